"""model_rlhf_train.py: the preference stage on the one engine: ln 2 at the first step, the metrics it writes, exact
resume after a signal, DDP equal to accumulation, one-line input errors, and a final/ that loads, chats and exports."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

import model  # noqa: F401  (registers the model with the Auto classes)
import model_rlhf_train
from helpers import cli_arguments, overridden, save_tiny_start, script_environment, write_lines
from training import read_metrics, stop_before_call, step_folders
from utils.config import PreferenceConfig, build_config
from utils.trainer import run_training
from utils.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
SFT_VAL = ROOT / "datasets" / "demo" / "sft_val.jsonl"
sys.path.insert(0, str(ROOT / "scripts"))
import chat  # noqa: E402
import export_hf  # noqa: E402

PREFERENCE_KEYS = ("rewards_chosen", "rewards_rejected", "reward_margin", "reward_accuracy", "logps_chosen",
                   "logps_rejected")


@pytest.fixture(scope="module")
def start(tmp_path_factory) -> dict[str, Path]:
    """A tiny starting model with the demo tokenizer, and pairs built from the SFT validation conversations (the
    next conversation's reply is the rejected one)."""
    folder = tmp_path_factory.mktemp("rlhf")
    save_tiny_start(folder / "sft")
    conversations = [json.loads(line)["conversations"] for line in SFT_VAL.read_text().splitlines()]
    pairs = []
    for index, turns in enumerate(conversations):
        other = conversations[(index + 1) % len(conversations)][-1]["content"]
        if other != turns[-1]["content"]:
            pairs.append({"prompt": turns[:-1], "chosen": [turns[-1]],
                          "rejected": [{"role": "assistant", "content": other}]})
    return {"model": folder / "sft", "pairs": write_lines(folder / "pairs.jsonl", pairs[:32])}


def values(start: dict[str, Path], out_dir: Path, **sections) -> dict:
    result = {"model": {"init_from": str(start["model"])},
              "data": {"train_files": [str(start["pairs"])], "val_files": [str(start["pairs"])], "seq_len": 64},
              "train": {"out_dir": str(out_dir), "max_steps": 12, "micro_batch_size": 2, "precision": "fp32",
                        "compile": False, "seed": 7},
              "optim": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 2},
              "checkpoint": {"every_steps": 4, "keep_last": 3},
              "eval": {"every_steps": 6, "max_batches": 2},
              "logging": {"every_steps": 1, "swanlab_mode": "disabled", "sample_tokens": 4, "plots": False}}
    return overridden(result, sections)


def fit(config_values: dict, resume: str | None = None) -> dict:
    return Trainer(build_config(PreferenceConfig, config_values), model_rlhf_train.PREFERENCE, resume).fit()


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return AutoModelForCausalLM.from_pretrained(folder).state_dict()


