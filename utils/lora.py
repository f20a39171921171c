"""Low-rank adapters (peft): only the adapters train, and only they are saved in checkpoints."""

from torch import nn

from utils.errors import InputError, error_summary


def is_peft_model(model: nn.Module) -> bool:
    return hasattr(model, "peft_config")


def add_lora(model: nn.Module, lora) -> nn.Module:
    """`model` wrapped with the adapters the `lora` config section describes; its own weights are frozen."""
    from peft import LoraConfig, get_peft_model

    try:
        return get_peft_model(model, LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                                target_modules=lora.target_modules, task_type="CAUSAL_LM"))
    except ValueError as error:
        raise InputError(f"lora: {error_summary(error)}") from None
