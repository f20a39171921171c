"""The serving engines: what turns queued requests into tokens for `scripts/serve.py`.

`ContinuousEngine` (the default) runs transformers' continuous-batching manager: requests join and leave one running
batch between decode steps. `StaticEngine` batches the requests that arrive together into one `generate` call; it
also serves the requests the manager cannot (presence/frequency penalties, a seed). Both take `Job`s and report what
each produces through the job's `sink`, from their own threads.
"""

import asyncio
import dataclasses
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext

import torch
from transformers import (ContinuousBatchingConfig, GenerationConfig, LogitsProcessor, LogitsProcessorList,
                          StoppingCriteria, StoppingCriteriaList, StopStringCriteria, TextStreamer)
from transformers.generation.continuous_batching.cb_logits_processors import (ContinuousBatchingTopKLogitsWarper,
                                                                              ContinuousBatchingTopPLogitsWarper)

from utils.sampling import InverseCDFSampling, sampling_processors


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How a job picks its tokens: greedy, or sampled at `temperature` within `top_p` and `top_k` (0: no limit)."""
    do_sample: bool
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
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
    reply_ids: list[int] = dataclasses.field(default_factory=list)
    streamer: "ReplyStreamer | None" = None
    stop_criteria: StopStringCriteria | None = None

    @property
    def batch_key(self) -> tuple:
        # A seeded sampling job runs alone, so that its seed alone decides its answer.
        return (self.sampling, id(self)) if self.seeded else (self.sampling,)

    @property
    def seeded(self) -> bool:
        return self.sampling.do_sample and self.sampling.seed is not None

    @property
    def needs_static(self) -> bool:
        """What continuous batching lacks: presence/frequency penalties, and a seed of the job's own."""
        return self.seeded or bool(self.presence_penalty or self.frequency_penalty)

    def begin(self, tokenizer) -> None:
        self.streamer = ReplyStreamer(tokenizer, self)
        self.stop_criteria = StopStringCriteria(tokenizer, list(self.stop)) if self.stop else None

    def take(self, token: int, eos_token_ids: set[int]) -> None:
        """One new token: counted, streamed, and checked against everything that ends the reply (end of sequence, a
        stop string on the tokens or in the decoded text, the token limit, the client gone)."""
        self.completion_tokens += 1
        if token in eos_token_ids:
            self.finish("stop")
            return
        self.reply_ids.append(token)
        self.streamer.put(torch.tensor([token]))
        # The criteria read only the reply's last `maximum_token_len` tokens (one per character of the longest stop).
        if self.stopped_by_text or (self.stop_criteria is not None and bool(self.stop_criteria(
                torch.tensor([self.reply_ids[-self.stop_criteria.maximum_token_len:]]), None))):
            self.finish("stop")
        elif self.completion_tokens >= self.max_tokens:
            self.finish("length")
        elif self.cancelled:
            self.finish("cancelled")

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

    def fail(self, message: str) -> None:
        self.finish_reason = "error"
        self.sink((self.index, "error", message))


def partial_stop_length(text: str, stops: tuple[str, ...]) -> int:
    """The length of the longest end of `text` that begins a stop string (held back until it is decided)."""
    return max((length for stop in stops for length in range(min(len(stop) - 1, len(text)), 0, -1)
                if text.endswith(stop[:length])), default=0)


class ReplyStreamer(TextStreamer):
    """transformers' TextStreamer for one reply: it releases text in whole characters (a CJK character or an emoji split
    over several byte tokens is never sent half), to its job instead of stdout."""

    def __init__(self, tokenizer, job: Job):
        super().__init__(tokenizer, skip_prompt=False, skip_special_tokens=True)
        self.job = job

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        self.job.add_text(text, stream_end)


def eos_token_ids(language_model, tokenizer) -> set[int]:
    eos = language_model.generation_config.eos_token_id
    return {tokenizer.eos_token_id, *(eos if isinstance(eos, list) else [eos] if eos is not None else [])}


def plain_generation_config(**settings) -> GenerationConfig:
    """A GenerationConfig with every processor a model folder's generation_config.json or transformers' defaults could
    switch on (top-k 50, a repetition penalty, ...) switched off, so that a request gets what it asked for."""
    return GenerationConfig(**{"top_k": 0, "typical_p": 1.0, "repetition_penalty": 1.0, "no_repeat_ngram_size": 0,
                               "num_beams": 1, "min_new_tokens": 0, **settings})


# ----------------------------------------------------------------------------------------------------------------
# The static engine: one `generate` call per batch.

