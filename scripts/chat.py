"""Talk to a model in the terminal: `python scripts/chat.py --model out/sft/final [--prompt TEXT]`.

Multi-turn chat with the tokenizer's own chat template and streamed output; generation stops at the end-of-
sequence token. `--prompt` answers once and exits (no prompt shown), for scripts and tests. `--quantize int8|int4`
runs the model with quantized weights (`utils/quantize.py`); `--draft` adds speculative decoding through
transformers' assisted generation, with a smaller model folder sharing the tokenizer or `int8`/`int4` for a
quantized copy of the model itself (greedy replies stay exactly the model's own, except for an int8 model, whose
activations are quantized per call: verifying drafted tokens together can shift them).
"""

import argparse
import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, TextStreamer

import model  # noqa: F401  (registers the StellarByte model with the Auto classes)
from utils.checkpoint import load_model_folder
from utils.config import check_attn_implementation, read_yaml
from utils.errors import InputError, error_summary, exit_on_input_error
from utils.logger import quiet_transformers
from utils.quantize import QUANTIZE_CHOICES, quantize


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


def quantized(language_model, mode: str, path: Path):
    try:
        return quantize(language_model, mode)
    except ValueError as error:
        raise InputError(f"{path}: {error}") from None


def load(folder: str, quantize_mode: str = "none", attn_implementation: str = "sdpa"):
    """A model folder for inference, its weights quantized as `quantize_mode` says, its attention function as
    `attn_implementation` says, and its tokenizer."""
    path = Path(folder)
    if not path.is_dir():
        raise InputError(f"model folder not found: {path}")
    check_attn_implementation(attn_implementation, "--attn-implementation")
    language_model = quantized(load_model_folder(path, AutoModelForCausalLM, attn_implementation), quantize_mode,
                               path)
    tokenizer = load_tokenizer(path)
    if not tokenizer.chat_template:
        raise InputError(f"{path}: the tokenizer has no chat template")
    return language_model, tokenizer


def load_draft(draft: str | None, folder: str, tokenizer):
    """The assistant model for speculative decoding, or None: `int8`/`int4` is a quantized copy of the model in
    `folder`, anything else a model folder whose tokenizer has the same vocabulary as `tokenizer`."""
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


def generation_config(args: argparse.Namespace, tokenizer) -> GenerationConfig:
    sampling = args.temperature > 0
    return GenerationConfig(
        max_new_tokens=args.max_new_tokens, do_sample=sampling, temperature=args.temperature if sampling else None,
        top_k=args.top_k if sampling else None, top_p=args.top_p if sampling else None,
        repetition_penalty=args.repetition_penalty, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        cache_implementation="static" if args.compile else None)


@torch.no_grad()
def reply(language_model, tokenizer, messages: list[dict], config: GenerationConfig, draft=None) -> str:
    """Generate the assistant's next turn, streaming it to stdout, and return it."""
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    output = language_model.generate(**inputs, generation_config=config, streamer=streamer, assistant_model=draft)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def add_inference_arguments(parser: argparse.ArgumentParser, draft: bool = True) -> None:
    """--quantize, --attn-implementation and (unless `draft` is False) --draft, as the scripts that generate with a
    model take them."""
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


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a model folder with its tokenizer (e.g. out/sft/final)")
    parser.add_argument("--prompt", help="answer this one message and exit")
    parser.add_argument("--system", help="a system message to start the conversation with")
    parser.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=50)
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--repetition-penalty", type=float, default=1.1)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--seed", type=int, default=None, help="fix sampling for reproducible answers")
    parser.add_argument("--compile", action="store_true",
                        help="static KV cache and a compiled decode step: faster replies after a one-off compile "
                             "(10-30 s)")
    add_inference_arguments(parser)
    args = parser.parse_args()
    if args.temperature < 0 or args.max_new_tokens < 1 or not 0 < args.top_p <= 1 or args.top_k < 0 \
            or args.repetition_penalty <= 0:
        raise InputError("need --temperature >= 0, --max-new-tokens >= 1, 0 < --top-p <= 1, --top-k >= 0 and "
                         "--repetition-penalty > 0")
    return args


@exit_on_input_error
def main() -> None:
    args = parse_args()
    quiet_transformers()
    language_model, tokenizer = load(args.model, args.quantize, args.attn_implementation)
    draft = load_draft(args.draft, args.model, tokenizer)
    config = generation_config(args, tokenizer)
    if args.seed is not None:
        torch.manual_seed(args.seed)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    if args.prompt is not None:
        reply(language_model, tokenizer, messages + [{"role": "user", "content": args.prompt}], config, draft)
        return
    print("Chat with the model; an empty line or Ctrl-D ends, /reset starts over.", file=sys.stderr)
    while True:
        try:
            text = input("you> ").strip()
        except EOFError:
            break
        if not text:
            break
        if text == "/reset":
            messages = messages[:1] if args.system else []
            continue
        messages.append({"role": "user", "content": text})
        print("model> ", end="", flush=True)
        messages.append({"role": "assistant", "content": reply(language_model, tokenizer, messages, config, draft)})


if __name__ == "__main__":
    main()
