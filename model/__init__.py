"""StellarByte model package. Importing it registers `stellarbyte` with transformers' Auto classes.

Modules import each other relatively, and the config and model classes are registered for the Auto classes, so that
`save_pretrained` copies this code beside the weights with an `auto_map`: every saved folder then loads with
`AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` where this project is not installed."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .attention import ByteAttention, repeat_kv
from .compat import CACHE_FIELD, enable_activation_checkpointing
from .config import ByteModelConfig
from .decoder_layer import ByteDecoderLayer, ByteDropPath, ByteLayerScale
from .mlp import ByteMLP
from .modeling import (ByteBaseModel, ByteModel, ByteMoeCausalLMOutputWithPast, BytePreTrainedModel,
                       check_attention_mask, count_targets)
from .moe import (ByteExperts, ByteMoELayer, ByteRouter, RouterStats, grouped_linear, mixtral_state_dict,
                  moe_layers, update_expert_bias)
from .norm import ByteRMSNorm
from .rope import ByteDynamicRoPE, apply_rotary_pos_emb, rotate_half

AutoConfig.register(ByteModelConfig.model_type, ByteModelConfig, exist_ok=True)
AutoModel.register(ByteModelConfig, ByteBaseModel, exist_ok=True)
AutoModelForCausalLM.register(ByteModelConfig, ByteModel, exist_ok=True)
ByteModelConfig.register_for_auto_class("AutoConfig")
ByteBaseModel.register_for_auto_class("AutoModel")
ByteModel.register_for_auto_class("AutoModelForCausalLM")

__all__ = [
    "CACHE_FIELD", "ByteAttention", "ByteBaseModel", "ByteDecoderLayer", "ByteDropPath", "ByteDynamicRoPE",
    "ByteExperts", "ByteLayerScale", "ByteMLP", "ByteModel", "ByteModelConfig", "ByteMoELayer",
    "ByteMoeCausalLMOutputWithPast", "BytePreTrainedModel", "ByteRMSNorm", "ByteRouter", "RouterStats",
    "apply_rotary_pos_emb", "check_attention_mask", "count_targets", "enable_activation_checkpointing", "grouped_linear",
    "mixtral_state_dict", "moe_layers", "repeat_kv", "rotate_half", "update_expert_bias",
]
