"""utils/lora.py: peft adapters on a ByteModel: only they train, the model starts unchanged, bad targets in one line."""

import pytest
import torch
from peft import PeftModel
from torch import nn

from helpers import tiny_config
from model import ByteModel
from utils.config import LoraSection
from utils.errors import InputError
from utils.lora import add_lora, is_peft_model

TARGETS = ["q_proj", "v_proj", "down_proj"]
RANK = 4


@pytest.fixture
def base():
    torch.manual_seed(0)
    return ByteModel(tiny_config(num_hidden_layers=1)).eval()


def input_ids() -> torch.Tensor:
    return torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(1))


def lora_section(**overrides) -> LoraSection:
    return LoraSection(**{"enabled": True, "rank": RANK, "alpha": 8.0, "dropout": 0.0, "target_modules": TARGETS,
                          **overrides})


def test_is_peft_model_only_after_add_lora(base):
    assert not is_peft_model(base)
    model = add_lora(base, lora_section())
    assert isinstance(model, PeftModel)
    assert is_peft_model(model)


def test_only_adapters_are_trainable(base):
    # Counted from the plain model: r x (in + out) for every targeted Linear (A is r x in, B is out x r).
    expected = sum(RANK * (module.in_features + module.out_features) for name, module in base.named_modules()
                   if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in TARGETS)
    model = add_lora(base, lora_section())
    trainable = {name: param for name, param in model.named_parameters() if param.requires_grad}
    assert trainable and all(".lora_" in name for name in trainable)
    assert sum(param.numel() for param in trainable.values()) == expected
    assert {name.split(".lora_")[0].rsplit(".", 1)[-1] for name in trainable} == set(TARGETS)
    assert all(not param.requires_grad for name, param in model.named_parameters() if ".lora_" not in name)


def test_adapters_start_as_the_identity(base):
    ids = input_ids()
    with torch.no_grad():
        expected = base(ids).logits
    model = add_lora(base, lora_section(dropout=0.05)).eval()
    assert all(not param.any() for name, param in model.named_parameters() if ".lora_B." in name)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected, rtol=0, atol=0)


def test_a_step_changes_only_the_adapters(base):
    ids = input_ids()
    with torch.no_grad():
        before = base(ids).logits
    frozen = {name: param.detach().clone() for name, param in base.named_parameters()}
    model = add_lora(base, lora_section()).train()
    optimizer = torch.optim.SGD([param for param in model.parameters() if param.requires_grad], lr=0.5)
    model(ids, labels=ids).loss.backward()
    assert all(param.grad is None for name, param in model.named_parameters() if ".lora_" not in name)
    optimizer.step()
    merged = model.eval().merge_and_unload()
    assert not torch.allclose(merged(ids).logits, before)
    # The merged weights moved only where adapters sat; the rest is bit for bit the starting model.
    changed = {name for name, param in merged.named_parameters() if not torch.equal(param, frozen[name])}
    assert changed and all(name.split(".")[-2] in TARGETS for name in changed)


def test_unknown_target_modules_are_an_input_error(base):
    with pytest.raises(InputError) as error:
        add_lora(base, lora_section(target_modules=["nope", "query"]))
    message = str(error.value)
    assert message.startswith("lora.target_modules: ") and "\n" not in message
    assert "nope" in message and "query" in message
    assert error.value.__cause__ is None


def test_an_unknown_target_beside_known_ones_is_logged(base, caplog, monkeypatch):
    # peft itself would ignore it silently; a mixture of experts has no dense gate/up/down_proj to adapt, so an
    # unmatched name is told, not refused, while others match.
    import logging

    from utils.logger import LOGGER_NAME

    monkeypatch.setattr(logging.getLogger(LOGGER_NAME), "propagate", True)  # for caplog
    with caplog.at_level(logging.WARNING, logger=LOGGER_NAME):
        model = add_lora(base, lora_section(target_modules=["q_proj", "vproj"]))
    assert "lora.target_modules: vproj name no layer of this model; adapting q_proj" in caplog.text
    assert any("q_proj.lora_A" in name for name, _ in model.named_parameters())
    with pytest.raises(InputError, match="^lora.target_modules: none of vproj, kproj names a layer of this model$"):
        add_lora(base, lora_section(target_modules=["vproj", "kproj"]))


def test_bad_rank_is_an_input_error(base):
    with pytest.raises(InputError, match=r"^lora: .*\b0\b"):
        add_lora(base, lora_section(rank=0))


def test_unsupported_target_module_says_why(base):
    with pytest.raises(InputError) as error:
        add_lora(base, lora_section(target_modules=["mlp"]))
    assert str(error.value) == "lora.target_modules: 'mlp' names ByteMLP modules, not linear layers"


def test_lora_settings_reach_the_adapters(base):
    """Rank, alpha (the adapters' scale is alpha / rank), dropout and the targeted layers, none at its default."""
    model = add_lora(base, lora_section(rank=3, alpha=6.0, dropout=0.2, target_modules=["q_proj", "up_proj"]))
    adapted = {name.rsplit(".", 1)[-1]: module for name, module in model.named_modules() if hasattr(module, "lora_A")}
    assert set(adapted) == {"q_proj", "up_proj"}
    for module in adapted.values():
        assert module.r["default"] == 3 and module.scaling["default"] == 2.0
        assert module.lora_dropout["default"].p == 0.2
