"""What a training stage supplies to the engine: its datasets, collator and loss. Everything else (distribution,
precision, checkpoints, evaluation, logging) is the same for every stage; `run_training(task, ...)` is a training
script's whole main."""

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from model import count_targets
from utils.config import TrainingConfig, parse_config
from utils.errors import exit_on_input_error

# How a run stopped by too many non-finite steps in a row says so (the script then exits with 1).
STOPPED_BY_BAD_STEPS = "non-finite steps in a row"


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
    measures the final model on rank 0 and returns a metrics row."""
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


def run_training(task: Task, default_config: str, description: str, argv: list[str] | None = None) -> dict:
    """A training script's main: parse the config and `--resume`, train, exit 1 when bad steps stopped the run
    (input errors exit 2, with one line)."""
    from utils.trainer import Trainer  # here: the trainer imports this module

    def add_arguments(parser) -> None:
        parser.add_argument("--resume", default=None, metavar="auto|PATH",
                            help="continue from the latest checkpoint in train.out_dir (auto) or from a step folder")

    @exit_on_input_error
    def main() -> dict:
        config, arguments = parse_config(task.config_type, default_config, description, argv, add_arguments)
        summary = Trainer(config, task, arguments.resume).fit()
        if summary["reason"].endswith(STOPPED_BY_BAD_STEPS):
            raise SystemExit(1)
        return summary

    return main()
