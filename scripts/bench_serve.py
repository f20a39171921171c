"""Serving throughput and time to first token, continuous batching against static batching, at 1, 4 and 16 clients.

Starts scripts/serve.py on free local ports, once per engine (`--engine continuous` and `--engine static`), or measures
a running server given by --url. Warms each up, then at each concurrency level sends the same --requests requests
(greedy, streamed, each with its own token limit averaging --max-tokens, or all --max-tokens with --lengths equal) from
that many clients, each sending its next request as soon as its last one ends, to each engine in turn (so that both see
the machine in the same state). One client is the sequential rate: every request generated alone. By default the
pretrained demo model continues the first words of the demo validation documents (`/v1/completions`), so that replies
run to their length and tokens/s measures generation; `--endpoint chat --model out/sft/final` sends the first user turns
of the demo validation conversations instead (the demo chat model's replies are a few tokens long). Prints a table and
writes it to --output (.json, and .md beside it). Run it alone on the machine.
"""

import argparse
import concurrent.futures
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import openai

from utils.errors import InputError, exit_on_input_error

ROOT = Path(__file__).resolve().parents[1]
DEMO_DATA = {"chat": "datasets/demo/sft_val.jsonl", "completions": "datasets/demo/pretrain_val.jsonl"}
PROMPT_CHARACTERS = 80


def prompts_from(path: Path, endpoint: str, count: int) -> list[str]:
    """Chat: the first user turn of each conversation; text completion: the first words of each document."""
    if not path.is_file():
        raise InputError(f"data file not found: {path}")
    prompts = []
    for line in path.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        if endpoint == "chat":
            turns = record.get("conversations") or record.get("messages") or []
            prompts += [turn["content"] for turn in turns[:1] if turn.get("role") == "user"]
        elif record.get("text"):
            prompts.append(record["text"][:PROMPT_CHARACTERS])
        if len(prompts) == count:
            return prompts
    raise InputError(f"{path} has fewer than {count} usable records for the {endpoint} endpoint")


def health(url: str) -> dict:
    with urllib.request.urlopen(f"{url}/health", timeout=10) as response:
        return json.load(response)


def start_server(args: argparse.Namespace, engine: str) -> tuple[subprocess.Popen, str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, str(ROOT / "scripts" / "serve.py"), "--model", args.model, "--port", str(port),
               "--engine", engine]
    if args.threads is not None:
        command += ["--threads", str(args.threads)]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONPATH": str(ROOT)})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        if process.poll() is not None:
            lines = process.stderr.read().strip().splitlines() or ["exited"]
            raise InputError(f"the server did not start: {lines[-1]}")
        try:
            health(url)
            return process, url
        except OSError:
            if time.monotonic() > deadline:
                process.kill()
                raise InputError("the server did not answer within 300 s") from None
            time.sleep(0.2)


def one_request(client: openai.OpenAI, endpoint: str, prompt: str, max_tokens: int) -> dict[str, float]:
    """Time to the first text, the whole request's time and the tokens it generated."""
    start, first_text, tokens = time.perf_counter(), None, 0
    settings = dict(model="bench", temperature=0, max_tokens=max_tokens, stream=True,
                    stream_options={"include_usage": True})
    if endpoint == "chat":
        stream = client.chat.completions.create(messages=[{"role": "user", "content": prompt}], **settings)
    else:
        stream = client.completions.create(prompt=prompt, **settings)
    for chunk in stream:
        text = (chunk.choices[0].delta.content if endpoint == "chat" else chunk.choices[0].text) \
            if chunk.choices else None
        if first_text is None and text:
            first_text = time.perf_counter() - start
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    latency = time.perf_counter() - start
    return {"ttft": latency if first_text is None else first_text, "latency": latency, "tokens": tokens}


