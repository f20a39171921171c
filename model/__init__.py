"""StellarByte model package. Importing it registers `stellarbyte` with transformers' Auto classes."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from model.attention import ByteAttention, repeat_kv
from model.config import ByteModelConfig
from model.decoder_layer import ByteDecoderLayer, ByteDropPath, ByteLayerScale
from model.mlp import ByteMLP
from model.modeling import ByteBaseModel, ByteModel, BytePreTrainedModel, build_attention_mask
from model.norm import ByteRMSNorm
from model.rope import ByteDynamicRoPE, apply_rotary_pos_emb, rotate_half

AutoConfig.register(ByteModelConfig.model_type, ByteModelConfig, exist_ok=True)
AutoModel.register(ByteModelConfig, ByteBaseModel, exist_ok=True)
AutoModelForCausalLM.register(ByteModelConfig, ByteModel, exist_ok=True)

__all__ = [
    "ByteAttention", "ByteBaseModel", "ByteDecoderLayer", "ByteDropPath", "ByteDynamicRoPE", "ByteLayerScale",
    "ByteMLP", "ByteModel", "ByteModelConfig", "BytePreTrainedModel", "ByteRMSNorm", "apply_rotary_pos_emb",
    "build_attention_mask", "repeat_kv", "rotate_half",
]