def test_first_step_is_ln_2_and_the_rows_carry_the_preference_metrics(start, tmp_path):
    out_dir = tmp_path / "run"
    summary = fit(values(start, out_dir, train={"max_steps": 6}, eval={"every_steps": 3, "at_start": True}))
    rows, evaluations = read_metrics(out_dir)
    # The policy starts as the reference: every reward is 0, the loss is -log sigmoid(0).
    assert abs(rows[0]["loss"] - math.log(2)) < 1e-4
    assert rows[0]["reward_margin"] == 0 and rows[0]["reward_accuracy"] == 0.5
    assert all(key in row for row in rows for key in (*PREFERENCE_KEYS, "lr", "grad_norm", "tokens_per_s"))
    assert rows[-1]["loss"] != rows[0]["loss"] and summary["reason"] == "finished"
    assert [row["step"] for row in evaluations] == [0, 3, 6]
    assert evaluations[0]["val_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert evaluations[0]["val_reward_accuracy"] == 0.5
    for row in evaluations:
        assert {f"val_{key}" for key in PREFERENCE_KEYS} <= set(row) and "val_ppl" not in row
        # The loss is a function of the margin alone; the log rows must agree with it.
        assert row["val_reward_margin"] == pytest.approx(
            row["val_rewards_chosen"] - row["val_rewards_rejected"], abs=1e-5)
    assert (out_dir / "final" / "model.safetensors").is_file()


def test_reference_from_is_the_model_the_policy_is_measured_against(start, tmp_path):
    """With rlhf.reference_from a model other than the starting one, that model is the frozen reference: the first
    step's rewards, zero against the starting model itself, measure the policy against it."""
    other = tmp_path / "other"
    reference = AutoModelForCausalLM.from_pretrained(start["model"])
    with torch.no_grad():
        reference.lm_head.weight.mul_(3.0)
    reference.save_pretrained(other)
    margins = {}
    for name, rlhf in (("start", {}), ("other", {"reference_from": str(other)})):
        trainer = Trainer(build_config(PreferenceConfig, values(start, tmp_path / name, rlhf=rlhf)),
                          model_rlhf_train.PREFERENCE)
        trainer.train_step([next(iter(trainer.batches))])
        margins[name] = trainer.step_metrics["reward_margin"]
        trainer.metrics.close()
    used = trainer.loss.reference.model.state_dict()
    assert all(torch.equal(value, used[name]) for name, value in reference.state_dict().items())
    assert margins["start"] == 0 and margins["other"] != 0


@pytest.fixture(scope="module")
def straight_run(start, tmp_path_factory) -> tuple[dict, Path]:
    out_dir = tmp_path_factory.mktemp("straight")
    return fit(values(start, out_dir)), out_dir


@pytest.mark.slow
def test_a_run_stopped_by_a_signal_resumes_bitwise_equal_to_the_straight_run(start, straight_run, tmp_path,
                                                                              monkeypatch):
    straight, straight_dir = straight_run
    stop_before_call(monkeypatch, 7)  # SIGTERM during step 7: the run saves step 6 and stops
    stopped = fit(values(start, tmp_path / "resumed"))
    assert stopped["reason"] == "stopped by signal" and step_folders(tmp_path / "resumed")[-1] == "step_6"
    monkeypatch.undo()
    resumed = fit(values(start, tmp_path / "resumed"), resume="auto")
    assert stopped["losses"] + resumed["losses"] == straight["losses"]
    before, after = weights(straight_dir / "final"), weights(tmp_path / "resumed" / "final")
    assert all(torch.equal(before[name], after[name]) for name in before)


@pytest.mark.slow
def test_precomputed_reference_is_stored_once_and_reused_on_resume(start, straight_run, tmp_path, monkeypatch):
    out_dir = tmp_path / "run"
    config = values(start, out_dir, rlhf={"precompute_reference": True})
    stop_before_call(monkeypatch, 5)
    stopped = fit(config)
    monkeypatch.undo()
    stored = (out_dir / "reference_logps.pt").stat().st_mtime_ns
    resumed = fit(config, resume="auto")
    assert (out_dir / "reference_logps.pt").stat().st_mtime_ns == stored
    assert "reference log-probabilities read from" in (out_dir / "train.log").read_text()
    # The same training as with the reference model alive: padding to another batch's length changes rounding only.
    torch.testing.assert_close(torch.tensor(stopped["losses"] + resumed["losses"]),
                               torch.tensor(straight_run[0]["losses"]), atol=1e-5, rtol=0)


@pytest.mark.slow
def test_ddp_two_processes_equal_one_process_with_doubled_accumulation(start, tmp_path):
    runs = {"ddp": (["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"], 1),
            "single": ([], 2)}
    processes = {}
    for name, (launcher, accumulation) in runs.items():
        arguments = cli_arguments(values(start, tmp_path / name, train={"max_steps": 4,
                                                                        "grad_accum_steps": accumulation},
                                         checkpoint={"every_steps": 4}, eval={"every_steps": 4}))
        processes[name] = subprocess.Popen([sys.executable, *launcher, "model_rlhf_train.py", *arguments], cwd=ROOT,
                                           env=script_environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                           text=True)
    for name, process in processes.items():
        output, _ = process.communicate(timeout=300)
        assert process.returncode == 0, output[-2000:]
    rows = {name: read_metrics(tmp_path / name) for name in runs}
    for key in ("loss", "reward_accuracy", "reward_margin", "grad_norm"):
        torch.testing.assert_close(torch.tensor([row[key] for row in rows["ddp"][0]]),
                                   torch.tensor([row[key] for row in rows["single"][0]]), atol=1e-5, rtol=0)
    torch.testing.assert_close(rows["ddp"][1][-1]["val_loss"], rows["single"][1][-1]["val_loss"], atol=1e-5, rtol=0)
    ddp, single = weights(tmp_path / "ddp" / "final"), weights(tmp_path / "single" / "final")
    for name in single:
        torch.testing.assert_close(ddp[name], single[name], atol=1e-5, rtol=0)


def without_chat_template(source: Path, folder: Path) -> Path:
    tokenizer = AutoTokenizer.from_pretrained(source)
    tokenizer.chat_template = None
    AutoModelForCausalLM.from_pretrained(source).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    return folder


BAD_RECORDS = {
    "malformed JSON": "{not json",
    "missing side": json.dumps({"prompt": "hi", "chosen": "hello"}),
    "identical": json.dumps({"prompt": "hi", "chosen": "hello", "rejected": "hello"}),
    "empty reply": json.dumps({"prompt": "hi", "chosen": " ", "rejected": "hello"}),
    "unknown role": json.dumps({"prompt": [{"role": "bot", "content": "hi"}], "chosen": "a", "rejected": "b"}),
}


@pytest.mark.parametrize("case", ["beta", "reference", "init_from", "chat_template", "smoothing", *BAD_RECORDS])
def test_bad_input_ends_with_one_line_and_exit_2(start, tmp_path, capsys, case):
    out_dir = tmp_path / "run"
    overrides = {"beta": {"rlhf": {"beta": 0}},
                 "reference": {"rlhf": {"reference_from": str(tmp_path / "missing")}},
                 "init_from": {"model": {"init_from": None}},
                 "smoothing": {"rlhf": {"method": "ipo", "label_smoothing": 0.1}},
                 "chat_template": {"model": {"init_from": str(without_chat_template(start["model"], tmp_path / "m"))
                                             if case == "chat_template" else None}}}.get(case, {})
    if case in BAD_RECORDS:
        good = start["pairs"].read_text().splitlines()[0]
        data = tmp_path / "pairs.jsonl"
        data.write_text(f"{good}\n{BAD_RECORDS[case]}\n{good}\n")
        overrides = {"data": {"train_files": [str(data)], "strict": True}}
    with pytest.raises(SystemExit) as exit_info:
        run_training(model_rlhf_train.PREFERENCE, None, "rlhf", cli_arguments(values(start, out_dir, **overrides)))
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1, error
    expected = {"beta": "rlhf.beta", "reference": "rlhf.reference_from", "init_from": "model.init_from",
                "chat_template": "chat template", "smoothing": "label_smoothing"}.get(case, "pairs.jsonl:2")
    assert expected in error[0]
    # Nothing of a run was written.
    assert not (out_dir / "checkpoints").exists() and not (out_dir / "final").exists()


@pytest.mark.slow
def test_final_folder_loads_chats_and_exports(start, tmp_path, capsys):
    out_dir = tmp_path / "run"
    fit(values(start, out_dir, train={"max_steps": 2}, eval={"every_steps": 2}))
    final = out_dir / "final"
    loaded = AutoModelForCausalLM.from_pretrained(final)
    language_model, tokenizer = chat.load(str(final))
    answer = chat.reply(language_model, tokenizer, [{"role": "user", "content": "你好"}],
                        GenerationConfig(do_sample=False, max_new_tokens=5, eos_token_id=tokenizer.eos_token_id,
                                         pad_token_id=tokenizer.pad_token_id))
    assert isinstance(answer, str) and answer == capsys.readouterr().out.strip()
    exported = export_hf.main(["--model", str(final), "--out", str(tmp_path / "llama")])
    llama = AutoModelForCausalLM.from_pretrained(exported)
    assert type(llama).__name__ == "LlamaForCausalLM"
    ids = torch.tensor([[1, 5, 9, 200, 31]])
    torch.testing.assert_close(llama(ids).logits, loaded(ids).logits, atol=1e-5, rtol=0)