class RequestStops(StoppingCriteria):
    """Ends each row of a batch on its own terms, checked on every new token (see `Job.take`)."""

    def __init__(self, jobs: list[Job], eos_token_ids: set[int]):
        self.jobs, self.eos_token_ids = jobs, eos_token_ids

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        for job, token in zip(self.jobs, input_ids[:, -1].tolist()):
            if job.finish_reason is None:
                job.take(token, self.eos_token_ids)
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


class StaticEngine:
    """Runs queued jobs in batches on one thread: the oldest job and every queued job with the same sampling settings
    (up to `max_batch_size`) go into one `generate` call. A new job waits `batch_window` seconds before its batch
    starts, so that requests sent together are generated together; jobs that arrive later wait for the batch to end.
    `exclusive` is held around each `generate` call (the continuous engine pauses its own batch with it)."""

    name = "static"

    def __init__(self, language_model, tokenizer, max_batch_size: int = 16, batch_window: float = 0.01,
                 exclusive: Callable = nullcontext):
        self.model, self.tokenizer = language_model, tokenizer
        self.max_batch_size, self.batch_window, self.exclusive = max_batch_size, batch_window, exclusive
        self.context_length = language_model.config.max_position_embeddings
        self.eos_token_ids = eos_token_ids(language_model, tokenizer)
        self.queue: list[Job] = []
        self.batch: list[Job] = []
        self.condition = threading.Condition()
        self.closing = False
        self.batches = 0
        self.peak_running = 0
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

    def stats(self) -> dict[str, int | str]:
        with self.condition:
            return {"engine": self.name, "queued": len(self.queue), "running": len(self.batch),
                    "batches": self.batches, "peak_running": self.peak_running, "completed": self.jobs_done,
                    "generated_tokens": self.generated_tokens}

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
            self.peak_running = max(self.peak_running, len(batch))
            return batch

    def serve_forever(self) -> None:
        while (batch := self.next_batch()) is not None:
            if batch:
                self.run(batch)

    def run(self, jobs: list[Job]) -> None:
        """Generate every job of one batch; each ends with an event, whatever happens."""
        try:
            with self.exclusive():
                self.generate(jobs)
        except Exception as error:  # the server must keep serving: the failure goes to these requests only
            for job in jobs:
                if job.finish_reason is None:
                    job.fail(f"generation failed: {error}")
        finally:
            with self.condition:
                self.batch = []
                self.jobs_done += len(jobs)
                self.generated_tokens += sum(job.completion_tokens for job in jobs)

    @torch.no_grad()
    def generate(self, jobs: list[Job]) -> None:
        for job in jobs:
            job.begin(self.tokenizer)
        inputs = self.tokenizer.pad({"input_ids": [job.prompt_ids for job in jobs]}, padding=True,
                                    padding_side="left", return_tensors="pt")
        sampling = jobs[0].sampling
        # Greedy over what the processors leave: the penalties, then (sampling) the warpers and one draw.
        config = plain_generation_config(
            max_new_tokens=max(job.max_tokens for job in jobs), do_sample=False,
            eos_token_id=sorted(self.eos_token_ids), pad_token_id=self.tokenizer.pad_token_id)
        processors = LogitsProcessorList()
        if any(job.presence_penalty or job.frequency_penalty for job in jobs):
            processors.append(PresenceFrequencyPenalty([job.presence_penalty for job in jobs],
                                                       [job.frequency_penalty for job in jobs],
                                                       inputs["input_ids"].shape[1]))
        if sampling.do_sample:
            processors.extend(sampling_processors(sampling.temperature, sampling.top_k, sampling.top_p))
        with torch.random.fork_rng(devices=[]) if jobs[0].seeded else nullcontext():
            if jobs[0].seeded:
                torch.manual_seed(sampling.seed)
            self.model.generate(**{key: value.to(self.model.device) for key, value in inputs.items()},
                                generation_config=config, logits_processor=processors,
                                stopping_criteria=StoppingCriteriaList([RequestStops(jobs, self.eos_token_ids)]))
        for job in jobs:
            if job.finish_reason is None:
                job.finish("length")


# ----------------------------------------------------------------------------------------------------------------
# The continuous engine: transformers' continuous-batching manager.

