"""One transformer block: pre-norm attention and MLP (or MoE), optional parallel residual, LayerScale and DropPath."""

import torch
from torch import nn
from transformers.cache_utils import Cache
from transformers.modeling_layers import GradientCheckpointingLayer

from .attention import ByteAttention
from .config import ByteModelConfig
from .mlp import ByteMLP
from .moe import ByteMoELayer
from .norm import ByteRMSNorm
from .rope import DynamicRoPEInputs


class ByteDropPath(nn.Module):
    """Stochastic depth (Huang et al., 2016): drop a residual branch for a whole sample while training."""

    def __init__(self, drop_prob: float):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep_prob = 1.0 - self.drop_prob
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep_prob)
        return x * keep / keep_prob

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class ByteLayerScale(nn.Module):
    """Learned per-channel scale of a residual branch (Touvron et al., 2021, CaiT), started small for deep stacks."""

    def __init__(self, hidden_size: int, init_value: float):
        super().__init__()
        self.init_value = init_value
        self.gamma = nn.Parameter(torch.full((hidden_size,), float(init_value)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class ByteDecoderLayer(GradientCheckpointingLayer):
    """Sequential (Llama): x + attn(norm(x)), then + mlp(norm(.)). Parallel (GPT-J): x + attn(norm1(x)) + mlp(norm2(x)).

    Checkpointing comes from transformers' `GradientCheckpointingLayer`, so `activation_checkpointing_enable()` works.
    """

    def __init__(self, config: ByteModelConfig, layer_idx: int, drop_path: float = 0.0):
        super().__init__()
        self.parallel_residual = config.parallel_residual
        self.self_attn = ByteAttention(config, layer_idx)
        self.mlp = ByteMoELayer(config) if config.is_moe_layer(layer_idx) else ByteMLP(config)
        self.input_layernorm = ByteRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = ByteRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        if config.layer_scale_init is not None:
            self.attn_layer_scale = ByteLayerScale(config.hidden_size, config.layer_scale_init)
            self.mlp_layer_scale = ByteLayerScale(config.hidden_size, config.layer_scale_init)
        else:
            self.attn_layer_scale = self.mlp_layer_scale = nn.Identity()
        self.drop_path = ByteDropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        dynamic_rope: DynamicRoPEInputs | None = None,
        **kwargs,
    ) -> torch.Tensor:
        attn_out = self.self_attn(self.input_layernorm(hidden_states), position_embeddings, attention_mask, cache,
                                  dynamic_rope, **kwargs)
        attn_out = self.drop_path(self.attn_layer_scale(attn_out))
        if self.parallel_residual:
            mlp_out = self.mlp(self.post_attention_layernorm(hidden_states))
            return hidden_states + attn_out + self.drop_path(self.mlp_layer_scale(mlp_out))
        hidden_states = hidden_states + attn_out
        mlp_out = self.mlp(self.post_attention_layernorm(hidden_states))
        return hidden_states + self.drop_path(self.mlp_layer_scale(mlp_out))
