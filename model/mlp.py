"""SwiGLU feed-forward block (Shazeer, 2020)."""

import torch
import torch.nn.functional as F
from torch import nn

from .config import ByteModelConfig


class ByteMLP(nn.Module):
    def __init__(self, config: ByteModelConfig, intermediate_size: int | None = None):
        super().__init__()
        hidden, inner = config.hidden_size, intermediate_size or config.intermediate_size
        self.gate_proj = nn.Linear(hidden, inner, bias=config.mlp_bias)
        self.up_proj = nn.Linear(hidden, inner, bias=config.mlp_bias)
        self.down_proj = nn.Linear(inner, hidden, bias=config.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