class RowsTopK(ContinuousBatchingTopKLogitsWarper):
    """transformers' per-request top-k, computed on the rows that limit it only, with `topk` of the largest limit
    among them instead of a sort of every row: greedy rows (top-k 1) then cost one `topk(1)`, and rows without a
    limit nothing. The same tokens survive."""

    def __call__(self, scores: torch.Tensor, tensor_arg: torch.Tensor) -> torch.Tensor:
        top_k = tensor_arg[:scores.size(0)].long()
        rows = torch.nonzero(top_k < scores.size(-1)).squeeze(-1)
        if rows.numel() == 0:
            return scores
        limited, k = scores[rows], top_k[rows]
        thresholds = limited.topk(int(k.max())).values.gather(-1, (k - 1).unsqueeze(-1))
        return scores.index_copy(0, rows, limited.masked_fill(limited < thresholds, self.filter_value))


class RowsTopP(ContinuousBatchingTopPLogitsWarper):
    """transformers' per-request top-p, computed on the rows with top-p below 1 only (a sort of the vocabulary per row
    is the costly part). The same tokens survive."""

    def __call__(self, scores: torch.Tensor, tensor_arg: torch.Tensor) -> torch.Tensor:
        top_p = tensor_arg[:scores.size(0)].view(dtype=torch.float32)
        rows = torch.nonzero(top_p < 1).squeeze(-1)
        if rows.numel() == 0:
            return scores
        return scores.index_copy(0, rows, super().__call__(scores[rows], tensor_arg[rows]))


FASTER_PROCESSORS = {ContinuousBatchingTopKLogitsWarper: RowsTopK, ContinuousBatchingTopPLogitsWarper: RowsTopP}


def faster(processor):
    """`processor` as its row-wise version (same settings), or itself where it has none."""
    faster_type = FASTER_PROCESSORS.get(type(processor))
    if faster_type is None:
        return processor
    replacement = faster_type.__new__(faster_type)
    replacement.__dict__.update(processor.__dict__)
    return replacement


def use_faster_sampling(manager) -> None:
    """Give a manager that has not started yet the row-wise top-k and top-p and the project's sampling draw
    (`utils.sampling`), after which it picks its tokens by argmax (it reads `do_sample` when it starts). Measured on
    the demo model at 16 requests: sorting every row of the vocabulary twice per step and torch.multinomial together
    cost more than the forward."""
    processors = manager.logit_processor.logits_processor
    processors[:] = [faster(processor) for processor in processors] + [InverseCDFSampling()]
    manager.generation_config.do_sample = False


PAGE_SIZE = 256  # tokens per KV-cache page (transformers' default)
MAX_BATCH_TOKENS = 512  # tokens per forward: a long prompt is prefilled in chunks, so decoding never stalls long


