"""utils/serving.py: both engines in-process. Batched greedy equals alone and transformers' generate, per-request
limits, stop strings and whole characters, penalties; for continuous batching also requests joining a running batch,
per-request sampling settings inside one batch, and a stop string or a cancellation ending one request of a batch
without disturbing the others."""

import time

import pytest
import torch

from helpers import randomize_, tiny_config
from model import ByteModel
from test_chat import scripted
from utils.serving import ContinuousEngine, Job, PresenceFrequencyPenalty, Sampling, StaticEngine

CONTEXT = 4096
ENGINES = {"static": StaticEngine, "continuous": ContinuousEngine}
GREEDY = Sampling(do_sample=False)


def random_model(tokenizer) -> ByteModel:
    """Random weights with a large context, whose end-of-sequence logit is always 0: among 6400 random logits the
    greedy choice is never it, so greedy replies run to their token limit."""
    torch.manual_seed(0)
    language_model = ByteModel(tiny_config(vocab_size=len(tokenizer), max_position_embeddings=CONTEXT,
                                           eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                           bos_token_id=tokenizer.bos_token_id))
    randomize_(language_model)
    with torch.no_grad():
        language_model.lm_head.weight[tokenizer.eos_token_id] = 0
    return language_model.eval()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """A model this small decodes fastest on one thread, and far faster than on two where other processes share the
    cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def chat_ids(tokenizer, content: str) -> list[int]:
    return tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                         return_dict=True)["input_ids"]


class Running:
    """An engine started for a test; `generated` submits jobs and waits for all of them to end."""

    def __init__(self, engine):
        self.engine = engine

    def __enter__(self):
        self.engine.start()
        return self

    def __exit__(self, *exc):
        self.engine.stop()

    def generated(self, jobs: list[Job], timeout: float = 60) -> None:
        self.engine.submit(jobs)
        wait_until(lambda: all(job.finish_reason is not None for job in jobs), timeout)


def wait_until(condition, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def job(prompt_ids: list[int], max_tokens: int, events: list, index: int = 0, **fields) -> Job:
    return Job(prompt_ids, max_tokens, fields.pop("sampling", GREEDY), events.append, index, **fields)


def replies(events: list, count: int) -> list[dict]:
    """Per job: the text pieces it sent, its finish reason and token count."""
    result = [{"pieces": [], "finish_reason": None, "tokens": None} for _ in range(count)]
    for event in events:
        if event[1] == "text":
            result[event[0]]["pieces"].append(event[2])
        elif event[1] == "end":
            result[event[0]].update(finish_reason=event[2], tokens=event[3])
        else:
            raise AssertionError(event)
    return result


def text(events: list, index: int = 0) -> str:
    return "".join(event[2] for event in events if event[0] == index and event[1] == "text")


def reference(language_model, tokenizer, prompt: list[int], max_new_tokens: int) -> str:
    """transformers' own greedy generate on one prompt."""
    output = language_model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(output[0, len(prompt):], skip_special_tokens=True)


@pytest.fixture(scope="module")
def language_model(tokenizer):
    return random_model(tokenizer)


@pytest.mark.parametrize("kind", sorted(ENGINES))
def test_batched_greedy_equals_alone_with_per_request_limits(kind, language_model, tokenizer):
    texts = ("hi", "你好，请介绍一下你自己。", "What is 2 + 3? Answer in one word, please.", "ok")
    prompts = [chat_ids(tokenizer, text) for text in texts]
    limits = [5, 12, 3, 9]
    with Running(ENGINES[kind](language_model, tokenizer)) as running:
        alone = []
        for prompt, limit in zip(prompts, limits):
            events = []
            running.generated([job(prompt, limit, events)])
            alone.append(replies(events, 1)[0])
        events = []
        running.generated([job(prompt, limit, events, index)
                           for index, (prompt, limit) in enumerate(zip(prompts, limits))])
        assert running.engine.stats()["peak_running"] > 1
    batched = replies(events, len(prompts))
    for single, together, limit in zip(alone, batched, limits):
        assert "".join(single["pieces"]) == "".join(together["pieces"]) != ""
        assert together["finish_reason"] == single["finish_reason"] == "length"
        assert together["tokens"] == single["tokens"] == limit
    assert "".join(batched[1]["pieces"]) == reference(language_model, tokenizer, prompts[1], limits[1])


@pytest.mark.parametrize("kind", sorted(ENGINES))
def test_text_streams_in_whole_characters_and_ends_at_eos(kind, tokenizer):
    text = "你好龘😀 ok! é"
    tokens = tokenizer.encode(text, add_special_tokens=False)
    # The rare character, the emoji and é are each split over byte tokens.
    assert any("\ufffd" in tokenizer.decode(tokens[:cut]) for cut in range(1, len(tokens)))
    events = []
    with Running(ENGINES[kind](scripted(tokenizer, tokens + [tokenizer.eos_token_id] + tokens), tokenizer)) as running:
        running.generated([job(tokenizer.encode("hi", add_special_tokens=False), 100, events)])
    (reply,) = replies(events, 1)
    assert "".join(reply["pieces"]) == text
    assert not any("\ufffd" in piece for piece in reply["pieces"]) and len(reply["pieces"]) > 1
    assert reply["finish_reason"] == "stop" and reply["tokens"] == len(tokens) + 1


