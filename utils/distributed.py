"""torchrun set-up and teardown, and wrapping a model for data parallelism (DDP or FSDP2) from outside it."""

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel

from utils.errors import InputError


@dataclass
class DistributedContext:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def rank_and_world_size() -> tuple[int, int]:
    """This process's rank and the number of processes, as torchrun sets them (0 and 1 without torchrun)."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(device: str = "auto") -> DistributedContext:
    """Join the process group torchrun describes in the environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*),
    or run as a single process when there is none. nccl on CUDA, gloo on CPU. `device` is auto, cpu or cuda (each
    process takes the GPU of its local rank)."""
    rank, world_size = rank_and_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise InputError("train.device is cuda, but this machine has no CUDA device: use auto or cpu")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        torch_device = torch.device("cuda", local_rank)
    else:
        torch_device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", timeout=datetime.timedelta(minutes=30),
                                device_id=torch_device if use_cuda else None)
    return DistributedContext(rank=rank, local_rank=local_rank, world_size=world_size, device=torch_device)


def barrier(context: DistributedContext) -> None:
    if context.is_distributed:
        dist.barrier()


def main_first(function, context: DistributedContext, expected_errors: tuple = (ValueError,)):
    """Run `function` on rank 0, then on the other ranks (for work that fills a cache the others then read).
    If it fails on rank 0 with one of `expected_errors`, rank 0 raises that error and every other rank raises the
    first expected type with its message, instead of waiting for a rank 0 that is gone."""
    result, failure, message = None, None, None
    if context.is_main:
        try:
            result = function()
        except expected_errors as error:
            failure, message = error, str(error)
    if context.is_distributed:
        shared = [message]
        dist.broadcast_object_list(shared, src=0)
        message = shared[0]
    if failure is not None:
        raise failure
    if message is not None:
        raise expected_errors[0](message)
    return result if context.is_main else function()


def all_reduce_sum(value: torch.Tensor, context: DistributedContext) -> torch.Tensor:
    if context.is_distributed:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def all_gather_objects(value, context: DistributedContext) -> list:
    """Every rank's `value` (any picklable object), in rank order."""
    if not context.is_distributed:
        return [value]
    gathered = [None] * context.world_size
    dist.all_gather_object(gathered, value)
    return gathered


def any_rank(flag: bool, context: DistributedContext) -> bool:
    """True on every rank if it is true on any rank (so all ranks take the same branch)."""
    if not context.is_distributed:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=context.device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def wrap_model(model: nn.Module, strategy: str, context: DistributedContext,
               param_dtype: torch.dtype | None = None) -> nn.Module:
    """DDP keeps a full replica per rank and all-reduces gradients; FSDP2 shards parameters, gradients and
    optimizer state per decoder layer. A single process gets the model back unchanged."""
    if not context.is_distributed:
        return model
    if strategy == "ddp":
        device_ids = [context.local_rank] if context.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids)
    if strategy == "fsdp":
        policy = fsdp_policy(param_dtype)
        for layer in model.model.layers:
            fully_shard(layer, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
        return model
    raise ValueError(f"unknown strategy {strategy!r}")


def fsdp_policy(param_dtype: torch.dtype | None) -> MixedPrecisionPolicy:
    """Compute in `param_dtype` (None: as stored), reduce gradients in fp32."""
    return MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)


def gradient_sync(model: nn.Module, sync: bool):
    """Only the last micro-batch of a step all-reduces gradients; the others accumulate locally."""
    if isinstance(model, DistributedDataParallel) and not sync:
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


def unwrap_model(model: nn.Module) -> nn.Module:
    model = getattr(model, "_orig_mod", model)  # torch.compile
    return model.module if isinstance(model, DistributedDataParallel) else model


def teardown(context: DistributedContext, wait: bool = True) -> None:
    """Barrier (unless `wait` is false, after a failure), then destroy the process group; callers drop model and
    optimizer references first."""
    if context.is_distributed and dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()