class ContinuousEngine:
    """Requests join and leave one running batch: transformers' continuous-batching manager decodes every request in
    flight one token per step over its paged KV cache, so a new request starts at the next step instead of waiting
    for a batch to end, and a finished or cancelled one frees its place at once. Each request keeps its own
    temperature, top-p and top-k (the manager's per-request processors); greedy requests are sampled with top-k 1,
    which is the argmax. The manager has no presence/frequency penalties and one random generator for all its
    requests, so penalised and seeded requests go to a `StaticEngine`, which pauses the running batch while it
    generates. The cache holds `max_batch_size` requests of the whole context."""

    name = "continuous"

    def __init__(self, language_model, tokenizer, max_batch_size: int = 16, batch_window: float = 0.01):
        self.model, self.tokenizer, self.max_batch_size = language_model, tokenizer, max_batch_size
        self.context_length = language_model.config.max_position_embeddings
        self.eos_token_ids = eos_token_ids(language_model, tokenizer)
        self.static = StaticEngine(language_model, tokenizer, max_batch_size, batch_window, self.paused)
        vocabulary = language_model.config.vocab_size
        # Values that switch each per-request processor on (transformers builds none for temperature 1 or top-p 1);
        # every request passes its own.
        config = plain_generation_config(do_sample=True, temperature=0.5, top_p=0.5, top_k=vocabulary,
                                         eos_token_id=sorted(self.eos_token_ids),
                                         pad_token_id=tokenizer.pad_token_id, max_new_tokens=self.context_length)
        pages = -(-self.context_length // PAGE_SIZE)
        self.manager = language_model.init_continuous_batching(
            generation_config=config, continuous_batching_config=ContinuousBatchingConfig(
                per_request_processors=True, page_size=PAGE_SIZE, num_blocks=max_batch_size * pages,
                max_batch_tokens=MAX_BATCH_TOKENS, max_requests_per_batch=max_batch_size))
        use_faster_sampling(self.manager)
        self.jobs: dict[str, Job] = {}
        self.lock = threading.Lock()
        self.closing = False
        self.counter = 0
        self.peak_running = 0
        self.jobs_done = 0
        self.generated_tokens = 0
        self.thread: threading.Thread | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    @contextmanager
    def paused(self):
        with self.manager.pause():
            yield

    def start(self) -> None:
        self.manager.start()
        self.static.start()
        # The manager hands a step's outputs to the handlers registered on an event loop in one callback: the
        # delivery thread runs that loop (a queue would wake it once per request and step).
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="delivery", daemon=True)
        self.thread.start()
        self.loop.call_soon_threadsafe(self.sweep)

    def stop(self) -> None:
        self.closing = True
        self.static.stop()
        self.manager.stop(block=True, hard_stop=True)
        if self.thread is not None:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join()
            self.loop.close()
        with self.lock:
            for job in self.jobs.values():
                if job.finish_reason is None:
                    job.finish("cancelled")
            self.jobs.clear()

    def submit(self, jobs: list[Job]) -> None:
        needs_static = [job for job in jobs if job.needs_static]
        if needs_static:
            self.static.submit(needs_static)
        for job in (job for job in jobs if not job.needs_static):
            job.begin(self.tokenizer)
            with self.lock:
                self.counter += 1
                request_id = f"job-{self.counter}"
                self.jobs[request_id] = job
            self.loop.call_soon_threadsafe(self.add_request, request_id, job)

    def add_request(self, request_id: str, job: Job) -> None:
        """On the delivery loop, where the request's handler must be registered before its first output."""
        self.manager.register_result_handler(request_id, self.delivered)
        sampling = job.sampling
        self.manager.add_request(
            job.prompt_ids, request_id=request_id, max_new_tokens=job.max_tokens, streaming=True,
            eos_token_id=sorted(self.eos_token_ids),
            temperature=float(sampling.temperature) if sampling.do_sample else 1.0,
            top_p=float(sampling.top_p) if sampling.do_sample else 1.0,
            top_k=(sampling.top_k or self.model.config.vocab_size) if sampling.do_sample else 1)

    def stats(self) -> dict[str, int | str]:
        static = self.static.stats()
        with self.lock:
            running = sum(job.completion_tokens > 0 for job in self.jobs.values())
            return {"engine": self.name, "queued": len(self.jobs) - running + static["queued"],
                    "running": running + static["running"], "batches": static["batches"],
                    "peak_running": max(self.peak_running, static["peak_running"]),
                    "completed": self.jobs_done + static["completed"],
                    "generated_tokens": self.generated_tokens + static["generated_tokens"]}

    def delivered(self, output) -> None:
        """A request's tokens so far, after a step: to its job. A job that has ended before its request (a stop
        string, its client gone) cancels the request; tokens the manager made before it saw that are dropped."""
        with self.lock:
            job = self.jobs.get(output.request_id)
            if job is None:
                return
            if output.error is not None:
                job.fail(f"generation failed: {output.error}")
            for token in output.generated_tokens[job.completion_tokens:]:
                if job.finish_reason is not None:
                    break
                job.take(token, self.eos_token_ids)
            if output.is_finished():
                if job.finish_reason is None:
                    job.finish("length")
                self.retire(output.request_id)
            elif job.finish_reason is not None:
                self.drop(output.request_id)
            elif job.completion_tokens == 1:
                self.peak_running = max(self.peak_running,
                                        sum(job.completion_tokens > 0 for job in self.jobs.values()))

    def sweep(self) -> None:
        """Every 50 ms on the delivery loop: cancels the requests of jobs whose clients left before their first
        output, and ends every job if the generation loop has died."""
        with self.lock:
            for request_id, job in list(self.jobs.items()):
                if job.cancelled and job.finish_reason is None:
                    job.finish("cancelled")
                if job.finish_reason is not None:
                    self.drop(request_id)
        if not self.closing and not self.manager.is_running():
            error = self.manager.background_thread_status.fatal_error
            self.end_all(f"generation failed: {error or 'the generation loop stopped'}")
        if not self.closing:
            self.loop.call_later(0.05, self.sweep)

    def drop(self, request_id: str) -> None:
        """Cancel the request of a job that has ended."""
        self.manager.cancel_request(request_id)
        self.retire(request_id)

    def retire(self, request_id: str) -> None:
        job = self.jobs.pop(request_id)
        self.jobs_done += 1
        self.generated_tokens += job.completion_tokens

    def end_all(self, message: str) -> None:
        with self.lock:
            for request_id, job in list(self.jobs.items()):
                job.fail(message)
                self.retire(request_id)
