"""Speed of ByteModel against transformers' LlamaForCausalLM at the same config and weights, in one run.

Prints training tokens/s (forward + backward + AdamW step) and greedy generation tokens/s (batch 1, KV cache) for
both models and the ratios ByteModel / Llama, then the figures as one JSON line. The two models are measured in
alternating rounds so that drift of a shared machine hits both alike; the median round counts.
Run it alone: a second busy process on a 2-core machine distorts every number.
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from transformers import GenerationConfig, LlamaForCausalLM

from model import ByteModel, ByteModelConfig

def build_models(config: ByteModelConfig) -> tuple[ByteModel, LlamaForCausalLM]:
    torch.manual_seed(0)
    byte_model = ByteModel(config)
    llama = LlamaForCausalLM._from_config(config.to_llama_config(), attn_implementation="sdpa")
    llama.load_state_dict(byte_model.state_dict(), strict=True)
    return byte_model, llama


def train_steps(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: torch.Tensor, steps: int) -> float:
    """Run `steps` optimizer steps on `batch`; return seconds."""
    start = time.perf_counter()
    for _ in range(steps):
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


@torch.no_grad()
def generate_seconds(model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int) -> tuple[float, torch.Tensor]:
    generation_config = GenerationConfig(do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                         eos_token_id=None, pad_token_id=0)
    start = time.perf_counter()
    output = model.generate(prompt, attention_mask=torch.ones_like(prompt), generation_config=generation_config)
    return time.perf_counter() - start, output


def alternate(measure_byte, measure_llama, rounds: int) -> tuple[list[float], list[float]]:
    byte_times, llama_times = [], []
    for round_index in range(rounds):
        # Swap who goes first each round, so neither always follows the other's cache or allocator state.
        order = [(measure_byte, byte_times), (measure_llama, llama_times)]
        for measure, times in (order if round_index % 2 == 0 else order[::-1]):
            times.append(measure())
    return byte_times, llama_times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden-size", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--vocab-size", type=int, default=6400)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--train-steps", type=int, default=3, help="optimizer steps per round")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--output", default="model_info/bench_model.json")
    args = parser.parse_args()

    config = ByteModelConfig(vocab_size=args.vocab_size, hidden_size=args.hidden_size, num_hidden_layers=args.layers,
                             num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                             max_position_embeddings=max(1024, args.seq_len, args.prompt_len + args.new_tokens))
    byte_model, llama = build_models(config)
    parameters = sum(p.numel() for p in byte_model.parameters())
    print(f"config: hidden {config.hidden_size}, layers {config.num_hidden_layers}, heads {config.num_attention_heads}"
          f"/{config.num_key_value_heads} kv, intermediate {config.intermediate_size}, vocab {config.vocab_size}, "
          f"{parameters / 1e6:.1f}M parameters; torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}")

    generator = torch.Generator().manual_seed(1)
    batch = torch.randint(0, config.vocab_size, (args.batch_size, args.seq_len), generator=generator)
    prompt = torch.randint(0, config.vocab_size, (1, args.prompt_len), generator=generator)

    byte_model.train()
    llama.train()
    byte_optimizer = torch.optim.AdamW(byte_model.parameters(), lr=1e-4)
    llama_optimizer = torch.optim.AdamW(llama.parameters(), lr=1e-4)
    train_steps(byte_model, byte_optimizer, batch, 1)  # warm-up: allocator, kernels, optimizer state
    train_steps(llama, llama_optimizer, batch, 1)
    byte_train, llama_train = alternate(lambda: train_steps(byte_model, byte_optimizer, batch, args.train_steps),
                                        lambda: train_steps(llama, llama_optimizer, batch, args.train_steps),
                                        args.rounds)
    tokens_per_round = args.train_steps * batch.numel()

    byte_model.eval()
    llama.eval()
    _, byte_tokens = generate_seconds(byte_model, prompt, args.new_tokens)  # warm-up, and the outputs to compare
    _, llama_tokens = generate_seconds(llama, prompt, args.new_tokens)
    byte_generate, llama_generate = alternate(lambda: generate_seconds(byte_model, prompt, args.new_tokens)[0],
                                              lambda: generate_seconds(llama, prompt, args.new_tokens)[0],
                                              args.rounds)

    result = {
        "parameters": parameters,
        "train_tokens_per_s_byte": tokens_per_round / statistics.median(byte_train),
        "train_tokens_per_s_llama": tokens_per_round / statistics.median(llama_train),
        "generate_tokens_per_s_byte": args.new_tokens / statistics.median(byte_generate),
        "generate_tokens_per_s_llama": args.new_tokens / statistics.median(llama_generate),
        "greedy_outputs_equal": bool(torch.equal(byte_tokens, llama_tokens)),
    }
    result["train_ratio"] = result["train_tokens_per_s_byte"] / result["train_tokens_per_s_llama"]
    result["generate_ratio"] = result["generate_tokens_per_s_byte"] / result["generate_tokens_per_s_llama"]

    print(f"{'':12}{'ByteModel':>12}{'Llama':>12}{'ratio':>8}")
    print(f"{'train tok/s':12}{result['train_tokens_per_s_byte']:12.0f}{result['train_tokens_per_s_llama']:12.0f}"
          f"{result['train_ratio']:8.3f}")
    print(f"{'gen tok/s':12}{result['generate_tokens_per_s_byte']:12.1f}{result['generate_tokens_per_s_llama']:12.1f}"
          f"{result['generate_ratio']:8.3f}")
    print(f"greedy outputs equal: {result['greedy_outputs_equal']}")
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
