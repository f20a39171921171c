"""Rotary position embeddings: default RoPE and Dynamic NTK scaling."""

from dataclasses import dataclass

import torch
from torch import nn

from .config import ByteModelConfig


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int = 1) -> torch.Tensor:
    """Rotate x (batch, heads, seq, head_dim) by the angles whose cos/sin are (batch, seq, head_dim)."""
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return x * cos + rotate_half(x) * sin


def apply_rotary_pos_emb(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                         unsqueeze_dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q and k (batch, heads, seq, head_dim) by the angles whose cos/sin are (batch, seq, head_dim)."""
    return rotate(q, cos, sin, unsqueeze_dim), rotate(k, cos, sin, unsqueeze_dim)


class ByteDynamicRoPE(nn.Module):
    """cos/sin tables for rotary embeddings.

    `rope_type="default"` is plain RoPE. `rope_type="dynamic"` is Dynamic NTK scaling, applied causally: the
    query at position p uses the frequencies of a sequence of p + 1 tokens, plain RoPE's up to
    `max_position_embeddings`, beyond it a base enlarged so that the lowest frequencies still fit. Its keys are
    rotated with those same frequencies, so the model keeps keys un-rotated in the KV cache and rotates them per
    query (`ByteAttention`). A token's output then never depends on tokens after it, and decoding token by token
    gives exactly the logits of a full forward pass at every length. (transformers scales every position of a
    forward pass for the whole sequence's length, so the same prefix gives different outputs at different lengths
    and its cached decoding does not match its own forward pass past `max_position_embeddings`.)
    """

    def __init__(self, config: ByteModelConfig):
        super().__init__()
        rope = config.rope_parameters or {}
        self.rope_type = rope.get("rope_type", "default")
        self.base = float(rope.get("rope_theta", config.default_theta))
        self.factor = float(rope.get("factor", 1.0))
        self.dim = config.head_dim
        self.original_max_seq_len = config.max_position_embeddings
        self.register_buffer("inv_freq", self.compute_inv_freq(), persistent=False)

    def compute_inv_freq(self, seq_len: torch.Tensor | None = None,
                         device: torch.device | None = None) -> torch.Tensor:
        """Inverse frequencies (head_dim / 2,) of plain RoPE, or with `seq_len` (a tensor of any shape) those of
        Dynamic NTK for sequences of that many tokens, shaped (*seq_len.shape, head_dim / 2)."""
        exponents = torch.arange(0, self.dim, 2, dtype=torch.int64, device=device).float() / self.dim
        if seq_len is None:
            return 1.0 / (self.base ** exponents)
        length = seq_len.to(device=exponents.device, dtype=torch.float64).clamp(min=self.original_max_seq_len)
        scale = self.factor * length / self.original_max_seq_len - (self.factor - 1)
        base = (self.base * scale ** (self.dim / (self.dim - 2)))[..., None]
        return (1.0 / (base ** exponents.double())).float()

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor,
                seq_len: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Return cos, sin of shape (batch, seq, head_dim) in x's dtype for integer `position_ids` (batch, seq):
        plain RoPE, or with `seq_len` (batch,) the Dynamic NTK frequencies of that length for each row."""
        inv_freq = self.inv_freq.float()[None] if seq_len is None else self.compute_inv_freq(seq_len, x.device)
        freqs = position_ids[..., None].float() * inv_freq[:, None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


@dataclass
class DynamicRoPEInputs:
    """What attention needs to apply Dynamic NTK causally: the rotary module, every query's and key's position
    (batch, q) and (batch, kv), the plain RoPE tables of the keys (for queries within the trained length) and the
    first query column where some row is past it (q when none is)."""

    rope: ByteDynamicRoPE
    position_ids: torch.Tensor
    key_positions: torch.Tensor
    key_embeddings: tuple[torch.Tensor, torch.Tensor]
    first_long: int

    @classmethod
    def build(cls, rope: ByteDynamicRoPE, x: torch.Tensor, position_ids: torch.Tensor,
              key_positions: torch.Tensor) -> "DynamicRoPEInputs":
        long_columns = (position_ids >= rope.original_max_seq_len).any(dim=0)
        first_long = int(long_columns.int().argmax()) if bool(long_columns.any()) else position_ids.shape[1]
        return cls(rope, position_ids, key_positions, rope(x, key_positions), first_long)
