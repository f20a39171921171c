"""RMSNorm (Zhang & Sennrich, 2019), as used by Llama."""

import torch
import torch.nn.functional as F
from torch import nn


class ByteRMSNorm(nn.Module):
    """Root-mean-square norm computed in fp32 (bf16/fp16 sums of squares lose too much precision), returned in the
    input dtype and then scaled, exactly like transformers' `LlamaRMSNorm`."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # F.rms_norm is one fused kernel (forward and backward) instead of five elementwise ops.
        normed = F.rms_norm(hidden_states.float(), (hidden_states.shape[-1],), eps=self.variance_epsilon)
        return self.weight * normed.to(hidden_states.dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"
