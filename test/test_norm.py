"""ByteRMSNorm against transformers' LlamaRMSNorm."""

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from helpers import ATOL
from model import ByteRMSNorm

HIDDEN = 64


def make_pair(eps: float = 1e-6, dtype: torch.dtype = torch.float32):
    torch.manual_seed(0)
    byte = ByteRMSNorm(HIDDEN, eps=eps)
    with torch.no_grad():
        byte.weight.copy_(1.0 + 0.5 * torch.randn(HIDDEN))
    llama = LlamaRMSNorm(HIDDEN, eps=eps)
    llama.load_state_dict(byte.state_dict(), strict=True)
    return byte.to(dtype), llama.to(dtype)


def test_state_dict_matches_llama():
    byte, llama = make_pair()
    assert list(byte.state_dict()) == list(llama.state_dict()) == ["weight"]
    assert byte.variance_epsilon == 1e-6


@pytest.mark.parametrize("eps", [1e-6, 1e-5, 1e-1])
def test_forward_and_gradients_match_llama_fp32(eps):
    byte, llama = make_pair(eps)
    torch.manual_seed(1)
    x = 3.0 * torch.randn(2, 7, HIDDEN) + 0.5
    upstream = torch.randn(2, 7, HIDDEN)
    x_byte = x.clone().requires_grad_(True)
    x_llama = x.clone().requires_grad_(True)

    out_byte, out_llama = byte(x_byte), llama(x_llama)
    assert out_byte.dtype == torch.float32
    torch.testing.assert_close(out_byte, out_llama, atol=ATOL, rtol=0)
    (out_byte * upstream).sum().backward()
    (out_llama * upstream).sum().backward()
    torch.testing.assert_close(x_byte.grad, x_llama.grad, atol=ATOL, rtol=0)
    torch.testing.assert_close(byte.weight.grad, llama.weight.grad, atol=ATOL, rtol=0)


def test_output_has_unit_rms_before_scaling():
    norm = ByteRMSNorm(HIDDEN, eps=1e-12)
    x = torch.randn(3, 5, HIDDEN) * 10
    out = norm(x)
    torch.testing.assert_close(out.pow(2).mean(-1), torch.ones(3, 5), atol=ATOL, rtol=0)


def test_eps_is_used():
    small, _ = make_pair(1e-6)
    large, llama_large = make_pair(1.0)
    x = 1e-2 * torch.randn(4, HIDDEN)  # mean square ~1e-4: eps=1 dominates
    assert (small(x) - large(x)).abs().max() > 0.1
    torch.testing.assert_close(large(x), llama_large(x), atol=ATOL, rtol=0)


def test_bf16_input_returns_bf16_close_to_llama():
    byte, llama = make_pair(dtype=torch.bfloat16)
    torch.manual_seed(2)
    x = (2.0 * torch.randn(2, 9, HIDDEN)).to(torch.bfloat16)
    out_byte, out_llama = byte(x), llama(x)
    assert out_byte.dtype == torch.bfloat16
    torch.testing.assert_close(out_byte.float(), out_llama.float(), atol=1e-2, rtol=1e-2)
    # And close to the fp32 computation too (the statistics are computed in fp32).
    reference, _ = make_pair()
    torch.testing.assert_close(out_byte.float(), reference(x.float()), atol=5e-2, rtol=2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_output_dtype_equals_input_dtype(dtype):
    byte, llama = make_pair(dtype=dtype)
    x = torch.randn(3, HIDDEN).to(dtype)
    out = byte(x)
    assert out.dtype == dtype == llama(x).dtype
    assert out.shape == x.shape