@pytest.mark.parametrize("kind", sorted(ENGINES))
@pytest.mark.parametrize("stop, expected", [(("wor",), " hello "), (("lo w", "again"), " hel"),
                                            (("xyz", " again"), " hello world")])
def test_stop_strings_end_the_reply_and_are_never_sent(kind, tokenizer, stop, expected):
    tokens = tokenizer.encode(" hello world again and again", add_special_tokens=False)
    language_model = scripted(tokenizer, tokens)
    events = []
    with Running(ENGINES[kind](language_model, tokenizer)) as running:
        running.generated([job(tokenizer.encode("hi", add_special_tokens=False), 50, events, stop=stop)])
    (reply,) = replies(events, 1)
    assert "".join(reply["pieces"]) == expected and reply["finish_reason"] == "stop"
    # Generation ended on the token that completed the stop string, not at the limit. The continuous engine's
    # manager runs on while the cancellation reaches it (a step or two, more on a busy machine).
    completing = next(count for count in range(1, len(tokens) + 1)
                      if any(text in tokenizer.decode(tokens[:count]) for text in stop))
    assert reply["tokens"] == completing
    if kind == "static":
        assert len(language_model.calls) == completing
    else:
        assert completing <= len(language_model.calls) < 50


def test_presence_and_frequency_penalties_count_the_reply_only():
    prompt_width = 2
    input_ids = torch.tensor([[5, 6, 7, 7, 8], [7, 7, 5, 0, 0]])
    penalty = PresenceFrequencyPenalty([0.5, 1.0], [0.25, 0.0], prompt_width)
    scores = penalty(input_ids, torch.zeros(2, 10))
    expected = torch.zeros(2, 10)
    expected[0, 7], expected[0, 8] = -(0.5 + 2 * 0.25), -(0.5 + 0.25)
    expected[1, 5], expected[1, 0] = -1.0, -1.0
    torch.testing.assert_close(scores, expected)


def test_a_batch_waits_the_window_and_holds_at_most_max_batch_size(language_model, tokenizer):
    engine = StaticEngine(language_model, tokenizer, max_batch_size=2, batch_window=0.3)
    events = []
    engine.submit([job(chat_ids(tokenizer, "hi"), 3, events, index) for index in range(3)])
    started = time.monotonic()
    batch = engine.next_batch()
    assert time.monotonic() - started > 0.2
    assert [queued.index for queued in batch] == [0, 1] and len(engine.queue) == 1


# ---------------------------------------------------------------------------------------------- continuous batching

def test_a_request_joining_a_running_batch_answers_as_alone(language_model, tokenizer):
    first, joining = chat_ids(tokenizer, "Tell me a long story."), chat_ids(tokenizer, "hi")
    events = []
    with Running(ContinuousEngine(language_model, tokenizer)) as running:
        long_job = job(first, 40, events, 0)
        running.engine.submit([long_job])
        wait_until(lambda: long_job.completion_tokens >= 5)
        running.generated([job(joining, 8, events, 1)])
        assert long_job.finish_reason is None  # the joining request ended while the first one was still decoding
        wait_until(lambda: long_job.finish_reason is not None)
        assert running.engine.stats()["peak_running"] == 2 and running.engine.stats()["batches"] == 0
    assert text(events, 0) == reference(language_model, tokenizer, first, 40)
    assert text(events, 1) == reference(language_model, tokenizer, joining, 8)


def test_each_request_keeps_its_sampling_settings_inside_one_batch(language_model, tokenizer):
    prompt = chat_ids(tokenizer, "hi")
    settings = [GREEDY,
                Sampling(do_sample=True, temperature=1.5, top_k=1),  # top-k 1 is the argmax at any temperature
                Sampling(do_sample=True, top_p=1e-6),  # so is the smallest nucleus
                Sampling(do_sample=True, temperature=1e-4),  # and a near-zero temperature
                Sampling(do_sample=True, top_k=3),
                Sampling(do_sample=True)]
    events = []
    torch.manual_seed(0)
    with Running(ContinuousEngine(language_model, tokenizer)) as running:
        jobs = [job(prompt, 12, events, index, sampling=sampling) for index, sampling in enumerate(settings)]
        running.generated(jobs)
        assert running.engine.stats()["peak_running"] == len(settings)
    greedy = reference(language_model, tokenizer, prompt, 12)
    assert [text(events, index) for index in range(4)] == [greedy] * 4
    # Top-k 3: each token is one of the model's three likeliest after the tokens before it.
    sequence = torch.tensor([prompt + jobs[4].reply_ids])
    with torch.no_grad():
        logits = language_model(sequence).logits[0, len(prompt) - 1:-1]
    top3 = logits.topk(3).indices
    assert all(token in top3[position] for position, token in enumerate(jobs[4].reply_ids))
    assert any(token != top3[position, 0] for position, token in enumerate(jobs[4].reply_ids))
    # Plain sampling from 6400 near-uniform tokens leaves the greedy path at once.
    assert text(events, 5) != greedy


