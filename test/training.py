"""Shared helpers for the tests that run the training engine in-process on a tiny model."""

import hashlib
import json
from pathlib import Path

import model_pretrain
import utils.trainer
from helpers import overridden
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
    if "init_from" in sections.get("model", {}):
        values["model"] = {}  # the starting model keeps its own architecture
    return build_config(TrainingConfig, overridden(values, sections))


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


def global_gradient_norm(model) -> float:
    """The norm of the whole gradient across ranks, from each rank's own part: its shards under FSDP2, where every
    rank holds a slice of each gradient; under DDP each rank holds all of it, so that is counted once."""
    import torch.distributed as dist

    local = [parameter.grad for parameter in model.parameters() if parameter.grad is not None]
    sharded = any(hasattr(grad, "to_local") for grad in local)
    squares = sum((grad.to_local() if hasattr(grad, "to_local") else grad).double().pow(2).sum() for grad in local)
    if sharded and dist.is_initialized():
        dist.all_reduce(squares)
    return squares.sqrt().item()


def clipped_step(out_dir: Path, cache_dir: Path, grad_clip: float, **train) -> dict:
    """The first step of a tiny pretraining run (`train` overrides its train section): the gradient norm it logs,
    the global norm of the gradient the optimizer stepped with, and whether the parameters were sharded."""
    config = make_config(out_dir, cache_dir, train={"max_steps": 2, **train}, optim={"grad_clip": grad_clip})
    trainer = Trainer(config, model_pretrain.PRETRAINING)
    stepped = []
    trainer.optimizer.register_step_pre_hook(lambda *_: stepped.append(global_gradient_norm(trainer.wrapped)))
    batches = iter(trainer.batches)
    _, grad_norm, _ = trainer.train_step([next(batches) for _ in range(config.train.grad_accum_steps)])
    trainer.metrics.close()
    sharded = any(hasattr(parameter, "to_local") for parameter in trainer.wrapped.parameters())
    return {"grad_norm": grad_norm, "stepped": stepped[0], "sharded": sharded}


if __name__ == "__main__":
    # torchrun --nproc_per_node=2 test/training.py FOLDER GRAD_CLIP: the first step under DDP, then under FSDP2;
    # each rank writes what it saw to FOLDER/rank_<rank>.json.
    import os
    import sys

    from utils.distributed import init_distributed, teardown

    folder, grad_clip = Path(sys.argv[1]), float(sys.argv[2])
    seen = {strategy: clipped_step(folder / strategy, folder / "cache", grad_clip, strategy=strategy)
            for strategy in ("ddp", "fsdp")}
    (folder / f"rank_{os.environ['RANK']}.json").write_text(json.dumps(seen))
    teardown(init_distributed("cpu"))
