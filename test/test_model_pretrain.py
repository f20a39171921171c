"""The pretraining command line (model_pretrain.py) in subprocesses: help and input errors, 2-process DDP and FSDP2
against a single process, and a SIGTERM followed by `--resume auto`.

Independent processes are started together and awaited together: each spends seconds importing torch and
transformers, which overlaps well even on two cores."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import model  # noqa: F401  (registers the model with the Auto classes)
from utils.data import build_token_cache

pytestmark = pytest.mark.slow  # every test here launches the script (most through torchrun)

ROOT = Path(__file__).resolve().parents[1]
DATA = str(ROOT / "datasets/demo/pretrain_val.jsonl")
TIMEOUT = 240


def environment() -> dict[str, str]:
    env = {key: value for key, value in os.environ.items()
           if key not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def tiny_args(out_dir: Path, cache_dir: Path, **overrides) -> list[str]:
    """Command-line overrides for a tiny, fast run; `overrides` use `section__key` names."""
    values = {
        "model.hidden_size": 32, "model.num_hidden_layers": 2, "model.num_attention_heads": 4,
        "model.num_key_value_heads": 2, "model.max_position_embeddings": 64,
        "data.train_files": DATA, "data.val_files": DATA, "data.seq_len": 32, "data.cache_dir": cache_dir,
        "train.out_dir": out_dir, "train.max_steps": 6, "train.micro_batch_size": 2, "train.grad_accum_steps": 1,
        "train.precision": "fp32", "optim.lr": 1e-2, "optim.min_lr": 1e-3, "optim.warmup_steps": 2,
        "eval.max_batches": 2, "logging.every_steps": 1, "logging.swanlab_mode": "disabled",
        "logging.sample_tokens": 4,
    }
    values.update({key.replace("__", "."): value for key, value in overrides.items()})
    arguments = []
    for key, value in values.items():
        arguments += [f"--{key}", str(value)]
    return arguments


def start(arguments: list[str], log_dir: Path, name: str, processes: int = 1) -> subprocess.Popen:
    """Start model_pretrain.py (under torchrun when `processes` > 1); stdout and stderr go to files, so that a
    chatty run can never block on a full pipe."""
    if processes > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
                   "model_pretrain.py", *arguments]
    else:
        command = [sys.executable, "model_pretrain.py", *arguments]
    log_dir.mkdir(parents=True, exist_ok=True)
    stdout = open(log_dir / f"{name}.out", "w")
    stderr = open(log_dir / f"{name}.err", "w")
    # A session of its own, so that a hung run can be killed with all its children (torchrun's workers).
    process = subprocess.Popen(command, cwd=ROOT, env=environment(), stdout=stdout, stderr=stderr,
                               start_new_session=True)
    process.log_files = (log_dir / f"{name}.out", log_dir / f"{name}.err")
    stdout.close()
    stderr.close()
    return process


def kill(process: subprocess.Popen) -> None:
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait()


def finish(process: subprocess.Popen, timeout: float = TIMEOUT) -> tuple[int, str, str]:
    try:
        code = process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill(process)
        raise
    out, err = (path.read_text(errors="replace") for path in process.log_files)
    return code, out, err


def finish_all(started: dict[str, tuple[subprocess.Popen, Path | None]]) -> dict[str, tuple]:
    """Wait for every process: name -> (exit code, stdout, stderr, out_dir). On any failure, kill the rest."""
    try:
        return {name: (*finish(process), out_dir) for name, (process, out_dir) in started.items()}
    finally:
        for process, _ in started.values():
            kill(process)


def complete_rows(out_dir: Path) -> int:
    """Number of complete lines in metrics.jsonl, for polling a file that is being written."""
    path = out_dir / "metrics.jsonl"
    return path.read_text().count("\n") if path.is_file() else 0


def train_rows(out_dir: Path) -> list[dict]:
    path = out_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [row for row in (json.loads(line) for line in path.read_text().splitlines() if line.strip())
            if "loss" in row]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("token-cache")


# --------------------------------------------------------------------------------------------------- 1. input errors

ERROR_CASES = {
    "unknown key": (dict(train__max_step=3), ["train.max_step", "max_steps", "micro_batch_size"]),
    "wrong type": (dict(train__max_steps="abc"), ["train.max_steps", "abc"]),
    "precision": (dict(train__precision="fp8"), ["train.precision", "fp8"]),
    "strategy": (dict(train__strategy="tp"), ["train.strategy", "tp"]),
    "swanlab mode": (dict(logging__swanlab_mode="online"), ["logging.swanlab_mode", "online"]),
    "missing data": (dict(data__train_files="datasets/demo/no_such_file.jsonl"), ["no_such_file.jsonl"]),
    "seq_len": (dict(data__seq_len=128), ["seq_len", "128", "max_position_embeddings"]),
}


@pytest.fixture(scope="module")
def cli_results(tmp_path_factory, cache_dir):
    """`--help` and every error case, run at the same time: name -> (exit code, stdout, stderr, out_dir)."""
    root = tmp_path_factory.mktemp("cli")
    started = {"help": (start(["--help"], root, "help"), None)}
    for index, (name, (overrides, _)) in enumerate(ERROR_CASES.items()):
        out_dir = root / f"out{index}"
        started[name] = (start(tiny_args(out_dir, cache_dir, **overrides), root, f"case{index}"), out_dir)
    return finish_all(started)


def test_help_lists_every_key_with_its_default(cli_results):
    code, out, err, _ = cli_results["help"]
    assert code == 0, err
    assert "--resume" in out and "--config" in out
    assert "--train.max_steps (int | null, default: 400)" in out
    assert "--train.precision (auto|fp32|bf16|fp16, default: 'auto')" in out  # choices are listed
    assert "--model.hidden_size (int, default: 512)" in out  # ByteModelConfig's own default
    assert "--optim.lr (float, default: 0.003)" in out
    for key in ("--model.hidden_size", "--data.seq_len", "--train.precision", "--checkpoint.keep_last",
                "--eval.patience", "--logging.swanlab_mode"):
        assert key in out, key


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_input_error_exits_2_with_one_line(cli_results, case):
    code, out, err, out_dir = cli_results[case]
    assert code == 2, (code, err[-2000:])
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    for fragment in ERROR_CASES[case][1]:
        assert fragment in lines[0], (fragment, lines[0])
    assert not (out_dir / "checkpoints").exists()


# --------------------------------------------------------------------------------------------------- 2-3. DDP, FSDP2

# A constant learning rate, so that runs of different lengths share the schedule of their common steps.
DISTRIBUTED = dict(optim__lr=1e-2, optim__min_lr=1e-2, optim__warmup_steps=0)


@pytest.fixture(scope="module")
def distributed_runs(tmp_path_factory, cache_dir):
    """DDP (2 processes, micro-batch 2), one process (micro-batch 2, accumulation 2) and FSDP2 (2 processes,
    4 steps, and 2 steps), started together. name -> (exit code, stdout, stderr, out_dir)."""
    root = tmp_path_factory.mktemp("distributed")
    runs = {
        "ddp": (dict(train__max_steps=6, train__strategy="ddp"), 2),
        "single": (dict(train__max_steps=6, train__grad_accum_steps=2), 1),
        "fsdp": (dict(train__max_steps=4, train__strategy="fsdp"), 2),
        # The first half of the FSDP run, to be continued by a resume in test_fsdp_resume_continues_the_run.
        "fsdp-half": (dict(train__max_steps=2, train__strategy="fsdp"), 2),
    }
    # The token cache is written by the first run that needs it; build it once up front so the runs only read it.
    build_token_cache([DATA], AutoTokenizer.from_pretrained(ROOT / "tokenizer"), cache_dir)
    started = {name: (start(tiny_args(root / name, cache_dir, **DISTRIBUTED, **overrides), root, name, processes),
                      root / name) for name, (overrides, processes) in runs.items()}
    return finish_all(started)


def test_ddp_two_processes_match_one_process_with_accumulation(distributed_runs):
    results = {}
    for name in ("ddp", "single"):
        code, out, err, out_dir = distributed_runs[name]
        assert code == 0, err[-3000:]
        assert (out_dir / "final" / "model.safetensors").is_file()
        results[name] = train_rows(out_dir)
    assert "2 process(es), ddp" in distributed_runs["ddp"][2]
    ddp, single = results["ddp"], results["single"]
    assert [row["step"] for row in ddp] == [row["step"] for row in single] == list(range(1, 7))
    for row_ddp, row_single in zip(ddp, single):
        assert row_ddp["loss"] == pytest.approx(row_single["loss"], abs=1e-4), (row_ddp, row_single)
        assert row_ddp["grad_norm"] == pytest.approx(row_single["grad_norm"], rel=1e-3, abs=1e-4)
    # Both saw the same tokens: 2 ranks x 2 samples, or 1 rank x 2 micro-batches x 2 samples, of 32 tokens a step.
    states = [json.loads((distributed_runs[name][3] / "checkpoints" / "step_6" / "trainer_state.json").read_text())
              for name in ("ddp", "single")]
    assert states[0]["tokens_seen"] == states[1]["tokens_seen"] == 6 * 4 * 32
    # The loss moved: this was training, not just the same forward pass twice.
    assert single[-1]["loss"] < single[0]["loss"]


def test_fsdp_two_processes_train_and_save_a_loadable_model(distributed_runs):
    code, out, err, out_dir = distributed_runs["fsdp"]
    assert code == 0, err[-3000:]
    assert "2 process(es), fsdp" in err
    rows = train_rows(out_dir)
    assert [row["step"] for row in rows] == [1, 2, 3, 4]
    assert all(math.isfinite(row["loss"]) and math.isfinite(row["grad_norm"]) for row in rows)
    final = out_dir / "final"
    loaded = AutoModelForCausalLM.from_pretrained(final).eval()
    tokenizer = AutoTokenizer.from_pretrained(final)
    ids = tokenizer("Once upon a time", return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = loaded(ids).logits
    assert logits.shape[-1] == len(tokenizer) and torch.isfinite(logits).all()
    assert (out_dir / "checkpoints" / "step_4" / "optimizer.pt").is_file()

    ddp_code, _, ddp_err, ddp_dir = distributed_runs["ddp"]
    assert ddp_code == 0, ddp_err[-3000:]
    for row_fsdp, row_ddp in zip(rows, train_rows(ddp_dir)[:4]):
        assert row_fsdp["loss"] == pytest.approx(row_ddp["loss"], abs=1e-3), (row_fsdp, row_ddp)


def test_fsdp_resume_continues_the_run(distributed_runs, cache_dir):
    code, _, err, out_dir = distributed_runs["fsdp-half"]
    assert code == 0, err[-3000:]
    assert (out_dir / "checkpoints" / "latest").read_text().strip() == "step_2"
    resumed = start(tiny_args(out_dir, cache_dir, **DISTRIBUTED, train__max_steps=4, train__strategy="fsdp")
                    + ["--resume", "auto"], out_dir.parent, "fsdp-resume", processes=2)
    code, _, err = finish(resumed)
    assert code == 0, err[-3000:]
    assert "resumed from" in err and "step_2 (step 2)" in err
    rows = train_rows(out_dir)
    reference = train_rows(distributed_runs["fsdp"][3])
    assert [row["step"] for row in rows] == [row["step"] for row in reference] == [1, 2, 3, 4]
    for row, expected in zip(rows, reference):
        assert row["loss"] == pytest.approx(expected["loss"], abs=1e-6), (row, expected)
        assert row["grad_norm"] == pytest.approx(expected["grad_norm"], abs=1e-6), (row, expected)


def eval_rows(out_dir: Path) -> list[dict]:
    return [row for row in (json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()
                            if line.strip()) if "val_loss" in row]


def test_validation_loss_does_not_depend_on_the_number_of_processes(distributed_runs):
    rows = {}
    for name in ("ddp", "single"):
        code, _, err, out_dir = distributed_runs[name]
        assert code == 0, err[-3000:]
        rows[name] = eval_rows(out_dir)
    assert [row["step"] for row in rows["ddp"]] == [row["step"] for row in rows["single"]] == [6]
    # The models are the same (training losses agree to 1e-4 above), so the validation losses must agree too.
    assert rows["ddp"][0]["val_loss"] == pytest.approx(rows["single"][0]["val_loss"], abs=1e-4)


# -------------------------------------------------------------------------------------------------------- 4. SIGTERM

def test_sigterm_saves_a_checkpoint_and_resume_finishes(tmp_path, cache_dir):
    out_dir = tmp_path / "out"
    arguments = tiny_args(out_dir, cache_dir, train__max_steps=2000, checkpoint__every_steps=1000,
                          eval__every_steps=1000, logging__every_steps=1)
    process = start(arguments, tmp_path, "run")
    try:
        deadline = time.monotonic() + 120
        while complete_rows(out_dir) < 3:
            assert process.poll() is None, finish(process)[2][-3000:]
            assert time.monotonic() < deadline, "no 3 metrics rows within 120 s"
            time.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        code, out, err = finish(process, timeout=60)
    finally:
        kill(process)
    assert code == 0, err[-3000:]
    assert "received SIGTERM" in err
    steps = [int(path.name[5:]) for path in (out_dir / "checkpoints").glob("step_*")]
    assert len(steps) == 1 and steps[0] >= 3, steps
    stopped_at = steps[0]
    assert (out_dir / "checkpoints" / "latest").read_text().strip() == f"step_{stopped_at}"
    assert [row["step"] for row in train_rows(out_dir)] == list(range(1, stopped_at + 1))
    assert not (out_dir / "final").exists()

    resumed = start(tiny_args(out_dir, cache_dir, train__max_steps=stopped_at + 2, checkpoint__every_steps=1000,
                              eval__every_steps=1000) + ["--resume", "auto"], tmp_path, "resume")
    code, out, err = finish(resumed)
    assert code == 0, err[-3000:]
    assert f"resumed from {out_dir / 'checkpoints' / f'step_{stopped_at}'}" in err
    assert [row["step"] for row in train_rows(out_dir)] == list(range(1, stopped_at + 3))
    assert (out_dir / "final" / "model.safetensors").is_file()
    assert (out_dir / "checkpoints" / "latest").read_text().strip() == f"step_{stopped_at + 2}"


def test_bad_data_with_two_processes_exits_2_on_every_rank(tmp_path):
    # Rank 0 builds the data cache first; its error must reach rank 1 instead of leaving it waiting at a barrier.
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "model_pretrain.py", "--data.train_files", str(tmp_path / "absent.jsonl"),
               "--train.out_dir", str(tmp_path / "out"), "--logging.swanlab_mode", "disabled"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=180,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    assert result.returncode != 0
    assert result.stderr.count("error: data file not found") == 2, result.stderr[-2000:]
    assert "[rank1]: Traceback" not in result.stderr and "[rank0]: Traceback" not in result.stderr


def test_streaming_with_two_processes_records_every_shard_and_resumes(tmp_path):
    out_dir = tmp_path / "out"
    data = ROOT / "datasets" / "demo" / "pretrain_val.jsonl"
    common = ["model_pretrain.py", "--data.streaming", "true", "--data.train_files", f"[{data}]",
              "--data.val_files", "[]", "--model.hidden_size", "32", "--model.num_hidden_layers", "2",
              "--model.num_attention_heads", "4", "--data.seq_len", "32", "--train.micro_batch_size", "2",
              "--train.out_dir", str(out_dir), "--checkpoint.every_steps", "2", "--logging.every_steps", "1",
              "--logging.swanlab_mode", "disabled", "--logging.sample_tokens", "2", "--train.precision", "fp32"]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    first = subprocess.run(launcher + common + ["--train.max_steps", "4"], cwd=ROOT, capture_output=True,
                           text=True, timeout=240, env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    state = json.loads((out_dir / "checkpoints" / "step_4" / "trainer_state.json").read_text())
    assert state["sampler"]["num_shards"] == 2 and set(state["sampler"]["positions"]) == {"0", "1"}
    second = subprocess.run(launcher + common + ["--train.max_steps", "6", "--resume", "auto"], cwd=ROOT,
                            capture_output=True, text=True, timeout=240, env=env)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stderr and (out_dir / "checkpoints" / "step_6").is_dir()
