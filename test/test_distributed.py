"""utils/distributed.py in a single process: no process group, and every collective and wrapper is the identity."""

import contextlib
import json

import pytest
import torch
import torch.distributed as dist
from torch import nn

from utils.distributed import (DistributedContext, all_gather_objects, all_reduce_sum, any_rank, barrier,
                               gradient_sync, init_distributed, main_first, rank_and_world_size, teardown,
                               unwrap_model, wrap_model)
from utils.errors import InputError

SINGLE = DistributedContext()


@pytest.fixture
def no_torchrun(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)


def test_init_distributed_without_torchrun(no_torchrun):
    context = init_distributed("cpu")
    assert context == DistributedContext(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    assert context.is_main and not context.is_distributed
    assert not dist.is_initialized()
    teardown(context)
    barrier(context)


def test_init_distributed_with_a_single_torchrun_process(no_torchrun, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert rank_and_world_size() == (0, 1)
    assert init_distributed("cpu") == SINGLE
    assert not dist.is_initialized()


def test_rank_and_world_size_come_from_torchrun(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert rank_and_world_size() == (3, 8)


def test_context_properties():
    assert DistributedContext(rank=1, world_size=2).is_distributed
    assert not DistributedContext(rank=1, world_size=2).is_main


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_wrap_model_returns_the_model(strategy):
    model = nn.Linear(4, 2)
    assert wrap_model(model, strategy, SINGLE, param_dtype=torch.bfloat16) is model
    assert model.weight.dtype == torch.float32


def test_collectives_are_identities():
    value = torch.tensor([1.5, -2.0])
    assert all_reduce_sum(value, SINGLE) is value
    assert value.tolist() == [1.5, -2.0]
    assert any_rank(True, SINGLE) is True and any_rank(False, SINGLE) is False
    state = {"3": [1, 2]}
    assert all_gather_objects(state, SINGLE) == [state]


def test_main_first_runs_once_and_returns():
    calls = []
    assert main_first(lambda: calls.append("run") or 42, SINGLE) == 42
    assert calls == ["run"]


def test_main_first_reraises_expected_errors_with_their_type():
    def fail():
        raise InputError("no data files match train_*.jsonl")

    with pytest.raises(InputError, match="no data files match"):
        main_first(fail, SINGLE)


def test_main_first_reraises_a_json_error_as_it_is():
    with pytest.raises(json.JSONDecodeError, match="Expecting property name"):
        main_first(lambda: json.loads("{"), SINGLE)


def test_main_first_lets_other_errors_through():
    def fail():
        raise KeyError("shard")

    with pytest.raises(KeyError):
        main_first(fail, SINGLE)


def grads_after_two_backwards(model: nn.Module, sync_first: bool) -> torch.Tensor:
    inputs = torch.arange(8.0).reshape(2, 4)
    with gradient_sync(model, sync_first):
        model(inputs).sum().backward()
    with gradient_sync(model, True):
        model(inputs[:1]).sum().backward()
    return model.weight.grad.clone()


def test_gradient_sync_on_a_plain_module_is_a_no_op():
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    context = gradient_sync(model, False)
    assert isinstance(context, contextlib.nullcontext)
    accumulated = grads_after_two_backwards(model, False)
    # Gradients accumulate as without the context: for sum(Wx + b), dW = the summed inputs for each output.
    torch.testing.assert_close(accumulated, (torch.arange(8.0).reshape(2, 4).sum(0) + torch.arange(4.0)).expand(2, 4))
    model.zero_grad()
    torch.testing.assert_close(grads_after_two_backwards(model, True), accumulated)


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")  # dynamo's import
def test_unwrap_model_undoes_torch_compile():
    model = nn.Linear(4, 2)
    compiled = torch.compile(model)
    assert compiled is not model and isinstance(compiled, torch._dynamo.eval_frame.OptimizedModule)
    assert unwrap_model(compiled) is model
    assert unwrap_model(model) is model
    assert compiled.state_dict().keys() != model.state_dict().keys()  # why checkpoints unwrap first
