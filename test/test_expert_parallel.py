"""utils/expert_parallel.py: the reordering of exchanged rows (single process, exact), the refusals, and under
torchrun with gloo (2 and 4 processes, one launch each) the MoE layer, DDP and FSDP2 training and checkpoints
at several expert-parallel sizes against the same work without expert parallelism (and bench_moe's
expert-parallel rows)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import ATOL, script_environment
from training import make_config
from utils.config import PreferenceConfig, build_config, check_training_config
from utils.errors import InputError
from utils.expert_parallel import check_expert_parallel, inverse_permutation, order_by_local_expert

ROOT = Path(__file__).resolve().parents[1]


def test_rows_are_ordered_by_local_expert_and_back_exactly():
    # 3 sending processes, 2 local experts: process 1 sends nothing to expert 0, process 2 nothing to expert 1.
    received = torch.tensor([[2, 1], [0, 3], [1, 0]])
    rows = torch.tensor([10, 11, 12, 20, 21, 22, 30])  # process p's rows for local expert e, in arrival order
    order = order_by_local_expert(received)
    assert rows[order].tolist() == [10, 11, 30, 12, 20, 21, 22]
    assert rows[order][inverse_permutation(order)].tolist() == rows.tolist()
    empty = torch.tensor([[0, 2], [0, 0]])
    order = order_by_local_expert(empty)
    assert order.tolist() == [0, 1] and inverse_permutation(order).tolist() == [0, 1]
    assert order_by_local_expert(torch.zeros(2, 3, dtype=torch.long)).numel() == 0


@pytest.mark.parametrize("size, world, experts, message", [
    (0, 2, 4, "must be >= 1"),
    (2, 3, 4, "does not divide the 3 process"),
    (4, 4, 6, "does not divide model.num_experts=6"),
    (2, 2, 0, "needs a mixture-of-experts model"),
])
def test_refusals(size, world, experts, message):
    with pytest.raises(InputError, match=message):
        check_expert_parallel(size, world, experts)
    check_expert_parallel(1, world, experts)


def test_refusals_of_the_training_config(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun sets; check_training_config reads no more of it

    def check(**sections):
        check_training_config(make_config(tmp_path, tmp_path, **sections))

    check(model={"num_experts": 4}, train={"expert_parallel_size": 2})
    with pytest.raises(InputError, match="needs a mixture-of-experts model"):
        check(train={"expert_parallel_size": 2})
    with pytest.raises(InputError, match="does not divide model.num_experts=3"):
        check(model={"num_experts": 3}, train={"expert_parallel_size": 2})
    with pytest.raises(InputError, match="LoRA"):
        check(model={"num_experts": 4}, train={"expert_parallel_size": 2}, lora={"enabled": True})
    grpo = build_config(PreferenceConfig, {
        "model": {"init_from": str(tmp_path)}, "train": {"expert_parallel_size": 2},
        "rlhf": {"method": "grpo", "beta": 0.0, "reward_functions": ["utils.rewards:format_reward"]}})
    with pytest.raises(InputError, match="grpo"):
        check_training_config(grpo)


def launch(tmp_path: Path, processes: int) -> dict:
    """test/expert_parallel_runs.py under torchrun (scripts/ importable for bench_moe); what rank 0 measured."""
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
                    str(ROOT / "test" / "expert_parallel_runs.py"), str(tmp_path)], cwd=ROOT,
                   env=script_environment(ROOT / "test", ROOT / "scripts"), check=True, timeout=300,
                   capture_output=True)
    return json.loads((tmp_path / f"world_{processes}.json").read_text())


def assert_layer_equal(measured: dict) -> None:
    assert measured.pop("top_k_and_counts_exact")
    assert all(difference < ATOL for difference in measured.values()), measured


def assert_training_equal(measured: dict, processes: int) -> None:
    assert measured["losses"] < ATOL and measured["grad_norms"] < ATOL and measured["weights"] < ATOL, measured
    assert measured["bias_exact"] and measured["bias_moved"] and measured["resaved_equal"], measured
    # Each process sends and receives token-slots; what one row sends, the others of its row receive.
    assert len(measured["tokens_sent"]) == processes and min(measured["tokens_sent"]) > 0
    assert sum(measured["tokens_sent"]) == sum(measured["tokens_received"])


@pytest.mark.slow
def test_two_processes_layer_ddp_training_and_resume_across_sizes(tmp_path):
    """ep 2 against the whole layer on the gathered batch; DDP ep 1 against ep 2 (also with gradient
    checkpointing) for three steps; saved at ep 2 resumed at ep 1 and the reverse."""
    measured = launch(tmp_path, 2)
    assert_layer_equal(measured["layer_ep2"])
    assert_training_equal(measured["ddp"], 2)
    assert measured["ddp"]["checkpointing"] < ATOL  # ep 2 with gradient checkpointing against ep 1 without
    bench = measured["bench"]  # scripts/bench_moe.py's expert-parallel rows, on a tiny model
    assert bench["ep1"]["tokens_per_s"] > 0 and bench["ep2"]["tokens_per_s"] > 0
    assert max(bench["ep2"]["state_mib_per_process"]) < min(bench["ep1"]["state_mib_per_process"])


@pytest.mark.slow
def test_four_processes_layer_fsdp_training_and_resume_across_sizes(tmp_path):
    """ep 2 and 4 against the whole layer; FSDP2 ep 1 against ep 2 for three steps; saved at ep 2 resumed at ep 1
    and 4, and saved at ep 1 resumed at ep 2 (4 processes on 2 cores: oversubscribed, but exact all the same)."""
    measured = launch(tmp_path, 4)
    assert_layer_equal(measured["layer_ep2"])
    assert_layer_equal(measured["layer_ep4"])
    assert_training_equal(measured["fsdp"], 4)
