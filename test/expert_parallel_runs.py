"""What test_expert_parallel.py checks under torchrun, all in one launch per world size (a launch costs more than
the checks): `torchrun --nproc_per_node=2|4 test/expert_parallel_runs.py FOLDER`. Rank 0 writes the largest
differences it measured, and whether the exact checks held, to FOLDER/world_<N>.json."""

import copy
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file

import bench_moe
import model_pretrain
from model import ByteModelConfig
from test_moe import make_layer
from training import make_config
from utils.distributed import init_distributed, teardown
from utils.expert_parallel import ExpertParallel
from utils.trainer import Trainer

MOE = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16, "num_shared_experts": 1,
       "router_bias_update_rate": 1e-2}


def largest(value: float) -> float:
    """The largest of every rank's `value`."""
    value = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return value.item()


def scaled_difference(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """The largest difference, relative where values exceed 1: parameter gradients sum over every token."""
    return ((actual - expected).abs().max() / expected.abs().max().clamp(min=1)).item()


def layer_check(size: int, context) -> dict:
    """An MoE layer split over `size` processes against the whole layer on the batch of all processes."""
    reference = make_layer(num_shared_experts=1).train()
    layer = copy.deepcopy(reference)
    hidden = reference.gate.weight.shape[1]
    tokens = [torch.randn(5 + 3 * rank, hidden, generator=torch.Generator().manual_seed(rank))
              for rank in range(context.world_size)]
    upstream = [torch.randn_like(x, generator=torch.Generator().manual_seed(100 + rank))
                for rank, x in enumerate(tokens)]
    batch = torch.cat(tokens).requires_grad_(True)
    expected = reference(batch)
    (expected * torch.cat(upstream)).sum().backward()
    _, _, _, indices = reference.gate(batch)

    parallel = ExpertParallel(size, context)
    parallel.shard(layer)
    x = tokens[context.rank].clone().requires_grad_(True)
    output = layer(x)
    (output * upstream[context.rank]).sum().backward()
    rows = slice(sum(len(t) for t in tokens[:context.rank]), sum(len(t) for t in tokens[:context.rank + 1]))

    replicated = {name: p.grad.clone() for name, p in layer.named_parameters() if not name.startswith("experts.")}
    for grad in replicated.values():
        dist.all_reduce(grad)
    experts, local = layer.experts, slice(layer.experts.first_expert,
                                          layer.experts.first_expert + layer.experts.num_local_experts)
    expert_grads = {name: getattr(experts, name).grad.clone() for name in ("gate_up_proj", "down_proj")}
    for grad in expert_grads.values():
        dist.all_reduce(grad, group=parallel.data_group)
    counts = layer.router_stats.expert_counts.clone()
    dist.all_reduce(counts)
    # What this process must have sent to and received from the others: its slots of other processes' experts,
    # and the other processes' slots of its experts.
    owner = indices // experts.num_local_experts
    row_of = torch.arange(len(batch))[:, None].expand_as(indices)
    process_of_row = torch.cat([torch.full((len(t),), rank) for rank, t in enumerate(tokens)])[row_of]
    in_row = process_of_row // size == context.rank // size
    me = context.rank % size
    sent = ((process_of_row == context.rank) & (owner != me)).sum().item()
    received = (in_row & (owner == me) & (process_of_row != context.rank)).sum().item()
    return {
        "output": largest((output - expected[rows]).abs().max().item()),
        "input_grad": largest((x.grad - batch.grad[rows]).abs().max().item()),
        "replicated_grads": largest(max(scaled_difference(grad, dict(reference.named_parameters())[name].grad)
                                        for name, grad in replicated.items())),
        "expert_grads": largest(max(scaled_difference(grad, getattr(reference.experts, name).grad[local])
                                    for name, grad in expert_grads.items())),
        "top_k_and_counts_exact": largest(float(
            not torch.equal(layer.gate(x)[3], indices[rows])
            or not torch.equal(counts, torch.bincount(indices.reshape(-1), minlength=4))
            or (experts.tokens_sent, experts.tokens_received) != (sent, received))) == 0,
    }


def trainer(folder: Path, name: str, size: int, strategy: str, resume: str | None = None, **train) -> Trainer:
    config = make_config(folder / name, folder / "cache", model=MOE,
                         train={"max_steps": 3, "strategy": strategy, "expert_parallel_size": size, **train})
    return Trainer(config, model_pretrain.PRETRAINING, resume)


def three_steps(run: Trainer) -> list[tuple[float, float]]:
    """Each step's loss and gradient norm: AdamW hardly notices gradients scaled by a constant, the norm does."""
    batches = iter(run.batches)
    steps = []
    for _ in range(3):
        steps.append(run.train_step([next(batches)])[:2])
        run.state.step += 1
    return steps


def weights(run: Trainer) -> dict[str, torch.Tensor]:
    """The whole model's weights as saved (experts global), on every rank."""
    state = run.checkpoints.model_state(run.wrapped)
    shared = [state if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(shared, src=0)
    return shared[0]


def training_check(folder: Path, strategy: str, sizes: tuple[int, int], resumes: tuple[tuple[int, int], ...]) -> dict:
    """Three steps at each of two expert-parallel sizes: losses, final weights, balancing biases. Each (saved,
    resumed) pair: the state saved at one size, resumed at the other and saved again, must be the same."""
    runs = {size: trainer(folder, f"{strategy}_ep{size}", size, strategy) for size in sizes}
    losses = {size: three_steps(run) for size, run in runs.items()}
    states = {size: weights(run) for size, run in runs.items()}
    tokens = runs[max(sizes)].expert_parallel.metrics()
    for run in runs.values():
        run.save()
        run.metrics.close()
    a, b = sizes
    bias = all(torch.equal(states[a][name], states[b][name]) for name in states[a] if name.endswith("expert_bias"))
    resaved = {}
    for saved, resumed in resumes:
        run = trainer(folder, f"{strategy}_ep{saved}_as_ep{resumed}", resumed, strategy,
                      resume=str(folder / f"{strategy}_ep{saved}" / "checkpoints" / "step_3"))
        run.save()
        run.metrics.close()
        resaved[saved, resumed] = same_checkpoint(folder / f"{strategy}_ep{saved}" / "checkpoints" / "step_3",
                                         folder / f"{strategy}_ep{saved}_as_ep{resumed}" / "checkpoints" / "step_3")
    return {"steps": losses[a], "losses": max(abs(x[0] - y[0]) for x, y in zip(losses[a], losses[b])),
            "grad_norms": max(abs(x[1] - y[1]) / x[1] for x, y in zip(losses[a], losses[b])),
            "weights": max((states[a][name] - states[b][name]).abs().max().item() for name in states[a]),
            "bias_exact": bias, "bias_moved": any(states[a][name].abs().sum() > 0 for name in states[a]
                                                  if name.endswith("expert_bias")),
            "resaved_equal": all(resaved.values()), "tokens_sent": tokens["expert_tokens_sent"],
            "tokens_received": tokens["expert_tokens_received"]}


def same_checkpoint(first: Path, second: Path) -> bool:
    """Same weights, optimizer state and trainer state, bit for bit."""
    if dist.get_rank() != 0:
        return True
    one, two = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    optimizers = [torch.load(folder / "optimizer.pt", weights_only=False) for folder in (first, second)]
    moments = [{(name, key): value for name, state in optimizer["state"].items() for key, value in state.items()}
               for optimizer in optimizers]
    return (one.keys() == two.keys() and all(torch.equal(one[name], two[name]) for name in one)
            and moments[0].keys() == moments[1].keys()
            and all(torch.equal(moments[0][key], moments[1][key]) for key in moments[0])
            and (first / "trainer_state.json").read_text() == (second / "trainer_state.json").read_text())


def main() -> None:
    folder = Path(sys.argv[1])
    context = init_distributed("cpu")
    world = context.world_size
    result = {f"layer_ep{size}": layer_check(size, context) for size in ((2,) if world == 2 else (2, 4))}
    if world == 2:
        result["ddp"] = training_check(folder, "ddp", (1, 2), ((2, 1), (1, 2)))
        # Recomputing a layer in the backward pass exchanges its tokens again, in the same order on every process.
        run = trainer(folder, "ddp_ep2_checkpointing", 2, "ddp", gradient_checkpointing=True)
        result["ddp"]["checkpointing"] = max(abs(x[0] - y[0]) for x, y in zip(three_steps(run), result["ddp"]["steps"]))
        run.metrics.close()
        tiny = ByteModelConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                               num_key_value_heads=1, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)
        result["bench"] = bench_moe.expert_parallel_rows(tiny, batch_size=2, seq_len=8, steps=1, rounds=1)
    else:
        result["fsdp"] = training_check(folder, "fsdp", (1, 2), ((2, 1), (1, 2), (2, 4)))
    if context.is_main:
        (folder / f"world_{world}.json").write_text(json.dumps(result, indent=2))
    teardown(context)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