def test_a_stop_string_and_a_cancellation_end_one_request_of_a_batch_only(language_model, tokenizer):
    prompts = [chat_ids(tokenizer, content) for content in ("one", "two", "three")]
    alone = [reference(language_model, tokenizer, prompt, 24) for prompt in prompts]
    stop = alone[1][6:9]
    events = []
    with Running(ContinuousEngine(language_model, tokenizer)) as running:
        jobs = [job(prompts[0], 24, events, 0), job(prompts[1], 24, events, 1, stop=(stop,)),
                job(prompts[2], 24, events, 2)]
        running.engine.submit(jobs)
        wait_until(lambda: jobs[2].completion_tokens >= 3)
        jobs[2].cancelled = True  # what a client that disconnects does
        wait_until(lambda: all(job.finish_reason is not None for job in jobs))
        assert running.engine.stats()["peak_running"] == 3
    ends = replies(events, 3)
    assert text(events, 0) == alone[0] and ends[0]["finish_reason"] == "length" and ends[0]["tokens"] == 24
    assert text(events, 1) == alone[1][:alone[1].find(stop)] and ends[1]["finish_reason"] == "stop"
    assert ends[2]["finish_reason"] == "cancelled" and 3 <= ends[2]["tokens"] < 24
    assert alone[2].startswith(text(events, 2))


def test_penalised_and_seeded_requests_take_the_static_path(language_model, tokenizer):
    prompt = chat_ids(tokenizer, "hi")
    seeded = Sampling(do_sample=True, seed=7)
    static_events = []
    # Negative penalties: the reply repeats its own tokens, which greedy decoding of random weights never does.
    with Running(StaticEngine(language_model, tokenizer)) as running:
        running.generated([job(prompt, 10, static_events, presence_penalty=-2.0, frequency_penalty=-2.0)])
    events = []
    with Running(ContinuousEngine(language_model, tokenizer)) as running:
        jobs = [job(prompt, 10, events, 0, presence_penalty=-2.0, frequency_penalty=-2.0),
                job(prompt, 10, events, 1, sampling=seeded), job(prompt, 10, events, 2, sampling=seeded)]
        running.generated(jobs)
        wait_until(lambda: running.engine.stats()["completed"] == 3)  # counted just after the last job ends
        assert running.engine.stats()["batches"] == 3
    assert text(events, 0) == text(static_events) != reference(language_model, tokenizer, prompt, 10)
    assert text(events, 1) == text(events, 2) != ""


def test_row_wise_top_k_and_top_p_keep_the_tokens_transformers_keeps():
    from transformers import TopKLogitsWarper, TopPLogitsWarper
    from transformers.generation.continuous_batching.cb_logits_processors import (
        ContinuousBatchingTopKLogitsWarper, ContinuousBatchingTopPLogitsWarper)

    from utils.serving import RowsTopK, RowsTopP, faster

    torch.manual_seed(0)
    scores = torch.randn(6, 100)
    scores[2, :10] = scores[2, 0]  # ties at the threshold survive in both
    top_k = torch.tensor([1, 100, 5, 100, 37, 2], dtype=torch.int32)
    top_p = torch.tensor([1.0, 0.3, 1.0, 0.9, 1e-6, 1.0]).view(torch.int32)
    for ours, theirs, argument in ((RowsTopK, ContinuousBatchingTopKLogitsWarper(TopKLogitsWarper(50)), top_k),
                                   (RowsTopP, ContinuousBatchingTopPLogitsWarper(TopPLogitsWarper(0.5)), top_p)):
        fast = faster(theirs)
        assert type(fast) is ours
        expected = theirs(scores.clone(), argument)
        assert torch.equal(fast(scores.clone(), argument), expected)
        assert torch.isinf(expected).any() and torch.isfinite(expected).any(dim=-1).all()
    # Rows that set no limit are left alone without any work.
    assert torch.equal(fast(scores, torch.ones(6).view(torch.int32)), scores)


@pytest.mark.parametrize("kind", sorted(ENGINES))
def test_a_bf16_model_answers_as_its_own_generate(kind, language_model, tokenizer):
    """bf16 weights, which `--precision auto` picks where they decode faster: the cache and the sampling follow
    the model's dtype."""
    bf16 = random_model(tokenizer).to(torch.bfloat16)
    prompt = chat_ids(tokenizer, "你好，请介绍一下你自己。")
    events = []
    with Running(ENGINES[kind](bf16, tokenizer)) as running:
        running.generated([job(prompt, 16, events)])
    assert text(events) == reference(bf16, tokenizer, prompt, 16) != reference(language_model, tokenizer, prompt, 16)
