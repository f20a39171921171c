"""ByteDynamicRoPE and apply_rotary_pos_emb against transformers' LlamaRotaryEmbedding / apply_rotary_pos_emb."""

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as llama_apply_rotary_pos_emb
from transformers.models.llama.modeling_llama import rotate_half as llama_rotate_half

from helpers import ATOL, llama_config_from, tiny_config
from model import ByteDynamicRoPE, apply_rotary_pos_emb, rotate_half

DYNAMIC = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}


def positions(length: int, batch: int = 1, start: int = 0) -> torch.Tensor:
    return torch.arange(start, start + length)[None].expand(batch, length)


def assert_same_tables(byte_rope, llama_rope, position_ids, x=None):
    x = torch.zeros(1) if x is None else x
    cos_b, sin_b = byte_rope(x, position_ids)
    cos_l, sin_l = llama_rope(x, position_ids)
    assert cos_b.shape == cos_l.shape == (*position_ids.shape, byte_rope.dim)
    torch.testing.assert_close(cos_b, cos_l, atol=ATOL, rtol=0)
    torch.testing.assert_close(sin_b, sin_l, atol=ATOL, rtol=0)
    return cos_b, sin_b


@pytest.mark.parametrize("theta", [10000.0, 500000.0])
@pytest.mark.parametrize("head_dim", [16, 32])
def test_default_rope_matches_llama(theta, head_dim):
    config = tiny_config(rope_theta=theta, head_dim=head_dim)
    byte_rope, llama_rope = ByteDynamicRoPE(config), LlamaRotaryEmbedding(llama_config_from(config))
    torch.testing.assert_close(byte_rope.inv_freq, llama_rope.inv_freq, atol=0, rtol=1e-6)
    assert_same_tables(byte_rope, llama_rope, positions(64, batch=2))
    # Arbitrary, unsorted, per-row positions, including ones beyond max_position_embeddings.
    torch.manual_seed(0)
    assert_same_tables(byte_rope, llama_rope, torch.randint(0, 300, (3, 11)))


def test_default_rope_is_static_beyond_max_positions():
    config = tiny_config()
    rope = ByteDynamicRoPE(config)
    inv_freq = rope.inv_freq.clone()
    cos, _ = rope(torch.zeros(1), positions(200))
    assert torch.equal(rope.inv_freq, inv_freq)
    angles = torch.arange(200).float()[:, None] * inv_freq
    torch.testing.assert_close(cos[0], torch.cat([angles, angles], dim=-1).cos(), atol=ATOL, rtol=0)


def test_rope_output_dtype_follows_x():
    rope = ByteDynamicRoPE(tiny_config())
    cos, sin = rope(torch.zeros(1, dtype=torch.bfloat16), positions(8))
    assert cos.dtype == sin.dtype == torch.bfloat16
    cos32, _ = rope(torch.zeros(1), positions(8))
    torch.testing.assert_close(cos.float(), cos32, atol=1e-2, rtol=0)


def test_rope_table_values():
    rope = ByteDynamicRoPE(tiny_config())  # head_dim 16, theta 1e4
    cos, sin = rope(torch.zeros(1), positions(5))
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, 16, 2).double() / 16)
    angles = torch.arange(5).double()[:, None] * inv_freq
    expected = torch.cat([angles, angles], dim=-1)
    torch.testing.assert_close(cos[0].double(), expected.cos(), atol=ATOL, rtol=0)
    torch.testing.assert_close(sin[0].double(), expected.sin(), atol=ATOL, rtol=0)


def test_dynamic_rope_tables_for_a_length_match_a_fresh_llama():
    config = tiny_config(rope_parameters=dict(DYNAMIC))
    rope, default_rope = ByteDynamicRoPE(config), ByteDynamicRoPE(tiny_config())
    for length in (32, 64, 150, 100, 20):
        # transformers keeps an enlarged base across calls, so each length is compared with a fresh module.
        llama_rope = LlamaRotaryEmbedding(llama_config_from(config))
        ours = rope(torch.zeros(1), positions(length, batch=2), seq_len=torch.tensor([length, length]))
        theirs = llama_rope(torch.zeros(1), positions(length, batch=2))
        torch.testing.assert_close(ours[0], theirs[0], atol=ATOL, rtol=0)
        torch.testing.assert_close(ours[1], theirs[1], atol=ATOL, rtol=0)
        # Within the trained length dynamic RoPE is plain RoPE; beyond it the base is enlarged.
        plain = default_rope(torch.zeros(1), positions(length, batch=2))[0]
        assert ((ours[0] - plain).abs().max() > 1e-2) == (length > 64), length
    # Without a length, the tables are plain RoPE's at any position.
    torch.testing.assert_close(rope(torch.zeros(1), positions(150))[0], default_rope(torch.zeros(1), positions(150))[0],
                               atol=0, rtol=0)


