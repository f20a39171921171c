"""Speed of the MoE layer and of an MoE ByteModel, each against a reference measured in the same run.

1. Layer: `ByteMoELayer` (tokens sorted by expert, grouped matmuls) against the same layer run as a per-expert Python
   loop (`reference_moe_forward`), forward + backward, tokens/s.
2. Model: an 8-expert top-2 ByteModel against transformers' `MixtralForCausalLM` at the same config and weights,
   training tokens/s (forward + backward + AdamW step), with the routing bias at zero so both compute the same
   function (checked: logits equal before timing).

3. Under torchrun (`torchrun --standalone --nproc_per_node=2 scripts/bench_moe.py`): the same model trained by
   every process under DDP, with every process holding all experts (expert parallelism 1) against the experts split
   over all processes (expert parallelism = processes), fp32: tokens/s of all processes together, and per process
   the memory of its weights, gradients and AdamW moments and the peak growth of its resident memory in a step.
   Written beside `--output` as NAME_expert_parallel.json.

Each pair is measured in alternating rounds (median), in fp32 and, where the hardware runs it natively, in bf16
autocast. Prints a table and writes the figures as JSON. Run it alone: a second busy process on a 2-core machine
distorts every number.
"""

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import MixtralForCausalLM

from benchmark import alternate, autocast_for, trainer_for
from model import ByteModel, ByteModelConfig, mixtral_state_dict
from model.moe import reference_moe_forward
from utils.distributed import all_gather_objects, init_distributed, rank_and_world_size, teardown, wrap_model
from utils.expert_parallel import ExpertParallel
from utils.precision import native_bf16


def layer_seconds(forward, layer: torch.nn.Module, x: torch.Tensor, precision: str, repeats: int) -> float:
    start = time.perf_counter()
    for _ in range(repeats):
        with autocast_for(precision):
            output = forward(layer, x)
        output.float().pow(2).mean().backward()
        layer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def precisions() -> list[str]:
    """fp32, plus bf16 autocast where it is native (elsewhere it is emulated and tens of times slower)."""
    return ["fp32"] + (["bf16"] if native_bf16(torch.device("cpu")) else [])


