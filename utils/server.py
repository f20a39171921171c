"""The OpenAI-compatible HTTP side of the server: request schemas and their checks, the routes (FastAPI), streaming as
server-sent events, OpenAI error bodies and the API key. Generation itself is `utils.serving`'s engines."""

import asyncio
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException

from utils.serving import ContinuousEngine, Job, Sampling, StaticEngine

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
MAX_STOP_STRINGS = 4
DISCONNECT_POLL_SECONDS = 0.25
Engine = ContinuousEngine | StaticEngine

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
    top_k: int | None = None  # not OpenAI's: vLLM's extension (-1 or 0: no limit), sent as extra_body by its client
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
    if request.top_k is not None and request.top_k < -1:
        raise RequestError(f"top_k must be -1 or 0 (no limit) or at least 1, got {request.top_k}", "top_k")
    top_k = max(request.top_k or 0, 0)
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
    sampling = Sampling(do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k, seed=request.seed) \
        if temperature > 0 else Sampling(do_sample=False)
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


def create_app(engine: Engine, model_id: str, chat_page: Path, api_key: str | None = None) -> FastAPI:
    """The FastAPI app serving `engine` (which starts and stops with the app) and `chat_page` at `/`; `api_key`
    guards every `/v1/` route."""

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
        return FileResponse(chat_page, media_type="text/html; charset=utf-8")

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


