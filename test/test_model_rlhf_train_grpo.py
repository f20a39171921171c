"""model_rlhf_train.py with rlhf.method grpo: the rows, samples, best/ and final/ a run writes, exact resume between
two steps that share a rollout, a loss independent of the micro-batch split, DDP equal to one process on the same
rollouts (and resumed exactly, and sampling per rank), a plain transformers Llama learning a reward of the user's
own, and one-line input errors."""

import json
import math
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

import model  # noqa: F401  (registers the model with the Auto classes)
import model_rlhf_train
from helpers import cli_arguments, overridden, save_tiny_start, script_environment, write_lines
from training import read_metrics, stop_before_call, step_folders
from utils.config import PreferenceConfig, build_config
from utils.trainer import Trainer, run_training

ROOT = Path(__file__).resolve().parents[1]
ARITHMETIC = ROOT / "datasets" / "demo" / "arithmetic_train.jsonl"
BUILT_IN = ["utils.rewards:exact_answer", "utils.rewards:partial_credit", "utils.rewards:format_reward"]
REWARDS_MODULE = "grpo_user_rewards"
LOW_IDS = f"{REWARDS_MODULE}:low_ids"
FUNCTIONS = ["exact_answer", "partial_credit", "format_reward", "low_ids"]
TRAIN_KEYS = ("loss", "grad_norm", "reward", "reward_std", "frac_reward_zero_std", "completion_length", "clip_ratio",
              "entropy", "kl", "rollout_s", "update_s", *(f"reward_{name}" for name in FUNCTIONS))

# Rewards a user would write, with TRL's signature. A random model scores about 0 on the arithmetic built-ins;
# `low_ids` gives it a signal from the first step (about 0.5, and learnable).
USER_REWARDS = '''
def low_ids(completion_ids, **kwargs):
    """The share of a completion's tokens from the lower half of the vocabulary."""
    return [sum(token < 3200 for token in ids) / len(ids) for ids in completion_ids]


def wrong_count(completions, **kwargs):
    return [0.0]


def not_finite(completions, **kwargs):
    return [float("nan")] * len(completions)


NOT_CALLABLE = 3
'''

# By a completion's place in its group (rlhf.num_generations 4): advantages that do not depend on the sampled text.
# Every call records what it scored (each group's prompt, each completion's ids), one line per process, in the folder
# $SCORED.
POSITION_REWARD = '''
import json
import os


def by_position(prompts, completions, completion_ids, **kwargs):
    path = os.path.join(os.environ["SCORED"], f"rank_{os.environ.get('RANK', '0')}.jsonl")
    with open(path, "a") as handle:
        handle.write(json.dumps({"prompts": [prompt[-1]["content"] for prompt in prompts[::4]],
                                 "completion_ids": completion_ids}) + "\\n")
    return [float(index % 4) for index in range(len(completions))]
'''

# model_rlhf_train.py with rollouts that draw no random numbers and still differ within a group: rlhf.top_k 1 makes
# sampling greedy, so a group's completions are equal and the policy gradient of its advantages (which sum to 0)
# would vanish. Each completion is therefore cut after a number of tokens given by its place in the group and its
# prompt's length, so that the ranks also hold different numbers of completion tokens.
GROUPS_OF_LENGTHS = '''
import runpy
import sys

import torch

from utils.grpo import GRPORollout, completion_mask

sampled = GRPORollout.generate


def generate(self, input_ids, attention_mask, sample):
    completion_ids, mask = sampled(self, input_ids, attention_mask, sample)
    if sample:
        rows = torch.arange(len(completion_ids))
        places = rows % self.section.num_generations
        ends = (1 + places + attention_mask.sum(1).cpu() % 3).clamp(max=completion_ids.shape[1] - 1)
        completion_ids[rows, ends] = self.eos_token_id
        mask = completion_mask(completion_ids, self.eos_token_id)
        completion_ids = completion_ids.masked_fill(mask == 0, self.pad_token_id)
    return completion_ids, mask


GRPORollout.generate = generate
sys.argv[0] = "model_rlhf_train.py"
runpy.run_path("model_rlhf_train.py", run_name="__main__")
'''


