"""The pretraining command line (model_pretrain.py): help and input errors through the script's entry in this
process; as real processes, 2-process DDP and FSDP2 against a single process, a SIGTERM followed by
`--resume auto`, streamed data on two ranks, and bad data on two ranks.

Every real process is started by one fixture, as soon as its input exists (a continuation when the run it continues
has ended): each spends seconds importing torch and transformers, which overlaps well even on two cores."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import model  # noqa: F401  (registers the model with the Auto classes)
import model_pretrain
from helpers import project_logger_restored
from utils.data import build_token_cache
from utils.trainer import run_training

pytestmark = pytest.mark.slow  # most tests here wait for real runs of the script, many through torchrun

ROOT = Path(__file__).resolve().parents[1]
DATA = str(ROOT / "datasets/demo/pretrain_val.jsonl")
TIMEOUT = 240
DISTRIBUTED_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def environment() -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in DISTRIBUTED_VARIABLES}
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
        "logging.sample_tokens": 4, "logging.plots": False,
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


def eval_rows(out_dir: Path) -> list[dict]:
    return [row for row in (json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()
                            if line.strip()) if "val_loss" in row]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("token-cache")


# --------------------------------------------------------------------------------------------------- 1. input errors

@pytest.fixture
def run_script(monkeypatch, capsys):
    """model_pretrain.py's entry (run_training with the script's task and default config) in this process, as its
    command line calls it: arguments -> (exit code, stdout, stderr). The real processes below prove the command line
    itself; a process per error case would mostly measure the torch and transformers import."""
    monkeypatch.chdir(ROOT)  # the default config and tokenizer are found relative to the repository, as by the script
    for key in DISTRIBUTED_VARIABLES:
        monkeypatch.delenv(key, raising=False)

    def run(arguments: list[str]) -> tuple[int, str, str]:
        try:
            run_training(model_pretrain.PRETRAINING, "configs/model_pretrain.yaml",
                         model_pretrain.__doc__.splitlines()[0], arguments)
            code = 0
        except SystemExit as stop:
            code = stop.code
        out, err = capsys.readouterr()
        return code, out, err

    # The trainer points the project logger at this test's captured stderr and its train.log: put it back after.
    with project_logger_restored():
        yield run


ERROR_CASES = {
    "unknown key": (dict(train__max_step=3), ["train.max_step", "max_steps", "micro_batch_size"]),
    "wrong type": (dict(train__max_steps="abc"), ["train.max_steps", "abc"]),
    "precision": (dict(train__precision="fp8"), ["train.precision", "fp8"]),
    "strategy": (dict(train__strategy="tp"), ["train.strategy", "tp"]),
    "swanlab mode": (dict(logging__swanlab_mode="online"), ["logging.swanlab_mode", "online"]),
    "missing data": (dict(data__train_files="datasets/demo/no_such_file.jsonl"), ["no_such_file.jsonl"]),
    "seq_len": (dict(data__seq_len=128), ["seq_len", "128", "max_position_embeddings"]),
    "expert parallel size": (dict(train__expert_parallel_size=2),
                             ["train.expert_parallel_size=2 does not divide the 1 process(es)"]),
}


def test_help_lists_every_key_with_its_default(run_script):
    code, out, err = run_script(["--help"])
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
def test_input_error_exits_2_with_one_line(run_script, cache_dir, tmp_path, case):
    out_dir = tmp_path / "out"
    code, out, err = run_script(tiny_args(out_dir, cache_dir, **ERROR_CASES[case][0]))
    assert code == 2, (code, err[-2000:])
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    for fragment in ERROR_CASES[case][1]:
        assert fragment in lines[0], (fragment, lines[0])
    assert not (out_dir / "checkpoints").exists()


# --------------------------------------------------------------------------------------------------- the processes

# A constant learning rate, so that runs of different lengths share the schedule of their common steps.
DISTRIBUTED = dict(optim__lr=1e-2, optim__min_lr=1e-2, optim__warmup_steps=0)
# Trains until SIGTERM stops it; no checkpoint or evaluation of its own before then.
UNTIL_SIGTERM = dict(checkpoint__every_steps=1000, eval__every_steps=1000)


def streaming_args(out_dir: Path, max_steps: int) -> list[str]:
    return ["--data.streaming", "true", "--data.train_files", f"[{DATA}]", "--data.val_files", "[]",
            "--model.hidden_size", "32", "--model.num_hidden_layers", "2", "--model.num_attention_heads", "4",
            "--data.seq_len", "32", "--train.micro_batch_size", "2", "--train.out_dir", str(out_dir),
            "--checkpoint.every_steps", "2", "--logging.every_steps", "1", "--logging.swanlab_mode", "disabled",
            "--logging.sample_tokens", "2", "--train.precision", "fp32", "--train.max_steps", str(max_steps)]


class Run(NamedTuple):
    code: int
    out: str
    err: str
    out_dir: Path
    left: dict  # what the run left in out_dir, read before a continuation of it changes the folder


def left_behind(out_dir: Path) -> dict:
    checkpoints = out_dir / "checkpoints"
    folders = sorted(checkpoints.glob("step_*"))
    return {"step_folders": [folder.name for folder in folders],
            "latest": (checkpoints / "latest").read_text().strip() if (checkpoints / "latest").is_file() else None,
            "trainer_states": {folder.name: json.loads((folder / "trainer_state.json").read_text())
                               for folder in folders if (folder / "trainer_state.json").is_file()},
            "train_steps": [row["step"] for row in train_rows(out_dir)], "final": (out_dir / "final").exists()}


def continuation(name: str, run: Run, cache_dir: Path) -> tuple[str, list[str], int] | None:
    """The run that continues `name` from its checkpoint once it has ended as expected: (name, arguments,
    processes), or None (the test of the first run then says what went wrong)."""
    if run.code != 0:
        return None
    if name == "fsdp-half":
        return "fsdp-resume", tiny_args(run.out_dir, cache_dir, **DISTRIBUTED, train__max_steps=4,
                                        train__strategy="fsdp") + ["--resume", "auto"], 2
    if name == "streaming":
        return "streaming-resume", streaming_args(run.out_dir, max_steps=6) + ["--resume", "auto"], 2
    if name == "sigterm" and len(run.left["step_folders"]) == 1:
        stopped_at = int(run.left["step_folders"][0][5:])
        arguments = tiny_args(run.out_dir, cache_dir, **UNTIL_SIGTERM, train__max_steps=stopped_at + 2)
        return "sigterm-resume", arguments + ["--resume", "auto"], 1
    return None


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache_dir) -> dict[str, Run]:
    """Every run of the script as a real process, all started at once and each continuation as soon as the run it
    continues has ended: name -> Run. A continuation writes into the folder of the run it continues.

    - ddp: 2 processes, micro-batch 2; single: one process, micro-batch 2, accumulation 2; fsdp: FSDP2, 4 steps;
      fsdp-half: its first 2 steps, continued by fsdp-resume;
    - sigterm: stopped by SIGTERM once it has logged 3 steps, continued by sigterm-resume for 2 more;
    - streaming: streamed data on 2 ranks for 4 steps, continued by streaming-resume to step 6;
    - bad-data: 2 processes and a training file that does not exist."""
    root = tmp_path_factory.mktemp("runs")
    planned = {
        "sigterm": (tiny_args(root / "sigterm", cache_dir, **UNTIL_SIGTERM, train__max_steps=2000), 1),
        "fsdp-half": (tiny_args(root / "fsdp-half", cache_dir, **DISTRIBUTED, train__max_steps=2,
                                train__strategy="fsdp"), 2),
        "streaming": (streaming_args(root / "streaming", max_steps=4), 2),
        "ddp": (tiny_args(root / "ddp", cache_dir, **DISTRIBUTED, train__max_steps=6, train__strategy="ddp"), 2),
        "single": (tiny_args(root / "single", cache_dir, **DISTRIBUTED, train__max_steps=6,
                             train__grad_accum_steps=2, logging__plots=True), 1),
        "fsdp": (tiny_args(root / "fsdp", cache_dir, **DISTRIBUTED, train__max_steps=4, train__strategy="fsdp"), 2),
        "bad-data": (["--data.train_files", str(root / "absent.jsonl"), "--train.out_dir", str(root / "bad-data"),
                      "--logging.swanlab_mode", "disabled"], 2),
    }
    out_dirs = {name: root / name for name in planned}
    out_dirs.update({"fsdp-resume": root / "fsdp-half", "streaming-resume": root / "streaming",
                     "sigterm-resume": root / "sigterm"})
    # The token cache is written by the first run that needs it; build it once up front so the runs only read it.
    build_token_cache([DATA], AutoTokenizer.from_pretrained(ROOT / "tokenizer"), cache_dir)
    running = {name: (start(arguments, root, name, processes), time.monotonic())
               for name, (arguments, processes) in planned.items()}
    results, signalled = {}, False
    try:
        while running:
            if not signalled and "sigterm" in running and complete_rows(out_dirs["sigterm"]) >= 3:
                running["sigterm"][0].send_signal(signal.SIGTERM)
                signalled = True
            for name, (process, started_at) in list(running.items()):
                if process.poll() is None:
                    assert time.monotonic() - started_at < TIMEOUT, f"{name}: still running after {TIMEOUT} s"
                    continue
                del running[name]
                out, err = (path.read_text(errors="replace") for path in process.log_files)
                results[name] = Run(process.returncode, out, err, out_dirs[name], left_behind(out_dirs[name]))
                follow = continuation(name, results[name], cache_dir)
                if follow is not None:
                    follow_name, arguments, processes = follow
                    running[follow_name] = (start(arguments, root, follow_name, processes), time.monotonic())
            time.sleep(0.2)
    finally:
        for process, _ in running.values():
            kill(process)
    return results


def test_ddp_two_processes_match_one_process_with_accumulation(runs):
    results = {}
    for name in ("ddp", "single"):
        code, out, err, out_dir, _ = runs[name]
        assert code == 0, err[-3000:]
        assert (out_dir / "final" / "model.safetensors").is_file()
        results[name] = train_rows(out_dir)
    assert "2 process(es), ddp" in runs["ddp"].err
    ddp, single = results["ddp"], results["single"]
    assert [row["step"] for row in ddp] == [row["step"] for row in single] == list(range(1, 7))
    for row_ddp, row_single in zip(ddp, single):
        assert row_ddp["loss"] == pytest.approx(row_single["loss"], abs=1e-4), (row_ddp, row_single)
        assert row_ddp["grad_norm"] == pytest.approx(row_single["grad_norm"], rel=1e-3, abs=1e-4)
    # Both saw the same tokens: 2 ranks x 2 samples, or 1 rank x 2 micro-batches x 2 samples, of 32 tokens a step.
    states = [json.loads((runs[name].out_dir / "checkpoints" / "step_6" / "trainer_state.json").read_text())
              for name in ("ddp", "single")]
    assert states[0]["tokens_seen"] == states[1]["tokens_seen"] == 6 * 4 * 32
    # The loss moved: this was training, not just the same forward pass twice.
    assert single[-1]["loss"] < single[0]["loss"]
    # The command line draws the run's figures and writes its samples (the evaluation's and final/'s).
    out_dir = runs["single"].out_dir
    assert sorted(path.name for path in (out_dir / "plots").iterdir()) == ["loss.png", "optimization.png"]
    samples = [json.loads(line) for line in (out_dir / "samples.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [(row["step"], row.get("final", False)) for row in samples] == [(6, False)] * 2 + [(6, True)] * 2


def test_fsdp_two_processes_train_and_save_a_loadable_model(runs):
    code, out, err, out_dir, _ = runs["fsdp"]
    assert code == 0, err[-3000:]
    assert "2 process(es), fsdp" in err
    # The sharded model generates its evaluation samples with every rank taking part; rank 0 writes them.
    samples = [json.loads(line) for line in (out_dir / "samples.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [row["step"] for row in samples if not row.get("final")] == [4, 4]
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

    ddp_code, _, ddp_err, ddp_dir, _ = runs["ddp"]
    assert ddp_code == 0, ddp_err[-3000:]
    for row_fsdp, row_ddp in zip(rows, train_rows(ddp_dir)[:4]):
        assert row_fsdp["loss"] == pytest.approx(row_ddp["loss"], abs=1e-3), (row_fsdp, row_ddp)


def test_fsdp_resume_continues_the_run(runs):
    half = runs["fsdp-half"]
    assert half.code == 0, half.err[-3000:]
    assert half.left["latest"] == "step_2"
    code, _, err, out_dir, _ = runs["fsdp-resume"]
    assert code == 0, err[-3000:]
    assert "resumed from" in err and "step_2 (step 2)" in err
    rows = train_rows(out_dir)
    reference = train_rows(runs["fsdp"].out_dir)
    assert [row["step"] for row in rows] == [row["step"] for row in reference] == [1, 2, 3, 4]
    for row, expected in zip(rows, reference):
        assert row["loss"] == pytest.approx(expected["loss"], abs=1e-6), (row, expected)
        assert row["grad_norm"] == pytest.approx(expected["grad_norm"], abs=1e-6), (row, expected)


def test_validation_loss_does_not_depend_on_the_number_of_processes(runs):
    rows = {}
    for name in ("ddp", "single"):
        code, _, err, out_dir, _ = runs[name]
        assert code == 0, err[-3000:]
        rows[name] = eval_rows(out_dir)
    assert [row["step"] for row in rows["ddp"]] == [row["step"] for row in rows["single"]] == [6]
    # The models are the same (training losses agree to 1e-4 above), so the validation losses must agree too.
    assert rows["ddp"][0]["val_loss"] == pytest.approx(rows["single"][0]["val_loss"], abs=1e-4)


def test_sigterm_saves_a_checkpoint_and_resume_finishes(runs):
    code, _, err, out_dir, left = runs["sigterm"]
    assert code == 0, err[-3000:]
    assert "received SIGTERM" in err
    steps = [int(name[5:]) for name in left["step_folders"]]
    assert len(steps) == 1 and steps[0] >= 3, steps
    stopped_at = steps[0]
    assert left["latest"] == f"step_{stopped_at}"
    assert left["train_steps"] == list(range(1, stopped_at + 1))
    assert not left["final"]

    code, _, err, _, _ = runs["sigterm-resume"]
    assert code == 0, err[-3000:]
    assert f"resumed from {out_dir / 'checkpoints' / f'step_{stopped_at}'}" in err
    assert [row["step"] for row in train_rows(out_dir)] == list(range(1, stopped_at + 3))
    assert (out_dir / "final" / "model.safetensors").is_file()
    assert (out_dir / "checkpoints" / "latest").read_text().strip() == f"step_{stopped_at + 2}"


def test_bad_data_with_two_processes_exits_2_on_every_rank(runs):
    # Rank 0 builds the data cache first; its error must reach rank 1 instead of leaving it waiting at a barrier.
    code, _, err, _, _ = runs["bad-data"]
    assert code != 0
    assert err.count("error: data file not found") == 2, err[-2000:]
    assert "[rank1]: Traceback" not in err and "[rank0]: Traceback" not in err


def test_streaming_with_two_processes_records_every_shard_and_resumes(runs):
    first = runs["streaming"]
    assert first.code == 0, first.err[-3000:]
    state = first.left["trainer_states"]["step_4"]
    assert state["sampler"]["num_shards"] == 2 and set(state["sampler"]["positions"]) == {"0", "1"}
    second = runs["streaming-resume"]
    assert second.code == 0, second.err[-3000:]
    assert "resumed from" in second.err and (second.out_dir / "checkpoints" / "step_6").is_dir()
