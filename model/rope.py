"""Rotary position embeddings: default RoPE and Dynamic NTK scaling."""

import torch
from torch import nn

from model.config import ByteModelConfig


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary_pos_emb(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                         unsqueeze_dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q and k (batch, heads, seq, head_dim) by the angles whose cos/sin are (batch, seq, head_dim)."""
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


class ByteDynamicRoPE(nn.Module):
    """cos/sin tables for rotary embeddings.

    `rope_type="default"` is plain RoPE. `rope_type="dynamic"` is Dynamic NTK scaling: once a sequence grows past
    `max_position_embeddings`, the base is enlarged so the lowest frequencies still fit, and frequencies are reset
    once sequences are short again. The update rule, including that the enlarged base is kept while sequences
    stay long, mirrors transformers' `rope_type="dynamic"`, so both give the same numbers at every length.
    """

    def __init__(self, config: ByteModelConfig):
        super().__init__()
        rope = config.rope_parameters or {}
        self.rope_type = rope.get("rope_type", "default")
        self.base = float(rope.get("rope_theta", config.default_theta))
        self.factor = float(rope.get("factor", 1.0))
        self.dim = config.head_dim
        self.original_max_seq_len = config.max_position_embeddings
        self.max_seq_len_cached = config.max_position_embeddings
        self.register_buffer("inv_freq", self.compute_inv_freq(), persistent=False)

    def compute_inv_freq(self, seq_len: int | None = None, device: torch.device | None = None) -> torch.Tensor:
        base = self.base
        if seq_len is not None and seq_len > self.original_max_seq_len:
            scale = self.factor * seq_len / self.original_max_seq_len - (self.factor - 1)
            base = base * scale ** (self.dim / (self.dim - 2))
        exponents = torch.arange(0, self.dim, 2, dtype=torch.int64, device=device).float() / self.dim
        return 1.0 / (base ** exponents)

    def _update_dynamic(self, position_ids: torch.Tensor) -> None:
        seq_len = int(position_ids.max()) + 1
        if seq_len > self.max_seq_len_cached:
            self.inv_freq = self.compute_inv_freq(seq_len, self.inv_freq.device)
            self.max_seq_len_cached = seq_len
        elif seq_len < self.original_max_seq_len < self.max_seq_len_cached:
            self.inv_freq = self.compute_inv_freq(None, self.inv_freq.device)
            self.max_seq_len_cached = self.original_max_seq_len

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return cos, sin of shape (batch, seq, head_dim) in x's dtype for integer `position_ids` (batch, seq)."""
        if self.rope_type == "dynamic":
            self._update_dynamic(position_ids)
        freqs = position_ids[..., None].float() * self.inv_freq.float()
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)
