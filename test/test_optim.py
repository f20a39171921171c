"""utils/optim.py: AdamW parameter groups and the warm-up + cosine schedule."""

import copy
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from helpers import tiny_config
from model import ByteModel, ByteRMSNorm
from utils.optim import build_optimizer, build_scheduler, parameter_groups

OPTIM = SimpleNamespace(lr=1e-2, min_lr=1e-3, warmup_steps=4, weight_decay=0.1, beta1=0.9, beta2=0.95)


@pytest.mark.parametrize("tied", [True, False])
def test_parameter_groups_decay_matrices_only(tied):
    network = ByteModel(tiny_config(tie_word_embeddings=tied, attention_bias=True, mlp_bias=True,
                                    layer_scale_init=0.1))
    groups = parameter_groups(network, weight_decay=0.1)
    assert [group["weight_decay"] for group in groups] == [0.1, 0.0]
    decay = [id(parameter) for parameter in groups[0]["params"]]
    no_decay = [id(parameter) for parameter in groups[1]["params"]]
    # Every parameter exactly once (a tied embedding is one parameter, not two).
    unique = {id(parameter) for parameter in network.parameters()}
    assert len(decay) + len(no_decay) == len(unique) == len(set(decay) | set(no_decay))

    linear_weights = {id(module.weight) for module in network.modules() if isinstance(module, nn.Linear)}
    embedding = network.model.embed_tokens.weight
    biases = {id(module.bias) for module in network.modules()
              if isinstance(module, nn.Linear) and module.bias is not None}
    norms = {id(module.weight) for module in network.modules() if isinstance(module, ByteRMSNorm)}
    assert biases and norms  # the config above really has both
    assert id(embedding) in no_decay
    assert biases | norms <= set(no_decay)
    assert set(decay) == linear_weights - {id(embedding)}
    assert (network.lm_head.weight is embedding) == tied
    if not tied:
        assert id(network.lm_head.weight) in decay
    # Nothing one-dimensional is decayed.
    assert all(parameter.ndim >= 2 for parameter in groups[0]["params"])


def test_adamw_steps_equal_torchs_with_the_configured_decay_and_betas():
    """Two steps of the built optimizer equal torch's AdamW given the groups by hand: `optim.weight_decay` on every
    matrix but the embedding, none elsewhere, and the configured lr and betas (none of them at their defaults)."""
    optim = SimpleNamespace(lr=0.05, weight_decay=0.3, beta1=0.8, beta2=0.9)
    torch.manual_seed(0)
    network = ByteModel(tiny_config(attention_bias=True))
    reference = copy.deepcopy(network)
    embedding = reference.model.embed_tokens.weight
    matrices = [module.weight for module in reference.modules()
                if isinstance(module, nn.Linear) and module.weight is not embedding]
    others = [parameter for parameter in reference.parameters() if all(parameter is not m for m in matrices)]
    expected = torch.optim.AdamW([{"params": matrices, "weight_decay": optim.weight_decay},
                                  {"params": others, "weight_decay": 0.0}], lr=optim.lr, betas=(optim.beta1, optim.beta2))
    optimizer = build_optimizer(network, optim)
    for _ in range(2):
        for parameter, twin in zip(network.parameters(), reference.parameters()):
            parameter.grad = torch.randn_like(parameter)
            twin.grad = parameter.grad.clone()
        optimizer.step()
        expected.step()
    for (name, parameter), twin in zip(network.named_parameters(), reference.parameters()):
        torch.testing.assert_close(parameter, twin, msg=name)


def test_schedule_warms_up_then_decays_to_min_lr():
    model = nn.Linear(4, 4)
    optimizer = build_optimizer(model, OPTIM)
    assert optimizer.defaults["betas"] == (0.9, 0.95)
    scheduler = build_scheduler(optimizer, OPTIM, total_steps=20)
    rates = []
    for _ in range(20):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert rates[0] == 0.0 and rates[4] == pytest.approx(OPTIM.lr)
    assert rates[1:5] == pytest.approx([OPTIM.lr * step / 4 for step in range(1, 5)])
    # Cosine from lr to min_lr over the 16 steps after the warm-up.
    progress = 10 / 16
    expected = OPTIM.min_lr + (OPTIM.lr - OPTIM.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))
    assert rates[14] == pytest.approx(expected)
    assert scheduler.get_last_lr()[0] == pytest.approx(OPTIM.min_lr)
