"""Differences between the torch and transformers versions this project supports, in one place. Each shim says
which version makes it unnecessary; delete it once requirements.txt no longer allows anything older."""

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

# transformers 5.24 renamed the cache argument and output field from `past_key_values` to `cache`. The model takes
# both names and fills whichever field the installed version's output classes have, so `generate` finds its cache.
# Can go once transformers >= 5.24 is required (then always "cache").
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"

# Grouped matmul became public as F.grouped_mm in torch 2.9; without it model/moe.py loops over experts.
# Can go once torch >= 2.9 is required.
GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def enable_activation_checkpointing(model: nn.Module) -> None:
    """transformers 5.2x calls it `activation_checkpointing_enable`, older versions `gradient_checkpointing_enable`
    (deprecated since, and gone in 6). Can go once a transformers with the new name is required."""
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()

# The seed project's config names, kept as aliases of the canonical fields (ByteModelConfig.attribute_map, which the
# YAML model section shares, with the seed's switch `moe_enabled`). Can go once no config written with them is used.
SEED_NAMES = {
    "model_dim": "hidden_size",
    "num_layers": "num_hidden_layers",
    "hidden_dim": "intermediate_size",
    "num_heads": "num_attention_heads",
    "num_kv_heads": "num_key_value_heads",
    "max_seq_len": "max_position_embeddings",
    "norm_eps": "rms_norm_eps",
    "moe_num_experts": "num_experts",
    "moe_k": "num_experts_per_tok",
}
