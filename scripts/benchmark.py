"""ByteModel against transformers at the same config and weights, in one run: `python scripts/benchmark.py`.

Dense: ByteModel (eager and `torch.compile`d) against `LlamaForCausalLM`; MoE: ByteModel against
`MixtralForCausalLM`. For each precision (fp32, and bf16 autocast where the hardware runs it natively) it reports
training tokens/s (forward, backward, fused AdamW step) with the model FLOPs utilisation against the matrix-multiply
peak measured here in the same run, greedy generation tokens/s at batch 1 and batch 8 (`--new-tokens`, 512 by
default; ByteModel also with its static cache and compiled decode step, whose tokens must equal the eager ones),
peak memory of each measurement, and every ratio against transformers. Pairs are measured in alternating rounds
and the median round counts, so drift of a shared machine hits both sides alike. Writes `model_info/benchmark.md`
and `model_info/benchmark.json`. `--quick` keeps the eager fp32 rows with generation at batch 1 only, for a check
(`scripts/bench_model.py` runs it on the dense model). Run it alone: on a 2-core machine a second busy process
distorts every number.
"""

import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # import from the repository root, not scripts/

import argparse  # noqa: E402
import contextlib  # noqa: E402
import ctypes  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import GenerationConfig, LlamaForCausalLM, MixtralForCausalLM  # noqa: E402

from model import ByteModel, ByteModelConfig, mixtral_state_dict  # noqa: E402
from utils.counting import flops_per_token, measure_peak_flops  # noqa: E402
from utils.precision import autocast  # noqa: E402

DENSE = dict(vocab_size=6400, hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2)
MOE = dict(vocab_size=6400, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
           num_experts=8, num_experts_per_tok=2, moe_intermediate_size=512)
QUICK = dict(compile=False, generate_batches=[1], new_tokens=64)  # defaults under --quick


def machine() -> str:
    """CPU model (or GPU name), cores and SIMD level: what the numbers were measured on."""
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
    name = platform.processor() or "unknown CPU"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout.splitlines():
            if line.startswith("Model name:"):
                name = line.split(":", 1)[1].strip()
    bf16 = "native bf16" if torch.cpu._is_avx512_bf16_supported() else "no native bf16"
    return (f"{name}, {torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()} ({bf16}), "
            f"torch {torch.__version__}, transformers {transformers.__version__}")


def rss_mib() -> float:
    """Resident memory of this process now (Linux), in MiB; 0 where /proc is missing."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return 0.0


def release_free_memory() -> None:
    """Hand memory that earlier measurements freed back to the OS (glibc's malloc_trim), so that resident memory
    grows again with what the next measurement allocates; a no-op where that call does not exist."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class Measured:
    """Seconds of alternating rounds, and the peak growth of resident memory over what the process held when a
    round started (sampled every millisecond by a thread): what the measured work itself needs. CPU-only processes
    have no allocator statistics to ask, and the peak-RSS counter never comes down between measurements."""

    def __init__(self):
        self.seconds: list[float] = []
        self.peak_mib = 0.0

    def run(self, measure) -> None:
        release_free_memory()
        start, peak, done = rss_mib(), [0.0], threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], rss_mib())
                time.sleep(0.001)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            self.seconds.append(measure())
        finally:
            done.set()
            sampler.join()
        self.peak_mib = max(self.peak_mib, peak[0] - start)

    def rate(self, work: float) -> float:
        return work / statistics.median(self.seconds)


