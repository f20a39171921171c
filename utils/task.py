"""What a training stage supplies to the engine: its datasets, collator and loss. Everything else (distribution,
precision, checkpoints, evaluation, logging) is the same for every stage."""

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from model import count_targets
from utils.config import TrainingConfig


def language_model_loss(model: nn.Module, batch: dict[str, torch.Tensor], num_items_in_batch: float | None):
    """Next-token cross-entropy on the batch's labels (a sum over `num_items_in_batch` targets when given)."""
    return model(**batch, num_items_in_batch=num_items_in_batch)


def label_targets(batch: dict[str, torch.Tensor]) -> int:
    return int(count_targets(batch.get("labels"), batch.get("shift_labels")))


@dataclass(frozen=True)
class Task:
    """What a training stage supplies. `datasets(tokenizer, config, log)` returns (train, validation or None);
    `collator(tokenizer)` the collate function (None: default collation); `loss(model, batch, num_items_in_batch)`
    model outputs with `.loss`; `targets(batch)` the targets the loss is normalised by. `evaluate_final(folder,
    config)` (optional) measures the final model on rank 0 and returns a metrics row."""
    datasets: Callable[..., tuple[Any, Any]]
    collator: Callable[[Any], Callable | None] = lambda tokenizer: None
    loss: Callable[..., Any] = language_model_loss
    targets: Callable[[dict], int] = label_targets
    chat_sample: bool = False  # render the closing sample prompt as a user turn of the chat template
    evaluate_final: Callable[[Path, TrainingConfig], dict] | None = None
