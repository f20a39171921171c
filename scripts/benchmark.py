"""ByteModel against transformers at the same config and weights, in one run: `python scripts/benchmark.py`.

Dense: ByteModel (eager and `torch.compile`d) against `LlamaForCausalLM`; MoE: ByteModel against
`MixtralForCausalLM`. For each precision (fp32, and bf16 where the hardware runs it natively: autocast over fp32
weights in training, weights cast to bf16 in generation, as `utils/inference.py` loads them) it reports training
tokens/s (forward, backward, fused AdamW step) with the model FLOPs utilisation against the matrix-multiply
peak measured here in the same run, greedy generation tokens/s at batch 1 and batch 8 (`--new-tokens`, 512 by
default; ByteModel also with its static cache and compiled decode step, whose tokens must equal the eager ones),
a sampled generation at batch 16 (temperature 1 over the whole vocabulary: a GRPO rollout's shape, `--sample-batch`;
ByteModel draws as the project's generation paths do, `utils/sampling.py`), what `--precision auto` picks for each,
peak memory of each measurement, and every ratio against transformers. Pairs are measured in alternating rounds
and the median round counts, so drift of a shared machine hits both sides alike. Then the inference rows: the
benchmark model and the demo's trained models (`--inference-models`) in fp32, int8 and int4 (`utils/quantize.py`),
eager and with the compiled static-cache step, and with a draft (`--draft`, and the model's own int8 copy) for
speculative decoding: greedy tokens/s at batch 1 and 8, weights read per token against the streaming-read bandwidth
measured in the same run, the draft's acceptance rate, perplexity and top-1 agreement on the demo validation text,
all against transformers' fp32 Llama at the same weights; where llama-cpp-python is installed, llama.cpp on the same
weights too (exported by scripts/export_gguf.py as f32 and q8_0, batch 1, as many threads as ours). Last, a GRPO
step of `model_rlhf_train.py` against TRL's GRPOTrainer on the same model, prompts and loss (`--grpo-steps`).
Writes `model_info/benchmark.md` and `model_info/benchmark.json`. `--quick` keeps the eager fp32 rows with
generation at batch 1 only, for a check (`scripts/bench_model.py` runs it on the dense model). Run it alone: on a
2-core machine a second busy process distorts every number.
"""

import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # import from the repository root, not scripts/

import argparse  # noqa: E402
import contextlib  # noqa: E402
import copy  # noqa: E402
import ctypes  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402
from transformers import (AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaForCausalLM,  # noqa: E402
                          MixtralForCausalLM)

from model import ByteModel, ByteModelConfig, mixtral_state_dict  # noqa: E402
from utils.checkpoint import load_model_folder  # noqa: E402
from utils.config import check_attn_implementation  # noqa: E402
from utils.counting import flops_per_token, measure_peak_flops  # noqa: E402
from utils.data import PretrainDataset  # noqa: E402
from utils.errors import exit_on_input_error  # noqa: E402
from utils.inference import PRECISION_NAMES, auto_dtype, for_generation  # noqa: E402
from utils.llama_cpp_runner import greedy, open_gguf  # noqa: E402
from utils.logger import quiet_transformers  # noqa: E402
from utils.metrics import perplexity  # noqa: E402
from utils.precision import autocast, native_bf16  # noqa: E402
from utils.quantize import weight_bytes  # noqa: E402
from utils.sampling import sampling_processors  # noqa: E402

DENSE = dict(vocab_size=6400, hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2)
MOE = dict(vocab_size=6400, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
           num_experts=8, num_experts_per_tok=2, moe_intermediate_size=512)
# Defaults under --quick.
QUICK = dict(compile=False, generate_batches=[1], sample_batch=0, new_tokens=64, inference_models=[], grpo_steps=0)


