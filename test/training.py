"""Shared helpers for the tests that run the training engine in-process on a tiny model."""

import hashlib
import json
from pathlib import Path

import model_pretrain
import utils.trainer
from utils.config import TrainingConfig, build_config
from utils.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
DATA = str(ROOT / "datasets/demo/pretrain_val.jsonl")


def make_config(out_dir: Path, cache_dir: Path, **sections) -> TrainingConfig:
    """A tiny, fast configuration; `sections` maps a section name to overrides of it."""
    values = {
        "model": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                  "max_position_embeddings": 64},
        "data": {"train_files": [DATA], "val_files": [DATA], "tokenizer": str(ROOT / "tokenizer"), "seq_len": 32,
                 "cache_dir": str(cache_dir)},
        "train": {"out_dir": str(out_dir), "max_steps": 12, "micro_batch_size": 2, "grad_accum_steps": 1,
                  "precision": "fp32", "seed": 42, "compile": False},
        "optim": {"lr": 1e-2, "min_lr": 1e-3, "warmup_steps": 3},
        "checkpoint": {"every_steps": 4, "keep_last": 3},
        "eval": {"every_steps": 4, "max_batches": 2},
        # No figures: drawing them costs more than most of these runs (test_plots turns them on).
        "logging": {"every_steps": 1, "swanlab_mode": "disabled", "sample_tokens": 4, "plots": False},
    }
    for section, overrides in sections.items():
        values[section] = {**values[section], **overrides}
    return build_config(TrainingConfig, values)


def fit(config: TrainingConfig, resume: str | None = None) -> dict:
    return Trainer(config, model_pretrain.PRETRAINING, resume).fit()


def stop_before_call(monkeypatch, call: int) -> None:
    """Emulate SIGTERM: the loop asks `any_rank(stop.requested, ...)` once at the top of every step, so answering
    True on call `call` stops the run after step `call - 1` (with a checkpoint)."""
    original = utils.trainer.any_rank
    calls = {"count": 0}

    def any_rank(flag, context):
        calls["count"] += 1
        return True if calls["count"] == call else original(flag, context)

    monkeypatch.setattr(utils.trainer, "any_rank", any_rank)


class RecordingTrainer(Trainer):
    """A Trainer that keeps a copy of the model's initial weights (`self.initial`)."""

    def build_model(self, tokenizer):
        built = super().build_model(tokenizer)
        self.initial = {key: value.detach().clone() for key, value in built.state_dict().items()}
        return built


def read_metrics(out_dir: Path) -> tuple[list[dict], list[dict]]:
    """(train rows, eval rows) of out_dir/metrics.jsonl."""
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [row for row in rows if "loss" in row], [row for row in rows if "val_loss" in row]


def tree_digest(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file below `folder` (directories as entries too)."""
    digest = {}
    for path in sorted(folder.rglob("*")):
        relative = str(path.relative_to(folder))
        digest[relative] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "<dir>"
    return digest


def step_folders(out_dir: Path) -> list[str]:
    return sorted((path.name for path in (out_dir / "checkpoints").glob("step_*")), key=lambda n: int(n[5:]))
