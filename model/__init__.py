"""StellarByte model package. Importing it registers `stellarbyte` with transformers' Auto classes."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from model.attention import ByteAttention, repeat_kv
from model.compat import CACHE_FIELD, enable_activation_checkpointing
from model.config import ByteModelConfig
from model.decoder_layer import ByteDecoderLayer, ByteDropPath, ByteLayerScale
from model.mlp import ByteMLP
from model.modeling import (ByteBaseModel, ByteModel, ByteMoeCausalLMOutputWithPast, BytePreTrainedModel,
                            build_attention_mask, count_targets)
from model.moe import (ByteExperts, ByteMoELayer, ByteRouter, RouterStats, grouped_linear, mixtral_state_dict,
                       moe_layers, update_expert_bias)
from model.norm import ByteRMSNorm
from model.rope import ByteDynamicRoPE, apply_rotary_pos_emb, rotate_half

AutoConfig.register(ByteModelConfig.model_type, ByteModelConfig, exist_ok=True)
AutoModel.register(ByteModelConfig, ByteBaseModel, exist_ok=True)
AutoModelForCausalLM.register(ByteModelConfig, ByteModel, exist_ok=True)

__all__ = [
    "CACHE_FIELD", "ByteAttention", "ByteBaseModel", "ByteDecoderLayer", "ByteDropPath", "ByteDynamicRoPE",
    "ByteExperts", "ByteLayerScale", "ByteMLP", "ByteModel", "ByteModelConfig", "ByteMoELayer",
    "ByteMoeCausalLMOutputWithPast", "BytePreTrainedModel", "ByteRMSNorm", "ByteRouter", "RouterStats",
    "apply_rotary_pos_emb", "build_attention_mask", "count_targets", "enable_activation_checkpointing", "grouped_linear",
    "mixtral_state_dict", "moe_layers", "repeat_kv", "rotate_half", "update_expert_bias",
]