def machine() -> str:
    """CPU model (or GPU name), cores and SIMD level: what the numbers were measured on."""
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
    name = platform.processor() or "unknown CPU"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout.splitlines():
            if line.startswith("Model name:"):
                name = line.split(":", 1)[1].strip()
    bf16 = "native bf16" if native_bf16(torch.device("cpu")) else "no native bf16"
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
    call started: what the measured work itself needs. CPU-only processes have no allocator statistics to ask and
    the peak-RSS counter never comes down, so a thread samples resident memory every millisecond, in a call of its
    own: on 2 cores that sampling slowed the timed work by up to a third."""

    def __init__(self):
        self.seconds: list[float] = []
        self.peak_mib = 0.0

    def run(self, measure) -> None:
        self.seconds.append(measure())

    def sample_memory(self, measure) -> None:
        release_free_memory()
        start, peak, done = rss_mib(), [0.0], threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], rss_mib())
                time.sleep(0.001)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            measure()
        finally:
            done.set()
            sampler.join()
        self.peak_mib = max(self.peak_mib, peak[0] - start)

    def rate(self, work: float) -> float:
        return work / statistics.median(self.seconds)


def alternate(measures: dict, rounds: int) -> dict[str, Measured]:
    """Every measure once per round, in rotating order, after one warm-up call each (compile, allocator, state);
    then one more call each for its peak memory."""
    results = {name: Measured() for name in measures}
    for measure in measures.values():
        measure()
    names = list(measures)
    for round_index in range(rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            results[name].run(measures[name])
    for name in names:
        results[name].sample_memory(measures[name])
    return results


def autocast_for(precision: str):
    """The benchmark measures CPU kernels, so autocast is the CPU's even where CUDA is present."""
    return autocast(torch.device("cpu"), torch.bfloat16 if precision == "bf16" else torch.float32)


def trainer_for(model: torch.nn.Module, batch: torch.Tensor, precision: str, steps: int, compiled: bool = False,
                after_backward=None):
    """A measure: `steps` training steps (forward, backward, `after_backward()`, fused AdamW) at lr 0, so weights
    stay equal."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0, fused=True)
    forward = torch.compile(model) if compiled else model

    def measure() -> float:
        model.train()
        start = time.perf_counter()
        for _ in range(steps):
            with autocast_for(precision):
                loss = forward(input_ids=batch, labels=batch).loss
            loss.backward()
            if after_backward is not None:
                after_backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start
    return measure


def generator_for(model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int, outputs: dict, name: str,
                  static: bool = False, draft: torch.nn.Module | None = None, sample: bool = False):
    """A measure: one `generate` of exactly `new_tokens` tokens, greedy or (`sample`) sampled at temperature 1 from the
    whole distribution, with `draft` as the assistant model of speculative decoding if given, in the precision of
    `model`'s weights. ByteModel samples as the project's generation paths do (`utils.sampling`), transformers'
    models with `generate`'s own sampling."""
    ours = sample and isinstance(model, ByteModel)
    # No end-of-sequence token ([]: None would be filled in from the model's own config, where min_new_tokens
    # would then suppress it): exactly `new_tokens` tokens, as llama.cpp's greedy decodes past it.
    config = GenerationConfig(do_sample=sample and not ours, temperature=1.0, top_k=0, top_p=1.0,
                              max_new_tokens=new_tokens, eos_token_id=[], pad_token_id=0,
                              cache_implementation="static" if static else None)
    processors = sampling_processors() if ours else None

    def measure() -> float:
        model.eval()
        start = time.perf_counter()
        with torch.no_grad():
            outputs[name] = model.generate(prompt, attention_mask=torch.ones_like(prompt), generation_config=config,
                                           assistant_model=draft, logits_processor=processors)
        return time.perf_counter() - start
    return measure


def decode_task(batch_size: int, sample: bool) -> str:
    return f"{'sample' if sample else 'generate'} b{batch_size}"


def auto_rows(kind: str, byte: ByteModel, batch_size: int, task: str, result: dict) -> None:
    """What `precision: auto` picks for generating with `byte` at `batch_size` (utils/inference.py: its start-up
    timing, on this machine), to set beside the measured fp32 and bf16 rows."""
    dtype, speedup = auto_dtype(byte, batch_size)
    pick = PRECISION_NAMES[dtype]
    result["auto_precision"].append({"model": kind, "task": task, "bf16_speedup": speedup, "picks": pick})
    timed = "" if speedup is None else f" (its timing: bf16 x{speedup:.2f})"
    print(f"  {task} precision auto picks {pick}{timed}")


def reference_for(byte: ByteModel) -> torch.nn.Module:
    """transformers' Llama (dense) or Mixtral (MoE) holding `byte`'s weights, with the same attention function."""
    config, implementation = byte.config, byte.config._attn_implementation
    if config.num_experts:
        reference = MixtralForCausalLM._from_config(config.to_mixtral_config(), attn_implementation=implementation)
    else:
        reference = LlamaForCausalLM._from_config(config.to_llama_config(), attn_implementation=implementation)
    # Llama and Mixtral names are ByteModel's; only an MoE model has routing biases (zero here) to leave out.
    reference.load_state_dict(mixtral_state_dict(byte.state_dict()), strict=True)
    return reference.eval()


