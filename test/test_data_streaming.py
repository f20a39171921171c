"""utils/data.py StreamingPretrainDataset: shards over ranks and workers, resuming after any sample, bad records."""

import random
import re

import pytest
import torch
from torch.utils.data import DataLoader

import utils.data as data_module
from helpers import expected_stream, write_lines
from utils.data import StreamingPretrainDataset
from utils.errors import InputError


STREAM_SEQ_LEN = 16
_WORDS = ("apple river stone cloud market silver engine garden yellow window basket thunder pencil ocean "
          "mirror candle forest rocket violin desert pepper ladder castle meadow puzzle harbor tiger lemon "
          "carpet glacier 春天 河流 山脉 城市 音乐 书本 花园 星星").split()
# 40 documents of distinct random words (seeded, so the test is deterministic)
STREAM_TEXTS = [f"doc {i}: " + " ".join(random.Random(i).choices(_WORDS, k=14)) + "." for i in range(40)]


@pytest.fixture
def stream_file(tmp_path, tokenizer):
    for text in STREAM_TEXTS:  # every document spans >= seq_len tokens, so a window starts inside each of them
        assert len(tokenizer(text, add_special_tokens=False).input_ids) + 1 > STREAM_SEQ_LEN
    return write_lines(tmp_path / "stream.jsonl", [{"text": text} for text in STREAM_TEXTS])


def shard_windows(tokenizer, shard: int, num_shards: int) -> list[list[int]]:
    """The windows (seq_len + 1 tokens, stride seq_len) of the packed stream of the shard's own documents."""
    stream = expected_stream(tokenizer, [t for i, t in enumerate(STREAM_TEXTS) if i % num_shards == shard])
    return [stream[start:start + STREAM_SEQ_LEN + 1]
            for start in range(0, len(stream) - STREAM_SEQ_LEN, STREAM_SEQ_LEN)]


def window_of(sample) -> list[int]:
    return sample["input_ids"].tolist() + sample["shift_labels"][-1:].tolist()


def test_streaming_shards_over_ranks_and_workers(stream_file, tokenizer, monkeypatch):
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    by_shard: dict[int, list[dict]] = {}
    for rank in range(2):
        dataset = StreamingPretrainDataset([str(stream_file)], tokenizer, STREAM_SEQ_LEN, rank=rank, world_size=2)
        for sample in DataLoader(dataset, batch_size=None, num_workers=2):
            assert sample["input_ids"][1:].tolist() == sample["shift_labels"][:-1].tolist()
            by_shard.setdefault(sample["shard"], []).append(sample)
    assert sorted(by_shard) == [0, 1, 2, 3]

    all_windows = [tuple(window_of(s)) for samples in by_shard.values() for s in samples]
    assert len(all_windows) == len(set(all_windows))  # no window twice
    documents_seen = {}
    for shard, samples in by_shard.items():
        assert [window_of(s) for s in samples] == shard_windows(tokenizer, shard, 4)
        documents = {s["document"] for s in samples}
        assert all(document % 4 == shard for document in documents)
        for document in documents:
            assert document not in documents_seen
            documents_seen[document] = shard
    assert sorted(documents_seen) == list(range(40))  # every document in exactly one shard


@pytest.mark.parametrize("rank,world_size", [(0, 1), (1, 2)])
@pytest.mark.parametrize("tokenize_batch", [512, 3])
def test_streaming_resumes_after_any_sample(stream_file, tokenizer, monkeypatch, rank, world_size, tokenize_batch):
    monkeypatch.setattr(data_module, "TOKENIZE_BATCH", tokenize_batch)
    shard = rank  # single process: one worker per rank

    def stream(positions=None):
        return list(StreamingPretrainDataset([str(stream_file)], tokenizer, STREAM_SEQ_LEN, rank=rank,
                                             world_size=world_size, positions=positions))

    full = stream()
    assert [window_of(s) for s in full] == shard_windows(tokenizer, shard, world_size)
    assert {s["shard"] for s in full} == {shard}
    # The reported position is where the next window starts: document's tokens from `offset` on.
    for sample, following in zip(full, full[1:]):
        ids = expected_stream(tokenizer, [STREAM_TEXTS[sample["document"]]])
        assert ids[sample["offset"]] == following["input_ids"][0]
    assert any(s["offset"] == 0 for s in full) and any(s["offset"] > 0 for s in full)

    for k in sorted({0, 1, 5, len(full) // 2, len(full) - 2, len(full) - 1}):
        resumed = stream({shard: (full[k]["document"], full[k]["offset"])})
        assert len(resumed) == len(full) - k - 1
        for got, want in zip(resumed, full[k + 1:], strict=True):
            assert torch.equal(got["input_ids"], want["input_ids"])
            assert torch.equal(got["shift_labels"], want["shift_labels"])
            assert (got["shard"], got["document"], got["offset"]) == (want["shard"], want["document"],
                                                                       want["offset"])
    # A position for another shard does not move this one.
    assert [window_of(s) for s in stream({shard + 1: (5, 3)})] == [window_of(s) for s in full]


def _streamed_shards(path, tokenizer, good: dict[int, str]):
    """Check each of 2 shards streams exactly the windows of its own good documents (by document index)."""
    for shard in range(2):
        samples = list(StreamingPretrainDataset([str(path)], tokenizer, 8, rank=shard, world_size=2))
        stream = expected_stream(tokenizer, [text for index, text in good.items() if index % 2 == shard])
        assert [window_of(s) for s in samples] == [stream[i:i + 9] for i in range(0, len(stream) - 8, 8)]
        assert {s["document"] for s in samples} <= {index for index in good if index % 2 == shard}


def test_streaming_skips_bad_records_but_counts_them_in_document_indices(tmp_path, tokenizer):
    texts = STREAM_TEXTS[:6]
    lines = [{"text": texts[0]}, {"title": "x"}, {"text": texts[1]}, "", {"text": 7}, {"text": texts[2]},
             {"text": texts[3]}, {"text": " "}, {"text": texts[4]}, {"text": texts[5]}]
    path = write_lines(tmp_path / "mixed.jsonl", lines)
    # bad records keep their index (the blank line is no record), so shards do not shift when records are skipped
    _streamed_shards(path, tokenizer, {0: texts[0], 2: texts[1], 4: texts[2], 5: texts[3], 7: texts[4], 8: texts[5]})
    with pytest.raises(InputError, match=re.escape(f"{path}:2: no 'text' field")):
        list(StreamingPretrainDataset([str(path)], tokenizer, 8, strict=True))
    with pytest.raises(InputError, match="data file not found"):
        StreamingPretrainDataset([str(tmp_path / "missing.jsonl")], tokenizer, 8)


def test_streaming_document_index_counts_malformed_lines(tmp_path, tokenizer):
    texts = STREAM_TEXTS[:4]
    path = write_lines(tmp_path / "mixed.jsonl", [{"text": texts[0]}, "{broken", {"text": texts[1]},
                                                  {"text": texts[2]}, {"text": texts[3]}])
    _streamed_shards(path, tokenizer, {0: texts[0], 2: texts[1], 3: texts[2], 4: texts[3]})