@pytest.fixture(scope="module")
def start(tmp_path_factory) -> Iterator[dict[str, Path]]:
    """A tiny starting model with the demo tokenizer, 32 training and 16 validation prompts of the arithmetic task,
    and a folder of reward modules."""
    folder = tmp_path_factory.mktemp("grpo")
    save_tiny_start(folder / "start")
    lines = ARITHMETIC.read_text(encoding="utf-8").splitlines()
    rewards = folder / "rewards"
    rewards.mkdir()
    (rewards / f"{REWARDS_MODULE}.py").write_text(USER_REWARDS)
    (rewards / "grpo_broken_rewards.py").write_text("import a_module_that_is_not_installed\n")
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(rewards))  # as a user's own modules on PYTHONPATH
        yield {"model": folder / "start", "prompts": write_lines(folder / "train.jsonl", lines[:32]),
               "val": write_lines(folder / "val.jsonl", lines[32:48])}


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """The models are tiny: more threads only wait for each other, all the more on a machine that is busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def values(start: dict[str, Path], out_dir: Path, **sections) -> dict:
    result = {"model": {"init_from": str(start["model"])},
              "data": {"train_files": [str(start["prompts"])], "val_files": [str(start["val"])], "seq_len": 32},
              "train": {"out_dir": str(out_dir), "max_steps": 6, "micro_batch_size": 8, "precision": "fp32",
                        "compile": False, "seed": 7},
              "optim": {"lr": 1e-2, "min_lr": 1e-3, "warmup_steps": 0},
              "checkpoint": {"every_steps": 3, "keep_last": 3},
              "eval": {"every_steps": 2, "max_batches": 2, "sample_prompts": []},
              "logging": {"every_steps": 1, "swanlab_mode": "disabled", "plots": False},
              "rlhf": {"method": "grpo", "beta": 0.0, "reward_functions": [*BUILT_IN, LOW_IDS], "num_generations": 4,
                       "prompts_per_step": 2, "max_completion_tokens": 8}}
    return overridden(result, sections)


def trainer(config_values: dict, resume: str | None = None) -> Trainer:
    return Trainer(build_config(PreferenceConfig, config_values), model_rlhf_train.PREFERENCE, resume)


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return AutoModelForCausalLM.from_pretrained(folder).state_dict()


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.mark.slow
def test_a_run_writes_the_grpo_rows_samples_best_and_final(start, tmp_path):
    out_dir = tmp_path / "run"
    run = trainer(values(start, out_dir, rlhf={"beta": 0.04}, eval={"at_start": True}))
    reference = run.rollout.reference[0]
    summary = run.fit()
    assert summary["reason"] == "finished" and summary["step"] == 6
    rows, _ = read_metrics(out_dir)
    evaluations = [row for row in read_jsonl(out_dir / "metrics.jsonl") if "val_reward" in row]

    assert [row["step"] for row in rows] == [1, 2, 3, 4, 5, 6]
    for row in rows:
        assert all(isinstance(row[key], float) and math.isfinite(row[key]) for key in TRAIN_KEYS), row
        # All weights are 1 and no function abstains: the reward is the sum of the functions' means.
        assert row["reward"] == pytest.approx(sum(row[f"reward_{name}"] for name in FUNCTIONS), abs=1e-5)
        assert 0 <= row["frac_reward_zero_std"] <= 1 and 0 <= row["clip_ratio"] <= 1
        assert 1 <= row["completion_length"] <= 8 and row["entropy"] > 0 and row["reward_std"] >= 0
        assert row["rollout_s"] > 0 and row["update_s"] > 0
    # The policy starts as the reference, then moves away from it.
    assert rows[0]["kl"] == 0 and all(row["kl"] > 0 for row in rows[1:])
    assert any(row["loss"] != 0 for row in rows) and rows[0]["reward_low_ids"] > 0
    # The reference stays frozen at the starting weights.
    starting = weights(start["model"])
    assert all(torch.equal(starting[name], value) for name, value in reference.state_dict().items())

    assert [row["step"] for row in evaluations] == [0, 2, 4, 6]
    for row in evaluations:
        assert row["val_reward"] == pytest.approx(sum(row[f"val_reward_{name}"] for name in FUNCTIONS), abs=1e-5)
        assert 0 <= row["val_accuracy"] <= 1 and "val_loss" not in row

    samples = read_jsonl(out_dir / "samples.jsonl")
    prompts = {json.loads(line)["prompt"][-1]["content"] for line in start["prompts"].read_text().splitlines()}
    # Each evaluation after a rollout shows its first group: num_generations completions of one prompt.
    assert [row["step"] for row in samples] == [2] * 4 + [4] * 4 + [6] * 4
    for row in samples:
        assert set(row) == {"step", "prompt", "sample", "reward"} and row["prompt"] in prompts
        assert isinstance(row["sample"], str) and isinstance(row["reward"], float)
    assert all(len({row["prompt"] for row in samples[first:first + 4]}) == 1 for first in (0, 4, 8))

    # best/ holds the evaluation with the highest val_reward (the one at the start is not a candidate).
    candidates = evaluations[1:]
    best_row = max(candidates, key=lambda row: row["val_reward"])  # the first of equals: later ones do not beat it
    best = json.loads((out_dir / "checkpoints" / "best" / "best_metrics.json").read_text())
    assert best["step"] == best_row["step"] and best["val_reward"] == best_row["val_reward"]
    assert summary["best_metric"] == best_row["val_reward"]
    final = AutoModelForCausalLM.from_pretrained(out_dir / "final")
    best_weights, last_weights = weights(out_dir / "checkpoints" / "best"), weights(out_dir / "checkpoints" / "step_6")
    assert all(torch.equal(best_weights[name], value) for name, value in final.state_dict().items())
    if best["step"] != 6:
        assert not all(torch.equal(last_weights[name], value) for name, value in final.state_dict().items())
    assert AutoTokenizer.from_pretrained(out_dir / "final").eos_token_id == run.tokenizer.eos_token_id


@pytest.mark.slow
def test_without_kl_no_reference_is_built_and_plots_show_the_rewards(start, tmp_path):
    out_dir = tmp_path / "run"
    # No validation: the figures are drawn once, at the end.
    run = trainer(values(start, out_dir, train={"max_steps": 2}, data={"val_files": []}, logging={"plots": True}))
    assert run.rollout.reference is None
    run.fit()
    rows, _ = read_metrics(out_dir)
    assert [row["kl"] for row in rows] == [0.0, 0.0]
    assert (out_dir / "plots" / "reward.png").stat().st_size > 0


# Rollouts feed two steps each; no validation, so final/ holds the last weights.
RESUMABLE = dict(train={"max_steps": 8}, data={"val_files": []}, checkpoint={"every_steps": 4},
                 rlhf={"num_iterations": 2, "beta": 0.04})


@pytest.fixture(scope="module")
def straight_run(start, tmp_path_factory) -> tuple[dict, Path]:
    out_dir = tmp_path_factory.mktemp("straight")
    return trainer(values(start, out_dir, **RESUMABLE)).fit(), out_dir


@pytest.mark.slow
@pytest.mark.parametrize("stopped_after", [3, 4])
def test_a_run_stopped_by_a_signal_resumes_bitwise_equal_to_the_straight_run(start, straight_run, tmp_path,
                                                                              monkeypatch, stopped_after):
    straight, straight_dir = straight_run
    out_dir = tmp_path / "resumed"
    with monkeypatch.context() as patch:
        stop_before_call(patch, stopped_after + 1)
        stopped = trainer(values(start, out_dir, **RESUMABLE)).fit()
    assert stopped["reason"] == "stopped by signal" and step_folders(out_dir)[-1] == f"step_{stopped_after}"
    saved = json.loads((out_dir / "checkpoints" / f"step_{stopped_after}" / "trainer_state.json").read_text())
    # After an odd step the rollout still feeds one step: its micro-batches are saved (one rank, one micro-batch).
    remaining = stopped_after % 2
    assert saved["rollout"]["remaining"] == remaining
    assert [len(batches) for batches in saved["rollout"]["micro_batches"]] == [remaining]
    resumed = trainer(values(start, out_dir, **RESUMABLE), resume="auto").fit()
    assert stopped["losses"] + resumed["losses"] == straight["losses"]
    before, after = weights(straight_dir / "final"), weights(out_dir / "final")
    assert all(torch.equal(before[name], after[name]) for name in before)


@pytest.mark.slow
def test_the_micro_batch_split_leaves_losses_and_gradients_unchanged(start, straight_run, tmp_path):
    """The straight run puts a step's 8 completions in one micro-batch; here they go in four. The rollouts are the
    same: generation runs on the whole prompt batch before the split."""
    straight, straight_dir = straight_run
    split_dir = tmp_path / "split"
    trainer(values(start, split_dir, **{**RESUMABLE, "train": {**RESUMABLE["train"], "micro_batch_size": 2}})).fit()
    whole, split = read_metrics(straight_dir)[0], read_metrics(split_dir)[0]
    assert len(whole) == len(split) == 8 and any(row["loss"] != 0 for row in whole)
    # The second step on a rollout is off-policy: the ratio moves and some tokens are clipped.
    assert any(row["clip_ratio"] > 0 for row in whole)
    for one, four in zip(whole, split):
        assert one["reward"] == four["reward"] and one["completion_length"] == four["completion_length"]
        assert abs(one["loss"] - four["loss"]) <= 1e-6 and abs(one["grad_norm"] - four["grad_norm"]) <= 1e-5
        assert one["kl"] == pytest.approx(four["kl"], abs=1e-6) and one["clip_ratio"] == four["clip_ratio"]
        assert one["entropy"] == pytest.approx(four["entropy"], abs=1e-5)  # a mean near ln 6400 in float32


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def launch(launcher: list[str], folder: Path, start: dict[str, Path], module: Path, prompts_per_step: int,
           max_steps: int = 4, resume: bool = False, greedy: bool = True, strategy: str = "ddp") -> subprocess.Popen:
    """model_rlhf_train.py (greedy: through groups_of_lengths.py): its run in folder/run, what it scored in
    folder/scored. Each rollout feeds two steps; the learning rate is constant, so that a run ended by max_steps
    and resumed with a higher one continues exactly."""
    (folder / "scored").mkdir(parents=True, exist_ok=True)
    arguments = cli_arguments(values(
        start, folder / "run", train={"max_steps": max_steps, "micro_batch_size": 16, "strategy": strategy},
        data={"val_files": []},
        checkpoint={"every_steps": 4}, optim={"lr": 1e-3, "min_lr": 1e-3},
        rlhf={"reward_functions": ["position_reward:by_position"], "top_k": 1 if greedy else 0, "beta": 0.04,
              "num_iterations": 2, "prompts_per_step": prompts_per_step}))
    script = module / "groups_of_lengths.py" if greedy else ROOT / "model_rlhf_train.py"
    return subprocess.Popen([*launcher, str(script), *arguments,
                             *(["--resume", "auto"] if resume else [])], cwd=ROOT,
                            env={**script_environment(module), "SCORED": str(folder / "scored")},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(process: subprocess.Popen) -> None:
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output[-2000:]


def scored(folder: Path) -> list[list[dict]]:
    """Per rank, per rollout: the prompts and completions scored."""
    return [read_jsonl(path) for path in sorted((folder / "scored").glob("rank_*.jsonl"))]


@pytest.fixture(scope="module")
def distributed_runs(start, tmp_path_factory) -> dict[str, Path]:
    """4 steps of 2 processes x 2 prompts per step and of 1 process x 4, on rollouts that do not depend on how the
    prompts are split (greedy, cut to lengths by place in the group, rewards by place in the group); and the
    2 processes ended after step 3, to be resumed; the 2 processes under FSDP (all ranks decode in step); and one
    step of 2 processes sampling as usual."""
    folder = tmp_path_factory.mktemp("distributed")
    module = folder / "module"
    module.mkdir()
    (module / "position_reward.py").write_text(POSITION_REWARD)
    (module / "groups_of_lengths.py").write_text(GROUPS_OF_LENGTHS)
    processes = [launch(TORCHRUN, folder / "ddp", start, module, 2),
                 launch([sys.executable], folder / "single", start, module, 4),
                 launch(TORCHRUN, folder / "ended", start, module, 2, max_steps=3),
                 launch(TORCHRUN, folder / "fsdp", start, module, 2, strategy="fsdp"),
                 launch(TORCHRUN, folder / "sampled", start, module, 2, max_steps=1, greedy=False)]
    for process in processes:
        finish(process)
    return {"module": module, **{name: folder / name for name in ("ddp", "single", "ended", "fsdp", "sampled")}}


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_equal_one_process_on_the_same_rollouts(distributed_runs, strategy):
    # Rollout by rollout, the two ranks together drew the single process's prompts (ResumableSampler deals one
    # order out to the ranks in turn, and its length grouping spans the whole file in both runs).
    ddp, single = scored(distributed_runs[strategy]), scored(distributed_runs["single"])
    assert [len(calls) for calls in ddp + single] == [2, 2, 2]
    for rollout, call in enumerate(single[0]):
        first, second = (calls[rollout]["prompts"] for calls in ddp)
        assert len(first) == len(second) == 2 and sorted(first + second) == sorted(call["prompts"])

    rows = {"ddp": read_metrics(distributed_runs[strategy] / "run")[0],
            "single": read_metrics(distributed_runs["single"] / "run")[0]}
    for run in rows.values():
        assert [row["reward"] for row in run] == [1.5] * 4
        assert all(abs(row["loss"]) > 1e-3 and row["grad_norm"] > 1e-2 for row in run)
    assert [row["completion_length"] for row in rows["ddp"]] == [row["completion_length"] for row in rows["single"]]
    # FSDP sums gradient shards and norm pieces in another order: rounding grows to about 2e-5 of a value by step 3.
    rtol = 1e-4 if strategy == "fsdp" else 0
    for key in ("loss", "grad_norm", "kl", "entropy", "clip_ratio"):
        torch.testing.assert_close(torch.tensor([row[key] for row in rows["ddp"]]),
                                   torch.tensor([row[key] for row in rows["single"]]), atol=1e-5, rtol=rtol)
    ddp_weights = weights(distributed_runs[strategy] / "run" / "final")
    single_weights = weights(distributed_runs["single"] / "run" / "final")
    for name in single_weights:
        torch.testing.assert_close(ddp_weights[name], single_weights[name], atol=1e-5, rtol=rtol)


@pytest.mark.slow
def test_ddp_resumes_between_two_steps_of_one_rollout(start, distributed_runs):
    """Ended after step 3, half-way through the second rollout: every rank gets its own micro-batches back."""
    folder, module = distributed_runs["ended"], distributed_runs["module"]
    saved = json.loads((folder / "run" / "checkpoints" / "step_3" / "trainer_state.json").read_text())["rollout"]
    assert saved["remaining"] == 1 and [len(batches) for batches in saved["micro_batches"]] == [1, 1]
    assert saved["micro_batches"][0][0]["input_ids"] != saved["micro_batches"][1][0]["input_ids"]
    finish(launch(TORCHRUN, folder, start, module, 2, max_steps=4, resume=True))
    # Step 4 trained on the saved rollout: the resumed run scored nothing.
    assert scored(folder) == scored(distributed_runs["ddp"])
    straight = read_metrics(distributed_runs["ddp"] / "run")[0]
    resumed = read_metrics(folder / "run")[0]
    assert [(row["loss"], row["grad_norm"]) for row in resumed] == [(row["loss"], row["grad_norm"]) for row in straight]
    before, after = weights(distributed_runs["ddp"] / "run" / "final"), weights(folder / "run" / "final")
    assert all(torch.equal(before[name], after[name]) for name in before)


@pytest.mark.slow
def test_ddp_ranks_sample_their_own_completions(distributed_runs):
    """Every rank draws its own random numbers: with the same ones, two ranks sample nearly the same tokens for
    different prompts while the policy is still flat (62 of these 64 before the seed depended on the rank)."""
    first, second = (calls[0]["completion_ids"] for calls in scored(distributed_runs["sampled"]))
    pairs = [(a, b) for row_a, row_b in zip(first, second) for a, b in zip(row_a, row_b)]
    assert len(pairs) == 2 * 4 * 8 and sum(a == b for a, b in pairs) / len(pairs) < 0.1


@pytest.mark.slow
def test_a_plain_llama_learns_a_reward_of_the_users_own(start, tmp_path):
    folder = tmp_path / "llama"
    tokenizer = AutoTokenizer.from_pretrained(ROOT / "tokenizer")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                 max_position_embeddings=128, bos_token_id=tokenizer.bos_token_id,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                 )).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    out_dir = tmp_path / "run"
    summary = trainer(values(start, out_dir, model={"init_from": str(folder)}, data={"val_files": []},
                             train={"max_steps": 30, "micro_batch_size": 16}, checkpoint={"every_steps": 30},
                             optim={"lr": 3e-2, "min_lr": 3e-2},
                             rlhf={"reward_functions": [LOW_IDS], "prompts_per_step": 4})).fit()
    assert summary["reason"] == "finished"
    rewards = [row["reward"] for row in read_metrics(out_dir)[0]]
    # A random model draws half its tokens from the lower half of the vocabulary; after 30 steps nearly all.
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert 0.4 < first < 0.6 and last > 0.9, rewards
    assert json.loads((out_dir / "final" / "config.json").read_text())["model_type"] == "llama"


# case: (overrides, what the error line names, whether the error surfaces only at the first rollout, where the
# reward function is first called: the start-up's log line is on stderr before it then)
BAD_INPUT = {
    "module does not import": ({"rlhf": {"reward_functions": ["grpo_broken_rewards:score"]}},
                               "grpo_broken_rewards", False),
    "not callable": ({"rlhf": {"reward_functions": [f"{REWARDS_MODULE}:NOT_CALLABLE"]}}, "is not callable", False),
    "wrong count": ({"rlhf": {"reward_functions": [f"{REWARDS_MODULE}:wrong_count"]}}, "wrong_count returned 1",
                    True),
    "NaN": ({"rlhf": {"reward_functions": [f"{REWARDS_MODULE}:not_finite"]}}, "finite", True),
    "one generation": ({"rlhf": {"num_generations": 1}}, "rlhf.num_generations", False),
    "negative beta": ({"rlhf": {"beta": -0.1}}, "rlhf.beta", False),
    "weights": ({"rlhf": {"reward_weights": [1.0, 2.0]}}, "rlhf.reward_weights", False),
    "long prompt": ({"data": {"strict": True}}, "train.jsonl:2", False),
    "no reward": ({"rlhf": {"reward_functions": []}}, "rlhf.reward_functions", False),
    "accumulation": ({"train": {"grad_accum_steps": 2}}, "train.grad_accum_steps", False),
}


@pytest.mark.parametrize("case", BAD_INPUT)
def test_bad_input_ends_with_one_line_and_exit_2(start, tmp_path, capsys, case):
    out_dir = tmp_path / "run"
    overrides, expected, at_rollout = BAD_INPUT[case]
    if case == "long prompt":
        lines = start["prompts"].read_text(encoding="utf-8").splitlines()
        long = {"prompt": [{"role": "user", "content": "1 + 1 " * 40}], "answer": "2"}
        data = write_lines(tmp_path / "train.jsonl", [lines[0], long, *lines[1:]])
        overrides = {"data": {**overrides["data"], "train_files": [str(data)]}}
    with pytest.raises(SystemExit) as exit_info:
        run_training(model_rlhf_train.PREFERENCE, None, "rlhf", cli_arguments(values(start, out_dir, **overrides)))
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == (2 if at_rollout else 1), lines
    assert lines[-1].startswith("error: ") and expected in lines[-1]
    if at_rollout:
        assert " INFO " in lines[0] and "tokenizer:" in lines[0]
    # Nothing of a run was written.
    assert not (out_dir / "checkpoints").exists() and not (out_dir / "final").exists()


def first_rollout(start: dict[str, Path], out_dir: Path, **rlhf) -> tuple[list[dict], dict]:
    """The first step's micro-batches and the rollout's metrics, for a configuration that differs in `rlhf` only."""
    run = trainer(values(start, out_dir, rlhf=rlhf))
    torch.manual_seed(3)
    micro_batches = run.rollout.step_batches(iter(run.batches))
    run.metrics.close()
    return micro_batches, run.rollout.last_metrics


def test_reward_weights_and_scale_rewards_reach_the_rollout(start, tmp_path):
    """Same samples, other settings: the weights make the total reward, scale_rewards divides the advantages."""
    plain, metrics = first_rollout(start, tmp_path / "a", scale_rewards="none")
    weights_ = [2.0, 0.0, 1.0, 0.5]
    weighted, weighted_metrics = first_rollout(start, tmp_path / "b", scale_rewards="none", reward_weights=weights_)
    names = ["exact_answer", "partial_credit", "format_reward", LOW_IDS.split(":")[1]]
    assert metrics["reward"] == pytest.approx(sum(metrics[f"reward_{name}"] for name in names))
    assert weighted_metrics["reward"] == pytest.approx(
        sum(weight * metrics[f"reward_{name}"] for weight, name in zip(weights_, names)))
    scaled, _ = first_rollout(start, tmp_path / "c", scale_rewards="group")
    centred = torch.cat([batch["advantages"] for batch in plain])
    assert centred.abs().sum() > 0 and torch.cat([batch["input_ids"].flatten() for batch in plain]).equal(
        torch.cat([batch["input_ids"].flatten() for batch in scaled]))
    groups = centred.view(-1, 4)
    expected = groups / (groups.std(dim=1, keepdim=True) + 1e-4)
    torch.testing.assert_close(torch.cat([batch["advantages"] for batch in scaled]), expected.flatten())
