"""ByteMLP (SwiGLU) against transformers' LlamaMLP."""

import pytest
import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import LlamaMLP

from helpers import ATOL, GRAD_TOL, llama_config_from, randomize_, tiny_config
from model import ByteMLP


def make_pair(**overrides):
    torch.manual_seed(0)
    config = tiny_config(**overrides)
    byte = randomize_(ByteMLP(config))
    llama = LlamaMLP(llama_config_from(config))
    llama.load_state_dict(byte.state_dict(), strict=True)
    return config, byte, llama


def test_shapes_and_parameter_names():
    config, byte, llama = make_pair()
    assert list(byte.state_dict()) == list(llama.state_dict())
    assert byte.gate_proj.weight.shape == (config.intermediate_size, 64) == (192, 64)
    assert byte.down_proj.weight.shape == (64, 192)
    assert byte.gate_proj.bias is None
    assert ByteMLP(config, intermediate_size=40).up_proj.weight.shape == (40, 64)


@pytest.mark.parametrize("mlp_bias", [False, True])
def test_forward_and_gradients_match_llama(mlp_bias):
    _, byte, llama = make_pair(mlp_bias=mlp_bias)
    torch.manual_seed(1)
    x = torch.randn(3, 7, 64)
    upstream = torch.randn(3, 7, 64)
    x_byte, x_llama = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    out_byte, out_llama = byte(x_byte), llama(x_llama)
    torch.testing.assert_close(out_byte, out_llama, atol=ATOL, rtol=0)
    (out_byte * upstream).sum().backward()
    (out_llama * upstream).sum().backward()
    torch.testing.assert_close(x_byte.grad, x_llama.grad, **GRAD_TOL)
    llama_params = dict(llama.named_parameters())
    for name, param in byte.named_parameters():
        assert param.grad is not None, name
        torch.testing.assert_close(param.grad, llama_params[name].grad, **GRAD_TOL)


def test_is_swiglu():
    _, byte, _ = make_pair()
    x = torch.randn(5, 64)
    gate, up = x @ byte.gate_proj.weight.T, x @ byte.up_proj.weight.T
    expected = (gate * torch.sigmoid(gate) * up) @ byte.down_proj.weight.T
    torch.testing.assert_close(byte(x), expected, atol=ATOL, rtol=0)
    assert (byte(x) - byte.down_proj(F.gelu(byte.gate_proj(x)) * byte.up_proj(x))).abs().max() > 1e-4
