"""ByteMoELayer: grouped dispatch against a per-expert loop and transformers' MixtralSparseMoeBlock, the fallback
matmul, capacity dropping, balancing losses, the routing bias, and MoE inside ByteModel (caching, generation, losses,
initialisation, serialisation, autocast, gradient checkpointing)."""

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM, MixtralConfig
from transformers.cache_utils import DynamicCache
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

import model.moe
from helpers import ATOL, GRAD_TOL, randomize_, tiny_config
from model import (CACHE_FIELD, ByteMLP, ByteModel, ByteModelConfig, ByteMoELayer, ByteMoeCausalLMOutputWithPast,
                   grouped_linear, moe_layers, update_expert_bias)
from model.moe import reference_moe_forward

HIDDEN, INNER, EXPERTS = 32, 16, 4
VOCAB = 128
GEN = dict(do_sample=False, max_new_tokens=8, eos_token_id=None, pad_token_id=0)


def moe_config(**overrides) -> ByteModelConfig:
    kwargs = dict(hidden_size=HIDDEN, num_experts=EXPERTS, num_experts_per_tok=2, moe_intermediate_size=INNER)
    kwargs.update(overrides)
    return tiny_config(**kwargs)


def make_layer(router_std: float = 1.0, seed: int = 0, **overrides) -> ByteMoELayer:
    """A layer with random weights; the router's are large enough that tokens clearly prefer some experts."""
    torch.manual_seed(seed)
    layer = randomize_(ByteMoELayer(moe_config(**overrides)), std=0.2).eval()
    with torch.no_grad():
        layer.gate.weight.normal_(0.0, router_std)
    return layer