def varied_range(max_tokens: int) -> tuple[int, int]:
    """Varied limits run from an eighth of `max_tokens` to twice it less an eighth, which averages `max_tokens`."""
    eighth = max(1, max_tokens // 8)
    return eighth, 2 * max_tokens - eighth


def token_limits(count: int, max_tokens: int, lengths: str) -> list[int]:
    """Each request's max_tokens: all `max_tokens`, or varied as replies are, drawn evenly (seeded) over
    `varied_range`."""
    if lengths == "equal":
        return [max_tokens] * count
    draw = random.Random(0)
    return [draw.randint(*varied_range(max_tokens)) for _ in range(count)]


def run_level(client: openai.OpenAI, endpoint: str, prompts: list[str], clients: int, limits: list[int]) -> dict:
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        futures = [pool.submit(one_request, client, endpoint, prompt, limit) for prompt, limit in zip(prompts, limits)]
        results, failures = [], 0
        for future in futures:
            try:
                results.append(future.result())
            except openai.OpenAIError:
                failures += 1
    seconds = time.perf_counter() - start
    ttft = sorted(result["ttft"] for result in results) or [float("nan")]
    tokens = sum(result["tokens"] for result in results)
    return {"clients": clients, "requests": len(prompts), "completed": len(results), "failed": failures,
            "seconds": seconds, "completion_tokens": tokens, "tokens_per_s": tokens / seconds,
            "requests_per_s": len(results) / seconds,
            "ttft_median_s": statistics.median(ttft), "ttft_p90_s": ttft[int(0.9 * (len(ttft) - 1))],
            "latency_median_s": statistics.median(result["latency"] for result in results) if results else None}


def table(rows: list[dict], model_name: str, endpoint: str, max_tokens: int, lengths: str) -> str:
    """One row per engine and level: tokens/s against the engine's own one-client rate and against the static
    engine's at the same level; then each engine's median wait for the first token at 4 clients against 1."""
    by_key = {(row["engine"], row["clients"]): row for row in rows}
    kind = "chat" if endpoint == "chat" else "text completion"
    low, high = varied_range(max_tokens)
    limit = f"up to {max_tokens}" if lengths == "equal" else f"a limit between {low} and {high} (mean {max_tokens})"
    lines = [f"Serving `{model_name}`: greedy {kind} requests, {limit} new tokens each, streamed.", "",
             "| engine | clients | requests (failed) | tokens/s | vs 1 client | vs static | requests/s "
             "| time to first token, median / p90 | request time, median |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        alone, static = by_key.get((row["engine"], 1)), by_key.get(("static", row["clients"]))
        lines.append(f"| {row['engine']} | {row['clients']} | {row['requests']} ({row['failed']}) | "
                     f"{row['tokens_per_s']:,.0f} | {ratio(row, alone, 'tokens_per_s')} | "
                     f"{ratio(row, static, 'tokens_per_s')} | {row['requests_per_s']:.2f} | "
                     f"{row['ttft_median_s'] * 1000:,.0f} / {row['ttft_p90_s'] * 1000:,.0f} ms | "
                     f"{row['latency_median_s']:.2f} s |")
    lines.append("")
    for engine in dict.fromkeys(row["engine"] for row in rows):
        if (engine, 1) in by_key and (engine, 4) in by_key:
            lines.append(f"- {engine}: median time to first token at 4 clients is "
                         f"{ratio(by_key[(engine, 4)], by_key[(engine, 1)], 'ttft_median_s')} the one-client "
                         f"figure.")
    return "\n".join(lines) + "\n"


def ratio(row: dict, reference: dict | None, key: str) -> str:
    return f"{row[key] / reference[key]:.2f}x" if reference and reference[key] else "-"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="out/pretrain/final", help="the folder to serve (ignored with --url)")
    parser.add_argument("--url", help="measure this running server instead (e.g. http://127.0.0.1:8000)")
    parser.add_argument("--engines", nargs="+", choices=["continuous", "static"], default=["static", "continuous"],
                        help="the engines to start a server with (ignored with --url)")
    parser.add_argument("--api-key", default="none", help="the server's --api-key, with --url")
    parser.add_argument("--requests", type=int, default=32, help="requests per concurrency level")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16], help="concurrency levels")
    parser.add_argument("--max-tokens", type=int, default=64, help="new tokens per request at most (the mean limit "
                                                                    "with --lengths varied)")
    parser.add_argument("--lengths", choices=["varied", "equal"], default="varied",
                        help="varied: each request its own limit, as replies end at different lengths; equal: all "
                             "--max-tokens (which keeps a static batch's rows in step)")
    parser.add_argument("--threads", type=int, help="the started server's --threads")
    parser.add_argument("--endpoint", choices=["chat", "completions"], default="completions",
                        help="/v1/chat/completions, or /v1/completions (a base model continuing text)")
    parser.add_argument("--data", help="records to take prompts from (default: the demo validation "
                                       "conversations, or the demo validation text for completions)")
    parser.add_argument("--output", default="model_info/bench_serve.json")
    args = parser.parse_args()
    if args.requests < 1 or args.max_tokens < 1 or min(args.clients) < 1:
        raise InputError("need --requests >= 1, --max-tokens >= 1 and every --clients >= 1")
    return args


@exit_on_input_error
def main() -> None:
    args = parse_args()
    prompts = prompts_from(Path(args.data) if args.data else ROOT / DEMO_DATA[args.endpoint], args.endpoint,
                           args.requests)
    limits = token_limits(args.requests, args.max_tokens, args.lengths)
    servers = {}  # engine -> (process or None, url)
    try:
        if args.url is None:
            for engine in dict.fromkeys(args.engines):
                servers[engine] = start_server(args, engine)
        else:
            url = args.url.rstrip("/")
            servers[health(url).get("engine", "server")] = (None, url)
        model_name = health(next(iter(servers.values()))[1])["model"]
        clients = {engine: openai.OpenAI(base_url=f"{url}/v1", api_key=args.api_key, max_retries=0, timeout=600)
                   for engine, (_, url) in servers.items()}
        for client in clients.values():
            one_request(client, args.endpoint, prompts[0], args.max_tokens)
        rows = []
        for level in args.clients:
            for engine, client in clients.items():
                rows.append({"engine": engine, **run_level(client, args.endpoint, prompts, level, limits)})
                print(f"{engine}, {level} clients: {rows[-1]['tokens_per_s']:,.0f} tokens/s", file=sys.stderr,
                      flush=True)
    except (OSError, openai.APIConnectionError) as error:
        raise InputError(f"cannot reach the server: {error}") from None
    finally:
        for process, _ in servers.values():
            if process is not None:
                process.terminate()
                process.wait()
    report = table(rows, model_name, args.endpoint, args.max_tokens, args.lengths)
    print(report)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps({"model": model_name, "endpoint": args.endpoint, "max_tokens": args.max_tokens,
                                  "lengths": args.lengths, "token_limits": limits,
                                       "levels": rows}, indent=2))
    output.with_suffix(".md").write_text(report)


if __name__ == "__main__":
    main()
