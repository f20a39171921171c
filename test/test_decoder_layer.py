"""ByteDecoderLayer against transformers' LlamaDecoderLayer, plus parallel residual, LayerScale and DropPath."""

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

from helpers import ATOL, GRAD_TOL, additive_mask, causal_bool_mask, llama_config_from, randomize_, tiny_config
from model import ByteBaseModel, ByteDecoderLayer, ByteDropPath, ByteLayerScale, ByteModel

SEQ = 10


def make_layer(drop_path: float = 0.0, **overrides):
    torch.manual_seed(0)
    config = tiny_config(**overrides)
    layer = randomize_(ByteDecoderLayer(config, layer_idx=0, drop_path=drop_path)).eval()
    return config, layer


def inputs(config, batch: int = 2):
    torch.manual_seed(1)
    x = torch.randn(batch, SEQ, config.hidden_size)
    rope = LlamaRotaryEmbedding(llama_config_from(config))
    return x, rope(x, torch.arange(SEQ)[None].expand(batch, SEQ))


def branches(layer, x, pe):
    """attn(ln1(x)) and a function computing mlp(ln2(h)) for any h, with the layer's own submodules."""
    attn = layer.self_attn(layer.input_layernorm(x), pe)
    return attn, lambda h: layer.mlp(layer.post_attention_layernorm(h))


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_default_layer_matches_llama(impl):
    config, byte = make_layer()
    llama = LlamaDecoderLayer(llama_config_from(config, impl), layer_idx=0).eval()
    llama.load_state_dict(byte.state_dict(), strict=True)
    x, pe = inputs(config)
    x_byte, x_llama = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    out_byte = byte(x_byte, pe)
    out_llama = llama(x_llama, attention_mask=additive_mask(causal_bool_mask(SEQ, batch=2)), position_embeddings=pe)
    torch.testing.assert_close(out_byte, out_llama, atol=ATOL, rtol=0)

    upstream = torch.randn_like(out_byte)
    (out_byte * upstream).sum().backward()
    (out_llama * upstream).sum().backward()
    torch.testing.assert_close(x_byte.grad, x_llama.grad, **GRAD_TOL)
    llama_params = dict(llama.named_parameters())
    for name, param in byte.named_parameters():
        torch.testing.assert_close(param.grad, llama_params[name].grad, **GRAD_TOL, msg=name)


def test_default_layer_has_exactly_llamas_parameter_names():
    config, byte = make_layer()
    llama = LlamaDecoderLayer(llama_config_from(config), layer_idx=0)
    assert list(byte.state_dict()) == list(llama.state_dict())
    assert [n for n, _ in byte.named_parameters()] == [n for n, _ in llama.named_parameters()]
    assert isinstance(byte.drop_path, torch.nn.Identity)
    assert isinstance(byte.attn_layer_scale, torch.nn.Identity)


def test_sequential_residual_hand_computed():
    config, layer = make_layer()
    x, pe = inputs(config)
    attn, mlp = branches(layer, x, pe)
    h = x + attn
    torch.testing.assert_close(layer(x, pe), h + mlp(h), atol=ATOL, rtol=0)


def test_parallel_residual_hand_computed():
    config, layer = make_layer(parallel_residual=True)
    x, pe = inputs(config)
    attn, mlp = branches(layer, x, pe)
    out = layer(x, pe)
    torch.testing.assert_close(out, x + attn + mlp(x), atol=ATOL, rtol=0)
    # And it is genuinely different from the sequential block with the same weights.
    sequential = ByteDecoderLayer(tiny_config(), layer_idx=0).eval()
    sequential.load_state_dict(layer.state_dict(), strict=True)
    assert (sequential(x, pe) - out).abs().max() > 1e-3


def test_parallel_residual_keeps_llama_parameter_names():
    config, layer = make_layer(parallel_residual=True)
    assert list(layer.state_dict()) == list(LlamaDecoderLayer(llama_config_from(config), 0).state_dict())


@pytest.mark.parametrize("parallel", [False, True])
def test_layer_scale_parameters_and_branch_scaling(parallel):
    config, layer = make_layer(layer_scale_init=1e-4, parallel_residual=parallel)
    names = {n for n, _ in layer.named_parameters()}
    assert {"attn_layer_scale.gamma", "mlp_layer_scale.gamma"} <= names
    assert isinstance(layer.attn_layer_scale, ByteLayerScale)
    fresh = ByteDecoderLayer(config, layer_idx=0)  # randomize_ overwrote `layer`'s gammas: check the init here
    for gamma in (fresh.attn_layer_scale.gamma, fresh.mlp_layer_scale.gamma):
        assert gamma.shape == (64,) and torch.all(gamma == 1e-4)

    x, pe = inputs(config)
    attn, mlp = branches(layer, x, pe)
    g_attn, g_mlp = layer.attn_layer_scale.gamma, layer.mlp_layer_scale.gamma
    if parallel:
        expected = x + g_attn * attn + g_mlp * mlp(x)
    else:
        h = x + g_attn * attn
        expected = h + g_mlp * mlp(h)
    torch.testing.assert_close(layer(x, pe), expected, atol=ATOL, rtol=0)


