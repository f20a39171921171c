"""Grouped-query self-attention through transformers' attention interface (sdpa by default, eager, or any function
registered with `AttentionInterface`), so kernels, paged caches and continuous batching plug in as for Llama."""

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import Cache
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import eager_attention_forward

from .config import ByteModelConfig
from .rope import DynamicRoPEInputs, apply_rotary_pos_emb, rotate


def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(batch, kv_heads, seq, dim) -> (batch, kv_heads * n_rep, seq, dim), each kv head serving n_rep query heads."""
    if n_rep == 1:
        return hidden_states
    batch, kv_heads, seq_len, head_dim = hidden_states.shape
    expanded = hidden_states[:, :, None].expand(batch, kv_heads, n_rep, seq_len, head_dim)
    return expanded.reshape(batch, kv_heads * n_rep, seq_len, head_dim)


class ByteAttention(nn.Module):
    """Causal GQA attention. The KV cache is any transformers cache (DynamicCache, StaticCache, the paged cache of
    continuous batching), and the attention function is the one `config._attn_implementation` names."""

    def __init__(self, config: ByteModelConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.is_causal = True
        self.sliding_window = config.sliding_window if config.layer_types[layer_idx] == "sliding_attention" else None
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        self.scaling = self.head_dim ** -0.5
        self.attention_dropout = config.attention_dropout
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_key_value_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_key_value_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        dynamic_rope: DynamicRoPEInputs | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """`attention_mask` comes from transformers' masking utilities for the attention function in use (None for
        plain causal attention). `kwargs` reach the cache update and the attention function (a paged cache fills
        them in for its kernel). `dynamic_rope` (Dynamic NTK RoPE) keeps keys un-rotated in the cache and rotates
        them for each query with SDPA (see `ByteDynamicRoPE`)."""
        batch, q_len, _ = hidden_states.shape
        query = self.q_proj(hidden_states).view(batch, q_len, -1, self.head_dim).transpose(1, 2)
        key = self.k_proj(hidden_states).view(batch, q_len, -1, self.head_dim).transpose(1, 2)
        value = self.v_proj(hidden_states).view(batch, q_len, -1, self.head_dim).transpose(1, 2)
        cos, sin = position_embeddings
        dropout = self.attention_dropout if self.training else 0.0
        if dynamic_rope is None:
            query, key = apply_rotary_pos_emb(query, key, cos, sin)
            if cache is not None:
                key, value = cache.update(key, value, self.layer_idx, kwargs=kwargs)
        else:
            if cache is not None:
                key, value = cache.update(key, value, self.layer_idx)  # un-rotated
            if dynamic_rope.first_long < q_len:
                output = self.dynamic_rope_attention(query, key, value, cos, sin, attention_mask, dynamic_rope,
                                                     dropout)
                return self.o_proj(output.transpose(1, 2).reshape(batch, q_len, -1))
            query, key = rotate(query, cos, sin), rotate(key, *dynamic_rope.key_embeddings)
        # A module built outside a model has no implementation set: SDPA, the model's default.
        implementation = self.config._attn_implementation or "sdpa"
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)
        output, _ = attention(self, query, key, value, attention_mask, dropout=dropout, scaling=self.scaling,
                              sliding_window=self.sliding_window, **kwargs)
        return self.o_proj(output.reshape(batch, q_len, -1).contiguous())

    def dynamic_rope_attention(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cos: torch.Tensor,
                               sin: torch.Tensor, attention_mask: torch.Tensor | None, dynamic: DynamicRoPEInputs,
                               dropout: float) -> torch.Tensor:
        """Attention over un-rotated keys. Queries within the trained length (the leading columns where no row has
        passed it) share plain RoPE and run as one block; each later query column uses the frequencies of its own
        length, with all its keys rotated to match (one pass per column, as decoding does one token at a time)."""
        q_len, kv_len = query.shape[2], key.shape[2]
        if attention_mask is None:  # plain causal: the queries are the last q_len of the kv_len positions
            key_index = torch.arange(kv_len, device=query.device)
            query_index = torch.arange(kv_len - q_len, kv_len, device=query.device)
            attention_mask = (key_index[None, :] <= query_index[:, None])[None, None]
        key, value = repeat_kv(key, self.num_key_value_groups), repeat_kv(value, self.num_key_value_groups)
        first_long, outputs = dynamic.first_long, []
        if first_long > 0:
            outputs.append(F.scaled_dot_product_attention(
                rotate(query[:, :, :first_long], cos[:, :first_long], sin[:, :first_long]),
                rotate(key, *dynamic.key_embeddings), value, attn_mask=attention_mask[:, :, :first_long],
                dropout_p=dropout, scale=self.scaling))
        for column in range(first_long, q_len):
            positions = dynamic.position_ids[:, column]
            query_cos, query_sin = dynamic.rope(query, positions[:, None], seq_len=positions + 1)
            key_cos, key_sin = dynamic.rope(query, dynamic.key_positions, seq_len=positions + 1)
            outputs.append(F.scaled_dot_product_attention(
                rotate(query[:, :, column:column + 1], query_cos, query_sin), rotate(key, key_cos, key_sin), value,
                attn_mask=attention_mask[:, :, column:column + 1], dropout_p=dropout, scale=self.scaling))
        return torch.cat(outputs, dim=2)
