"""ByteAttention against transformers' LlamaAttention (eager and sdpa), given the same masks."""

import pytest
import torch
from transformers.cache_utils import DynamicCache
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding

from helpers import ATOL, GRAD_TOL, additive_mask, causal_bool_mask, llama_config_from, randomize_, tiny_config
from model import ByteAttention, check_attention_mask, repeat_kv

IMPLEMENTATIONS = ["eager", "sdpa"]
KV_HEADS = [pytest.param(2, id="gqa"), pytest.param(1, id="mqa"), pytest.param(4, id="mha")]


def make_pair(num_key_value_heads: int, attn_implementation: str, **overrides):
    torch.manual_seed(0)
    config = tiny_config(num_key_value_heads=num_key_value_heads, **overrides)
    config._attn_implementation = attn_implementation  # a standalone module reads it from its config
    byte = randomize_(ByteAttention(config, layer_idx=0)).eval()
    llama_config = llama_config_from(config, attn_implementation)
    llama = LlamaAttention(llama_config, layer_idx=0).eval()
    llama.load_state_dict(byte.state_dict(), strict=True)
    return config, byte, llama, LlamaRotaryEmbedding(llama_config)


def llama_forward(llama, x, position_embeddings, bool_mask, cache=None):
    """LlamaAttention with an explicit additive mask (eager attention applies no causality by itself)."""
    return llama(x, position_embeddings=position_embeddings, attention_mask=additive_mask(bool_mask),
                 past_key_values=cache)[0]


def as_mask(impl: str, bool_mask: torch.Tensor | None) -> torch.Tensor | None:
    """The mask type each attention function takes: sdpa a bool mask, eager an additive one (as the model's masking
    utilities make them)."""
    return bool_mask if impl == "sdpa" else additive_mask(bool_mask)


def padded_causal_mask(attention_mask: torch.Tensor | None, query_length: int, past_length: int,
                       kv_length: int) -> torch.Tensor:
    """Causality and a 2D padding mask as the (batch, 1, q, kv) bool mask the model hands its attention; a padding
    query attends to itself, so that no row is empty."""
    query_positions = torch.arange(past_length, past_length + query_length)[:, None]
    key_positions = torch.arange(kv_length)[None, :]
    mask = (key_positions <= query_positions)[None, None]
    if attention_mask is not None:
        mask = mask & attention_mask.bool()[:, None, None, :kv_length]
        mask = mask | (key_positions == query_positions)[None, None]
    return mask


def padded_batch(side: str, seq: int = 10):
    mask = torch.ones(3, seq, dtype=torch.long)
    if side == "right":
        mask[0, 7:] = 0
        mask[2, 4:] = 0
    else:
        mask[0, :3] = 0
        mask[2, :6] = 0
    # Positions count real tokens only, as generate does for left padding.
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    return mask, position_ids


def test_parameter_names_match_llama():
    _, byte, llama, _ = make_pair(2, "sdpa")
    assert list(byte.state_dict()) == list(llama.state_dict())
    assert byte.q_proj.weight.shape == (64, 64) and byte.k_proj.weight.shape == (32, 64)


def test_attention_bias():
    _, byte, llama, rope = make_pair(2, "eager", attention_bias=True)
    assert byte.q_proj.bias is not None and byte.o_proj.bias is not None
    x = torch.randn(2, 6, 64)
    pe = rope(x, torch.arange(6)[None].expand(2, 6))
    mask = causal_bool_mask(6, batch=2)
    torch.testing.assert_close(byte(x, pe, as_mask("eager", mask)), llama_forward(llama, x, pe, mask), atol=ATOL,
                               rtol=0)


@pytest.mark.parametrize("num_kv", KV_HEADS)
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_causal_without_mask_matches_llama(impl, num_kv):
    _, byte, llama, rope = make_pair(num_kv, impl)
    torch.manual_seed(1)
    x = torch.randn(2, 12, 64, requires_grad=True)
    pe = rope(x, torch.arange(12)[None].expand(2, 12))
    mask = None if impl == "sdpa" else as_mask(impl, causal_bool_mask(12, batch=2))  # eager: no causality itself
    out_byte = byte(x, pe, mask)
    out_llama = llama_forward(llama, x, pe, causal_bool_mask(12, batch=2))
    torch.testing.assert_close(out_byte, out_llama, atol=ATOL, rtol=0)
    # Causality: changing the last token does not change earlier outputs.
    x2 = x.detach().clone()
    x2[:, -1] += 1.0
    torch.testing.assert_close(byte(x2, pe, mask)[:, :-1], out_byte[:, :-1], atol=ATOL, rtol=0)
    assert (byte(x2, pe, mask)[:, -1] - out_byte[:, -1]).abs().max() > 1e-3
    # Gradients agree too.
    upstream = torch.randn_like(out_byte)
    gb = torch.autograd.grad((out_byte * upstream).sum(), [x, *byte.parameters()])
    gl = torch.autograd.grad((out_llama * upstream).sum(), [x, *llama.parameters()])
    for a, b in zip(gb, gl):
        torch.testing.assert_close(a, b, **GRAD_TOL)


