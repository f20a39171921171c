"""Serve a model over an OpenAI-compatible HTTP API, with a chat page: `python scripts/serve.py --model out/sft/final`.

Routes: `GET /v1/models`, `POST /v1/chat/completions`, `POST /v1/completions` (streamed as server-sent events with
`"stream": true`), `GET /health` and the chat page at `/`. Requests that arrive together are batched into one
`generate` call (left padding; each request keeps its own stop strings, token limit and penalties); requests whose
sampling settings differ run in separate batches.
"""

import argparse
import asyncio
import dataclasses
import json
import secrets
import socket
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, nullcontext
from pathlib import Path
from typing import Any, Literal

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException
from transformers import (GenerationConfig, LogitsProcessor, LogitsProcessorList, StoppingCriteria,
                          StoppingCriteriaList, StopStringCriteria, TextStreamer)

from chat import add_inference_arguments, load
from utils.errors import InputError, exit_on_input_error
from utils.logger import quiet_transformers

CHAT_PAGE = Path(__file__).resolve().parent / "static" / "chat.html"
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
MAX_STOP_STRINGS = 4
DISCONNECT_POLL_SECONDS = 0.25


# ----------------------------------------------------------------------------------------------------------------
# Requests: the OpenAI fields this server honours. Types are checked strictly (422); values are checked in
# `checked_sampling` and the routes (400). Any other field is refused rather than silently ignored.