def test_small_layer_scale_keeps_block_near_identity_and_gamma_one_is_default():
    config, layer = make_layer(layer_scale_init=1e-4)
    x, pe = inputs(config)
    with torch.no_grad():
        layer.attn_layer_scale.gamma.fill_(1e-4)
        layer.mlp_layer_scale.gamma.fill_(1e-4)
        assert (layer(x, pe) - x).abs().max() < 1e-3
        layer.attn_layer_scale.gamma.fill_(1.0)
        layer.mlp_layer_scale.gamma.fill_(1.0)
    plain = ByteDecoderLayer(tiny_config(), layer_idx=0).eval()
    plain.load_state_dict({k: v for k, v in layer.state_dict().items() if "layer_scale" not in k}, strict=True)
    torch.testing.assert_close(layer(x, pe), plain(x, pe), atol=ATOL, rtol=0)


def test_layer_scale_init_survives_model_post_init():
    torch.manual_seed(0)
    model = ByteModel(tiny_config(layer_scale_init=1e-4))
    gammas = {n: p for n, p in model.named_parameters() if n.endswith("layer_scale.gamma")}
    assert len(gammas) == 2 * model.config.num_hidden_layers
    assert "model.layers.0.attn_layer_scale.gamma" in gammas and "model.layers.1.mlp_layer_scale.gamma" in gammas
    for name, gamma in gammas.items():
        assert torch.all(gamma == 1e-4), name


# ------------------------------------------------------------------------------------------------------- DropPath
def test_drop_path_identity_in_eval_and_when_zero():
    x = torch.randn(4, 3, 8)
    drop = ByteDropPath(0.5).eval()
    assert torch.equal(drop(x), x)
    assert torch.equal(ByteDropPath(0.0).train()(x), x)


def test_drop_path_per_sample_and_unbiased_in_train():
    torch.manual_seed(0)
    drop = ByteDropPath(0.25).train()
    x = torch.randn(4000, 3, 5).abs() + 0.5
    out = drop(x)
    # Every sample is either dropped entirely or scaled by exactly 1 / keep_prob.
    dropped = (out == 0).flatten(1)
    assert torch.all(dropped == dropped[:, :1])
    dropped = dropped[:, 0]
    torch.testing.assert_close(out[~dropped], x[~dropped] / 0.75, atol=1e-6, rtol=1e-6)
    values = (out / x).flatten(1).mean(1)
    assert abs(dropped.float().mean().item() - 0.25) < 0.03
    # Unbiased: the expected output equals the input.
    assert abs(values.mean().item() - 1.0) < 0.05
    # Stochastic: another call draws another pattern.
    assert not torch.equal(drop(x) == 0, dropped[:, None, None].expand_as(x))


def test_layer_drop_path_identity_in_eval():
    config, layer = make_layer(drop_path=0.5)
    assert isinstance(layer.drop_path, ByteDropPath)
    plain = ByteDecoderLayer(config, layer_idx=0).eval()
    plain.load_state_dict(layer.state_dict(), strict=True)
    x, pe = inputs(config)
    torch.testing.assert_close(layer(x, pe), plain(x, pe), atol=0, rtol=0)


def test_layer_drop_path_in_train_drops_or_rescales_each_branch_per_sample():
    config, layer = make_layer(drop_path=0.5)
    x, pe = inputs(config, batch=16)
    attn, mlp = branches(layer, x, pe)
    layer.train()
    torch.manual_seed(123)
    out = layer(x, pe)
    keep = 0.5
    seen = set()
    for i in range(x.shape[0]):
        matches = []
        for a in (0.0, 1 / keep):
            h = x[i:i + 1] + a * attn[i:i + 1]
            for m in (0.0, 1 / keep):
                if torch.allclose(out[i:i + 1], h + m * mlp(h), atol=ATOL, rtol=0):
                    matches.append((a, m))
        assert len(matches) == 1, (i, matches)
        seen.add(matches[0])
    assert len(seen) >= 3  # a seeded batch of 16 shows several of the four drop patterns
    torch.manual_seed(124)
    assert (layer(x, pe) - out).abs().max() > 1e-3


def test_model_drop_path_schedule_is_linear_over_depth():
    model = ByteBaseModel(tiny_config(num_hidden_layers=3, drop_path_rate=0.2))
    assert isinstance(model.layers[0].drop_path, torch.nn.Identity)
    assert model.layers[1].drop_path.drop_prob == pytest.approx(0.1)
    assert model.layers[2].drop_path.drop_prob == pytest.approx(0.2)