@pytest.mark.parametrize("mask_kind", ["bool", "additive"])
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("num_kv", KV_HEADS)
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_padded_batch_matches_llama(impl, num_kv, side, mask_kind):
    _, byte, llama, rope = make_pair(num_kv, impl)
    mask2d, position_ids = padded_batch(side)
    torch.manual_seed(2)
    x = torch.randn(3, 10, 64)
    pe = rope(x, position_ids)
    bool_mask = padded_causal_mask(mask2d, query_length=10, past_length=0, kv_length=10)
    assert bool_mask.dtype == torch.bool and bool_mask.shape == (3, 1, 10, 10)
    byte_mask = bool_mask if mask_kind == "bool" and impl == "sdpa" else additive_mask(bool_mask)
    out_byte = byte(x, pe, attention_mask=byte_mask)
    out_llama = llama_forward(llama, x, pe, bool_mask)
    real = mask2d.bool()
    assert not torch.isnan(out_byte).any()
    torch.testing.assert_close(out_byte[real], out_llama[real], atol=ATOL, rtol=0)
    # Each real row equals that sequence run alone, unpadded.
    for row in range(3):
        alone = x[row:row + 1, real[row]]
        n = alone.shape[1]
        alone_out = byte(alone, rope(alone, torch.arange(n)[None]), as_mask(impl, causal_bool_mask(n)))
        torch.testing.assert_close(out_byte[row, real[row]], alone_out[0], atol=ATOL, rtol=0)


@pytest.mark.parametrize("num_kv", KV_HEADS)
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_dynamic_cache_decoding_matches_full_forward(impl, num_kv):
    _, byte, llama, rope = make_pair(num_kv, impl)
    torch.manual_seed(3)
    seq = 12
    x = torch.randn(2, seq, 64)
    full = byte(x, rope(x, torch.arange(seq)[None].expand(2, seq)), as_mask(impl, causal_bool_mask(seq, batch=2)))

    byte_cache, llama_cache = DynamicCache(), DynamicCache()
    outputs_byte, outputs_llama = [], []
    # Prefill 5 tokens, then a chunk of 3 (query > 1 with a non-empty cache), then one token at a time.
    for start, end in [(0, 5), (5, 8)] + [(i, i + 1) for i in range(8, seq)]:
        chunk = x[:, start:end]
        pe = rope(chunk, torch.arange(start, end)[None].expand(2, end - start))
        mask = padded_causal_mask(None, end - start, start, end)
        outputs_byte.append(byte(chunk, pe, attention_mask=as_mask(impl, mask), cache=byte_cache))
        outputs_llama.append(llama_forward(llama, chunk, pe, causal_bool_mask(end - start, start, batch=2),
                                           llama_cache))
        assert byte_cache.get_seq_length() == end
    incremental = torch.cat(outputs_byte, dim=1)
    torch.testing.assert_close(incremental, full, atol=ATOL, rtol=0)
    torch.testing.assert_close(incremental, torch.cat(outputs_llama, dim=1), atol=ATOL, rtol=0)
    torch.testing.assert_close(byte_cache.layers[0].keys, llama_cache.layers[0].keys, atol=ATOL, rtol=0)
    torch.testing.assert_close(byte_cache.layers[0].values, llama_cache.layers[0].values, atol=ATOL, rtol=0)


@pytest.mark.parametrize("num_kv", KV_HEADS)
def test_left_padded_cache_decoding_matches_full_forward(num_kv):
    _, byte, llama, rope = make_pair(num_kv, "eager")
    mask2d, position_ids = padded_batch("left", seq=10)
    torch.manual_seed(4)
    x = torch.randn(3, 10, 64)
    full = byte(x, rope(x, position_ids), attention_mask=as_mask("eager", padded_causal_mask(mask2d, 10, 0, 10)))
    cache = DynamicCache()
    steps = []
    for start, end in [(0, 6)] + [(i, i + 1) for i in range(6, 10)]:
        chunk = x[:, start:end]
        mask = padded_causal_mask(mask2d[:, :end], end - start, start, end)
        assert mask is not None and mask.shape == (3, 1, end - start, end)
        steps.append(byte(chunk, rope(chunk, position_ids[:, start:end]), attention_mask=as_mask("eager", mask),
                          cache=cache))
    real = mask2d.bool()
    torch.testing.assert_close(torch.cat(steps, dim=1)[real], full[real], atol=ATOL, rtol=0)
    llama_out = llama_forward(llama, x, rope(x, position_ids), padded_causal_mask(mask2d, 10, 0, 10))
    torch.testing.assert_close(full[real], llama_out[real], atol=ATOL, rtol=0)


def test_repeat_kv_matches_repeat_interleave():
    x = torch.randn(2, 3, 5, 8)
    torch.testing.assert_close(repeat_kv(x, 4), torch.repeat_interleave(x, 4, dim=1), atol=0, rtol=0)
    assert repeat_kv(x, 1) is x


def test_attention_dropout_only_in_training():
    _, byte, _, rope = make_pair(2, "sdpa", attention_dropout=0.5)
    x = torch.randn(1, 8, 64)
    pe = rope(x, torch.arange(8)[None])
    torch.testing.assert_close(byte(x, pe), byte(x, pe), atol=0, rtol=0)
    byte.train()
    torch.manual_seed(0)
    a = byte(x, pe)
    torch.manual_seed(1)
    b = byte(x, pe)
    assert (a - b).abs().max() > 1e-3


def test_a_mask_shorter_than_cache_and_input_is_refused():
    check_attention_mask(torch.ones(2, 4), past_length=3, query_length=1)
    with pytest.raises(ValueError, match=r"covers 3 positions.*hold 4"):
        check_attention_mask(torch.tensor([[0, 1, 1], [1, 1, 1]]), past_length=3, query_length=1)
