"""Talk to a model in the terminal: `python scripts/chat.py --model out/sft/final [--prompt TEXT]`.

Multi-turn chat with the tokenizer's own chat template and streamed output; generation stops at the end-of-sequence
token. `--prompt` answers once and exits (no prompt shown), for scripts and tests. `--precision auto` (the default)
decodes in bf16 where a short timing at start-up measures it faster than fp32 (`utils/inference.py`); `--quantize
int8|int4` runs the model with quantized weights (`utils/quantize.py`); `--draft` adds speculative decoding through
transformers' assisted generation, with a smaller model folder sharing the tokenizer or `int8`/`int4` for a
quantized copy of the model itself (greedy replies stay exactly the model's own, except for an int8 model, whose
activations are quantized per call: verifying drafted tokens together can shift them).
"""

import argparse
import sys

import torch
from transformers import GenerationConfig, TextStreamer

import model  # noqa: F401  (registers the StellarByte model with the Auto classes)
from utils.errors import InputError, exit_on_input_error
from utils.inference import add_inference_arguments, load, load_draft
from utils.logger import quiet_transformers


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
    language_model, tokenizer = load(args.model, args.quantize, args.attn_implementation, args.precision)
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