class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class TextPart(StrictModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    # Messages echoed back from a response carry extra keys (refusal, annotations, ...): they are ignored.
    model_config = ConfigDict(extra="ignore", strict=True)
    role: str
    content: str | list[TextPart] | None = None


class StreamOptions(StrictModel):
    include_usage: bool = False


class SamplingRequest(StrictModel):
    model: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    user: str | None = None

    @property
    def include_usage(self) -> bool:
        """A stream ends with a usage chunk only when asked (`stream_options.include_usage`)."""
        return self.stream_options is not None and self.stream_options.include_usage


class ChatRequest(SamplingRequest):
    messages: list[Message]
    max_completion_tokens: int | None = None


class CompletionRequest(SamplingRequest):
    prompt: str | list[str]


FIELD_NAMES = {name for schema in (ChatRequest, CompletionRequest, Message, TextPart, StreamOptions)
               for name in schema.model_fields}


def parameter_name(location: tuple) -> str | None:
    """`messages[0].content` from pydantic's error location, which also names the branch of a union (`str`, ...)."""
    name = ""
    for part in location[1:] if location[:1] == ("body",) else location:
        if isinstance(part, int):
            name += f"[{part}]"
        elif part in FIELD_NAMES:
            name += f".{part}"
        else:  # not a field of ours: a union's branch, or an unknown field
            break
    return name.lstrip(".") or None


class RequestError(Exception):
    """A request the server refuses, answered with OpenAI's error body."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None, status: int = 400,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.code, self.status, self.kind = message, param, code, status, kind


def error_body(error: RequestError) -> dict:
    return {"error": {"message": error.message, "type": error.kind, "param": error.param, "code": error.code}}


def error_response(error: RequestError) -> JSONResponse:
    return JSONResponse(error_body(error), status_code=error.status)


def generation_failure(message: str) -> RequestError:
    """A batch that failed while generating: the server's fault, not the request's."""
    return RequestError(message, None, None, 500, "server_error")


# ----------------------------------------------------------------------------------------------------------------
# Generation: one worker thread turns queued jobs into batched `generate` calls.

@dataclasses.dataclass(frozen=True)
class Sampling:
    """The settings one `generate` call applies to all its rows; only jobs with equal settings share a batch."""
    do_sample: bool
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None


@dataclasses.dataclass(eq=False)
class Job:
    """One text to generate: its prompt's token ids and its request's limits. What it produces goes to `sink` as
    events `(index, "text", piece)`, then `(index, "end", finish_reason, completion_tokens)` or
    `(index, "error", message)`."""
    prompt_ids: list[int]
    max_tokens: int
    sampling: Sampling
    sink: Callable[[tuple], None]
    index: int = 0
    stop: tuple[str, ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    cancelled: bool = False
    arrived: float = dataclasses.field(default_factory=time.monotonic)
    text: str = ""
    sent: int = 0
    stopped_by_text: bool = False
    completion_tokens: int = 0
    finish_reason: str | None = None
    streamer: "ReplyStreamer | None" = None

    @property
    def batch_key(self) -> tuple:
        # A seeded sampling job runs alone, so that its seed alone decides its answer.
        return (self.sampling, id(self)) if self.sampling.do_sample and self.sampling.seed is not None \
            else (self.sampling,)

    def add_text(self, piece: str, final: bool) -> None:
        """Release text to the client, never a stop string or the start of one that may still complete."""
        if self.stopped_by_text:
            return
        self.text += piece
        cuts = [position for position in (self.text.find(stop) for stop in self.stop) if position >= 0]
        if cuts:
            self.text, self.stopped_by_text, final = self.text[:min(cuts)], True, True
        ready = len(self.text) if final else len(self.text) - partial_stop_length(self.text, self.stop)
        if ready > self.sent:
            self.sink((self.index, "text", self.text[self.sent:ready]))
            self.sent = ready

    def finish(self, reason: str) -> None:
        if self.streamer is not None:
            self.streamer.end()
        # The held-back text, released now, may complete a stop string.
        self.finish_reason = "stop" if self.stopped_by_text else reason
        self.sink((self.index, "end", self.finish_reason, self.completion_tokens))


def partial_stop_length(text: str, stops: tuple[str, ...]) -> int:
    """The length of the longest end of `text` that begins a stop string (held back until it is decided)."""
    return max((length for stop in stops for length in range(min(len(stop) - 1, len(text)), 0, -1)
                if text.endswith(stop[:length])), default=0)


class ReplyStreamer(TextStreamer):
    """transformers' TextStreamer for one row of a batch: it releases text in whole characters (a CJK character or an
    emoji split over several byte tokens is never sent half), to its job instead of stdout."""

    def __init__(self, tokenizer, job: Job):
        super().__init__(tokenizer, skip_prompt=False, skip_special_tokens=True)
        self.job = job

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        self.job.add_text(text, stream_end)


class RequestStops(StoppingCriteria):
    """Ends each row of a batch on its own terms, checked on every new token: end of sequence, the job's stop strings
    (transformers' StopStringCriteria on the tokens, and the decoded text), its token limit, or its client gone.
    It also hands each row's new tokens to that row's streamer until the row ends."""

    def __init__(self, jobs: list[Job], tokenizer, eos_token_ids: set[int]):
        self.jobs, self.eos_token_ids = jobs, eos_token_ids
        self.stop_strings = [StopStringCriteria(tokenizer, list(job.stop)) if job.stop else None for job in jobs]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        for row, (job, token) in enumerate(zip(self.jobs, input_ids[:, -1].tolist())):
            if job.finish_reason is not None:
                continue
            job.completion_tokens += 1
            if token in self.eos_token_ids:
                job.finish("stop")
                continue
            job.streamer.put(torch.tensor([token]))
            stop_strings = self.stop_strings[row]
            if job.stopped_by_text or (stop_strings is not None and bool(stop_strings(input_ids[row:row + 1], scores))):
                job.finish("stop")
            elif job.completion_tokens >= job.max_tokens:
                job.finish("length")
            elif job.cancelled:
                job.finish("cancelled")
        return torch.tensor([job.finish_reason is not None for job in self.jobs], device=input_ids.device)


class PresenceFrequencyPenalty(LogitsProcessor):
    """OpenAI's penalties, per row: subtract `frequency x count + presence x (count > 0)` from the logit of every token
    the reply has used so far (the prompt does not count). transformers' repetition penalty scales logits instead,
    which is a different curve, so it cannot stand in for these."""

    def __init__(self, presence: list[float], frequency: list[float], prompt_width: int):
        self.presence, self.frequency = torch.tensor(presence)[:, None], torch.tensor(frequency)[:, None]
        self.prompt_width = prompt_width

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        reply = input_ids[:, self.prompt_width:]
        counts = torch.zeros_like(scores).scatter_add_(1, reply, torch.ones_like(reply, dtype=scores.dtype))
        return scores - self.frequency.to(scores.device) * counts - self.presence.to(scores.device) * (counts > 0)


class Engine:
    """Runs queued jobs in batches on one thread: the oldest job and every queued job with the same sampling settings
    (up to `max_batch_size`) go into one `generate` call. A new job waits `batch_window` seconds before its batch
    starts, so that requests sent together are generated together."""

    def __init__(self, language_model, tokenizer, max_batch_size: int = 16, batch_window: float = 0.01):
        self.model, self.tokenizer = language_model, tokenizer
        self.max_batch_size, self.batch_window = max_batch_size, batch_window
        self.context_length = language_model.config.max_position_embeddings
        eos = language_model.generation_config.eos_token_id
        self.eos_token_ids = {tokenizer.eos_token_id, *(eos if isinstance(eos, list) else [eos] if eos is not None
                                                          else [])}
        self.queue: list[Job] = []
        self.batch: list[Job] = []
        self.condition = threading.Condition()
        self.closing = False
        self.batches = 0
        self.jobs_done = 0
        self.generated_tokens = 0
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        self.thread = threading.Thread(target=self.serve_forever, name="generation", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        with self.condition:
            self.closing = True
            for job in self.queue + self.batch:
                job.cancelled = True
            self.condition.notify()
        if self.thread is not None:
            self.thread.join()

    def submit(self, jobs: list[Job]) -> None:
        with self.condition:
            self.queue.extend(jobs)
            self.condition.notify()

    def stats(self) -> dict[str, int]:
        with self.condition:
            return {"queued": len(self.queue), "running": len(self.batch), "batches": self.batches,
                    "completed": self.jobs_done, "generated_tokens": self.generated_tokens}

    def next_batch(self) -> list[Job] | None:
        with self.condition:
            while not self.closing and not self.queue:
                self.condition.wait()
            if self.closing:
                return None
            wait = self.queue[0].arrived + self.batch_window - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        with self.condition:
            for job in self.queue:
                if job.cancelled:
                    job.finish("cancelled")
            self.queue = [job for job in self.queue if not job.cancelled]
            if not self.queue:
                return []
            key = self.queue[0].batch_key
            batch = [job for job in self.queue if job.batch_key == key][:self.max_batch_size]
            self.queue = [job for job in self.queue if job not in batch]
            self.batch = batch
            self.batches += 1
            return batch

    def serve_forever(self) -> None:
        while (batch := self.next_batch()) is not None:
            if batch:
                self.run(batch)

    def run(self, jobs: list[Job]) -> None:
        """Generate every job of one batch; each ends with an event, whatever happens."""
        try:
            self.generate(jobs)
        except Exception as error:  # the server must keep serving: the failure goes to these requests only
            for job in jobs:
                if job.finish_reason is None:
                    job.finish_reason = "error"
                    job.sink((job.index, "error", f"generation failed: {error}"))
        finally:
            with self.condition:
                self.batch = []
                self.jobs_done += len(jobs)
                self.generated_tokens += sum(job.completion_tokens for job in jobs)

    @torch.no_grad()
    def generate(self, jobs: list[Job]) -> None:
        for job in jobs:
            job.streamer = ReplyStreamer(self.tokenizer, job)
        inputs = self.tokenizer.pad({"input_ids": [job.prompt_ids for job in jobs]}, padding=True,
                                    padding_side="left", return_tensors="pt")
        sampling = jobs[0].sampling
        config = GenerationConfig(
            max_new_tokens=max(job.max_tokens for job in jobs), do_sample=sampling.do_sample,
            temperature=sampling.temperature, top_p=sampling.top_p,
            # Set, so that neither the model folder's generation_config.json nor transformers' defaults (top-k 50)
            # change what an OpenAI client asked for.
            top_k=0, typical_p=1.0, repetition_penalty=1.0, no_repeat_ngram_size=0, num_beams=1, min_new_tokens=0,
            eos_token_id=sorted(self.eos_token_ids), pad_token_id=self.tokenizer.pad_token_id)
        processors = LogitsProcessorList()
        if any(job.presence_penalty or job.frequency_penalty for job in jobs):
            processors.append(PresenceFrequencyPenalty([job.presence_penalty for job in jobs],
                                                       [job.frequency_penalty for job in jobs],
                                                       inputs["input_ids"].shape[1]))
        seeded = sampling.do_sample and sampling.seed is not None
        with torch.random.fork_rng(devices=[]) if seeded else nullcontext():
            if seeded:
                torch.manual_seed(sampling.seed)
            self.model.generate(**{key: value.to(self.model.device) for key, value in inputs.items()},
                                generation_config=config, logits_processor=processors,
                                stopping_criteria=StoppingCriteriaList([RequestStops(jobs, self.tokenizer,
                                                                                     self.eos_token_ids)]))
        for job in jobs:
            if job.finish_reason is None:
                job.finish("length")


# ----------------------------------------------------------------------------------------------------------------
# The HTTP side.

def checked_sampling(request: SamplingRequest) -> tuple[Sampling, tuple[str, ...], int | None]:
    """The request's sampling settings, stop strings and token limit, or a RequestError naming the bad field."""
    if request.n != 1:
        raise RequestError("only n=1 is supported", "n")
    temperature = 1.0 if request.temperature is None else request.temperature
    if not 0 <= temperature <= 2:
        raise RequestError(f"temperature must be between 0 and 2, got {temperature}", "temperature")
    top_p = 1.0 if request.top_p is None else request.top_p
    if not 0 < top_p <= 1:
        raise RequestError(f"top_p must be in (0, 1], got {top_p}", "top_p")
    for name in ("presence_penalty", "frequency_penalty"):
        if not -2 <= getattr(request, name) <= 2:
            raise RequestError(f"{name} must be between -2 and 2, got {getattr(request, name)}", name)
    stop = (request.stop,) if isinstance(request.stop, str) else tuple(request.stop or ())
    if len(stop) > MAX_STOP_STRINGS or not all(stop):
        raise RequestError(f"stop takes up to {MAX_STOP_STRINGS} non-empty strings", "stop")
    max_completion_tokens = getattr(request, "max_completion_tokens", None)
    max_tokens, param = (request.max_tokens, "max_tokens") if max_completion_tokens is None \
        else (max_completion_tokens, "max_completion_tokens")
    if max_tokens is not None and max_tokens < 1:
        raise RequestError(f"{param} must be at least 1, got {max_tokens}", param)
    sampling = Sampling(do_sample=True, temperature=temperature, top_p=top_p, seed=request.seed) if temperature > 0 \
        else Sampling(do_sample=False)
    return sampling, stop, max_tokens


def token_limit(prompt_tokens: int, max_tokens: int | None, context_length: int, param: str) -> int:
    if prompt_tokens >= context_length:
        raise RequestError(f"the prompt has {prompt_tokens} tokens; this model's context is {context_length} tokens",
                           param, "context_length_exceeded")
    room = context_length - prompt_tokens
    if max_tokens is None:
        return room
    if max_tokens > room:
        raise RequestError(f"max_tokens {max_tokens} plus the prompt's {prompt_tokens} tokens exceed this model's "
                           f"context of {context_length} tokens", "max_tokens", "context_length_exceeded")
    return max_tokens


def chat_prompt(tokenizer, messages: list[Message]) -> list[int]:
    if not messages:
        raise RequestError("messages must not be empty", "messages")
    turns = []
    for index, message in enumerate(messages):
        if message.role not in ROLES:
            raise RequestError(f"unknown role '{message.role}': use system, developer, user or assistant",
                               f"messages[{index}].role")
        content = message.content if isinstance(message.content, str) else \
            "".join(part.text for part in message.content or [])
        turns.append({"role": ROLES[message.role], "content": content})
    try:
        return tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=True, return_dict=True)[
            "input_ids"]
    except Exception as error:  # a chat template rejects a conversation by raising (e.g. roles out of order)
        raise RequestError(f"the chat template rejected the messages: {error}", "messages") from None


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def sse(data: Any) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