def build(kind: str, attn_implementation: str, seed: int = 0) -> tuple[ByteModel, torch.nn.Module, ByteModelConfig]:
    config = ByteModelConfig(**(DENSE if kind == "dense" else MOE), max_position_embeddings=2048,
                             attn_implementation=attn_implementation)
    torch.manual_seed(seed)
    byte = ByteModel(config)
    return byte, reference_for(byte), config


def run(args) -> dict:
    bf16_rows = native_bf16(torch.device("cpu")) or torch.cuda.is_available()
    precisions = ["fp32"] + (["bf16"] if bf16_rows and not args.quick else [])
    device = torch.device("cpu")
    peaks = {precision: measure_peak_flops(device, torch.float32 if precision == "fp32" else torch.bfloat16)
             for precision in precisions}
    result = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "peak_matmul_flops": peaks,
              "settings": vars(args), "rows": [], "auto_precision": []}
    print(result["machine"])
    print("matmul peak: " + ", ".join(f"{p} {v / 1e9:.0f} GFLOP/s" for p, v in peaks.items()))
    generator = torch.Generator().manual_seed(1)
    for kind in args.models:
        torch._dynamo.reset()
        byte, reference, config = build(kind, args.attn_implementation)
        reference_name = "Llama" if kind == "dense" else "Mixtral"
        # Generation's weights, cast once as scripts/chat.py and scripts/serve.py load them (utils/inference.py).
        # Copied (here and by the timing of `auto`) before anything runs: transformers keeps a compiled decode step
        # on the model, which a later copy would share, and a trained MoE model holds its last balancing loss,
        # which a copy cannot take.
        weights = {precision: (byte, reference) if precision == "fp32" else
                   tuple(for_generation(copy.deepcopy(model), Path(kind), precision=precision)
                         for model in (byte, reference))
                   for precision in precisions}
        # (batch, sampled): greedy at each --generate-batches, and the shape of a GRPO rollout, sampled.
        decodes = [(batch_size, False) for batch_size in args.generate_batches] + (
            [(args.sample_batch, True)] if args.sample_batch else [])
        parameters = sum(p.numel() for p in byte.parameters())
        print(f"\n{kind}: {parameters / 1e6:.1f}M parameters, hidden {config.hidden_size}, {config.num_hidden_layers} "
              f"layers" + (f", {config.num_experts} experts top-{config.num_experts_per_tok}" if config.num_experts
                           else ""))
        if len(precisions) > 1:
            for batch_size, sample in decodes:
                auto_rows(kind, byte.eval(), batch_size, decode_task(batch_size, sample), result)
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
        for batch_size, sample in decodes:
            prompt = torch.randint(0, config.vocab_size, (batch_size, args.prompt_len), generator=generator)
            task = decode_task(batch_size, sample)
            for precision in precisions:
                outputs = {}
                ours, theirs = weights[precision]
                measures = {"ByteModel": generator_for(ours, prompt, args.new_tokens, outputs, "ByteModel",
                                                       sample=sample),
                            reference_name: generator_for(theirs, prompt, args.new_tokens, outputs, reference_name,
                                                          sample=sample)}
                # The compiled decode step runs where ByteModel uses it: dense models (MoE generation stays eager:
                # data-dependent dispatch).
                if args.compile and kind == "dense" and not sample:
                    measures["ByteModel static+compiled"] = generator_for(
                        ours, prompt, args.new_tokens, outputs, "ByteModel static+compiled", static=True)
                timed = alternate(measures, args.generate_rounds)
                tokens = batch_size * args.new_tokens
                their = timed[reference_name].rate(tokens)
                for name, measured in timed.items():
                    rate = measured.rate(tokens)
                    shape = f"{batch_size}x{args.prompt_len}+{args.new_tokens}"
                    row = {"model": kind, "task": task, "precision": precision, "variant": name, "batch": shape,
                           "tokens_per_s": rate, "ms_per_step": 1e3 * batch_size / rate,
                           "peak_memory_mib": measured.peak_mib, "ratio": rate / their}
                    if not sample:  # sampled tokens differ between any two runs
                        row.update(tokens_equal_reference=bool(torch.equal(outputs[name], outputs[reference_name])),
                                   tokens_equal_eager=bool(torch.equal(outputs[name], outputs["ByteModel"])))
                    result["rows"].append(row)
                    equal = "" if sample else (f"  same tokens as {reference_name}: {row['tokens_equal_reference']}, "
                                               f"as eager: {row['tokens_equal_eager']}")
                    print(f"  {task} {precision:5} {name:26} {rate:8.1f} tok/s "
                          f"({1e3 * batch_size / rate:.1f} ms/step)  x{rate / their:.2f}{equal}")
        del byte, reference, weights
    run_inference(args, result)
    grpo_rows(args, result)
    return result


