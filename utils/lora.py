"""Low-rank adapters (peft): only the adapters train, and only they are saved in checkpoints."""

from torch import nn

from utils.errors import InputError, error_summary
from utils.logger import get_logger


def is_peft_model(model: nn.Module) -> bool:
    return hasattr(model, "peft_config")


def add_lora(model: nn.Module, lora) -> nn.Module:
    """`model` wrapped with the adapters the `lora` config section describes; its own weights are frozen.

    Every target must name linear layers of the model; a name that matches nothing is logged and skipped while
    others match (the default list names the dense MLP's projections, which a mixture of experts lacks)."""
    from peft import LoraConfig, get_peft_model

    layers: dict[str, set[str]] = {}
    for name, module in model.named_modules():
        layers.setdefault(name.rsplit(".", 1)[-1], set()).add(type(module).__name__)
    for target in lora.target_modules:
        kinds = layers.get(target, set())
        if kinds and not kinds & {"Linear", "Embedding", "Conv1d", "Conv2d"}:
            raise InputError(f"lora.target_modules: {target!r} names {', '.join(sorted(kinds))} modules, not linear "
                             f"layers")
    missing = [target for target in lora.target_modules if target not in layers]
    if len(missing) == len(lora.target_modules):
        raise InputError(f"lora.target_modules: none of {', '.join(missing)} names a layer of this model")
    if missing:
        get_logger().warning(f"lora.target_modules: {', '.join(missing)} name no layer of this model; adapting "
                             f"{', '.join(target for target in lora.target_modules if target not in missing)}")
    try:
        return get_peft_model(model, LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                                target_modules=lora.target_modules, task_type="CAUSAL_LM"))
    except ValueError as error:
        raise InputError(f"lora: {error_summary(error)}") from None