class Conversation:
    """The jobs of one HTTP request and the queue their events arrive on, from the generation thread."""

    def __init__(self, engine: Engine, prompts: list[list[int]], max_tokens: int | None, sampling: Sampling,
                 stop: tuple[str, ...], request: SamplingRequest, param: str):
        loop = asyncio.get_running_loop()
        self.events: asyncio.Queue = asyncio.Queue()
        self.prompt_tokens = sum(len(prompt) for prompt in prompts)

        def sink(event: tuple) -> None:
            try:
                loop.call_soon_threadsafe(self.events.put_nowait, event)
            except RuntimeError:  # the event loop has closed: the server is shutting down
                pass

        self.jobs = [Job(prompt, token_limit(len(prompt), max_tokens, engine.context_length, param), sampling, sink,
                         index, stop, request.presence_penalty, request.frequency_penalty)
                     for index, prompt in enumerate(prompts)]
        self.engine = engine

    def cancel(self) -> None:
        for job in self.jobs:
            job.cancelled = True

    async def __aiter__(self) -> AsyncIterator[tuple]:
        """Every job's events until each has ended. A stream's client that leaves cancels this iteration (Starlette
        watches the connection while it streams): the jobs are cancelled with it."""
        self.engine.submit(self.jobs)
        open_jobs = len(self.jobs)
        try:
            while open_jobs:
                event = await self.events.get()
                if event[1] in ("end", "error"):
                    open_jobs -= 1
                yield event
        finally:
            self.cancel()


