"""Talk to a model in the terminal: `python scripts/chat.py --model out/sft/final [--prompt TEXT]`.

Multi-turn chat with the tokenizer's own chat template and streamed output; generation stops at the end-of-
sequence token. `--prompt` answers once and exits (no prompt shown), for scripts and tests.
"""

import argparse
import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, TextStreamer

import model  # noqa: F401  (registers the StellarByte model with the Auto classes)
from utils.checkpoint import load_model_folder
from utils.config import read_yaml
from utils.errors import InputError, error_summary, exit_on_input_error
from utils.logger import quiet_transformers


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


def load(folder: str):
    path = Path(folder)
    if not path.is_dir():
        raise InputError(f"model folder not found: {path}")
    language_model = load_model_folder(path, AutoModelForCausalLM)
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder(path))
    except Exception as error:  # any failure to read the folder means the same to the user
        raise InputError(f"cannot load the tokenizer from {path}: {error_summary(error)}") from None
    if not tokenizer.chat_template:
        raise InputError(f"{path}: the tokenizer has no chat template")
    return language_model, tokenizer


def generation_config(args: argparse.Namespace, tokenizer) -> GenerationConfig:
    sampling = args.temperature > 0
    return GenerationConfig(
        max_new_tokens=args.max_new_tokens, do_sample=sampling, temperature=args.temperature if sampling else None,
        top_k=args.top_k if sampling else None, top_p=args.top_p if sampling else None,
        repetition_penalty=args.repetition_penalty, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        cache_implementation="static" if args.compile else None)


@torch.no_grad()
def reply(language_model, tokenizer, messages: list[dict], config: GenerationConfig) -> str:
    """Generate the assistant's next turn, streaming it to stdout, and return it."""
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    output = language_model.generate(**inputs, generation_config=config, streamer=streamer)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


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
    language_model, tokenizer = load(args.model)
    config = generation_config(args, tokenizer)
    if args.seed is not None:
        torch.manual_seed(args.seed)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    if args.prompt is not None:
        reply(language_model, tokenizer, messages + [{"role": "user", "content": args.prompt}], config)
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
        messages.append({"role": "assistant", "content": reply(language_model, tokenizer, messages, config)})


if __name__ == "__main__":
    main()
