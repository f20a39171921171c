"""The training engine (utils/trainer.py), run in-process on a tiny model: a short run that learns and writes every
artefact, bitwise-exact resume after a stop (dense, MoE, dropout, epoch boundaries, streaming), early stopping,
accumulation, checkpointing, bf16, starting from a saved model, non-finite steps, up-front config checks."""

import functools
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import model  # noqa: F401  (registers the model with the Auto classes)
import model_pretrain
import utils.trainer
from helpers import script_environment
from model import ByteModel
from training import (DATA, RecordingTrainer, clipped_step, fit, make_config, read_metrics, step_folders,
                      stop_before_call)
from utils.errors import InputError
from utils.trainer import Trainer

pytestmark = pytest.mark.slow  # every test here runs whole trainings

ROOT = Path(__file__).resolve().parents[1]
TRAIN_KEYS = {"step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "tokens_seen", "elapsed_s"}
EVAL_KEYS = {"step", "val_loss", "val_ppl", "tokens_seen", "elapsed_s"}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    """One token cache for the module: the validation file is tokenized once."""
    return tmp_path_factory.mktemp("token-cache")


# --------------------------------------------------------------------------------------------------------- 1. set-up

@pytest.mark.parametrize("section, key, value", [("train", "precision", "fp8"), ("train", "precision", ""),
                                                 ("train", "compile", "yes")])
def test_unknown_choices_are_refused_by_the_config_schema(tmp_path, cache_dir, section, key, value):
    with pytest.raises(InputError, match=f"{section}.{key} must be"):
        make_config(tmp_path / "out", cache_dir, **{section: {key: value}})


# ---------------------------------------------------------------------------------------------------- 2. a short run

@pytest.fixture(scope="module")
def short_run(tmp_path_factory, cache_dir):
    out_dir = tmp_path_factory.mktemp("short-run") / "out"
    config = make_config(out_dir, cache_dir, train={"max_steps": 30}, optim={"lr": 1e-2, "min_lr": 1e-3,
                                                                             "warmup_steps": 3},
                         checkpoint={"every_steps": 5, "keep_last": 2}, eval={"every_steps": 10})
    return config, out_dir, fit(config)


def test_short_run_lowers_the_loss(short_run):
    config, out_dir, summary = short_run
    assert summary["reason"] == "finished"
    assert summary["step"] == 30 and summary["bad_steps"] == 0
    assert summary["tokens_seen"] == 30 * 2 * 32
    losses = summary["losses"]
    assert len(losses) == 30
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.25, (first, last)
    train_rows, eval_rows = read_metrics(out_dir)
    assert [row["step"] for row in eval_rows] == [10, 20, 30]
    assert eval_rows[-1]["val_loss"] < eval_rows[0]["val_loss"]
    assert summary["last_eval"]["val_loss"] == eval_rows[-1]["val_loss"]
    assert summary["best_metric"] == min(row["val_loss"] for row in eval_rows)
    assert [row["loss"] for row in train_rows] == losses


def test_short_run_metrics_rows_and_schedule(short_run):
    config, out_dir, summary = short_run
    train_rows, eval_rows = read_metrics(out_dir)
    assert [row["step"] for row in train_rows] == list(range(1, 31))
    for row in train_rows:
        assert set(row) == TRAIN_KEYS
        assert all(isinstance(row[key], (int, float)) and math.isfinite(row[key]) for key in TRAIN_KEYS), row
        assert row["tokens_per_s"] > 0 and row["mfu"] > 0 and row["grad_norm"] > 0
    for row in eval_rows:
        assert set(row) == EVAL_KEYS
        assert math.isfinite(row["val_loss"]) and row["val_ppl"] == pytest.approx(math.exp(row["val_loss"]))
    elapsed = [row["elapsed_s"] for row in train_rows]
    assert elapsed == sorted(elapsed)
    per_step = config.train.micro_batch_size * config.train.grad_accum_steps * config.data.seq_len
    assert [row["tokens_seen"] for row in train_rows] == [row["step"] * per_step for row in train_rows]

    lr, min_lr, warmup = config.optim.lr, config.optim.min_lr, config.optim.warmup_steps
    lrs = [row["lr"] for row in train_rows]
    peak = lrs.index(max(lrs))
    assert max(lrs) == pytest.approx(lr) and peak <= warmup
    # Linear warm-up: equal increments of lr / warmup_steps up to the peak...
    rises = [later - earlier for earlier, later in zip(lrs[:peak + 1], lrs[1:peak + 1])]
    assert len(rises) >= warmup - 1 and rises == pytest.approx([lr / warmup] * len(rises))
    # ...then cosine decay: never increasing, never below min_lr, half-way at mid-decay, ending at min_lr.
    decay = lrs[peak:]
    assert all(later <= earlier + 1e-12 for earlier, later in zip(decay, decay[1:]))
    assert min(lrs) >= min_lr - 1e-12
    middle = decay[len(decay) // 2]
    assert min_lr + 0.3 * (lr - min_lr) < middle < min_lr + 0.7 * (lr - min_lr)
    assert lrs[-1] == pytest.approx(min_lr, rel=0.05)


def test_short_run_writes_every_artefact(short_run):
    config, out_dir, summary = short_run
    saved = yaml.safe_load((out_dir / "config.yaml").read_text())
    assert saved["model"]["hidden_size"] == 32 and saved["train"]["max_steps"] == 30
    log = (out_dir / "train.log").read_text()
    assert "step 30: val_loss" in log and "final model written" in log
    checkpoints = out_dir / "checkpoints"
    assert step_folders(out_dir) == ["step_25", "step_30"]  # every 5 steps, keep_last 2
    assert (checkpoints / "latest").read_text().strip() == "step_30"
    for name in ("config.json", "model.safetensors", "optimizer.pt", "rng_state.pt", "trainer_state.json",
                 "config.yaml"):
        assert (checkpoints / "step_30" / name).is_file(), name
    state = json.loads((checkpoints / "step_30" / "trainer_state.json").read_text())
    assert state["step"] == 30 and state["tokens_seen"] == summary["tokens_seen"]
    best = checkpoints / "best"
    assert (best / "model.safetensors").is_file()
    best_metrics = json.loads((best / "best_metrics.json").read_text())
    assert best_metrics["val_loss"] == summary["best_metric"]
    assert not list(out_dir.rglob(".tmp-*")), "temporary folders left behind"


def test_short_run_final_model_loads_with_auto_classes(short_run):
    config, out_dir, summary = short_run
    final = out_dir / "final"
    tokenizer = AutoTokenizer.from_pretrained(final)
    loaded = AutoModelForCausalLM.from_pretrained(final).eval()
    assert isinstance(loaded, ByteModel)
    assert loaded.config.hidden_size == 32 and loaded.config.vocab_size == len(tokenizer)
    assert loaded.generation_config.eos_token_id == tokenizer.eos_token_id is not None
    assert loaded.generation_config.pad_token_id == tokenizer.pad_token_id is not None
    ids = tokenizer("The cat", return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = loaded(ids).logits
    assert logits.shape == (1, ids.shape[1], len(tokenizer)) and torch.isfinite(logits).all()
    # With validation, final/ holds the best weights.
    final_weights = load_file(final / "model.safetensors")
    best_weights = load_file(out_dir / "checkpoints" / "best" / "model.safetensors")
    assert final_weights.keys() == best_weights.keys()
    assert all(torch.equal(final_weights[key], best_weights[key]) for key in final_weights)


# --------------------------------------------------------------------------------------------------- 3. exact resume



@pytest.mark.parametrize("model_overrides", [
    pytest.param({}, id="no-dropout"),
    pytest.param({"attention_dropout": 0.1, "drop_path_rate": 0.1}, id="dropout"),
    # Routing biases change every step and capacity drops tokens: both must be part of the saved state.
    pytest.param({"num_experts": 4, "moe_intermediate_size": 32, "router_bias_update_rate": 0.01,
                  "moe_capacity_factor": 1.0}, id="moe"),
])
def test_resume_after_stop_is_bitwise_identical(tmp_path, cache_dir, monkeypatch, model_overrides):
    config_a = make_config(tmp_path / "a", cache_dir, model=model_overrides)
    summary_a = fit(config_a)
    assert summary_a["reason"] == "finished" and summary_a["step"] == 12

    config_b = make_config(tmp_path / "b", cache_dir, model=model_overrides)
    stop_before_call(monkeypatch, 7)
    stopped = fit(config_b)
    assert stopped["reason"] == "stopped by signal"
    assert stopped["step"] == 6
    assert step_folders(tmp_path / "b") == ["step_4", "step_6"]
    assert (tmp_path / "b" / "checkpoints" / "latest").read_text().strip() == "step_6"
    assert not (tmp_path / "b" / "final").exists()

    resumed = fit(make_config(tmp_path / "b", cache_dir, model=model_overrides), "auto")
    assert resumed["reason"] == "finished" and resumed["step"] == 12
    assert "resumed from" in (tmp_path / "b" / "train.log").read_text()
    assert len(resumed["losses"]) == 6
    assert stopped["losses"] + resumed["losses"] == summary_a["losses"]
    for key in ("tokens_seen", "best_metric", "last_eval", "bad_steps"):
        assert resumed[key] == summary_a[key], key

    rows_a, evals_a = read_metrics(tmp_path / "a")
    rows_b, evals_b = read_metrics(tmp_path / "b")
    assert [row["step"] for row in rows_b] == list(range(1, 13))  # no duplicates from before the stop
    assert [row["step"] for row in evals_b] == [4, 8, 12]
    for row_a, row_b in zip(rows_a, rows_b):
        assert (row_b["step"], row_b["loss"], row_b["grad_norm"], row_b["lr"]) == \
               (row_a["step"], row_a["loss"], row_a["grad_norm"], row_a["lr"])
    # Everything but the wall clock is the same.
    assert [{**row, "elapsed_s": 0} for row in evals_a] == [{**row, "elapsed_s": 0} for row in evals_b]
    if model_overrides.get("num_experts"):
        assert [row["expert_load"] for row in rows_a] == [row["expert_load"] for row in rows_b]

    for name in ("final", "checkpoints/step_12"):
        weights_a = load_file(tmp_path / "a" / name / "model.safetensors")
        weights_b = load_file(tmp_path / "b" / name / "model.safetensors")
        assert weights_a.keys() == weights_b.keys()
        assert all(torch.equal(weights_a[key], weights_b[key]) for key in weights_a), name


def test_moe_run_reports_routing_and_moves_the_routing_bias(tmp_path, cache_dir):
    config = make_config(tmp_path, cache_dir, model={"num_experts": 4, "num_experts_per_tok": 2,
                                                     "moe_intermediate_size": 32, "moe_capacity_factor": 1.0,
                                                     "router_bias_update_rate": 0.01, "router_z_loss_coef": 1e-3},
                         train={"max_steps": 6, "grad_accum_steps": 2}, eval={"every_steps": 6})
    summary = fit(config)
    assert summary["reason"] == "finished"
    rows, evals = read_metrics(tmp_path)
    assert len(rows) == 6 and [row["step"] for row in evals] == [6]
    for row in rows:
        assert set(row) == TRAIN_KEYS | {"aux_loss", "z_loss", "dropped_frac", "max_load", "expert_load"}
        assert len(row["expert_load"]) == 2 and all(len(layer) == 4 for layer in row["expert_load"])
        assert all(sum(layer) == pytest.approx(1.0, abs=1e-3) for layer in row["expert_load"])
        assert row["max_load"] == pytest.approx(4 * max(max(layer) for layer in row["expert_load"]), abs=1e-3)
        assert 0.9 < row["aux_loss"] < 4.0 and row["z_loss"] > 0
        # Capacity 1.0 x the even share: any imbalance drops slots.
        assert (row["dropped_frac"] > 0) == (row["max_load"] > 1.0 + 1e-6)
    weights = load_file(tmp_path / "final" / "model.safetensors")
    biases = [weights[f"model.layers.{layer}.mlp.gate.expert_bias"] for layer in range(2)]
    # Six steps of +-0.01 each: every entry is a multiple of 0.01 and some have moved.
    assert all(bias.abs().max() <= 0.06 + 1e-6 for bias in biases)
    assert any(bias.abs().max() > 0 for bias in biases)
    for bias in biases:
        torch.testing.assert_close(bias / 0.01, (bias / 0.01).round(), atol=1e-4, rtol=0)


# --------------------------------------------------------------------------------------------- 4b. other run options

def test_early_stopping_keeps_the_best_weights(tmp_path, cache_dir):
    out_dir = tmp_path / "out"
    # No evaluation can improve on the first by more than min_delta: the second one stops the run.
    config = make_config(out_dir, cache_dir, eval={"every_steps": 4, "patience": 1, "min_delta": 100.0})
    summary = fit(config)
    assert summary["reason"] == "early stopping" and summary["step"] == 8
    assert step_folders(out_dir) == ["step_4", "step_8"]
    best_metrics = json.loads((out_dir / "checkpoints" / "best" / "best_metrics.json").read_text())
    assert best_metrics["step"] == 4 and best_metrics["val_loss"] == summary["best_metric"]
    final = load_file(out_dir / "final" / "model.safetensors")
    step_4 = load_file(out_dir / "checkpoints" / "step_4" / "model.safetensors")
    step_8 = load_file(out_dir / "checkpoints" / "step_8" / "model.safetensors")
    assert all(torch.equal(final[key], step_4[key]) for key in final)
    assert not all(torch.equal(final[key], step_8[key]) for key in final)


@pytest.fixture(scope="module")
def tiny_train_file(tmp_path_factory) -> tuple[str, int]:
    """A training file of a handful of windows, so that a few steps cross epochs: (path, number of windows)."""
    from utils.data import PretrainDataset

    folder = tmp_path_factory.mktemp("tiny-data")
    tokenizer = AutoTokenizer.from_pretrained(ROOT / "tokenizer")
    lines = Path(DATA).read_text(encoding="utf-8").splitlines()
    for count in range(1, 20):
        path = folder / f"train{count}.jsonl"
        path.write_text("\n".join(lines[:count]) + "\n", encoding="utf-8")
        windows = len(PretrainDataset([str(path)], tokenizer, 32, folder / "cache"))
        if windows >= 7:
            return str(path), windows
    raise AssertionError("could not build a small training file")


def test_resume_at_an_epoch_boundary_and_epoch_mode(tmp_path, cache_dir, monkeypatch, tiny_train_file):
    path, windows = tiny_train_file
    steps_per_epoch = windows // 2
    data = {"train_files": [path]}
    train = {"max_steps": None, "epochs": 3}
    summary_a = fit(make_config(tmp_path / "a", cache_dir, data=data, train=train))
    assert summary_a["reason"] == "finished" and summary_a["step"] == 3 * steps_per_epoch
    assert summary_a["tokens_seen"] == 3 * steps_per_epoch * 2 * 32

    stop_before_call(monkeypatch, steps_per_epoch + 1)  # stop right after the last batch of epoch 0
    stopped = fit(make_config(tmp_path / "b", cache_dir, data=data, train=train))
    assert stopped["step"] == steps_per_epoch
    resumed = fit(make_config(tmp_path / "b", cache_dir, data=data, train=train), "auto")
    assert resumed["step"] == 3 * steps_per_epoch
    assert stopped["losses"] + resumed["losses"] == summary_a["losses"]
    rows_a, rows_b = read_metrics(tmp_path / "a")[0], read_metrics(tmp_path / "b")[0]
    assert [row["step"] for row in rows_b] == list(range(1, 3 * steps_per_epoch + 1))
    assert [row["grad_norm"] for row in rows_b] == [row["grad_norm"] for row in rows_a]


def test_gradient_accumulation_matches_a_bigger_micro_batch(tmp_path, cache_dir):
    big = fit(make_config(tmp_path / "big", cache_dir, train={"max_steps": 6, "micro_batch_size": 2}))
    accumulated = fit(make_config(tmp_path / "acc", cache_dir,
                                  train={"max_steps": 6, "micro_batch_size": 1, "grad_accum_steps": 2}))
    assert accumulated["tokens_seen"] == big["tokens_seen"]
    assert accumulated["losses"] == pytest.approx(big["losses"], abs=1e-5)
    rows_big, rows_accumulated = read_metrics(tmp_path / "big")[0], read_metrics(tmp_path / "acc")[0]
    assert [row["grad_norm"] for row in rows_accumulated] == pytest.approx([row["grad_norm"] for row in rows_big],
                                                                          rel=1e-4)


def test_gradient_checkpointing_does_not_change_the_run(tmp_path, cache_dir):
    plain = fit(make_config(tmp_path / "plain", cache_dir, train={"max_steps": 4}))
    checkpointed = fit(make_config(tmp_path / "gc", cache_dir, train={"max_steps": 4,
                                                                     "gradient_checkpointing": True}))
    assert checkpointed["losses"] == pytest.approx(plain["losses"], abs=1e-6)


def test_bf16_autocast_run(tmp_path, cache_dir, monkeypatch):
    # Measuring the peak FLOP/s with 1024x1024 bf16 matrices takes long where bf16 is emulated: measure smaller ones.
    monkeypatch.setattr(utils.trainer, "measure_peak_flops",
                        functools.partial(utils.trainer.measure_peak_flops, size=128))
    summary = fit(make_config(tmp_path / "out", cache_dir, train={"max_steps": 3, "precision": "bf16"}))
    assert summary["reason"] == "finished" and summary["bad_steps"] == 0
    assert all(math.isfinite(loss) for loss in summary["losses"])
    assert "precision torch.bfloat16" in (tmp_path / "out" / "train.log").read_text()
    weights = load_file(tmp_path / "out" / "final" / "model.safetensors")
    assert all(value.dtype == torch.float32 for value in weights.values())  # master weights stay fp32


def test_init_from_a_saved_model(tmp_path, cache_dir, short_run):
    _, short_out, _ = short_run
    config = make_config(tmp_path / "out", cache_dir, model={"init_from": str(short_out / "final")},
                         train={"max_steps": 2})
    trainer = RecordingTrainer(config, model_pretrain.PRETRAINING)
    summary = trainer.fit()
    assert summary["reason"] == "finished"
    start = load_file(short_out / "final" / "model.safetensors")
    assert all(torch.equal(trainer.initial[key], value) for key, value in start.items())
    missing = make_config(tmp_path / "missing", cache_dir, model={"init_from": str(tmp_path / "nowhere")})
    with pytest.raises(InputError, match="init_from"):
        fit(missing)


def test_ddp_and_fsdp_clip_the_global_gradient_to_exactly_grad_clip(tmp_path, cache_dir):
    """Two processes of a micro-batch each, against one process accumulating two: every rank logs the global norm
    before clipping (the one process's), and steps with the global gradient scaled to exactly optim.grad_clip; only
    FSDP2 shards the parameters."""
    clip = 0.01
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                    str(ROOT / "test" / "training.py"), str(tmp_path), str(clip)], cwd=ROOT,
                   env=script_environment(ROOT / "test"), check=True, timeout=300, capture_output=True)
    single = clipped_step(tmp_path / "single", cache_dir, clip, grad_accum_steps=2)
    # torch sums the squares in fp32: the norms agree with ours (in fp64) to about 3e-5.
    assert single["grad_norm"] > 10 * clip and single["stepped"] == pytest.approx(clip, rel=1e-4)
    for rank in (0, 1):
        seen = json.loads((tmp_path / f"rank_{rank}.json").read_text())
        for strategy in ("ddp", "fsdp"):
            assert seen[strategy]["grad_norm"] == pytest.approx(single["grad_norm"], rel=1e-4), (rank, strategy)
            assert seen[strategy]["stepped"] == pytest.approx(clip, rel=1e-4), (rank, strategy)
            assert seen[strategy]["sharded"] == (strategy == "fsdp")


# ------------------------------------------------------------------------------------------------------ 5. NaN steps

def inject_nan(monkeypatch, bad_calls) -> dict:
    """Make `ByteModel.causal_lm_loss` return NaN (still differentiable, so gradients are NaN too) on the calls for
    which `bad_calls(n)` is true (n counts from 1)."""
    original = ByteModel.causal_lm_loss
    calls = {"count": 0}

    def causal_lm_loss(*args, **kwargs):
        calls["count"] += 1
        loss = original(*args, **kwargs)
        return loss * float("nan") if bad_calls(calls["count"]) else loss

    monkeypatch.setattr(ByteModel, "causal_lm_loss", staticmethod(causal_lm_loss))
    return calls


def record_optimizer_steps(monkeypatch, calls) -> list[int]:
    """The loss-call count at every optimizer step."""
    steps: list[int] = []
    original = utils.trainer.build_optimizer

    def build_optimizer(*args, **kwargs):
        optimizer = original(*args, **kwargs)
        optimizer.register_step_post_hook(lambda *_: steps.append(calls["count"]))
        return optimizer

    monkeypatch.setattr(utils.trainer, "build_optimizer", build_optimizer)
    return steps


def test_one_nan_step_is_skipped(tmp_path, cache_dir, monkeypatch):
    calls = inject_nan(monkeypatch, lambda n: n == 3)
    optimizer_steps = record_optimizer_steps(monkeypatch, calls)
    config = make_config(tmp_path / "out", cache_dir, train={"max_steps": 6}, eval={"every_steps": 100})
    summary = fit(config)
    assert summary["reason"] == "finished" and summary["step"] == 6
    assert summary["bad_steps"] == 1
    assert len(summary["losses"]) == 5 and all(math.isfinite(loss) for loss in summary["losses"])
    assert optimizer_steps == [1, 2, 4, 5, 6]  # no update on the step whose loss was NaN
    train_rows, eval_rows = read_metrics(tmp_path / "out")
    assert [row["step"] for row in train_rows] == list(range(1, 7))
    bad = train_rows[2]
    assert bad["step"] == 3 and bad["loss"] is None and bad["grad_norm"] is None
    for row in train_rows[3:]:
        assert math.isfinite(row["loss"]) and math.isfinite(row["grad_norm"])
    assert math.isfinite(eval_rows[-1]["val_loss"])
    weights = load_file(tmp_path / "out" / "final" / "model.safetensors")
    assert all(torch.isfinite(value).all() for value in weights.values())
    log = (tmp_path / "out" / "train.log").read_text()
    assert "step 3: non-finite loss or gradient, step skipped" in log


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")
def test_nan_steps_in_a_row_stop_the_run_with_the_last_good_weights(tmp_path, cache_dir, monkeypatch):
    inject_nan(monkeypatch, lambda n: True)
    out_dir = tmp_path / "out"
    # No warm-up: a (wrong) update on step 1 would already change the weights.
    config = make_config(out_dir, cache_dir, train={"max_steps": 10, "max_bad_steps": 2},
                         optim={"warmup_steps": 0})
    trainer = RecordingTrainer(config, model_pretrain.PRETRAINING)
    summary = trainer.fit()
    assert "in a row" in summary["reason"]
    assert summary["step"] == 2 and summary["bad_steps"] == 2 and summary["losses"] == []
    assert step_folders(out_dir) == ["step_2"]
    assert (out_dir / "checkpoints" / "latest").read_text().strip() == "step_2"
    assert not (out_dir / "final").exists()
    saved = load_file(out_dir / "checkpoints" / "step_2" / "model.safetensors")
    assert saved, "no weights saved"
    for key, value in saved.items():
        assert torch.equal(value, trainer.initial[key]), key
    state = json.loads((out_dir / "checkpoints" / "step_2" / "trainer_state.json").read_text())
    assert state["bad_steps"] == 2
    train_rows, _ = read_metrics(out_dir)
    assert all(row["loss"] is None and row["grad_norm"] is None for row in train_rows)


@pytest.mark.parametrize("section, key, value, message", [
    ("train", "strategy", "tp", "train.strategy"),
    ("logging", "swanlab_mode", "online", "logging.swanlab_mode"),
    ("train", "micro_batch_size", 0, "train.micro_batch_size"),
    ("train", "max_steps", 0, "train.max_steps"),
    ("optim", "min_lr", 1.0, "optim.min_lr"),
    ("optim", "lr", 0.0, "optim.lr must be > 0"),
    ("logging", "sample_repetition_penalty", 0.0, "logging.sample_repetition_penalty must be > 0"),
])
def test_trainer_checks_the_config_up_front(tmp_path, cache_dir, section, key, value, message):
    with pytest.raises(InputError, match=message):
        Trainer(make_config(tmp_path / "out", cache_dir, **{section: {key: value}}), model_pretrain.PRETRAINING)
    assert not (tmp_path / "out").exists()


def test_seq_len_longer_than_positions_is_an_input_error(tmp_path, cache_dir):
    config = make_config(tmp_path / "out", cache_dir, data={"seq_len": 65})
    with pytest.raises(InputError, match="max_position_embeddings"):
        fit(config)


# --------------------------------------------------------------------------------------------- streaming data

def test_streaming_training_resumes_exactly(tmp_path, cache_dir, monkeypatch):
    stream = {"streaming": True}
    config_a = make_config(tmp_path / "a", cache_dir, data=stream)
    uninterrupted = fit(config_a)
    assert uninterrupted["reason"] == "finished" and uninterrupted["step"] == 12
    state = json.loads((tmp_path / "a" / "checkpoints" / "step_12" / "trainer_state.json").read_text())
    assert state["sampler"]["num_shards"] == 1 and "0" in state["sampler"]["positions"]

    config_b = make_config(tmp_path / "b", cache_dir, data=stream)
    stop_before_call(monkeypatch, 6)
    assert fit(config_b)["reason"] == "stopped by signal"
    monkeypatch.undo()
    resumed = fit(config_b, "auto")
    assert resumed["losses"] == uninterrupted["losses"][5:]

    # The stream is read as one shard per process and worker: another worker count cannot continue it.
    other = make_config(tmp_path / "b", cache_dir, data={**stream, "num_workers": 2}, train={"max_steps": 14})
    with pytest.raises(InputError, match="no usable checkpoint"):
        fit(other, "auto")


def test_streaming_needs_max_steps(tmp_path, cache_dir):
    with pytest.raises(InputError, match="data.streaming needs train.max_steps"):
        fit(make_config(tmp_path / "out", cache_dir, data={"streaming": True}, train={"max_steps": None}))


def test_streaming_with_two_workers_trains(tmp_path, cache_dir):
    summary = fit(make_config(tmp_path / "out", cache_dir, data={"streaming": True, "num_workers": 2},
                              train={"max_steps": 6}))
    assert summary["reason"] == "finished" and all(math.isfinite(loss) for loss in summary["losses"])
    state = json.loads((tmp_path / "out" / "checkpoints" / "step_6" / "trainer_state.json").read_text())
    assert state["sampler"]["num_shards"] == 2 and set(state["sampler"]["positions"]) == {"0", "1"}


def test_every_evaluation_and_the_final_model_write_samples(tmp_path, cache_dir):
    out_dir = tmp_path / "out"
    config = make_config(out_dir, cache_dir, train={"max_steps": 4}, eval={"every_steps": 2, "at_start": True,
                                                                          "sample_prompts": ["The", "我们"]})
    fit(config)
    rows = [json.loads(line) for line in (out_dir / "samples.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [(row["step"], row["prompt"]) for row in rows] == [(step, prompt) for step in (0, 2, 4, 4)
                                                              for prompt in ("The", "我们")]
    assert [row.get("final", False) for row in rows] == [False] * 6 + [True] * 2
    # final/ holds the best evaluated weights (step 0 is never a best): its greedy text is that step's.
    _, evaluations = read_metrics(out_dir)
    best = min(evaluations[1:], key=lambda row: row["val_loss"])["step"]
    assert [row["sample"] for row in rows[6:]] == [row["sample"] for row in rows if row["step"] == best][:2]
    log = (out_dir / "train.log").read_text(encoding="utf-8")
    assert "step 2 sample: 'The' -> " in log and "final sample: '我们' -> " in log
