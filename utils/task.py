"""What a training stage supplies to the engine: its datasets, collator and loss (and, for an online stage, its
rollouts). Everything else (distribution, precision, checkpoints, evaluation, logging) is the same for every stage;
`utils.trainer.run_training(task, ...)` is a training script's whole main."""

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
    `collator(tokenizer)` the collate function (None: default collation); `objective(trainer)` the loss function
    `loss(model, batch, num_items_in_batch)` -> outputs with `.loss`, called once the trainer's model is built (a
    stage may build what its loss needs there, such as a reference model); `targets(batch)` the targets the loss is
    normalised by. A loss may also return `.metrics`, sums over the batch's targets of the names in `metrics`: the
    engine logs their mean per target (`val_<name>` in evaluations). `evaluate_final(folder, config)` (optional)
    measures the final model on rank 0 and returns a metrics row.

    An online stage also supplies `rollout(trainer)`, built right after the model: an object whose
    `step_batches(prompt_batches)` returns each step's micro-batches (sampling new ones from the next batch of
    `prompts_per_step` training samples every `steps_per_rollout` steps), with `state_dict`/`load_state_dict` for
    checkpoints and `last_metrics` for the logged rows. `evaluate(trainer)` replaces the validation loss with the
    stage's own measures; `selection` names the one that picks `best/` and early stopping, and whether higher is
    better. `variant(config)` lets one script hold several stages: the engine runs the task it returns."""
    datasets: Callable[..., tuple[Any, Any]]
    collator: Callable[[Any], Callable | None] = lambda tokenizer: None
    objective: Callable[[Any], Callable] = lambda trainer: language_model_loss
    targets: Callable[[dict], int] = label_targets
    metrics: tuple[str, ...] = ()
    progress_metrics: tuple[str, ...] = ()  # the few of `metrics` shown on the progress line
    perplexity: bool = True  # the loss is a next-token cross-entropy: report val_ppl
    config_type: type = TrainingConfig
    chat_sample: bool = False  # the sample prompts are user turns of the chat template
    evaluate_final: Callable[[Path, TrainingConfig], dict] | None = None
    rollout: Callable[[Any], Any] | None = None
    evaluate: Callable[[Any], dict] | None = None
    selection: tuple[str, bool] = ("val_loss", False)  # (evaluation metric, higher is better)
    variant: Callable[[Any], "Task"] | None = None