class RequireKey:
    """Refuses every `/v1/` request without `Authorization: Bearer <key>` (401), before its body is even read; `/health`
    and the page stay open. Plain ASGI: a BaseHTTPMiddleware would sit between a stream and its client."""

    def __init__(self, app, api_key: str):
        self.app, self.expected = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not secrets.compare_digest(given, self.expected):
                response = error_response(RequestError("invalid or missing API key: send 'Authorization: Bearer "
                                                       "<key>'", None, "invalid_api_key", 401, "authentication_error"))
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(engine: Engine, model_id: str, api_key: str | None = None) -> FastAPI:
    """The FastAPI app serving `engine` (which starts and stops with the app); `api_key` guards every `/v1/` route."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="StellarByte", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    if api_key is not None:
        app.add_middleware(RequireKey, api_key=api_key)
    created = int(time.time())

    @app.exception_handler(RequestError)
    async def refused(request: Request, error: RequestError) -> JSONResponse:
        return error_response(error)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        errors = error.errors()
        if errors[0].get("type") == "json_invalid":
            return error_response(RequestError(f"malformed JSON: {errors[0].get('msg')}", None, "invalid_json"))
        location = errors[0].get("loc", ())
        param = parameter_name(location)
        if errors[0].get("type") == "extra_forbidden":
            param = f"{param}.{location[-1]}" if param else str(location[-1])
            message = f"unsupported parameter: {param}"
        elif errors[0].get("type") == "missing":
            message = f"missing required parameter: {param}"
        else:
            # A field that takes several types fails once per type: name them all.
            reasons = dict.fromkeys(str(item.get("msg")) for item in errors
                                    if parameter_name(item.get("loc", ())) == param)
            message = f"{param}: {', or '.join(reasons)}" if param else ", or ".join(reasons)
        return error_response(RequestError(message, param, errors[0].get("type"), status=422))

    @app.exception_handler(Exception)
    async def failed(request: Request, error: Exception) -> JSONResponse:
        return error_response(RequestError(f"internal error: {error}", None, None, 500, "server_error"))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        return error_response(RequestError(str(error.detail), None, None, error.status_code, kind))

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(CHAT_PAGE, media_type="text/html; charset=utf-8")

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": model_id, "api_key_required": api_key is not None,
                "context_length": engine.context_length, **engine.stats()}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": created,
                                            "owned_by": "stellarbyte"}]}

    def new_id(prefix: str) -> str:
        return f"{prefix}-{uuid.uuid4().hex}"

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, http_request: Request):
        sampling, stop, max_tokens = checked_sampling(body)
        prompt = chat_prompt(engine.tokenizer, body.messages)
        conversation = Conversation(engine, [prompt], max_tokens, sampling, stop, body, "messages")
        completion_id, now = new_id("chatcmpl"), int(time.time())
        head = {"id": completion_id, "created": now, "model": model_id, "system_fingerprint": None}
        if body.stream:
            def chunk(delta: dict, finish_reason: str | None) -> str:
                return sse({**head, "object": "chat.completion.chunk",
                            "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                         "finish_reason": finish_reason}]})

            async def stream() -> AsyncIterator[str]:
                yield chunk({"role": "assistant", "content": ""}, None)
                async for event in conversation:
                    if event[1] == "text":
                        yield chunk({"content": event[2]}, None)
                    elif event[1] == "end":
                        yield chunk({}, event[2])
                        if body.include_usage:
                            yield sse({**head, "object": "chat.completion.chunk", "choices": [],
                                       "usage": usage(conversation.prompt_tokens, event[3])})
                    else:
                        yield sse(error_body(generation_failure(event[2])))
                yield "data: [DONE]\n\n"

            return StreamingResponse(stream(), media_type="text/event-stream")
        text, finish_reason, completion_tokens = await collected(conversation, http_request)
        return {**head, "object": "chat.completion",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text[0]}, "logprobs": None,
                             "finish_reason": finish_reason[0]}],
                "usage": usage(conversation.prompt_tokens, completion_tokens)}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http_request: Request):
        sampling, stop, max_tokens = checked_sampling(body)
        texts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not texts or not all(texts):
            raise RequestError("prompt must be a non-empty string or a list of them", "prompt")
        prompts = [engine.tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
        conversation = Conversation(engine, prompts, max_tokens, sampling, stop, body, "prompt")
        completion_id, now = new_id("cmpl"), int(time.time())
        head = {"id": completion_id, "object": "text_completion", "created": now, "model": model_id,
                "system_fingerprint": None}
        if body.stream:
            async def stream() -> AsyncIterator[str]:
                completion_tokens = 0
                async for event in conversation:
                    if event[1] == "error":
                        yield sse(error_body(generation_failure(event[2])))
                        continue
                    text, finish_reason = (event[2], None) if event[1] == "text" else ("", event[2])
                    completion_tokens += event[3] if event[1] == "end" else 0
                    yield sse({**head, "choices": [{"index": event[0], "text": text, "logprobs": None,
                                                    "finish_reason": finish_reason}]})
                if body.include_usage:
                    yield sse({**head, "choices": [], "usage": usage(conversation.prompt_tokens, completion_tokens)})
                yield "data: [DONE]\n\n"

            return StreamingResponse(stream(), media_type="text/event-stream")
        texts, finish_reasons, completion_tokens = await collected(conversation, http_request)
        return {**head, "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": reason}
                                    for index, (text, reason) in enumerate(zip(texts, finish_reasons))],
                "usage": usage(conversation.prompt_tokens, completion_tokens)}

    return app


async def collected(conversation: Conversation, http_request: Request) -> tuple[list[str], list[str], int]:
    """Each job's whole text and finish reason, and the tokens generated in all. The jobs are cancelled if the client
    leaves before they end."""

    async def watch() -> None:
        while not await http_request.is_disconnected():
            await asyncio.sleep(DISCONNECT_POLL_SECONDS)
        conversation.cancel()

    watcher = asyncio.create_task(watch())
    texts, reasons, completion_tokens = [""] * len(conversation.jobs), [""] * len(conversation.jobs), 0
    try:
        async for event in conversation:
            if event[1] == "text":
                texts[event[0]] += event[2]
            elif event[1] == "end":
                reasons[event[0]], completion_tokens = event[2], completion_tokens + event[3]
            else:
                raise generation_failure(event[2])
    finally:
        watcher.cancel()
    return texts, reasons, completion_tokens


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True,
                        help="a model folder with its tokenizer, as scripts/chat.py takes (e.g. out/sft/final)")
    parser.add_argument("--host", default="127.0.0.1", help="0.0.0.0 serves other machines too")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    parser.add_argument("--api-key", help="require 'Authorization: Bearer <key>' on every /v1/ route")
    parser.add_argument("--model-name", help="the model id clients see (default: the --model path)")
    parser.add_argument("--max-batch-size", type=int, default=16, help="requests generated together at most")
    parser.add_argument("--batch-window-ms", type=float, default=10.0,
                        help="how long a new request waits for others to share its batch")
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
        language_model, tokenizer = load(args.model, args.quantize, args.attn_implementation)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        engine = Engine(language_model, tokenizer, args.max_batch_size, args.batch_window_ms / 1000)
        model_id = args.model_name or args.model
        app = create_app(engine, model_id, args.api_key)
        host, port = listener.getsockname()[:2]
        print(f"serving {model_id} at http://{host}:{port}/ (OpenAI API at /v1"
              f"{', API key required' if args.api_key else ''})", file=sys.stderr, flush=True)
        uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2)).run(sockets=[listener])


if __name__ == "__main__":
    main()