def random_states(tokens: int = 12, seed: int = 1, hidden: int = HIDDEN) -> torch.Tensor:
    return torch.randn(2, tokens // 2, hidden, generator=torch.Generator().manual_seed(seed))


def expert_swiglu(layer: ByteMoELayer, expert: int, x: torch.Tensor) -> torch.Tensor:
    gate, up = (x @ layer.experts.gate_up_proj[expert].T).chunk(2, dim=-1)
    return (F.silu(gate) * up) @ layer.experts.down_proj[expert].T


def forward_and_grads(layer: ByteMoELayer, x: torch.Tensor, upstream: torch.Tensor, forward=None):
    """Output, input gradient and parameter gradients of (forward(layer, x) * upstream).sum()."""
    layer.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    out = forward(layer, x) if forward is not None else layer(x)
    (out * upstream).sum().backward()
    return out.detach(), x.grad, {name: p.grad.clone() for name, p in layer.named_parameters() if p.grad is not None}


def assert_max_diff(actual: torch.Tensor, expected: torch.Tensor, tol: float = ATOL, msg: str = "") -> None:
    diff = (actual - expected).abs().max().item()
    assert diff < tol, f"{msg} max abs diff {diff:.3g} >= {tol}"


def spy_on_grouped_mm(monkeypatch) -> list:
    """Count calls of the grouped matmul kernel (this PyTorch has one)."""
    kernel, calls = model.moe.GROUPED_MM, []
    assert kernel is not None
    monkeypatch.setattr(model.moe, "GROUPED_MM", lambda *args, **kwargs: calls.append(1) or kernel(*args, **kwargs))
    return calls


def coefficient_of_variation(counts: torch.Tensor) -> float:
    counts = counts.float()
    return (counts.std(unbiased=False) / counts.mean()).item()


# ------------------------------------------------------------------------------- grouped dispatch vs reference
@pytest.mark.parametrize("shared", [0, 1])
@pytest.mark.parametrize("norm_topk_prob", [True, False])
@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("scoring_func", ["softmax", "sigmoid"])
def test_grouped_dispatch_matches_reference_forward_and_gradients(scoring_func, top_k, norm_topk_prob, shared,
                                                                  monkeypatch):
    layer = make_layer(scoring_func=scoring_func, num_experts_per_tok=top_k, norm_topk_prob=norm_topk_prob,
                       num_shared_experts=shared)
    calls = spy_on_grouped_mm(monkeypatch)
    x = random_states()
    upstream = torch.randn_like(x)

    out, x_grad, grads = forward_and_grads(layer, x, upstream)
    assert len(calls) == 2  # the grouped kernel ran (gate_up and down), not the per-expert fallback
    ref_out, ref_x_grad, ref_grads = forward_and_grads(layer, x, upstream, reference_moe_forward)

    # Routing is far from uniform, and several experts receive tokens.
    _, scores, _, indices = layer.gate(x.reshape(-1, HIDDEN))
    assert (scores.max(-1).values - scores.min(-1).values).mean() > 0.3
    assert torch.bincount(indices.flatten(), minlength=EXPERTS).count_nonzero() >= 3

    assert out.abs().max() > 0.1
    assert_max_diff(out, ref_out, msg="output")
    assert_max_diff(x_grad, ref_x_grad, msg="input grad")
    expected_names = {"gate.weight", "experts.gate_up_proj", "experts.down_proj"}
    if shared:
        expected_names |= {f"shared_experts.{name}.weight" for name in ("gate_proj", "up_proj", "down_proj")}
    assert set(grads) == set(ref_grads) == expected_names
    for name in expected_names:
        assert_max_diff(grads[name], ref_grads[name], msg=name)
    assert grads["experts.gate_up_proj"].abs().max() > 1e-3 and grads["experts.down_proj"].abs().max() > 1e-3
    if not (norm_topk_prob and top_k == 1):  # a single renormalised weight is always 1: no router gradient then
        assert grads["gate.weight"].abs().max() > 1e-3


@pytest.mark.parametrize("norm_topk_prob", [True, False])
@pytest.mark.parametrize("scoring_func", ["softmax", "sigmoid"])
def test_router_scores_choices_and_weights(scoring_func, norm_topk_prob):
    layer = make_layer(scoring_func=scoring_func, norm_topk_prob=norm_topk_prob)
    x = random_states().reshape(-1, HIDDEN)
    logits, scores, weights, indices = layer.gate(x)
    expected_logits = x @ layer.gate.weight.T
    expected_scores = expected_logits.softmax(-1) if scoring_func == "softmax" else expected_logits.sigmoid()
    assert_max_diff(logits, expected_logits)
    assert_max_diff(scores, expected_scores)
    top = expected_scores.topk(2, dim=-1)
    assert torch.equal(indices, top.indices)
    expected_weights = top.values / top.values.sum(-1, keepdim=True) if norm_topk_prob else top.values
    assert_max_diff(weights, expected_weights)
    off_one = (weights.sum(-1) - 1).abs().max()
    assert off_one < 1e-6 if norm_topk_prob else off_one > 0.05


def test_expert_bias_is_a_persistent_buffer_not_a_parameter():
    layer = make_layer()
    assert "gate.expert_bias" in layer.state_dict()
    assert "gate.expert_bias" not in dict(layer.named_parameters())
    assert layer.experts.gate_up_proj.shape == (EXPERTS, 2 * INNER, HIDDEN)
    assert layer.experts.down_proj.shape == (EXPERTS, HIDDEN, INNER)
    assert layer.gate.weight.shape == (EXPERTS, HIDDEN)


# ------------------------------------------------------------------------------------------ transformers' Mixtral
@pytest.mark.parametrize("top_k", [1, 2])
def test_matches_transformers_mixtral_sparse_moe_block(top_k):
    layer = make_layer(num_experts_per_tok=top_k)
    mixtral_config = MixtralConfig(hidden_size=HIDDEN, intermediate_size=INNER, num_local_experts=EXPERTS,
                                   num_experts_per_tok=top_k, router_jitter_noise=0.0)
    mixtral_config._experts_implementation = "eager"
    mixtral = MixtralSparseMoeBlock(mixtral_config).eval()
    state = {name: value for name, value in layer.state_dict().items() if name != "gate.expert_bias"}
    assert set(state) == set(mixtral.state_dict())
    mixtral.load_state_dict(state, strict=True)

    x = random_states(seed=2)
    upstream = torch.randn_like(x)
    out, x_grad, grads = forward_and_grads(layer, x, upstream)
    mixtral.zero_grad(set_to_none=True)
    x_mixtral = x.clone().requires_grad_(True)
    out_mixtral = mixtral(x_mixtral)
    (out_mixtral * upstream).sum().backward()

    assert out.abs().max() > 0.1
    assert_max_diff(out, out_mixtral, msg="output")
    assert_max_diff(x_grad, x_mixtral.grad, msg="input grad")
    for name, param in mixtral.named_parameters():
        assert_max_diff(grads[name], param.grad, msg=name)


def test_experts_take_mixtral_and_vllm_call_and_equal_mixtral_experts():
    """vLLM's Transformers backend swaps in its fused experts and calls them as transformers calls Mixtral's:
    experts(hidden_states, top_k_index, top_k_weights); ours take that call and compute what Mixtral's compute."""
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    layer = make_layer(num_experts_per_tok=2)
    mixtral_config = MixtralConfig(hidden_size=HIDDEN, intermediate_size=INNER, num_local_experts=EXPERTS)
    mixtral_config._experts_implementation = "eager"
    experts = MixtralExperts(mixtral_config)
    experts.load_state_dict(layer.experts.state_dict(), strict=True)
    x = random_states(seed=3).reshape(-1, HIDDEN)
    generator = torch.Generator().manual_seed(4)
    top_k_index = torch.stack([torch.randperm(EXPERTS, generator=generator)[:2] for _ in range(x.shape[0])])
    top_k_index[:, 0] = top_k_index[:, 0].clamp(max=EXPERTS - 2)  # leave the last expert no token at all
    top_k_index[:, 1] = torch.where(top_k_index[:, 1] == EXPERTS - 1, top_k_index[:, 0] ^ 1, top_k_index[:, 1])
    top_k_weights = torch.rand(x.shape[0], 2, generator=generator)
    ours = layer.experts(hidden_states=x, top_k_index=top_k_index, top_k_weights=top_k_weights)
    assert ours.abs().max() > 0.1
    assert_max_diff(ours, experts(x, top_k_index, top_k_weights), msg="experts")


# ----------------------------------------------------------------------------------------------- fallback path
def test_grouped_linear_fallback_equals_grouped_kernel_with_an_empty_group(monkeypatch):
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(10, 16, generator=generator)
    weight = torch.randn(4, 24, 16, generator=generator)
    offsets = torch.tensor([3, 3, 7, 10])  # expert 1 gets no rows
    expected = torch.cat([x[0:3] @ weight[0].T, x[3:3] @ weight[1].T, x[3:7] @ weight[2].T, x[7:10] @ weight[3].T])
    grouped = grouped_linear(x, weight, offsets)
    monkeypatch.setattr(model.moe, "GROUPED_MM", None)
    fallback = grouped_linear(x, weight, offsets)
    assert grouped.shape == fallback.shape == (10, 24)
    assert_max_diff(grouped, expected)
    assert_max_diff(fallback, expected)


def test_grouped_linear_falls_back_for_unaligned_widths(monkeypatch):
    calls = spy_on_grouped_mm(monkeypatch)
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(6, 12, generator=generator)  # a width of 12 is not a multiple of 8: the per-expert loop runs
    weight = torch.randn(2, 20, 12, generator=generator)
    out = grouped_linear(x, weight, torch.tensor([2, 6]))
    assert calls == []
    assert_max_diff(out, torch.cat([x[:2] @ weight[0].T, x[2:] @ weight[1].T]))


@pytest.mark.parametrize("shared", [0, 1])
def test_layer_fallback_matches_grouped_and_reference(shared, monkeypatch):
    layer = make_layer(num_shared_experts=shared, seed=5)
    x = random_states(seed=6)
    upstream = torch.randn_like(x)
    grouped = forward_and_grads(layer, x, upstream)
    reference = forward_and_grads(layer, x, upstream, reference_moe_forward)
    monkeypatch.setattr(model.moe, "GROUPED_MM", None)
    fallback = forward_and_grads(layer, x, upstream)
    for other in (grouped, reference):
        assert_max_diff(fallback[0], other[0], msg="output")
        assert_max_diff(fallback[1], other[1], msg="input grad")
        for name in other[2]:
            assert_max_diff(fallback[2][name], other[2][name], msg=name)


# ------------------------------------------------------------------------------------------- capacity dropping
def test_capacity_drops_late_tokens_of_overloaded_experts():
    layer = make_layer(moe_capacity_factor=1.25, seed=7)
    with torch.no_grad():
        # Scores are at most 1, so every token picks expert 0 first and expert 1 second.
        layer.gate.expert_bias.copy_(torch.tensor([10.0, 5.0, 0.0, 0.0]))
    x = random_states(tokens=8, seed=8).requires_grad_(True)
    layer.train()
    capacity = math.ceil(1.25 * 8 * 2 / EXPERTS)
    assert layer.capacity(8) == capacity == 5
    out = layer(x)
    stats = layer.router_stats
    assert stats.expert_counts.tolist() == [8, 8, 0, 0]  # before dropping
    assert stats.dropped.item() == 2 * (8 - capacity) == 6

    full = reference_moe_forward(layer, x.detach()).reshape(8, HIDDEN)
    flat = out.reshape(8, HIDDEN)
    assert_max_diff(flat[:capacity], full[:capacity])  # the first five tokens keep both experts
    assert torch.equal(flat[capacity:], torch.zeros(8 - capacity, HIDDEN))  # the last three lose both
    out.sum().backward()
    x_grad = x.grad.reshape(8, HIDDEN)
    assert x_grad[:capacity].abs().max() > 0 and torch.equal(x_grad[capacity:], torch.zeros(3, HIDDEN))

    layer.eval()
    assert layer.capacity(8) is None
    out_eval = layer(x.detach())
    assert layer.router_stats.dropped.item() == 0
    assert layer.router_stats.expert_counts.tolist() == [8, 8, 0, 0]
    assert_max_diff(out_eval, reference_moe_forward(layer, x.detach()))


@pytest.mark.parametrize("shared", [0, 1])
def test_capacity_is_first_come_first_served_in_token_order(shared):
    layer = make_layer(moe_capacity_factor=0.75, num_shared_experts=shared, router_std=2.0, seed=9)
    layer.train()
    tokens = 16
    x = random_states(tokens=tokens, seed=10)
    out = layer(x).reshape(tokens, HIDDEN)

    flat = x.reshape(tokens, HIDDEN)
    _, _, weights, indices = layer.gate(flat)
    capacity = math.ceil(0.75 * tokens * 2 / EXPERTS)
    used, kept = [0] * EXPERTS, 0
    expected = torch.zeros(tokens, HIDDEN)
    partly_dropped = 0
    for token in range(tokens):
        kept_here = 0
        for slot in range(2):
            expert = int(indices[token, slot])
            if used[expert] < capacity:
                used[expert] += 1
                kept_here += 1
                expected[token] += weights[token, slot] * expert_swiglu(layer, expert, flat[token])
        partly_dropped += kept_here == 1
        kept += kept_here
    if shared:
        expected += layer.shared_experts(flat)
    dropped = 2 * tokens - kept
    assert dropped > 0 and partly_dropped > 0  # the routing exercises both whole and partial drops
    assert layer.router_stats.dropped.item() == dropped
    assert layer.router_stats.expert_counts.tolist() == torch.bincount(indices.flatten(), minlength=EXPERTS).tolist()
    assert_max_diff(out, expected)


# --------------------------------------------------------------------------------------------- balancing losses
@pytest.mark.parametrize("scoring_func", ["softmax", "sigmoid"])
@pytest.mark.parametrize("top_k", [1, 2])
def test_aux_loss_is_one_when_balanced(scoring_func, top_k):
    layer = make_layer(scoring_func=scoring_func, num_experts_per_tok=top_k)
    with torch.no_grad():
        layer.gate.weight.zero_()
        layer.gate.weight[:, :EXPERTS] = 4.0 * torch.eye(EXPERTS)
    # Token t points at expert t % 4 (and, with k=2, next at expert (t + 1) % 4): every expert gets equal load,
    # while each token's probabilities are far from uniform.
    x = torch.zeros(8, HIDDEN)
    for token in range(8):
        x[token, token % EXPERTS] = 2.0
        x[token, (token + 1) % EXPERTS] = 1.0
    layer(x)
    stats = layer.router_stats
    assert stats.expert_counts.tolist() == [2 * top_k] * EXPERTS
    assert abs(stats.aux_loss.item() - 1.0) < 1e-6

    # Direct construction: equal counts with arbitrary probabilities, and uniform probabilities with any counts.
    scores = torch.rand(10, EXPERTS, generator=torch.Generator().manual_seed(11))
    if scoring_func == "softmax":
        scores = scores.softmax(-1)
    assert abs(layer.load_balancing_loss(scores, torch.tensor([5, 5, 5, 5])).item() - 1.0) < 1e-6
    uniform = torch.full((10, EXPERTS), 1.0 / EXPERTS if scoring_func == "softmax" else 0.5)
    assert abs(layer.load_balancing_loss(uniform, torch.tensor([9, 1, 0, 0])).item() - 1.0) < 1e-6


@pytest.mark.parametrize("scoring_func", ["softmax", "sigmoid"])
@pytest.mark.parametrize("top_k", [1, 2])
def test_aux_loss_is_experts_over_k_when_collapsed(scoring_func, top_k):
    layer = make_layer(scoring_func=scoring_func, num_experts_per_tok=top_k)
    scores = torch.zeros(6, EXPERTS)
    scores[:, :top_k] = 1.0 / top_k if scoring_func == "softmax" else 0.9
    counts = torch.tensor([6] * top_k + [0] * (EXPERTS - top_k))
    assert abs(layer.load_balancing_loss(scores, counts).item() - EXPERTS / top_k) < 1e-6

    # The same through a forward pass: huge logits for the first k experts, for every token.
    direction = torch.ones(HIDDEN) / math.sqrt(HIDDEN)
    with torch.no_grad():
        layer.gate.weight.copy_(-10.0 * direction.expand(EXPERTS, HIDDEN))
        layer.gate.weight[:top_k] = 10.0 * direction
    x = 3.0 * direction + 0.01 * torch.randn(6, HIDDEN, generator=torch.Generator().manual_seed(12))
    layer(x)
    assert layer.router_stats.expert_counts.tolist() == counts.tolist()
    assert abs(layer.router_stats.aux_loss.item() - EXPERTS / top_k) < 1e-5


def test_aux_and_z_loss_values_and_gradients():
    layer = make_layer(seed=13)
    x = random_states(seed=14).reshape(-1, HIDDEN)
    layer(x)
    stats = layer.router_stats
    logits = x @ layer.gate.weight.T
    expected_z = torch.logsumexp(logits, dim=-1).square().mean()
    assert expected_z > 1.0
    torch.testing.assert_close(stats.z_loss, expected_z, atol=1e-6, rtol=1e-6)

    probs = logits.softmax(-1)
    share = torch.bincount(probs.topk(2, dim=-1).indices.flatten(), minlength=EXPERTS).float() / (2 * x.shape[0])
    expected_aux = EXPERTS * (share * probs.mean(0)).sum()
    torch.testing.assert_close(stats.aux_loss, expected_aux, atol=1e-6, rtol=0)
    assert stats.aux_loss > 1.0  # random routing is not balanced

    # Both losses train the router (through the probabilities; the counts carry no gradient).
    aux_grad, = torch.autograd.grad(stats.aux_loss, layer.gate.weight, retain_graph=True)
    z_grad, = torch.autograd.grad(stats.z_loss, layer.gate.weight)
    assert aux_grad.abs().max() > 1e-4 and z_grad.abs().max() > 1e-4
    assert stats.expert_counts.requires_grad is False and stats.dropped.requires_grad is False


# --------------------------------------------------------------------------------------- auxiliary-loss-free bias
def test_update_expert_bias_moves_by_rate_towards_the_mean():
    layers = nn.ModuleList([make_layer(), make_layer(seed=1)])
    update_expert_bias(layers, torch.tensor([[8, 2, 5, 5], [1, 1, 1, 9]]), rate=0.1)
    torch.testing.assert_close(layers[0].gate.expert_bias, torch.tensor([-0.1, 0.1, 0.0, 0.0]), atol=0, rtol=0)
    torch.testing.assert_close(layers[1].gate.expert_bias, torch.tensor([0.1, 0.1, 0.1, -0.1]), atol=0, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("scoring_func", ["softmax", "sigmoid"])
def test_expert_bias_balances_a_skewed_router(scoring_func):
    experts, tokens = 8, 64
    layer = make_layer(router_std=0.3, scoring_func=scoring_func, num_experts=experts, norm_topk_prob=False)
    with torch.no_grad():
        # The inputs share a mean direction; the router ignores it except for experts 0 and 1, which all tokens favour.
        layer.gate.weight.sub_(layer.gate.weight.mean(dim=1, keepdim=True))
        layer.gate.weight[:2] += 0.1
    layers = nn.ModuleList([layer]).train()
    router_weight = layer.gate.weight.detach().clone()
    x = torch.randn(tokens, HIDDEN, generator=torch.Generator().manual_seed(15)) + 1.0

    history = []
    with torch.no_grad():
        for _ in range(80):
            layer(x)
            counts = layer.router_stats.expert_counts
            history.append(counts.clone())
            update_expert_bias(layers, counts[None], rate=0.01)
    initial = coefficient_of_variation(history[0])
    final = sum(coefficient_of_variation(counts) for counts in history[-10:]) / 10
    assert history[0][:2].min() > 2 * tokens * 2 / experts  # the favoured experts start overloaded
    assert initial > 0.8
    assert final < 0.5 * initial, (initial, final)
    assert max(counts.max().item() for counts in history[-10:]) < history[0].max().item()
    assert torch.equal(layer.gate.weight, router_weight)  # only the bias moved
    assert layer.gate.expert_bias[:2].max() < 0 < layer.gate.expert_bias[2:].max()

    # The bias changes which experts are chosen, never the weights their outputs are mixed with.
    _, scores, weights, indices = layer.gate(x)
    assert not torch.equal(indices, scores.topk(2, dim=-1).indices)
    assert torch.equal(indices, (scores + layer.gate.expert_bias).topk(2, dim=-1).indices)
    assert torch.equal(weights, scores.gather(1, indices))


def test_moe_layers_in_layer_order_and_bias_update_per_layer():
    byte = ByteModel(tiny_config(num_hidden_layers=4, num_experts=EXPERTS, decoder_sparse_step=2,
                                 moe_intermediate_size=INNER))
    layers = moe_layers(byte)
    assert layers == [byte.model.layers[1].mlp, byte.model.layers[3].mlp]
    update_expert_bias(byte, torch.tensor([[3, 1, 1, 3], [0, 0, 0, 8]]), rate=0.5)
    assert layers[0].gate.expert_bias.tolist() == [-0.5, 0.5, 0.5, -0.5]
    assert layers[1].gate.expert_bias.tolist() == [0.5, 0.5, 0.5, -0.5]


# ------------------------------------------------------------------------------------------------ ByteModel + MoE
def make_model(seed: int = 0, **overrides) -> ByteModel:
    torch.manual_seed(seed)
    kwargs = dict(num_experts=EXPERTS, num_experts_per_tok=2, moe_intermediate_size=32, pad_token_id=0,
                  router_aux_loss_coef=0.1, router_z_loss_coef=0.01)
    kwargs.update(overrides)
    byte = randomize_(ByteModel(tiny_config(**kwargs)))
    with torch.no_grad():
        for layer in moe_layers(byte):
            layer.gate.weight.normal_(0.0, 0.5)
    return byte.eval()


@pytest.fixture(scope="module")
def moe_model():
    return make_model()


def random_ids(batch: int, seq: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(1, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def test_kv_cache_decoding_matches_full_forward(moe_model):
    ids = random_ids(2, 12, seed=16)
    full = moe_model(ids, use_cache=False)
    assert isinstance(full, ByteMoeCausalLMOutputWithPast)
    assert full.aux_loss is not None and full.z_loss is not None
    cache = DynamicCache(config=moe_model.config)
    prefix = moe_model(ids[:, :4], past_key_values=cache, use_cache=True)
    assert getattr(prefix, CACHE_FIELD) is cache and cache.get_seq_length() == 4
    steps = [prefix.logits]
    for t in range(4, 12):
        steps.append(moe_model(ids[:, t:t + 1], past_key_values=cache, use_cache=True).logits)
    assert cache.get_seq_length() == 12
    assert_max_diff(torch.cat(steps, dim=1), full.logits)


@pytest.mark.slow
def test_greedy_generate_equals_argmax_loop(moe_model):
    ids = random_ids(2, 5, seed=17)
    sequence = ids
    for _ in range(GEN["max_new_tokens"]):
        next_token = moe_model(sequence, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        sequence = torch.cat([sequence, next_token], dim=1)
    generated = moe_model.generate(ids, **GEN)
    assert torch.equal(generated, sequence)
    assert len(set(generated[:, 5:].flatten().tolist())) > 3  # not a degenerate repetition


def test_decoder_sparse_step_places_moe_in_every_second_layer():
    byte = make_model(num_hidden_layers=4, decoder_sparse_step=2)
    kinds = [type(layer.mlp) for layer in byte.model.layers]
    assert kinds == [ByteMLP, ByteMoELayer, ByteMLP, ByteMoELayer]
    assert byte.model.layers[0].mlp.gate_proj.weight.shape == (byte.config.intermediate_size, 64)
    out = byte(random_ids(2, 6, seed=18))
    stats = [layer.router_stats for layer in moe_layers(byte)]
    torch.testing.assert_close(out.aux_loss, (stats[0].aux_loss + stats[1].aux_loss) / 2, atol=0, rtol=0)
    torch.testing.assert_close(out.z_loss, (stats[0].z_loss + stats[1].z_loss) / 2, atol=0, rtol=0)


def test_config_aliases():
    config = tiny_config(moe_num_experts=6, moe_k=3)
    assert (config.num_experts, config.num_experts_per_tok) == (6, 3)
    assert (config.moe_num_experts, config.moe_k) == (6, 3) and config.moe_enabled
    assert config.moe_intermediate_size == config.intermediate_size
    assert all(isinstance(layer.mlp, ByteMoELayer) for layer in ByteModel(config).model.layers)

    disabled = tiny_config(moe_num_experts=6, moe_enabled=False)
    assert disabled.num_experts == 0 and not disabled.moe_enabled
    dense = ByteModel(disabled)
    assert not moe_layers(dense) and all(isinstance(layer.mlp, ByteMLP) for layer in dense.model.layers)
    assert not hasattr(dense(random_ids(1, 4)), "aux_loss")
    assert tiny_config(moe_num_experts=2, moe_enabled=True).num_experts == 2
    with pytest.raises(ValueError, match="moe_enabled"):
        tiny_config(moe_enabled=True)


@pytest.mark.parametrize("overrides, field", [
    (dict(num_experts_per_tok=5), "num_experts_per_tok"),
    (dict(num_experts_per_tok=0), "num_experts_per_tok"),
    (dict(scoring_func="tanh"), "scoring_func"),
    (dict(moe_capacity_factor=0.0), "moe_capacity_factor"),
    (dict(decoder_sparse_step=3), "decoder_sparse_step"),
    (dict(num_shared_experts=-1), "num_shared_experts"),
    (dict(router_aux_loss_coef=-0.1), "router_aux_loss_coef"),
    (dict(num_experts=-1), "num_experts"),
])
def test_invalid_moe_config_raises(overrides, field):
    kwargs = dict(num_experts=EXPERTS)
    kwargs.update(overrides)
    with pytest.raises(ValueError, match=field):
        tiny_config(**kwargs)


def test_training_loss_adds_weighted_balancing_terms():
    byte = make_model(seed=1)
    ids = random_ids(2, 10, seed=19)
    labels = ids.clone()
    labels[0, :3] = -100
    byte.train()
    train = byte(ids, labels=labels)
    byte.eval()
    evaluation = byte(ids, labels=labels)
    assert train.aux_loss > 1.0 and train.z_loss > 0.1
    torch.testing.assert_close(train.aux_loss, evaluation.aux_loss, atol=1e-6, rtol=0)
    expected_lm = F.cross_entropy(evaluation.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
    torch.testing.assert_close(evaluation.loss, expected_lm, atol=1e-6, rtol=0)  # evaluation: language model only
    expected = evaluation.loss + 0.1 * train.aux_loss + 0.01 * train.z_loss
    torch.testing.assert_close(train.loss, expected, atol=1e-6, rtol=0)

    # The balancing terms are in the training loss's graph: they reach the router weights.
    router = byte.model.layers[0].mlp.gate.weight
    byte.train()
    train = byte(ids, labels=labels)
    total, = torch.autograd.grad(train.loss, router, retain_graph=True)
    lm_only = F.cross_entropy(train.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
    lm_grad, = torch.autograd.grad(lm_only, router, retain_graph=True)
    balance_grad, = torch.autograd.grad(0.1 * train.aux_loss + 0.01 * train.z_loss, router)
    assert balance_grad.abs().max() > 1e-5
    torch.testing.assert_close(total, lm_grad + balance_grad, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("use_shift_labels", [False, True])
def test_num_items_in_batch_weights_the_balancing_terms(use_shift_labels):
    byte = make_model(seed=2)
    ids = random_ids(2, 10, seed=20)
    labels = ids.clone()
    labels[1, :6] = -100
    targets = labels[:, 1:]
    label_kwargs = (dict(shift_labels=F.pad(labels, (0, 1), value=-100)[:, 1:]) if use_shift_labels
                    else dict(labels=labels))
    n_valid = int(targets.ne(-100).sum())
    for num_items in (n_valid, 3 * n_valid, torch.tensor(3 * n_valid)):
        byte.train()
        train = byte(ids, num_items_in_batch=num_items, **label_kwargs)
        byte.eval()
        evaluation = byte(ids, num_items_in_batch=num_items, **label_kwargs)
        share = n_valid / int(num_items)
        expected = evaluation.loss + share * (0.1 * train.aux_loss + 0.01 * train.z_loss)
        torch.testing.assert_close(train.loss, expected, atol=1e-6, rtol=0)
        assert (train.loss - evaluation.loss).item() > 0.01 * share


def test_init_zero_bias_and_depth_scaled_down_proj():
    torch.manual_seed(0)
    std = 0.05
    byte = ByteModel(tiny_config(num_hidden_layers=4, num_experts=8, moe_intermediate_size=64, initializer_range=std))
    for layer in moe_layers(byte):
        assert torch.equal(layer.gate.expert_bias, torch.zeros(8))
        gate_up, down = layer.experts.gate_up_proj.std().item(), layer.experts.down_proj.std().item()
        assert abs(gate_up - std) < 0.1 * std
        assert abs(down - std / math.sqrt(8)) < 0.1 * std / math.sqrt(8)
        assert down < 0.5 * gate_up
        assert abs(layer.gate.weight.std().item() - std) < 0.1 * std
        assert abs(layer.experts.gate_up_proj.mean().item()) < 0.1 * std
    router = moe_layers(byte)[0].gate
    with torch.no_grad():
        router.expert_bias.fill_(1.0)
    byte._init_weights(router)
    assert torch.equal(router.expert_bias, torch.zeros(8))


@pytest.mark.slow
def test_save_pretrained_round_trip_keeps_expert_bias(tmp_path):
    byte = make_model(seed=3)
    ids = random_ids(2, 8, seed=21)
    unbiased = byte(ids).logits
    with torch.no_grad():
        for index, layer in enumerate(moe_layers(byte)):
            layer.gate.expert_bias.copy_(torch.tensor([0.3, -0.2, 0.1, -0.4]) * (index + 1))
    logits = byte(ids).logits
    assert (logits - unbiased).abs().max() > 1e-3  # the bias changes routing, so losing it would show

    byte.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    assert torch.equal(saved["model.layers.1.mlp.gate.expert_bias"], byte.model.layers[1].mlp.gate.expert_bias)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is ByteModel and loaded.config.num_experts == EXPERTS
    for mine, theirs in zip(moe_layers(byte), moe_layers(loaded)):
        assert torch.equal(mine.gate.expert_bias, theirs.gate.expert_bias)
    original, restored = byte.state_dict(), loaded.state_dict()
    assert list(original) == list(restored)
    for key in original:
        assert torch.equal(restored[key], original[key]), key
    assert torch.equal(loaded(ids).logits, logits)


def test_bf16_autocast_forward_backward_close_to_fp32():
    byte = make_model(seed=4).train()
    ids = random_ids(2, 10, seed=22)

    def loss_and_grads(**autocast):
        byte.zero_grad(set_to_none=True)
        with torch.autocast("cpu", **autocast):
            out = byte(ids, labels=ids)
        out.loss.backward()
        return out, {name: p.grad.clone() for name, p in byte.named_parameters()}

    fp32, fp32_grads = loss_and_grads(enabled=False)
    bf16, bf16_grads = loss_and_grads(dtype=torch.bfloat16)
    assert bf16.logits.dtype == torch.bfloat16 and bf16.loss.dtype == torch.float32
    assert abs(bf16.loss.item() - fp32.loss.item()) < 0.02 * fp32.loss.item()
    assert abs(bf16.aux_loss.item() - fp32.aux_loss.item()) < 0.05
    for name, grad in bf16_grads.items():
        assert grad.dtype == torch.float32 and torch.isfinite(grad).all(), name
        reference = fp32_grads[name].flatten()
        if reference.norm() > 0:
            assert F.cosine_similarity(grad.flatten(), reference, dim=0) > 0.9, name


def test_grouped_linear_uses_the_autocast_dtype_when_enough_rows_go_through():
    weight = torch.randn(2, 8, 16)
    for rows, dtype in ((32, torch.bfloat16), (31, torch.float32)):  # 16 rows per expert on average, or fewer
        x = torch.randn(rows, 16)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = grouped_linear(x, weight, torch.tensor([rows // 2, rows]))
        assert out.dtype == dtype, rows
        expected = torch.cat([x[:rows // 2] @ weight[0].T, x[rows // 2:] @ weight[1].T])
        assert (out.float() - expected).abs().max() < 0.05 * expected.abs().max()


@pytest.mark.slow
@pytest.mark.parametrize("capacity_factor", [None, 1.0])
def test_gradient_checkpointing_gives_same_loss_and_gradients(capacity_factor):
    byte = make_model(seed=5, moe_capacity_factor=capacity_factor).train()
    ids = random_ids(2, 12, seed=23)

    def loss_and_grads():
        byte.zero_grad(set_to_none=True)
        out = byte(ids, labels=ids)
        out.loss.backward()
        return out, {name: p.grad.clone() for name, p in byte.named_parameters()}

    plain, plain_grads = loss_and_grads()
    if capacity_factor is not None:
        assert sum(layer.router_stats.dropped.item() for layer in moe_layers(byte)) > 0
    byte.activation_checkpointing_enable()
    assert all(layer.gradient_checkpointing for layer in byte.model.layers)
    checkpointed, checkpointed_grads = loss_and_grads()
    byte.activation_checkpointing_disable()
    torch.testing.assert_close(checkpointed.loss, plain.loss, atol=ATOL, rtol=0)
    torch.testing.assert_close(checkpointed.aux_loss, plain.aux_loss, atol=ATOL, rtol=0)
    assert set(checkpointed_grads) == set(plain_grads)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(checkpointed_grads[name], grad, **GRAD_TOL, msg=name)
    router_grad = plain_grads["model.layers.0.mlp.gate.weight"]
    assert router_grad.abs().max() > 0


def test_reentrant_gradient_checkpointing_is_refused_for_moe():
    # Reentrant checkpointing runs the layers under no_grad, so the balancing losses the MoE layers hand to
    # ByteModel.forward would carry no gradient: refused rather than silently dropped.
    byte = make_model(seed=5).train()
    with pytest.raises(ValueError, match="use_reentrant=False"):
        byte.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    with pytest.raises(ValueError, match="use_reentrant=False"):  # the older entry point ends in the same check
        byte.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    byte.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False}, every_n_layers=1)
    ids = random_ids(2, 12, seed=23)
    out = byte(ids, labels=ids)
    assert out.aux_loss.requires_grad and out.z_loss.requires_grad