def test_dynamic_rope_lengths_per_row():
    rope = ByteDynamicRoPE(tiny_config(rope_parameters=dict(DYNAMIC)))
    both = rope(torch.zeros(1), positions(10, batch=2), seq_len=torch.tensor([50, 120]))[0]
    for row, length in enumerate((50, 120)):
        alone = rope(torch.zeros(1), positions(10), seq_len=torch.tensor([length]))[0]
        torch.testing.assert_close(both[row:row + 1], alone, atol=0, rtol=0)
    assert (both[0] - both[1]).abs().max() > 1e-3


def test_dynamic_rope_scaled_base_formula():
    config = tiny_config(rope_parameters=dict(DYNAMIC))
    rope = ByteDynamicRoPE(config)
    dim, base = config.head_dim, 10000.0 * (2.0 * 128 / 64 - 1.0) ** (16 / 14)
    expected = 1.0 / base ** (torch.arange(0, dim, 2).double() / dim)
    torch.testing.assert_close(rope.compute_inv_freq(torch.tensor(128)).double(), expected, atol=0, rtol=1e-6)
    torch.testing.assert_close(rope.compute_inv_freq(torch.tensor(64)), rope.inv_freq, atol=0, rtol=1e-6)


def test_dynamic_rope_matches_llama_for_decode_steps():
    # Decoding one position at a time, transformers scales for position + 1 tokens, as the causal rule does.
    config = tiny_config(rope_parameters=dict(DYNAMIC))
    rope, llama_rope = ByteDynamicRoPE(config), LlamaRotaryEmbedding(llama_config_from(config))
    for step in range(60, 70):  # across the boundary
        ours = rope(torch.zeros(1), positions(1, start=step), seq_len=torch.tensor([step + 1]))
        theirs = llama_rope(torch.zeros(1), positions(1, start=step))
        torch.testing.assert_close(ours[0], theirs[0], atol=ATOL, rtol=0)
        torch.testing.assert_close(ours[1], theirs[1], atol=ATOL, rtol=0)


def test_rotate_half_matches_llama():
    x = torch.randn(2, 3, 5, 16)
    assert torch.equal(rotate_half(x), llama_rotate_half(x))


def test_apply_rotary_pos_emb_matches_llama():
    torch.manual_seed(0)
    config = tiny_config()
    rope = ByteDynamicRoPE(config)
    q, k = torch.randn(2, 4, 9, 16), torch.randn(2, 2, 9, 16)
    cos, sin = rope(q, torch.randint(0, 64, (2, 9)))
    q_b, k_b = apply_rotary_pos_emb(q, k, cos, sin)
    q_l, k_l = llama_apply_rotary_pos_emb(q, k, cos, sin)
    torch.testing.assert_close(q_b, q_l, atol=ATOL, rtol=0)
    torch.testing.assert_close(k_b, k_l, atol=ATOL, rtol=0)
    # unsqueeze_dim=2 for (batch, seq, heads, dim) layouts.
    q_b2, k_b2 = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin, unsqueeze_dim=2)
    torch.testing.assert_close(q_b2.transpose(1, 2), q_b, atol=ATOL, rtol=0)
    torch.testing.assert_close(k_b2.transpose(1, 2), k_b, atol=ATOL, rtol=0)


def test_position_zero_is_identity():
    rope = ByteDynamicRoPE(tiny_config())
    q, k = torch.randn(1, 4, 1, 16), torch.randn(1, 2, 1, 16)
    cos, sin = rope(q, positions(1))
    q_r, k_r = apply_rotary_pos_emb(q, k, cos, sin)
    torch.testing.assert_close(q_r, q, atol=ATOL, rtol=0)
    torch.testing.assert_close(k_r, k, atol=ATOL, rtol=0)


def test_rotation_preserves_norms():
    torch.manual_seed(0)
    rope = ByteDynamicRoPE(tiny_config())
    q, k = torch.randn(2, 4, 30, 16), torch.randn(2, 2, 30, 16)
    cos, sin = rope(q, torch.randint(0, 1000, (2, 30)))
    q_r, k_r = apply_rotary_pos_emb(q, k, cos, sin)
    assert (q_r - q).abs().max() > 0.1  # it does rotate
    torch.testing.assert_close(q_r.norm(dim=-1), q.norm(dim=-1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k_r.norm(dim=-1), k.norm(dim=-1), atol=1e-5, rtol=1e-5)


def test_scores_depend_only_on_relative_position():
    torch.manual_seed(0)
    rope = ByteDynamicRoPE(tiny_config())
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(m, n):
        cos_m, sin_m = rope(q, torch.tensor([[m]]))
        cos_n, sin_n = rope(q, torch.tensor([[n]]))
        q_m, _ = apply_rotary_pos_emb(q, q, cos_m, sin_m)
        _, k_n = apply_rotary_pos_emb(k, k, cos_n, sin_n)
        return (q_m * k_n).sum()

    torch.testing.assert_close(score(7, 3), score(40, 36), atol=1e-5, rtol=0)
    torch.testing.assert_close(score(0, 5), score(20, 25), atol=1e-5, rtol=0)
    assert (score(7, 3) - score(7, 4)).abs() > 1e-4