# ----------------------------------------------------------------------------------------------------------------
# Inference: quantized weights and speculative decoding, on trained weights where they exist.

def stream_read_bandwidth(megabytes: int = 512, repeats: int = 5) -> float:
    """Bytes/s this machine streams from memory right now: the median of summing a buffer far larger than any
    cache, with all threads (the ceiling a decode step that only reads its weights could reach)."""
    buffer = torch.ones(megabytes * 2**20 // 4)
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        buffer.sum()
        times.append(time.perf_counter() - start)
    return buffer.numel() * 4 / statistics.median(times[1:])


@contextlib.contextmanager
def forward_calls(models: list[torch.nn.Module]):
    """Counts each model's forward calls while the block runs, in a list (a hook, removed afterwards: a hook left on
    a model would also run inside its compiled decode step and change what gets compiled)."""
    counts = [0] * len(models)

    def counter(index: int):
        def hook(*_) -> None:
            counts[index] += 1
        return hook

    handles = [model.register_forward_hook(counter(index)) for index, model in enumerate(models)]
    try:
        yield counts
    finally:
        for handle in handles:
            handle.remove()


def validation_windows(tokenizer, files: list[str], count: int,
                       seq_len: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `count` windows of the validation text, and their next-token targets."""
    dataset = PretrainDataset(files, tokenizer, seq_len, cache_dir=".cache/data")
    windows = [dataset[index] for index in range(min(count, len(dataset)))]
    return (torch.stack([window["input_ids"] for window in windows]),
            torch.stack([window["shift_labels"] for window in windows]))


@torch.no_grad()
def text_quality(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[float, torch.Tensor]:
    """Perplexity on the windows, and the model's top-1 prediction at every position."""
    total, predictions = 0.0, []
    for start in range(0, len(inputs), 8):
        logits = model(inputs[start:start + 8], use_cache=False).logits.float()
        total += F.cross_entropy(logits.flatten(0, 1), targets[start:start + 8].flatten(), reduction="sum").item()
        predictions.append(logits.argmax(-1))
    return perplexity(total / targets.numel()), torch.cat(predictions)


def inference_models(args) -> list[tuple[str, ByteModel, object]]:
    """(name, fp32 ByteModel, tokenizer) for each of `--inference-models`: `dense` is the benchmark's random-init
    model (with the demo tokenizer for its text), anything else a trained model folder; missing folders are
    skipped with a note, so the benchmark also runs before the demo has been trained."""
    models = []
    for name in args.inference_models:
        if name == "dense":
            byte, _, _ = build("dense", args.attn_implementation)
            models.append((name, byte.eval(), AutoTokenizer.from_pretrained(args.tokenizer)))
        elif not Path(name).is_dir():
            print(f"\n{name}: not found, skipped (train the demo to measure it)")
        else:
            models.append((name, load_model_folder(Path(name), attn_implementation=args.attn_implementation),
                           AutoTokenizer.from_pretrained(name)))
    return models


LLAMA_CPP_TYPES = ("f32", "q8_0")


def gguf_files(byte: ByteModel, tokenizer, folder: Path) -> dict[str, Path]:
    """`byte` exported by scripts/export_gguf.py in each of LLAMA_CPP_TYPES, where llama-cpp-python is installed to
    run them (none otherwise)."""
    if importlib.util.find_spec("llama_cpp") is None:
        return {}
    byte.save_pretrained(folder / "model")
    tokenizer.save_pretrained(folder / "model")
    files = {}
    for dtype in LLAMA_CPP_TYPES:
        files[dtype] = folder / f"model-{dtype}.gguf"
        subprocess.run([sys.executable, str(Path(__file__).resolve().parent / "export_gguf.py"), "--model",
                        str(folder / "model"), "--out", str(files[dtype]), "--dtype", dtype], check=True,
                       stdout=subprocess.DEVNULL)
    return files


def llama_cpp_generator(llm, prompt: torch.Tensor, new_tokens: int, outputs: dict, name: str):
    """A measure: llama.cpp's greedy decoding of exactly `new_tokens` tokens after the one-row `prompt`."""
    def measure() -> float:
        start = time.perf_counter()
        tokens = greedy(llm, prompt[0].tolist(), new_tokens)
        seconds = time.perf_counter() - start
        outputs[name] = torch.cat([prompt[0], torch.tensor(tokens)])[None]
        return seconds
    return measure


def inference_rows(name: str, byte: ByteModel, tokenizer, draft: ByteModel | None, args) -> list[dict]:
    """Greedy generation speed, weights read per token and text quality of `byte` in fp32 and quantized, eager and
    with the compiled static-cache step, with and without a draft, against transformers' Llama at the same weights
    in the same run; at batch 1 also llama.cpp on the same weights (f32 and q8_0 GGUF files), with as many threads as
    ours."""
    # Compiled steps of earlier models would count against dynamo's recompile limit (8 per function), past which
    # it silently runs eager.
    torch._dynamo.reset()
    inputs, targets = validation_windows(tokenizer, args.val_files, args.quality_windows)
    prompts = inputs[:, :args.prompt_len]
    models = {"Llama fp32": reference_for(byte), "ByteModel fp32": byte}
    for mode in args.quantize:
        models[f"ByteModel {mode}"] = for_generation(copy.deepcopy(byte), Path(name), quantize_mode=mode)
    # variant: (model, static cache with the compiled decode step, draft)
    variants = {variant: (variant, False, None) for variant in models}
    for variant in ("ByteModel fp32", "ByteModel int8"):
        if args.compile and variant in models:
            variants[f"{variant} static+compiled"] = (variant, True, None)
    speculative = {}
    if draft is not None and draft.config.vocab_size == byte.config.vocab_size and name != "dense":
        speculative["ByteModel fp32 + draft"] = ("ByteModel fp32", False, draft)
    if "int8" in args.quantize:
        speculative["ByteModel fp32 + int8 self-draft"] = ("ByteModel fp32", False, models["ByteModel int8"])
    sizes = {id(model): weight_bytes(model) for model in [*models.values(), *(
        assistant for _, _, assistant in speculative.values())]}
    quality = {}
    reference_ppl, reference_predictions = text_quality(byte, inputs, targets)
    for model_name, model in models.items():
        ppl, predictions = ((reference_ppl, reference_predictions) if model is byte
                            else text_quality(model, inputs, targets))
        quality[model_name] = (ppl, (predictions == reference_predictions).float().mean().item())
    rows = []
    scratch = tempfile.TemporaryDirectory()
    # variant: (llama.cpp model, its file's bytes)
    yardsticks = {f"llama.cpp {dtype}": (open_gguf(path, args.prompt_len + args.inference_new_tokens,
                                                   torch.get_num_threads()), path.stat().st_size)
                  for dtype, path in gguf_files(byte, tokenizer, Path(scratch.name)).items()} \
        if 1 in args.generate_batches else {}
    for batch_size in args.generate_batches:
        prompt = prompts[:batch_size] if len(prompts) >= batch_size else prompts[[0] * batch_size]
        outputs, calls = {}, {}

        def counted(variant: str, measure, target: torch.nn.Module, assistant: torch.nn.Module):
            """`measure`, noting how often the target and the draft ran forward in its latest call."""
            def run() -> float:
                with forward_calls([target, assistant]) as counts:
                    seconds = measure()
                calls[variant] = counts
                return seconds
            return run

        # transformers' assisted generation takes one sequence at a time
        runs = {**variants, **(speculative if batch_size == 1 else {})}
        measures = {}
        for variant, (model_name, static, assistant) in runs.items():
            measure = generator_for(models[model_name], prompt, args.inference_new_tokens, outputs, variant,
                                    static=static, draft=assistant)
            measures[variant] = counted(variant, measure, models[model_name], assistant) if assistant else measure
        if batch_size == 1:
            for variant, (llm, _) in yardsticks.items():
                measures[variant] = llama_cpp_generator(llm, prompt, args.inference_new_tokens, outputs, variant)
        timed = alternate(measures, args.generate_rounds)
        tokens = batch_size * args.inference_new_tokens
        their = timed["Llama fp32"].rate(tokens)
        for variant, measured in timed.items():
            model_name, _, assistant = runs.get(variant, (None, False, None))
            weights = yardsticks[variant][1] if variant in yardsticks else sizes[id(models[model_name])]
            # Without a draft, every token takes one forward pass (the first one reads the prompt too).
            target_calls, draft_calls = calls.get(variant, (args.inference_new_tokens, 0))
            read = weights * target_calls
            acceptance = None
            if assistant is not None:
                read += sizes[id(assistant)] * draft_calls
                # Every target forward yields one token of its own; the rest were the draft's, accepted.
                acceptance = (args.inference_new_tokens - target_calls) / max(1, draft_calls)
            rate = measured.rate(tokens)
            ppl, agreement = quality.get(model_name, (None, None))
            row = {"model": name, "variant": variant, "batch": batch_size, "tokens_per_s": rate,
                   "ms_per_token": 1e3 / rate, "ratio": rate / their, "acceptance": acceptance,
                   "weight_mib": weights / 2**20, "read_mib_per_token": read / tokens / 2**20,
                   "read_gb_per_s": read / tokens * rate / 1e9,
                   "tokens_equal_fp32": bool(torch.equal(outputs[variant], outputs["ByteModel fp32"])),
                   "ppl": ppl, "ppl_change": None if ppl is None else ppl / reference_ppl - 1,
                   "top1_agreement": agreement,
                   "peak_memory_mib": measured.peak_mib}
            rows.append(row)
            print(f"  b{batch_size} {variant:34} {rate:7.1f} tok/s {1e3 / rate:6.1f} ms/token  x{rate / their:.2f}  "
                  f"{row['weight_mib']:6.1f} MiB  read {row['read_mib_per_token']:6.1f} MiB/token "
                  f"({row['read_gb_per_s']:5.1f} GB/s)  "
                  + (f"accepted {acceptance:.2f}  " if acceptance is not None else "")
                  + (f"ppl {ppl:.2f} ({100 * row['ppl_change']:+.2f}%)  top-1 {agreement:.3f}  " if ppl else "")
                  + f"same tokens as fp32: {row['tokens_equal_fp32']}")
    for llm, _ in yardsticks.values():
        llm.close()
    scratch.cleanup()
    return rows


def run_inference(args, result: dict) -> None:
    if not args.inference_models:
        return
    bandwidth = stream_read_bandwidth()
    result["stream_read_gb_per_s"] = bandwidth / 1e9
    print(f"\ninference: streaming read {bandwidth / 1e9:.1f} GB/s; greedy, {args.inference_new_tokens} new tokens "
          f"after {args.prompt_len} of the validation text")
    draft = None
    if args.draft and Path(args.draft).is_dir():
        draft = load_model_folder(Path(args.draft))
    elif args.draft:
        print(f"draft {args.draft}: not found, speculative rows with it skipped (train "
              "configs/model_pretrain_draft.yaml to measure them)")
    result["inference"] = []
    for name, byte, tokenizer in inference_models(args):
        print(f"\n{name}: {sum(p.numel() for p in byte.parameters()) / 1e6:.1f}M parameters")
        result["inference"] += inference_rows(name, byte, tokenizer, draft, args)


# ----------------------------------------------------------------------------------------------------------------
# Online RL: a GRPO step against TRL's GRPOTrainer.


def grpo_rows(args, result: dict) -> None:
    """Steps per second of `model_rlhf_train.py`'s GRPO against TRL's GRPOTrainer on the same start: the demo
    pretraining config's model shape (random weights, so every completion runs to the full length on both sides),
    the same arithmetic prompts, G, completion length, loss (dapo, beta 0, one update per rollout), rewards and
    weights (the demo's), optimizer and precision. The median of the timed steps after warm-up."""
    import tempfile

    import yaml
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer
    from transformers import TrainerCallback

    import model_rlhf_train
    from utils.config import PreferenceConfig, build_config, model_config_from, read_yaml
    from utils.rewards import load_reward_functions
    from utils.trainer import Trainer

    if not args.grpo_steps:
        return
    precision = "bf16" if native_bf16(torch.device("cpu")) else "fp32"
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    section = read_yaml(Path("configs/model_pretrain.yaml"))["model"]
    pretrain = build_config(PreferenceConfig, {"model": section})
    torch.manual_seed(0)
    byte = ByteModel(model_config_from(pretrain.model, tokenizer))
    prompts, group = args.grpo_prompts, args.grpo_generations
    rows = [json.loads(line) for line in Path("datasets/demo/arithmetic_train.jsonl").read_text().splitlines()]
    warmup, steps = 2, args.grpo_steps
    with tempfile.TemporaryDirectory() as folder:
        start = Path(folder) / "start"
        byte.save_pretrained(start)
        tokenizer.save_pretrained(start)
        values = yaml.safe_load(Path("configs/model_grpo.yaml").read_text())
        for section, overrides in {
                "model": {"init_from": str(start)}, "data": {"val_files": []},
                "train": {"out_dir": str(Path(folder) / "ours"), "max_steps": warmup + steps,
                          "micro_batch_size": prompts * group, "precision": precision, "compile": False},
                "checkpoint": {"every_steps": 10 ** 6}, "eval": {"every_steps": 10 ** 6, "at_start": False},
                "logging": {"every_steps": 10 ** 6, "swanlab_mode": "disabled", "plots": False},
                "rlhf": {"num_generations": group, "prompts_per_step": prompts,
                         "max_completion_tokens": args.grpo_tokens}}.items():
            values[section] = {**values.get(section, {}), **overrides}
        config = build_config(PreferenceConfig, values)
        rlhf = config.rlhf
        ours = Trainer(config, model_rlhf_train.PREFERENCE)
        batches = iter(ours.batches)
        seconds = []
        for index in range(warmup + steps):
            started = time.perf_counter()
            ours.train_step(ours.rollout.step_batches(batches))
            seconds.append(time.perf_counter() - started)
        our_rate = 1 / statistics.median(seconds[warmup:])
        ours.metrics.close()

        class StepTimes(TrainerCallback):
            def __init__(self):
                self.times = [time.perf_counter()]

            def on_step_end(self, args, state, control, **kwargs):
                self.times.append(time.perf_counter())

        timer = StepTimes()
        trl_args = GRPOConfig(
            output_dir=str(Path(folder) / "trl"), per_device_train_batch_size=prompts * group, num_generations=group,
            max_completion_length=args.grpo_tokens, max_steps=warmup + steps, learning_rate=config.optim.lr,
            lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=config.optim.grad_clip, beta=0.0,
            loss_type="dapo", reward_weights=rlhf.reward_weights, epsilon=rlhf.epsilon, epsilon_high=rlhf.epsilon_high,
            temperature=rlhf.temperature,
            bf16=precision == "bf16", use_cpu=True, report_to="none", logging_steps=10 ** 6, save_strategy="no",
            seed=config.train.seed, dataloader_num_workers=0)
        trl = GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(start), processing_class=tokenizer,
                          reward_funcs=[function for _, function in load_reward_functions(rlhf.reward_functions)],
                          args=trl_args, train_dataset=Dataset.from_list(rows), callbacks=[timer])
        trl.train()
        their_rate = 1 / statistics.median(torch.tensor(timer.times).diff().tolist()[warmup:])
    shape = f"{prompts}x{group}+{args.grpo_tokens}"
    for name, rate in (("StellarByte", our_rate), ("TRL GRPOTrainer", their_rate)):
        result["rows"].append({"model": "demo", "task": "grpo step", "precision": precision, "variant": name,
                               "batch": shape, "tokens_per_s": rate * prompts * group * args.grpo_tokens,
                               "steps_per_s": rate, "peak_memory_mib": None, "ratio": rate / their_rate})
        print(f"  grpo {precision:5} {name:20} {rate:6.2f} steps/s  x{rate / their_rate:.2f}")


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
        memory = "" if row["peak_memory_mib"] is None else f"{row['peak_memory_mib']:,.0f} MiB"
        equal = "" if "tokens_equal_eager" not in row else (
            f"{'yes' if row['tokens_equal_reference'] else 'no'} / {'yes' if row['tokens_equal_eager'] else 'no'}")
        lines.append(f"| {row['model']} | {row['task']} | {row['precision']} | {row['variant']} | {row['batch']} | "
                     f"{row['tokens_per_s']:,.0f} | {mfu} | {row['ratio']:.2f} | {memory} | "
                     f"{equal} |")
    lines += ["", "Tokens equal: greedy tokens equal to transformers' / to ByteModel's eager ones. Sample rows: "
              "temperature 1 over the whole vocabulary; ByteModel draws as the project's generation paths do "
              "(utils/sampling.py, one uniform number per row), transformers with generate's torch.multinomial. "
              "GRPO step: "
              "prompts x completions per prompt + completion tokens, one optimizer step on a fresh rollout; tokens/s "
              "counts completion tokens, the ratio is against TRL's GRPOTrainer in the same run. Precision: bf16 "
              "training is autocast over fp32 weights; bf16 generation runs weights cast to bf16, as "
              "utils/inference.py loads them for chat.py and serve.py.", ""]
    if result.get("auto_precision"):
        lines += ["`--precision auto` (utils/inference.py's start-up timing, bf16 only at 1.1x or faster) picks: "
                  + "; ".join(f"{row['model']} {row['task']}: {row['picks']}"
                              + ("" if row["bf16_speedup"] is None else f" (bf16 x{row['bf16_speedup']:.2f})")
                              for row in result["auto_precision"]) + ".", ""]
    if result.get("inference"):
        lines += ["## Inference: quantized weights and speculative decoding", "",
                  f"Greedy generation of {result['settings']['inference_new_tokens']} tokens after "
                  f"{result['settings']['prompt_len']} tokens of validation text, fp32 activations. Ratio: against "
                  "transformers' fp32 Llama at the same weights. Read per token: the bytes of weights every forward "
                  "pass reads (target and draft), per generated token; the machine streamed "
                  f"{result['stream_read_gb_per_s']:.1f} GB/s from memory in the same run. Accepted: the share of "
                  "draft tokens the model kept. Perplexity and top-1 agreement (with the fp32 model's next-token "
                  f"predictions) on {result['settings']['quality_windows']} windows of 256 tokens of "
                  f"{', '.join(result['settings']['val_files'])}; a speculative row shows its target's. "
                  "llama.cpp rows: the same weights exported by scripts/export_gguf.py, decoded by llama.cpp's "
                  "greedy sampler with as many threads; their weights are the GGUF file's size.", "",
                  "| model | variant | batch | tokens/s | ms/token | ratio | accepted | weights | read per token | "
                  "GB/s | same tokens as fp32 | perplexity | top-1 agreement |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for row in result["inference"]:
            accepted = "" if row["acceptance"] is None else f"{row['acceptance']:.2f}"
            lines.append(f"| {row['model']} | {row['variant']} | {row['batch']} | {row['tokens_per_s']:,.1f} | "
                         f"{row['ms_per_token']:.1f} | {row['ratio']:.2f} | {accepted} | "
                         f"{row['weight_mib']:.1f} MiB | {row['read_mib_per_token']:.1f} MiB | "
                         f"{row['read_gb_per_s']:.1f} | {'yes' if row['tokens_equal_fp32'] else 'no'} | "
                         + ("| |" if row["ppl"] is None else f"{row['ppl']:.2f} ({100 * row['ppl_change']:+.2f}%) | "
                                                            f"{row['top1_agreement']:.3f} |"))
        lines.append("")
    lines += [f"Settings: {json.dumps(result['settings'])}", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", choices=("dense", "moe"), default=["dense", "moe"],
                        help="ByteModel against transformers, training and generation (none: skip these rows)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--train-steps", type=int, default=2, help="optimizer steps per round")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of training (median counts)")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=512)
    parser.add_argument("--generate-batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--sample-batch", type=int, default=16,
                        help="a sampled generation row at this batch, temperature 1 (a GRPO rollout's shape; 0: none)")
    parser.add_argument("--generate-rounds", type=int, default=2)
    parser.add_argument("--no-compile", dest="compile", action="store_false",
                        help="skip the compiled variants (each pays a one-off compile)")
    parser.add_argument("--inference-models", nargs="*", default=["dense", "out/pretrain/final", "out/sft/final"],
                        help="quantized and speculative inference rows for these model folders, and `dense` for the "
                             "random-init benchmark model (none: skip the rows)")
    parser.add_argument("--quantize", nargs="*", choices=("int8", "int4"), default=["int8", "int4"])
    parser.add_argument("--draft", default="out/pretrain_draft/final",
                        help="the draft model of the speculative rows (configs/model_pretrain_draft.yaml trains it)")
    parser.add_argument("--inference-new-tokens", type=int, default=128)
    parser.add_argument("--quality-windows", type=int, default=64,
                        help="windows of 256 validation tokens for perplexity and top-1 agreement")
    parser.add_argument("--val-files", nargs="+", default=["datasets/demo/pretrain_val.jsonl"])
    parser.add_argument("--tokenizer", default="tokenizer", help="encodes the text for the `dense` model")
    parser.add_argument("--grpo-steps", type=int, default=8, help="timed GRPO steps of each side (0: no GRPO rows)")
    parser.add_argument("--grpo-prompts", type=int, default=8, help="prompts per GRPO step")
    parser.add_argument("--grpo-generations", type=int, default=8, help="completions per prompt")
    parser.add_argument("--grpo-tokens", type=int, default=32, help="tokens per completion")
    parser.add_argument("--attn-implementation", default="sdpa",
                        help="the attention function of ByteModel and of the Llama/Mixtral it is measured against")
    parser.add_argument("--out", default="model_info")
    parser.add_argument("--quick", action="store_true",
                        help="a check rather than the full measurement: fp32 only, no compiled variants, generation "
                             "at batch 1 with 64 new tokens unless given; written as benchmark_quick.md and .json")
    args = parser.parse_args(argv)
    if args.quick:
        parser.set_defaults(**QUICK)
        args = parser.parse_args(argv)
    check_attn_implementation(args.attn_implementation, "--attn-implementation")
    quiet_transformers()
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
    exit_on_input_error(main)()
