"""A model folder made ready to generate: the one loader and the one set of settings (weights' precision,
quantization, attention function) behind scripts/chat.py, scripts/serve.py and scripts/benchmark.py.

`precision: auto` decodes in bf16 only where it measures faster than fp32, on this machine, for this model and
batch size: whether it does depends on all three (on a 2-core Xeon with AMX a 29M-parameter model decodes slower in
bf16 at batch 1 and faster at batch 16; on an AVX-512 BF16 EPYC faster at both; with bf16 emulated, never), so no
rule by CPU flags alone picks right. The weights are cast once rather than run under autocast, which casts at every
op (measured slower at both batch sizes).
"""

import argparse
import copy
import json
import time
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from utils.checkpoint import load_model_folder
from utils.config import check_attn_implementation, read_yaml
from utils.errors import InputError, error_summary
from utils.precision import native_bf16
from utils.quantize import QUANTIZE_CHOICES, quantize

PRECISIONS = ("auto", "fp32", "bf16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PRECISION_NAMES = {dtype: name for name, dtype in DTYPES.items()}
# auto takes bf16 only this much faster: fp32's tokens are the trained model's own, and two close timings would
# flip the choice from one start to the next.
AUTO_MARGIN = 1.1


def decode_seconds(language_model: nn.Module, batch_size: int, new_tokens: int = 8, prompt_length: int = 16) -> float:
    """Seconds for one greedy `generate` of `new_tokens` tokens after a random prompt, `batch_size` rows."""
    prompt = torch.randint(0, language_model.config.vocab_size, (batch_size, prompt_length),
                           generator=torch.Generator().manual_seed(0)).to(language_model.device)
    config = GenerationConfig(do_sample=False, max_new_tokens=new_tokens, eos_token_id=[], pad_token_id=0,
                              repetition_penalty=1.0)
    start = time.perf_counter()
    with torch.no_grad():
        language_model.generate(prompt, attention_mask=torch.ones_like(prompt), generation_config=config)
    return time.perf_counter() - start


def bf16_speedup(language_model: nn.Module, batch_size: int, rounds: int = 3) -> float:
    """fp32 decode time over bf16's for `language_model` (fp32) at `batch_size`: the best of `rounds` alternating
    rounds after one warm-up each, on a bf16 copy, so the fp32 weights stay untouched."""
    bf16 = copy.deepcopy(language_model).to(torch.bfloat16)
    best = {torch.float32: float("inf"), torch.bfloat16: float("inf")}
    for round_index in range(rounds + 1):
        for dtype, candidate in ((torch.float32, language_model), (torch.bfloat16, bf16)):
            seconds = decode_seconds(candidate, batch_size)
            if round_index:
                best[dtype] = min(best[dtype], seconds)
    return best[torch.float32] / best[torch.bfloat16]


def auto_dtype(language_model: nn.Module, batch_size: int = 1) -> tuple[torch.dtype, float | None]:
    """What `precision: auto` picks for decoding `batch_size` rows, and the bf16 speedup it measured (None where it
    timed nothing): bf16 where the hardware runs it natively and, on a CPU, where it measures at least AUTO_MARGIN
    times faster than fp32 (`bf16_speedup`); fp32 otherwise."""
    device = language_model.device
    if not native_bf16(device):
        return torch.float32, None
    if device.type == "cuda":
        return torch.bfloat16, None
    speedup = bf16_speedup(language_model, batch_size)
    return (torch.bfloat16 if speedup >= AUTO_MARGIN else torch.float32), speedup


def decode_dtype(language_model: nn.Module, precision: str, batch_size: int = 1) -> torch.dtype:
    """The weights' dtype `precision` (auto, fp32 or bf16) stands for."""
    return auto_dtype(language_model, batch_size)[0] if precision == "auto" else DTYPES[precision]


def quantized(language_model: nn.Module, mode: str, path: Path) -> nn.Module:
    try:
        return quantize(language_model, mode)
    except ValueError as error:
        raise InputError(f"{path}: {error}") from None


def for_generation(language_model: nn.Module, path: Path, quantize_mode: str = "none", precision: str = "fp32",
                   batch_size: int = 1) -> nn.Module:
    """An fp32 model (from `path`, named in messages) with its weights quantized as `quantize_mode` says, or cast
    to the dtype `precision` picks for decoding `batch_size` rows."""
    if precision not in PRECISIONS:
        raise InputError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if quantize_mode != "none":
        # fbgemm's int8 GEMM and the int4 dequantization take fp32 activations.
        if precision == "bf16":
            raise InputError("--precision bf16 with --quantize: quantized weights compute in fp32")
        return quantized(language_model, quantize_mode, path)
    return language_model.to(decode_dtype(language_model, precision, batch_size))


def tokenizer_folder(path: Path) -> Path:
    """Where a model folder's tokenizer is: in the folder; for a checkpoint (`checkpoints/step_<N>/`, `best/`), the
    one its run trained with (`data.tokenizer` in the step's or the run's `config.yaml`); for a LoRA adapter saved
    alone (`final/adapter/`), in the run's `final/` around it, else in the base model folder the adapter names."""
    if (path / "tokenizer_config.json").is_file():
        return path
    run_configs = [path / "config.yaml"] + ([path.parent.parent / "config.yaml"]
                                           if path.parent.name == "checkpoints" else [])
    for run_config in filter(Path.is_file, run_configs):
        tokenizer = (read_yaml(run_config).get("data") or {}).get("tokenizer")
        if tokenizer:
            return Path(tokenizer)
    if (path / "adapter_config.json").is_file():
        if (path.parent / "tokenizer_config.json").is_file():
            return path.parent
        base = json.loads((path / "adapter_config.json").read_text(encoding="utf-8")).get("base_model_name_or_path")
        return Path(base) if base else path
    return path


def load_tokenizer(path: Path):
    try:
        return AutoTokenizer.from_pretrained(tokenizer_folder(path))
    except Exception as error:  # any failure to read the folder means the same to the user
        raise InputError(f"cannot load the tokenizer from {path}: {error_summary(error)}") from None


def load(folder: str, quantize_mode: str = "none", attn_implementation: str = "sdpa", precision: str = "fp32",
         batch_size: int = 1):
    """A model folder ready to generate (`for_generation`) with its attention function as `attn_implementation`
    says, and its tokenizer, which must have a chat template."""
    path = Path(folder)
    if not path.is_dir():
        raise InputError(f"model folder not found: {path}")
    check_attn_implementation(attn_implementation, "--attn-implementation")
    language_model = load_model_folder(path, AutoModelForCausalLM, attn_implementation)
    tokenizer = load_tokenizer(path)
    if not tokenizer.chat_template:
        raise InputError(f"{path}: the tokenizer has no chat template")
    return for_generation(language_model, path, quantize_mode, precision, batch_size), tokenizer


def load_draft(draft: str | None, folder: str, tokenizer):
    """The assistant model for speculative decoding, or None: `int8`/`int4` is a quantized copy of the model in
    `folder`, anything else a model folder whose tokenizer has the same vocabulary as `tokenizer` (in fp32: the
    draft only proposes tokens, which the model checks)."""
    if draft is None:
        return None
    if draft in QUANTIZE_CHOICES[1:]:
        return quantized(load_model_folder(Path(folder), AutoModelForCausalLM), draft, Path(folder))
    path = Path(draft)
    if not path.is_dir():
        raise InputError(f"--draft: model folder not found: {path}")
    assistant = load_model_folder(path, AutoModelForCausalLM)
    if load_tokenizer(path).get_vocab() != tokenizer.get_vocab():
        raise InputError(f"--draft {path}: its tokenizer differs from the model's; a draft must share it")
    return assistant


def add_inference_arguments(parser: argparse.ArgumentParser, draft: bool = True) -> None:
    """--precision, --quantize, --attn-implementation and (unless `draft` is False) --draft, as the scripts that
    generate with a model take them."""
    parser.add_argument("--precision", choices=PRECISIONS, default="auto",
                        help="the weights' dtype: auto is bf16 where the hardware runs it natively and a short "
                             "timing at start-up measures it decoding faster than fp32, fp32 otherwise")
    parser.add_argument("--quantize", choices=QUANTIZE_CHOICES, default="none",
                        help="int8: per-channel int8 weights on fbgemm (faster on a CPU); int4: grouped 4-bit weights "
                             "(smallest, slower); see utils/quantize.py")
    parser.add_argument("--attn-implementation", default="sdpa",
                        help="the attention function: sdpa, eager, or one registered with transformers' "
                             "AttentionInterface (the same choice as model.attn_implementation in training)")
    if draft:
        parser.add_argument("--draft", help="speculative decoding: a smaller model folder sharing the tokenizer (e.g. "
                                            "out/pretrain_draft/final), or int8 / int4 for a quantized copy of "
                                            "--model")
