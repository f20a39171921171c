"""utils/router_monitor.py: expert-load statistics from routing counts, and the monitor's counts, metrics and bias."""

import pytest
import torch

from helpers import tiny_config
from model import ByteModel, moe_layers
from utils.distributed import DistributedContext
from utils.router_monitor import RouterMonitor, load_statistics

EXPERTS, TOP_K = 4, 2
BATCH, LENGTH = 2, 8


def test_balanced_load():
    stats = load_statistics(torch.tensor([[5.0, 5.0, 5.0, 5.0]]), torch.tensor([0.0]))
    torch.testing.assert_close(stats["expert_load"], torch.full((1, 4), 0.25))
    torch.testing.assert_close(stats["max_load"], torch.tensor([1.0]))
    torch.testing.assert_close(stats["dropped_frac"], torch.tensor([0.0]))


def test_collapsed_load_is_the_number_of_experts():
    stats = load_statistics(torch.tensor([[0.0, 0.0, 12.0, 0.0, 0.0, 0.0]]), torch.tensor([0.0]))
    torch.testing.assert_close(stats["expert_load"], torch.tensor([[0.0, 0.0, 1.0, 0.0, 0.0, 0.0]]))
    torch.testing.assert_close(stats["max_load"], torch.tensor([6.0]))


def test_layers_are_independent_and_dropped_is_a_share_of_slots():
    routed = torch.tensor([[3.0, 1.0, 2.0, 2.0], [10.0, 10.0, 20.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    stats = load_statistics(routed, torch.tensor([2.0, 4.0, 0.0]))
    torch.testing.assert_close(stats["expert_load"], torch.tensor([[0.375, 0.125, 0.25, 0.25],
                                                                   [0.25, 0.25, 0.5, 0.0],
                                                                   [0.0, 0.0, 0.0, 0.0]]))
    torch.testing.assert_close(stats["max_load"], torch.tensor([1.5, 2.0, 0.0]))
    torch.testing.assert_close(stats["dropped_frac"], torch.tensor([0.25, 0.1, 0.0]))  # a layer with no slots: 0


def test_dense_model_is_not_monitored():
    model = ByteModel(tiny_config()).train()
    monitor = RouterMonitor(model, DistributedContext())
    ids = torch.randint(0, 128, (BATCH, LENGTH))
    monitor.after_forward(model(ids, labels=ids))
    monitor.after_step(model, applied=True)
    assert monitor.layers == [] and monitor.rate == 0.0
    assert monitor.metrics() == {}


def moe_model(**overrides) -> ByteModel:
    torch.manual_seed(0)
    return ByteModel(tiny_config(num_experts=EXPERTS, num_experts_per_tok=TOP_K, **overrides)).train()


def forward(model, monitor, chosen: list[torch.Tensor], seed: int):
    """One micro-batch; `chosen` collects each router's top-k expert indices, read from the router's own output."""
    hooks = [layer.gate.register_forward_hook(lambda module, args, output: chosen.append(output[3]))
             for layer in moe_layers(model)]
    ids = torch.randint(0, 128, (BATCH, LENGTH), generator=torch.Generator().manual_seed(seed))
    outputs = model(ids, labels=ids)
    for hook in hooks:
        hook.remove()
    monitor.after_forward(outputs)
    return outputs


def expert_counts(chosen: list[torch.Tensor], num_layers: int) -> torch.Tensor:
    """(layers, experts) slot counts over all recorded forwards (the hook records the layers in order)."""
    counts = torch.zeros(num_layers, EXPERTS)
    for index, indices in enumerate(chosen):
        counts[index % num_layers] += torch.bincount(indices.flatten(), minlength=EXPERTS)
    return counts


def test_moe_counts_every_routed_slot():
    model = moe_model()
    monitor = RouterMonitor(model, DistributedContext())
    chosen = []
    # Two steps in one logging window: two micro-batches, then one.
    outputs = [forward(model, monitor, chosen, seed) for seed in (1, 2)]
    monitor.after_step(model, applied=True)
    outputs.append(forward(model, monitor, chosen, 3))
    monitor.after_step(model, applied=True)
    num_layers = len(moe_layers(model))
    counts = expert_counts(chosen, num_layers)
    assert num_layers == 2 and (counts.sum(dim=1) == 3 * BATCH * LENGTH * TOP_K).all()
    torch.testing.assert_close(monitor.window_counts[:, :-1], counts)
    assert not monitor.window_counts[:, -1].any()  # dropless

    metrics = monitor.metrics()
    load = torch.tensor(metrics["expert_load"])
    expected_load = counts / counts.sum(dim=1, keepdim=True)
    assert load.shape == (num_layers, EXPERTS)
    torch.testing.assert_close(load.sum(dim=1), torch.ones(num_layers), atol=1e-3, rtol=0)
    torch.testing.assert_close(load, expected_load, atol=1e-4, rtol=0)  # rounded to 4 decimals
    assert metrics["max_load"] == pytest.approx(expected_load.max().item() * EXPERTS)
    assert metrics["dropped_frac"] == 0.0
    assert metrics["aux_loss"] == pytest.approx(sum(output.aux_loss.item() for output in outputs) / 3)
    assert metrics["z_loss"] == pytest.approx(sum(output.z_loss.item() for output in outputs) / 3)

    # The next window counts only what came after.
    chosen = []
    forward(model, monitor, chosen, 4)
    monitor.after_step(model, applied=True)
    counts = expert_counts(chosen, num_layers)
    load = torch.tensor(monitor.metrics()["expert_load"])
    torch.testing.assert_close(load, counts / counts.sum(dim=1, keepdim=True), atol=1e-4, rtol=0)


def test_dropped_slots_under_a_capacity_limit():
    # Capacity ceil(0.5 * 16 tokens * 2 / 4 experts) = 4 slots per expert and forward, of 32: at least 16 dropped.
    model = moe_model(moe_capacity_factor=0.5)
    monitor = RouterMonitor(model, DistributedContext())
    chosen = []
    forward(model, monitor, chosen, 1)
    monitor.after_step(model, applied=True)
    counts = expert_counts(chosen, len(moe_layers(model)))
    dropped = (counts - 4).clamp(min=0).sum()
    assert dropped >= 16
    torch.testing.assert_close(monitor.window_counts[:, -1], (counts - 4).clamp(min=0).sum(dim=1))
    assert monitor.metrics()["dropped_frac"] == pytest.approx((dropped / counts.sum()).item())
    assert monitor.rate == 0.0 and not any(layer.gate.expert_bias.any() for layer in moe_layers(model))


@pytest.mark.parametrize("applied", [True, False])
def test_expert_bias_moves_only_after_an_applied_step(applied):
    rate = 0.01
    model = moe_model(router_bias_update_rate=rate)
    monitor = RouterMonitor(model, DistributedContext())
    assert monitor.rate == rate
    chosen = []
    forward(model, monitor, chosen, 1)
    monitor.after_step(model, applied=applied)
    assert not monitor.step_counts.any()  # counted once, whether or not the step was applied
    biases = torch.stack([layer.gate.expert_bias for layer in moe_layers(model)])
    if applied:
        # DeepSeek-V3's rule by hand: down by `rate` above the mean load of the step, up below it.
        counts = expert_counts(chosen, len(moe_layers(model)))
        torch.testing.assert_close(biases, rate * torch.sign(counts.mean(dim=1, keepdim=True) - counts))
        assert biases.any()
    else:
        assert not biases.any()
