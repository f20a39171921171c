"""Serve a model over an OpenAI-compatible HTTP API, with a chat page: `python scripts/serve.py --model out/sft/final`.

Routes: `GET /v1/models`, `POST /v1/chat/completions`, `POST /v1/completions` (streamed as server-sent events with
`"stream": true`), `GET /health` and the chat page at `/`. By default requests join and leave one running batch
(continuous batching, `utils.serving.ContinuousEngine`); `--engine static` batches the requests that arrive together
into one `generate` call instead.
"""

import argparse
import socket
import sys
from pathlib import Path

import torch
import uvicorn

from utils.errors import InputError, exit_on_input_error
from utils.inference import PRECISION_NAMES, add_inference_arguments, load
from utils.logger import quiet_transformers
from utils.server import create_app
from utils.serving import ContinuousEngine, StaticEngine

CHAT_PAGE = Path(__file__).resolve().parent / "static" / "chat.html"
ENGINES = {"continuous": ContinuousEngine, "static": StaticEngine}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True,
                        help="a model folder with its tokenizer, as scripts/chat.py takes (e.g. out/sft/final)")
    parser.add_argument("--host", default="127.0.0.1", help="0.0.0.0 serves other machines too")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    parser.add_argument("--api-key", help="require 'Authorization: Bearer <key>' on every /v1/ route")
    parser.add_argument("--model-name", help="the model id clients see (default: the --model path)")
    parser.add_argument("--engine", choices=sorted(ENGINES), default="continuous",
                        help="continuous: requests join and leave a running batch; static: requests that arrive "
                             "together share one generate call, later ones wait for it to end")
    parser.add_argument("--max-batch-size", type=int, default=16, help="requests generated together at most")
    parser.add_argument("--batch-window-ms", type=float, default=10.0,
                        help="how long a new request waits for others to share its static batch (the static "
                             "engine, and penalised or seeded requests under the continuous one)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for generation (default: PyTorch's, one per core); a small model on a "
                             "busy machine is faster with fewer")
    add_inference_arguments(parser, draft=False)
    args = parser.parse_args()
    if not 0 <= args.port <= 65535 or args.max_batch_size < 1 or args.batch_window_ms < 0 \
            or (args.threads is not None and args.threads < 1):
        raise InputError("need 0 <= --port <= 65535, --max-batch-size >= 1, --batch-window-ms >= 0 and "
                         "--threads >= 1")
    if args.api_key is not None and not args.api_key.strip():
        raise InputError("--api-key must not be empty")
    return args


def serving_engine(name: str, language_model, tokenizer, max_batch_size: int, batch_window: float):
    try:
        return ENGINES[name](language_model, tokenizer, max_batch_size, batch_window)
    except ValueError as error:  # a model continuous batching cannot serve (dynamic NTK RoPE) says why
        print(f"note: {error}; serving with the static engine", file=sys.stderr, flush=True)
        return StaticEngine(language_model, tokenizer, max_batch_size, batch_window)


@exit_on_input_error
def main() -> None:
    args = parse_args()
    quiet_transformers()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        listener = socket.create_server((args.host, args.port))
    except OSError as error:
        raise InputError(f"cannot listen on {args.host}:{args.port}: {error.strerror or error}") from None
    with listener:
        language_model, tokenizer = load(args.model, args.quantize, args.attn_implementation, args.precision,
                                         args.max_batch_size)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        engine = serving_engine(args.engine, language_model, tokenizer, args.max_batch_size,
                                args.batch_window_ms / 1000)
        model_id = args.model_name or args.model
        app = create_app(engine, model_id, CHAT_PAGE, args.api_key)
        host, port = listener.getsockname()[:2]
        precision = PRECISION_NAMES.get(language_model.dtype, language_model.dtype)
        print(f"serving {model_id} ({precision}) at http://{host}:{port}/ (OpenAI API at /v1"
              f"{', API key required' if args.api_key else ''})", file=sys.stderr, flush=True)
        uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2)).run(sockets=[listener])


if __name__ == "__main__":
    main()