def expert_parallel_rows(config: ByteModelConfig, batch_size: int, seq_len: int, steps: int, rounds: int) -> dict:
    """Collective (under torchrun): DDP training tokens/s of all processes, expert parallelism 1 against the number
    of processes, and each process's memory for both."""
    context = init_distributed("cpu")
    sizes = (1, context.world_size)
    batch = torch.randint(0, config.vocab_size, (batch_size, seq_len),
                          generator=torch.Generator().manual_seed(1 + context.rank))
    measures, state_mib = {}, {}
    for size in sizes:
        torch.manual_seed(0)
        model = ByteModel(config)
        if size > 1:
            parallel = ExpertParallel(size, context)
            wrapped = parallel.wrap(parallel.shard(model), "ddp")
        else:
            parallel, wrapped = None, wrap_model(model, "ddp", context)
        # Weights, their gradients and AdamW's two moments, all fp32.
        state_mib[size] = 4 * sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
        measures[f"ep{size}"] = trainer_for(wrapped, batch, "fp32", steps,
                                            after_backward=parallel.reduce_gradients if parallel else None)
    timed = alternate(measures, rounds)
    tokens = steps * batch.numel() * context.world_size
    rows = {f"ep{size}": {"tokens_per_s": timed[f"ep{size}"].rate(tokens),
                          "state_mib_per_process": all_gather_objects(state_mib[size], context),
                          "peak_growth_mib_per_process": all_gather_objects(timed[f"ep{size}"].peak_mib, context)}
            for size in sizes}
    teardown(context)
    return {"processes": context.world_size, **rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--expert-size", type=int, default=512, help="moe_intermediate_size")
    parser.add_argument("--vocab-size", type=int, default=6400)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--train-steps", type=int, default=2, help="optimizer steps per round")
    parser.add_argument("--layer-repeats", type=int, default=5, help="layer forward+backward passes per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--output", default="model_info/bench_moe.json",
                        help="(under torchrun: NAME_expert_parallel.json beside it)")
    args = parser.parse_args()

    config = ByteModelConfig(vocab_size=args.vocab_size, hidden_size=args.hidden_size, num_hidden_layers=args.layers,
                             num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                             max_position_embeddings=max(1024, args.seq_len), num_experts=args.experts,
                             num_experts_per_tok=args.top_k, moe_intermediate_size=args.expert_size)
    rank, processes = rank_and_world_size()
    if processes > 1:
        result = expert_parallel_rows(config, args.batch_size, args.seq_len, args.train_steps, args.rounds)
        if rank == 0:
            print_expert_parallel(result, Path(args.output))
        return
    torch.manual_seed(0)
    byte_model = ByteModel(config)
    mixtral = MixtralForCausalLM._from_config(config.to_mixtral_config(), attn_implementation="sdpa")
    mixtral.load_state_dict(mixtral_state_dict(byte_model.state_dict()), strict=True)
    batch = torch.randint(0, config.vocab_size, (args.batch_size, args.seq_len),
                          generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        difference = (byte_model.eval()(batch).logits - mixtral.eval()(batch).logits).abs().max().item()
    parameters = sum(p.numel() for p in byte_model.parameters())
    print(f"config: hidden {config.hidden_size}, layers {config.num_hidden_layers}, {config.num_experts} experts "
          f"top-{config.num_experts_per_tok} of size {config.moe_intermediate_size}, vocab {config.vocab_size}, "
          f"{parameters / 1e6:.1f}M parameters; batch {args.batch_size} x {args.seq_len}; Mixtral experts "
          f"implementation {mixtral.config._experts_implementation}; max |logit difference| {difference:.2e}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}")

    layer = byte_model.model.layers[0].mlp.train()
    x = torch.randn(args.batch_size * args.seq_len, config.hidden_size, requires_grad=True)
    result = {"config": {key: getattr(config, key) for key in ("hidden_size", "num_hidden_layers", "num_experts",
                                                              "num_experts_per_tok", "moe_intermediate_size")},
              "parameters": parameters, "max_logit_difference": difference, "tokens": batch.numel()}
    rows = []
    for precision in precisions():
        timed = alternate({
            "grouped": lambda: layer_seconds(lambda module, inputs: module(inputs), layer, x, precision,
                                             args.layer_repeats),
            "loop": lambda: layer_seconds(reference_moe_forward, layer, x, precision, args.layer_repeats),
        }, args.rounds)
        layer_tokens = args.layer_repeats * x.shape[0]
        rows.append((f"layer {precision}", "grouped", "loop", timed["grouped"].rate(layer_tokens),
                     timed["loop"].rate(layer_tokens)))

        timed = alternate({"ByteModel": trainer_for(byte_model, batch, precision, args.train_steps),
                           "Mixtral": trainer_for(mixtral, batch, precision, args.train_steps)}, args.rounds)
        model_tokens = args.train_steps * batch.numel()
        rows.append((f"model {precision}", "ByteModel", "Mixtral", timed["ByteModel"].rate(model_tokens),
                     timed["Mixtral"].rate(model_tokens)))

    print(f"{'':14}{'':>10}{'tok/s':>10}{'':>10}{'tok/s':>10}{'ratio':>8}")
    for name, ours, theirs, ours_speed, their_speed in rows:
        print(f"{name:14}{ours:>10}{ours_speed:10.0f}{theirs:>10}{their_speed:10.0f}{ours_speed / their_speed:8.2f}")
        result[name.replace(" ", "_")] = {f"{ours}_tokens_per_s": ours_speed, f"{theirs}_tokens_per_s": their_speed,
                                          "ratio": ours_speed / their_speed}
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


def print_expert_parallel(result: dict, output: Path) -> None:
    print(f"{result['processes']} processes, DDP, fp32{'':8}{'tok/s':>10}{'state MiB':>12}{'peak +MiB':>12}  "
          f"(per process)")
    for name in ("ep1", f"ep{result['processes']}"):
        row = result[name]
        print(f"expert parallelism {name[2:]:<16}{row['tokens_per_s']:10.0f}"
              f"{max(row['state_mib_per_process']):12.1f}{max(row['peak_growth_mib_per_process']):12.1f}")
    output = output.with_name(f"{output.stem}_expert_parallel.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