def alternate(measures: dict, rounds: int) -> dict[str, Measured]:
    """Every measure once per round, in rotating order; after one warm-up call each (compile, allocator, state)."""
    results = {name: Measured() for name in measures}
    for measure in measures.values():
        measure()
    names = list(measures)
    for round_index in range(rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            results[name].run(measures[name])
    return results


def autocast_for(precision: str):
    """The benchmark measures CPU kernels, so autocast is the CPU's even where CUDA is present."""
    return autocast(torch.device("cpu"), torch.bfloat16 if precision == "bf16" else torch.float32)


def trainer_for(model: torch.nn.Module, batch: torch.Tensor, precision: str, steps: int, compiled: bool = False):
    """A measure: `steps` training steps (forward, backward, fused AdamW) at lr 0, so weights stay equal."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0, fused=True)
    forward = torch.compile(model) if compiled else model

    def measure() -> float:
        model.train()
        start = time.perf_counter()
        for _ in range(steps):
            with autocast_for(precision):
                loss = forward(input_ids=batch, labels=batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start
    return measure


def generator_for(model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int, precision: str, outputs: dict,
                  name: str, static: bool = False):
    config = GenerationConfig(do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                              eos_token_id=None, pad_token_id=0, cache_implementation="static" if static else None)

    def measure() -> float:
        model.eval()
        start = time.perf_counter()
        with torch.no_grad(), autocast_for(precision):
            outputs[name] = model.generate(prompt, attention_mask=torch.ones_like(prompt), generation_config=config)
        return time.perf_counter() - start
    return measure


def build(kind: str, seed: int = 0) -> tuple[ByteModel, torch.nn.Module, ByteModelConfig]:
    config = ByteModelConfig(**(DENSE if kind == "dense" else MOE), max_position_embeddings=2048)
    torch.manual_seed(seed)
    byte = ByteModel(config)
    if kind == "dense":
        reference = LlamaForCausalLM._from_config(config.to_llama_config(), attn_implementation="sdpa")
    else:
        reference = MixtralForCausalLM._from_config(config.to_mixtral_config(), attn_implementation="sdpa")
    # Llama and Mixtral names are ByteModel's; only an MoE model has routing biases (zero here) to leave out.
    reference.load_state_dict(mixtral_state_dict(byte.state_dict()), strict=True)
    return byte, reference, config


def run(args) -> dict:
    native_bf16 = torch.cpu._is_avx512_bf16_supported() or torch.cuda.is_available()
    precisions = ["fp32"] + (["bf16"] if native_bf16 and not args.quick else [])
    device = torch.device("cpu")
    peaks = {precision: measure_peak_flops(device, torch.float32 if precision == "fp32" else torch.bfloat16)
             for precision in precisions}
    result = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "peak_matmul_flops": peaks,
              "settings": vars(args), "rows": []}
    print(result["machine"])
    print("matmul peak: " + ", ".join(f"{p} {v / 1e9:.0f} GFLOP/s" for p, v in peaks.items()))
    generator = torch.Generator().manual_seed(1)
    for kind in args.models:
        byte, reference, config = build(kind)
        reference_name = "Llama" if kind == "dense" else "Mixtral"
        parameters = sum(p.numel() for p in byte.parameters())
        print(f"\n{kind}: {parameters / 1e6:.1f}M parameters, hidden {config.hidden_size}, {config.num_hidden_layers} "
              f"layers" + (f", {config.num_experts} experts top-{config.num_experts_per_tok}" if config.num_experts
                           else ""))
        batch = torch.randint(0, config.vocab_size, (args.batch_size, args.seq_len), generator=generator)
        flops = sum(flops_per_token(config, args.seq_len).values())
        for precision in precisions:
            measures = {"ByteModel": trainer_for(byte, batch, precision, args.train_steps),
                        reference_name: trainer_for(reference, batch, precision, args.train_steps)}
            if kind == "dense" and args.compile:
                measures["ByteModel compiled"] = trainer_for(byte, batch, precision, args.train_steps, compiled=True)
            timed = alternate(measures, args.rounds)
            tokens = args.train_steps * batch.numel()
            their = timed[reference_name].rate(tokens)
            for name, measured in timed.items():
                rate = measured.rate(tokens)
                result["rows"].append({"model": kind, "task": "train", "precision": precision, "variant": name,
                                       "batch": f"{args.batch_size}x{args.seq_len}", "tokens_per_s": rate,
                                       "mfu": rate * flops / peaks[precision], "peak_memory_mib": measured.peak_mib,
                                       "ratio": rate / their})
                print(f"  train {precision:5} {name:20} {rate:9.0f} tok/s  MFU {rate * flops / peaks[precision]:.2f}"
                      f"  +{measured.peak_mib:6.0f} MiB  x{rate / their:.2f}")
        for batch_size in args.generate_batches:
            prompt = torch.randint(0, config.vocab_size, (batch_size, args.prompt_len), generator=generator)
            for precision in precisions:
                outputs = {}
                measures = {"ByteModel": generator_for(byte, prompt, args.new_tokens, precision, outputs, "ByteModel"),
                            reference_name: generator_for(reference, prompt, args.new_tokens, precision, outputs,
                                                          reference_name)}
                # The compiled decode step runs where ByteModel uses it: dense models, and not under bf16 autocast
                # on a CPU (measured slower there); MoE generation stays eager (data-dependent dispatch).
                if args.compile and kind == "dense" and (precision == "fp32" or torch.cuda.is_available()):
                    measures["ByteModel static+compiled"] = generator_for(
                        byte, prompt, args.new_tokens, precision, outputs, "ByteModel static+compiled", static=True)
                timed = alternate(measures, args.generate_rounds)
                tokens = batch_size * args.new_tokens
                their = timed[reference_name].rate(tokens)
                for name, measured in timed.items():
                    rate = measured.rate(tokens)
                    same = bool(torch.equal(outputs[name], outputs[reference_name]))
                    own = bool(torch.equal(outputs[name], outputs["ByteModel"]))
                    shape = f"{batch_size}x{args.prompt_len}+{args.new_tokens}"
                    result["rows"].append({"model": kind, "task": f"generate b{batch_size}", "precision": precision,
                                           "variant": name, "batch": shape,
                                           "tokens_per_s": rate, "ms_per_step": 1e3 * batch_size / rate,
                                           "peak_memory_mib": measured.peak_mib, "ratio": rate / their,
                                           "tokens_equal_reference": same, "tokens_equal_eager": own})
                    print(f"  generate b{batch_size} {precision:5} {name:26} {rate:8.1f} tok/s "
                          f"({1e3 * batch_size / rate:.1f} ms/step)  x{rate / their:.2f}  same tokens as "
                          f"{reference_name}: {same}, as eager: {own}")
        del byte, reference
    return result


def markdown(result: dict) -> str:
    lines = ["# Benchmark: ByteModel against transformers", "",
             f"Measured {result['date']} on {result['machine']}. Matrix-multiply peak measured in the same run: "
             + ", ".join(f"{p} {v / 1e9:.0f} GFLOP/s" for p, v in result["peak_matmul_flops"].items()) + ".", "",
             "Training: forward + backward + fused AdamW; MFU against the measured peak. Generation: greedy, "
             "tokens/s over all rows of the batch. Ratio: against the transformers model in the same row group. "
             "Peak memory: the most resident memory grew above its level at the start of a measurement "
             "(sampled every millisecond; the models' weights are already loaded).", "",
             "| model | task | precision | variant | batch | tokens/s | MFU | ratio | peak memory | tokens equal |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        mfu = f"{row['mfu']:.2f}" if "mfu" in row else ""
        equal = "" if "tokens_equal_eager" not in row else (
            f"{'yes' if row['tokens_equal_reference'] else 'no'} / {'yes' if row['tokens_equal_eager'] else 'no'}")
        lines.append(f"| {row['model']} | {row['task']} | {row['precision']} | {row['variant']} | {row['batch']} | "
                     f"{row['tokens_per_s']:,.0f} | {mfu} | {row['ratio']:.2f} | {row['peak_memory_mib']:,.0f} MiB | "
                     f"{equal} |")
    lines += ["", "Tokens equal: greedy tokens equal to transformers' / to ByteModel's eager ones.", "",
              f"Settings: {json.dumps(result['settings'])}", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=("dense", "moe"), default=["dense", "moe"])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--train-steps", type=int, default=2, help="optimizer steps per round")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of training (median counts)")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=512)
    parser.add_argument("--generate-batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--generate-rounds", type=int, default=2)
    parser.add_argument("--no-compile", dest="compile", action="store_false",
                        help="skip the compiled variants (each pays a one-off compile)")
    parser.add_argument("--out", default="model_info")
    parser.add_argument("--quick", action="store_true",
                        help="a check rather than the full measurement: fp32 only, no compiled variants, generation "
                             "at batch 1 with 64 new tokens unless given; written as benchmark_quick.md and .json")
    args = parser.parse_args(argv)
    if args.quick:
        parser.set_defaults(**QUICK)
        args = parser.parse_args(argv)
    result = run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # A quick run never overwrites the table of a full one.
    name = "benchmark_quick" if args.quick else "benchmark"
    (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{name}.md").write_text(markdown(result), encoding="utf-8")
    print(f"\nwritten to {out / f'{name}.md'} and {out / f'{name}.json'}")
    return out / f"{name}.md"


if __name__ == "__main__":
    main()
