"""AdamW with decoupled weight decay on matrices only, and its warm-up + cosine schedule."""

import torch
from torch import nn
from transformers.optimization import get_cosine_with_min_lr_schedule_with_warmup


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: norms, biases and embeddings are left alone (nanoGPT, Llama)."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        (decay if parameter.ndim >= 2 and "embed_tokens" not in name else no_decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, optim) -> torch.optim.Optimizer:
    """AdamW from the `optim` config section."""
    groups = parameter_groups(model, optim.weight_decay)
    options = dict(lr=optim.lr, betas=(optim.beta1, optim.beta2))
    try:
        # One fused kernel per step instead of a dozen elementwise ops per parameter group.
        return torch.optim.AdamW(groups, fused=True, **options)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, **options)


def build_scheduler(optimizer: torch.optim.Optimizer, optim, total_steps: int):
    """Linear warm-up to `optim.lr`, then cosine decay to `optim.min_lr` at `total_steps`."""
    return get_cosine_with_min_lr_schedule_with_warmup(optimizer, min(optim.warmup_steps, total_steps), total_steps,
                                                      min_lr=optim.min_lr)
