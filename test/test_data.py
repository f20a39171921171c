"""utils/data.py: reading JSONL data files, the packed pretraining token cache, the resumable sampler, streaming
shards, chat-formatted SFT samples with assistant-only labels, bad-input handling and padding."""

import copy
import json
import random
import re
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset
from transformers import AutoTokenizer

import utils.data as data_module
from helpers import ATOL, tiny_config
from model import ByteModel
from utils.errors import InputError
from utils.data import (DataIssues, PadCollator, PretrainDataset, ResumableSampler, SFTDataset,
                        StreamingPretrainDataset, build_token_cache, document_texts, encode_conversation, read_jsonl)

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "datasets" / "demo"
PAD, BOS, EOS = 0, 1, 2


def test_read_jsonl_skips_blank_lines_and_numbers_lines(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": "b"}\n', encoding="utf-8")
    assert list(read_jsonl(path)) == [(1, {"text": "a"}), (3, {"text": "b"})]


def test_read_jsonl_names_file_and_line_of_malformed_json(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "a"}\n{"text": \n', encoding="utf-8")
    with pytest.raises(InputError, match=r"data\.jsonl:2: malformed JSON"):
        list(read_jsonl(path))
    with pytest.raises(InputError, match="data file not found"):
        list(read_jsonl(tmp_path / "missing.jsonl"))


def test_document_texts():
    assert document_texts({"text": "hello"}) == ["hello"]
    conversation = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "hi"}]
    assert document_texts({"conversations": conversation}) == ["你好", "hi"]
    assert document_texts({"messages": conversation}) == ["你好", "hi"]
    assert document_texts({"title": "x"}) == [] and document_texts([1, 2]) == []


# ---------------------------------------------------------------------------------------------------------------
# Shared fixtures and helpers
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer():
    tok = AutoTokenizer.from_pretrained(ROOT / "tokenizer")
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, len(tok)) == (PAD, BOS, EOS, 6400)
    return tok


def write_lines(path: Path, lines: list) -> Path:
    """Write records (dumped as JSON) or raw strings, one per line."""
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line, ensure_ascii=False)) + "\n"
                            for line in lines), encoding="utf-8")
    return path


def demo_texts(count: int) -> list[str]:
    with open(DEMO / "pretrain_train.jsonl", encoding="utf-8") as handle:
        return [json.loads(line)["text"] for line in islice(handle, count)]


PRETRAIN_TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "今天天气很好，我们去公园散步吧。",
    "def add(a, b):\n    return a + b\n",
    "Packing keeps every token: no padding, no loss.",
    "  leading and trailing spaces  ",
    "数字 12345 与 English 混合 text.",
]


def expected_stream(tokenizer, texts: list[str], eos: int = EOS) -> list[int]:
    """The packed token stream written by hand: each document's ids without specials, then EOS."""
    stream = []
    for text in texts:
        stream += tokenizer(text, add_special_tokens=False).input_ids + [eos]
    return stream


def unpack(dataset) -> list[int]:
    """Rebuild the token stream from the windows: the first input token, then every window's targets."""
    stream = [int(dataset[0]["input_ids"][0])]
    for index in range(len(dataset)):
        stream += dataset[index]["shift_labels"].tolist()
    return stream


# ---------------------------------------------------------------------------------------------------------------
# 1. PretrainDataset / build_token_cache
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("tokenize_batch", [512, 2])  # 2: documents spread over several tokenizer batch calls
@pytest.mark.parametrize("seq_len", [16, 7])
def test_pretrain_packing_is_lossless(tmp_path, tokenizer, monkeypatch, tokenize_batch, seq_len):
    monkeypatch.setattr(data_module, "TOKENIZE_BATCH", tokenize_batch)
    texts = demo_texts(5) + PRETRAIN_TEXTS
    path = write_lines(tmp_path / "train.jsonl", [{"text": text} for text in texts])
    dataset = PretrainDataset([str(path)], tokenizer, seq_len, cache_dir=tmp_path / "cache")
    stream = expected_stream(tokenizer, texts)
    assert PAD not in stream  # no pad token in these texts ...

    # The cache on disk holds exactly the stream, as uint16 (the 6400-token vocabulary fits).
    meta = dataset.meta
    assert meta["dtype"] == "uint16" and meta["num_tokens"] == len(stream)
    assert meta["num_documents"] == len(texts) and meta["skipped"] == {}
    bins = list((tmp_path / "cache").glob("pretrain-*.bin"))
    assert len(bins) == 1 and bins[0].stat().st_size == len(stream) * 2
    assert np.fromfile(bins[0], dtype=np.uint16).tolist() == stream
    assert not list((tmp_path / "cache").glob("*.tmp-*"))  # temporary files renamed away

    num_windows = (len(stream) - 1) // seq_len
    assert len(dataset) == num_windows and num_windows > 10
    assert unpack(dataset) == stream[:1 + num_windows * seq_len]
    assert torch.cat([dataset[i]["input_ids"] for i in range(num_windows)]).tolist() == stream[:num_windows * seq_len]
    for index in range(num_windows):
        sample = dataset[index]
        assert sample["input_ids"].dtype == torch.long and sample["shift_labels"].dtype == torch.long
        assert sample["input_ids"].shape == sample["shift_labels"].shape == (seq_len,)
        window = stream[index * seq_len:index * seq_len + seq_len + 1]
        assert sample["input_ids"].tolist() == window[:-1] and sample["shift_labels"].tolist() == window[1:]
        assert PAD not in sample["input_ids"].tolist() + sample["shift_labels"].tolist()  # ... so none is packed
        if index + 1 < num_windows:  # consecutive windows share exactly one token: the last target is the next input
            following = dataset[index + 1]
            assert following["input_ids"][0] == sample["shift_labels"][-1]
            # ... and only that one: window i covers stream positions [i * seq_len, (i + 1) * seq_len]
            assert following["input_ids"].tolist() == stream[(index + 1) * seq_len:(index + 2) * seq_len]


def test_pretrain_pad_token_only_where_the_text_has_it(tmp_path, tokenizer):
    texts = ["before <|SPAD|> after", "a clean document without it"]
    path = write_lines(tmp_path / "train.jsonl", [{"text": text} for text in texts])
    dataset = PretrainDataset([str(path)], tokenizer, 4, cache_dir=tmp_path / "cache")
    stream = expected_stream(tokenizer, texts)
    assert stream.count(PAD) == 1
    assert unpack(dataset) == stream[:1 + len(dataset) * 4]
    assert np.fromfile(next((tmp_path / "cache").glob("*.bin")), dtype=np.uint16).tolist().count(PAD) == 1


def test_token_cache_is_reused_until_source_or_tokenizer_changes(tmp_path, tokenizer, monkeypatch):
    path = write_lines(tmp_path / "train.jsonl", [{"text": text} for text in PRETRAIN_TEXTS])
    cache = tmp_path / "cache"
    tokens_path, meta = build_token_cache([str(path)], tokenizer, cache)
    mtime = tokens_path.stat().st_mtime_ns
    meta_mtime = tokens_path.with_suffix(".json").stat().st_mtime_ns

    # Nothing changed: the same files are returned, untouched, without tokenizing anything.
    def no_tokenizing(*args, **kwargs):
        raise AssertionError("the cache should have been reused")

    with monkeypatch.context() as patch:
        patch.setattr(data_module, "encode_documents", no_tokenizing)
        again_path, again_meta = build_token_cache([str(path)], tokenizer, cache)
        dataset = PretrainDataset([str(path)], tokenizer, 8, cache_dir=cache)
    assert again_path == tokens_path and again_meta == meta and dataset.meta == meta
    assert tokens_path.stat().st_mtime_ns == mtime
    assert tokens_path.with_suffix(".json").stat().st_mtime_ns == meta_mtime
    assert sorted(p.name for p in cache.iterdir()) == sorted([tokens_path.name, tokens_path.with_suffix(".json").name])

    # A truncated token file (size disagrees with the metadata) is rebuilt under the same name.
    tokens_path.write_bytes(tokens_path.read_bytes()[:-2])
    repaired_path, repaired_meta = build_token_cache([str(path)], tokenizer, cache)
    assert repaired_path == tokens_path and repaired_meta == meta
    assert tokens_path.stat().st_size == meta["num_tokens"] * 2

    # Source changed (a line appended): new cache key, new token count.
    extra = "An appended document changes the cache."
    with path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps({"text": extra}) + "\n")
    grown_path, grown = build_token_cache([str(path)], tokenizer, cache)
    assert grown_path != tokens_path
    assert grown["num_tokens"] == meta["num_tokens"] + len(tokenizer(extra, add_special_tokens=False).input_ids) + 1
    assert grown["num_documents"] == meta["num_documents"] + 1
    assert np.fromfile(grown_path, dtype=np.uint16).tolist() == expected_stream(tokenizer, PRETRAIN_TEXTS + [extra])

    # Tokenizer changed: an added token, or a different EOS id, gives a different key (the old caches stay valid).
    added = copy.deepcopy(tokenizer)
    added.add_tokens(["<|extra|>"])
    assert len(added) == 6401 and len(tokenizer) == 6400
    added_path, added_meta = build_token_cache([str(path)], added, cache)
    assert added_path not in (tokens_path, grown_path) and added_meta["tokenizer"] != grown["tokenizer"]

    other_eos = copy.deepcopy(tokenizer)
    other_eos.eos_token = "<|SBOS|>"
    assert other_eos.eos_token_id == BOS and tokenizer.eos_token_id == EOS
    eos_path, eos_meta = build_token_cache([str(path)], other_eos, cache)
    assert eos_path not in (tokens_path, grown_path, added_path)
    assert np.fromfile(eos_path, dtype=np.uint16).tolist() == \
        expected_stream(tokenizer, PRETRAIN_TEXTS + [extra], eos=BOS)

    # Each of them is now reused.
    with monkeypatch.context() as patch:
        patch.setattr(data_module, "encode_documents", no_tokenizing)
        assert build_token_cache([str(path)], tokenizer, cache)[0] == grown_path
        assert build_token_cache([str(path)], added, cache)[0] == added_path
        assert build_token_cache([str(path)], other_eos, cache)[0] == eos_path


def test_pretrain_plain_text_files_hold_one_document_per_non_blank_line(tmp_path, tokenizer):
    text_path = tmp_path / "corpus.txt"
    text_path.write_text("first line of text\n\n   \n第二行\nthird, with  spaces  \n", encoding="utf-8")
    json_path = write_lines(tmp_path / "more.jsonl", [{"text": "a jsonl document after the text file"}])
    dataset = PretrainDataset([str(text_path), str(json_path)], tokenizer, 5, cache_dir=tmp_path / "cache")
    texts = ["first line of text", "第二行", "third, with  spaces  ", "a jsonl document after the text file"]
    stream = expected_stream(tokenizer, texts)
    assert dataset.meta["num_documents"] == 4 and dataset.meta["num_tokens"] == len(stream)
    assert dataset.meta["skipped"] == {}  # blank lines are no documents, not empty ones
    assert unpack(dataset) == stream[:1 + len(dataset) * 5]


def test_pretrain_too_few_tokens_raises_input_error(tmp_path, tokenizer):
    path = write_lines(tmp_path / "tiny.jsonl", [{"text": "hi"}])
    num_tokens = len(expected_stream(tokenizer, ["hi"]))
    with pytest.raises(InputError, match=rf"tiny\.jsonl: {num_tokens} tokens do not fill one window"):
        PretrainDataset([str(path)], tokenizer, num_tokens, cache_dir=tmp_path / "cache")
    assert len(PretrainDataset([str(path)], tokenizer, num_tokens - 1, cache_dir=tmp_path / "cache")) == 1
    with pytest.raises(InputError, match="seq_len must be >= 1"):
        PretrainDataset([str(path)], tokenizer, 0, cache_dir=tmp_path / "cache")
    with pytest.raises(InputError, match="data file not found"):
        PretrainDataset([str(tmp_path / "missing.jsonl")], tokenizer, 4, cache_dir=tmp_path / "cache")
    with pytest.raises(InputError, match="no data files"):
        build_token_cache([], tokenizer, tmp_path / "cache")


# ---------------------------------------------------------------------------------------------------------------
# 2. ResumableSampler
# ---------------------------------------------------------------------------------------------------------------

def test_sampler_order_depends_only_on_seed_and_epoch():
    a, b = ResumableSampler(50, seed=7), ResumableSampler(50, seed=7)
    assert list(a) == list(b) and sorted(a) == list(range(50)) and len(a) == 50
    first = list(a)
    a.set_epoch(1)
    b.set_epoch(1)
    assert list(a) == list(b) != first
    a.set_epoch(0)
    assert list(a) == first  # going back to an epoch gives it again
    assert list(ResumableSampler(50, seed=8)) != first
    assert list(iter(a)) == list(iter(a))  # iterating twice does not advance anything


@pytest.mark.parametrize("num_samples", [30, 31, 32])
@pytest.mark.parametrize("world_size", [2, 3])
def test_sampler_ranks_share_disjointly(world_size, num_samples):
    shares = [list(ResumableSampler(num_samples, rank=rank, world_size=world_size, seed=3))
              for rank in range(world_size)]
    assert {len(share) for share in shares} == {num_samples // world_size}
    assert all(len(ResumableSampler(num_samples, rank=r, world_size=world_size)) == num_samples // world_size
               for r in range(world_size))
    union = set().union(*shares)
    assert len(union) == sum(len(share) for share in shares)  # disjoint
    assert union <= set(range(num_samples)) and num_samples - len(union) == num_samples % world_size
    assert num_samples - len(union) <= world_size - 1

    ordered = [list(ResumableSampler(num_samples, rank=rank, world_size=world_size, shuffle=False))
               for rank in range(world_size)]
    usable = num_samples // world_size * world_size
    assert ordered == [list(range(rank, usable, world_size)) for rank in range(world_size)]

    with pytest.raises(InputError, match="cannot be shared"):
        ResumableSampler(world_size - 1, world_size=world_size)


@pytest.mark.parametrize("rank,world_size", [(0, 1), (1, 2)])
def test_sampler_set_epoch_start_and_state_dict_continue_exactly(rank, world_size):
    sampler = ResumableSampler(41, rank=rank, world_size=world_size, seed=5)
    sampler.set_epoch(3)
    full = list(sampler)
    for start in (0, 1, 7, len(full) - 1, len(full)):
        sampler.set_epoch(3, start=start)
        assert list(sampler) == full[start:] and len(sampler) == len(full) - start

    sampler.set_epoch(3)
    state = sampler.state_dict(consumed=6)
    assert state == {"epoch": 3, "consumed": 6, "num_samples": 41, "world_size": world_size, "seed": 5}
    fresh = ResumableSampler(41, rank=rank, world_size=world_size, seed=5)
    fresh.load_state_dict(json.loads(json.dumps(state)))  # survives a round trip through a checkpoint file
    assert list(fresh) == full[6:]
    # Resuming a resumed sampler: `consumed` counts from the start of the epoch.
    again = ResumableSampler(41, rank=rank, world_size=world_size, seed=5)
    again.load_state_dict(fresh.state_dict(consumed=4))
    assert list(again) == full[10:]


class _Numbered(Dataset):
    def __len__(self):
        return 30

    def __getitem__(self, index):
        return {"x": torch.tensor([index, index * index]), "y": torch.tensor(float(index) / 7)}


@pytest.mark.parametrize("rank,world_size", [(0, 1), (1, 2)])
def test_dataloader_resumed_mid_epoch_yields_the_remaining_batches(rank, world_size):
    dataset = _Numbered()

    def loader(sampler):
        return DataLoader(dataset, batch_size=4, sampler=sampler)

    sampler = ResumableSampler(len(dataset), rank=rank, world_size=world_size, seed=11)
    sampler.set_epoch(2)
    uninterrupted = list(loader(sampler))
    assert len(uninterrupted) == -(-len(sampler) // 4)

    interrupted = ResumableSampler(len(dataset), rank=rank, world_size=world_size, seed=11)
    interrupted.set_epoch(2)
    taken = 0
    for batch_index, batch in enumerate(loader(interrupted)):
        assert torch.equal(batch["x"], uninterrupted[batch_index]["x"])
        taken += len(batch["x"])
        if batch_index == 1:
            break
    state = interrupted.state_dict(consumed=taken)

    resumed = ResumableSampler(len(dataset), rank=rank, world_size=world_size, seed=11)
    resumed.load_state_dict(state)
    remaining = list(loader(resumed))
    assert len(remaining) == len(uninterrupted) - 2
    for got, want in zip(remaining, uninterrupted[2:], strict=True):
        assert torch.equal(got["x"], want["x"]) and torch.equal(got["y"], want["y"])


@pytest.mark.parametrize("key,value", [("num_samples", 31), ("world_size", 2), ("seed", 1)])
def test_sampler_load_state_dict_rejects_a_different_run(key, value):
    state = ResumableSampler(30, seed=0).state_dict(consumed=3)
    state[key] = value
    sampler = ResumableSampler(30, seed=0)
    with pytest.raises(InputError, match=rf"{key}={value}"):
        sampler.load_state_dict(state)
    assert (sampler.epoch, sampler.start) == (0, 0)


@pytest.mark.parametrize("world_size", [1, 2])
def test_sampler_length_grouping(world_size):
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 500, (64,), generator=generator).tolist()
    group_size = 8
    plain = ResumableSampler(64, seed=4)  # same permutation, no grouping
    plain.set_epoch(1)
    plain_order = plain.epoch_indices()
    shares = []
    for rank in range(world_size):
        sampler = ResumableSampler(64, rank=rank, world_size=world_size, seed=4, lengths=lengths,
                                   group_size=group_size)
        twin = ResumableSampler(64, rank=rank, world_size=world_size, seed=4, lengths=lengths, group_size=group_size)
        sampler.set_epoch(1)
        twin.set_epoch(1)
        share = list(sampler)
        assert share == list(twin)  # deterministic
        per_group = group_size // world_size
        for start in range(0, len(share), per_group):
            group = share[start:start + per_group]
            assert [lengths[i] for i in group] == sorted((lengths[i] for i in group), reverse=True)
            # grouping only reorders within the group of the plain permutation
            global_group = plain_order[start * world_size:(start + per_group) * world_size]
            assert set(group) <= set(global_group)
        shares.append(share)
    assert sorted(sum(shares, [])) == list(range(64))
    # Still random across groups: another epoch gives another order.
    other = ResumableSampler(64, seed=4, lengths=lengths, group_size=group_size)
    other.set_epoch(2)
    if world_size == 1:
        assert list(other) != shares[0]


# ---------------------------------------------------------------------------------------------------------------
# 3. StreamingPretrainDataset
# ---------------------------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------------------------
# 4. SFTDataset / encode_conversation
# ---------------------------------------------------------------------------------------------------------------

TWO_TURNS = [{"role": "user", "content": "What is 2 + 3?"},
             {"role": "assistant", "content": "2 + 3 = 5.\nAnything else?"}]
MULTI_TURNS = [{"role": "system", "content": "You are a helpful assistant."},
               {"role": "user", "content": "你好，请介绍一下你自己。"},
               {"role": "assistant", "content": "我是一个小模型，可以回答简单的问题。"},
               {"role": "user", "content": "Write a Python function that adds two numbers."},
               {"role": "assistant", "content": "def add(a, b):\n    return a + b"}]


def labelled_runs(ids: list[int], labels: list[int]) -> list[tuple[int, int]]:
    """(start, stop) of each maximal run of labelled positions."""
    runs, start = [], None
    for position, label in enumerate(labels + [-100]):
        if label != -100 and start is None:
            start = position
        elif label == -100 and start is not None:
            runs.append((start, position))
            start = None
    return runs


def rendered(tokenizer, turns, **kwargs) -> list[int]:
    return tokenizer.apply_chat_template(turns, tokenize=True, **kwargs)["input_ids"]


def check_assistant_only_labels(tokenizer, turns, ids, labels, num_replies=None):
    assert len(ids) == len(labels)
    assert all(label == -100 or label == token for token, label in zip(ids, labels))
    replies = [turn["content"] for turn in turns if turn["role"] == "assistant"][:num_replies]
    runs = labelled_runs(ids, labels)
    assert [tokenizer.decode(ids[a:b], skip_special_tokens=False) for a, b in runs] == \
        [reply + "<|SEOS|>" for reply in replies]
    for start, stop in runs:
        assert ids[stop - 1] == EOS  # the end token is trained ...
        if stop < len(ids):  # ... the template's "\n" after it is not
            assert tokenizer.decode(ids[stop:stop + 1]) == "\n" and labels[stop] == -100
        # the prompt before the reply is not; the reply follows the role marker directly
        assert tokenizer.decode(ids[start - 1:start], skip_special_tokens=False) == "<|assistant|>"
    return runs


@pytest.mark.parametrize("turns", [TWO_TURNS, MULTI_TURNS], ids=["two_turns", "multi_turn"])
def test_encode_conversation_labels_exactly_the_assistant_replies(tokenizer, turns):
    ids, labels = encode_conversation(tokenizer, turns, max_seq_len=1024)
    assert ids == rendered(tokenizer, turns) and ids[0] == BOS
    assert tokenizer.decode(ids, skip_special_tokens=False).startswith("<|SBOS|>")
    runs = check_assistant_only_labels(tokenizer, turns, ids, labels)
    assert len(runs) == sum(turn["role"] == "assistant" for turn in turns)
    assert sum(label != -100 for label in labels) == sum(b - a for a, b in runs)



def test_encode_conversation_labels_a_reply_starting_with_indentation(tokenizer):
    turns = [{"role": "user", "content": "Finish the function body."},
             {"role": "assistant", "content": "    return a + b"}]
    ids, labels = encode_conversation(tokenizer, turns, max_seq_len=1024)
    check_assistant_only_labels(tokenizer, turns, ids, labels)


def test_sft_conversation_opening_with_the_assistant(tmp_path, tokenizer):
    opening = [{"role": "assistant", "content": "Hello, how can I help?"}, {"role": "user", "content": "Thanks."},
               {"role": "assistant", "content": "You are welcome."}]
    path = write_lines(tmp_path / "sft.jsonl", [{"conversations": TWO_TURNS}, {"conversations": opening}])
    dataset = SFTDataset([str(path)], tokenizer, max_seq_len=1024)
    if len(dataset) == 2:  # trained on: labels are exactly the replies
        check_assistant_only_labels(tokenizer, opening, dataset[1]["input_ids"].tolist(), dataset[1]["labels"].tolist())
    else:  # or skipped as a bad record, with its location
        assert dataset.issues.total == 1 and f"{path}:2" in dataset.issues.summary()

def test_sft_dataset_messages_key_works_like_conversations(tmp_path, tokenizer):
    path = write_lines(tmp_path / "sft.jsonl", [{"conversations": MULTI_TURNS}, {"messages": MULTI_TURNS},
                                                {"messages": TWO_TURNS, "id": 3}])
    logged = []
    dataset = SFTDataset([str(path)], tokenizer, max_seq_len=1024, log=logged.append)
    assert len(dataset) == 3 and dataset.issues.total == 0 and logged == []
    assert torch.equal(dataset[0]["input_ids"], dataset[1]["input_ids"])
    assert torch.equal(dataset[0]["labels"], dataset[1]["labels"])
    ids, labels = encode_conversation(tokenizer, TWO_TURNS, 1024)
    assert dataset[2]["input_ids"].tolist() == ids and dataset[2]["labels"].tolist() == labels
    assert dataset[2]["input_ids"].dtype == dataset[2]["labels"].dtype == torch.long
    assert dataset.lengths == [len(dataset[i]["input_ids"]) for i in range(3)]


def test_sft_dataset_on_demo_data(tmp_path, tokenizer):
    lines = (DEMO / "sft_val.jsonl").read_text(encoding="utf-8").splitlines()[:8]
    path = write_lines(tmp_path / "demo.jsonl", lines)
    dataset = SFTDataset([str(path)], tokenizer, max_seq_len=4096)
    assert len(dataset) == 8 and dataset.issues.total == 0
    for line, index in zip(lines, range(8)):
        turns = json.loads(line).get("conversations") or json.loads(line)["messages"]
        sample = dataset[index]
        check_assistant_only_labels(tokenizer, turns, sample["input_ids"].tolist(), sample["labels"].tolist())


def test_encode_conversation_truncates_at_turn_boundaries(tokenizer, tmp_path):
    full = rendered(tokenizer, MULTI_TURNS)
    first_start = len(rendered(tokenizer, MULTI_TURNS[:2], add_generation_prompt=True))
    first_end = len(rendered(tokenizer, MULTI_TURNS[:3]))
    assert first_start < first_end < len(full)

    # Room for the first exchange but not the second: whole turns are kept, ending at the first reply.
    for max_seq_len in (first_end, first_end + 1, (first_end + len(full)) // 2, len(full) - 1):
        ids, labels = encode_conversation(tokenizer, MULTI_TURNS, max_seq_len)
        assert ids == full[:first_end] and ids[-2] == EOS
        assert tokenizer.decode(ids[-2:], skip_special_tokens=False) == "<|SEOS|>\n"
        check_assistant_only_labels(tokenizer, MULTI_TURNS, ids, labels, num_replies=1)
    assert encode_conversation(tokenizer, MULTI_TURNS, len(full))[0] == full

    # Not even the first reply fits: cut at max_seq_len, keeping the reply's beginning as labels.
    for max_seq_len in (first_start + 1, first_start + 4, first_end - 1):
        ids, labels = encode_conversation(tokenizer, MULTI_TURNS, max_seq_len)
        assert ids == full[:max_seq_len] and len(ids) == max_seq_len
        assert [i for i, label in enumerate(labels) if label != -100] == list(range(first_start, max_seq_len))
        assert labels[first_start:] == full[first_start:max_seq_len]

    # No assistant token fits: nothing to learn.
    assert encode_conversation(tokenizer, MULTI_TURNS, first_start) is None
    assert encode_conversation(tokenizer, MULTI_TURNS, 3) is None

    path = write_lines(tmp_path / "sft.jsonl", [{"conversations": TWO_TURNS}, {"conversations": MULTI_TURNS}])
    dataset = SFTDataset([str(path)], tokenizer, max_seq_len=first_start)
    assert len(dataset) == 1 and dataset.issues.counts == {"too_long": 1}
    assert dataset.issues.examples == {"too_long": [f"{path}:2"]}
    with pytest.raises(InputError, match=re.escape(f"{path}:2: no assistant token fits in max_seq_len={first_start}")):
        SFTDataset([str(path)], tokenizer, max_seq_len=first_start, strict=True)


# ---------------------------------------------------------------------------------------------------------------
# 5. Bad input
# ---------------------------------------------------------------------------------------------------------------

GOOD = {"conversations": TWO_TURNS}
SFT_LINES = [
    GOOD,                                                                                        # 1
    '{"conversations": [{"role": "user", "content": "hi"}',                                     # 2 malformed_json
    {"text": "pretraining text, not a conversation"},                                           # 3 missing_field
    {"conversations": [{"role": "robot", "content": "beep"}, TWO_TURNS[1]]},                   # 4 bad_role
    "",                                                                                          # 5 blank: ignored
    {"conversations": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]},  # 6 empty_text
    {"conversations": [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}]},  # 7 no_assistant
    {"messages": MULTI_TURNS},                                                                   # 8
    "not json at all",                                                                           # 9 malformed_json
    [1, 2],                                                                                      # 10 missing_field
    {"conversations": [{"role": "user"}, TWO_TURNS[1]]},                                       # 11 missing_field
    {"conversations": []},                                                                       # 12 missing_field
    {"conversations": [{"role": "user", "content": ""}, TWO_TURNS[1]]},                        # 13 empty_text
    GOOD,                                                                                        # 14
]


def test_sft_bad_lines_are_skipped_and_counted(tmp_path, tokenizer):
    path = write_lines(tmp_path / "sft.jsonl", SFT_LINES)
    logged = []
    dataset = SFTDataset([str(path)], tokenizer, max_seq_len=1024, log=logged.append)
    assert len(dataset) == 3
    assert dict(dataset.issues.counts) == {"malformed_json": 2, "missing_field": 4, "bad_role": 1, "empty_text": 2,
                                           "no_assistant": 1}
    assert dataset.issues.total == 10
    at = lambda *lines: [f"{path}:{line}" for line in lines]  # noqa: E731
    assert dataset.issues.examples == {"malformed_json": at(2, 9), "missing_field": at(3, 10, 11),  # first 3 only
                                       "bad_role": at(4), "empty_text": at(6, 13), "no_assistant": at(7)}
    summary = dataset.issues.summary()
    assert summary.startswith("skipped 10 bad records: ")
    for part in (f"malformed_json 2 (first: {path}:2, {path}:9)", f"bad_role 1 (first: {path}:4)",
                 f"missing_field 4 (first: {path}:3, {path}:10, {path}:11)", f"no_assistant 1 (first: {path}:7)",
                 f"empty_text 2 (first: {path}:6, {path}:13)"):
        assert part in summary
    assert logged == [summary]
    ids, _ = encode_conversation(tokenizer, MULTI_TURNS, 1024)
    assert dataset[1]["input_ids"].tolist() == ids
    assert DataIssues().summary() == "no bad records"


@pytest.mark.parametrize("first_bad,reason", [(2, "malformed JSON"), (4, "role 'robot' is not one of"),
                                              (6, "empty assistant turn"), (7, "no assistant turn"),
                                              (3, "no 'conversations' or 'messages' list")])
def test_sft_strict_raises_at_the_first_bad_line(tmp_path, tokenizer, first_bad, reason):
    lines = [line for number, line in enumerate(SFT_LINES, 1) if number == first_bad or number in (1, 5, 8, 9, 14)]
    path = write_lines(tmp_path / "sft.jsonl", lines)
    line_number = lines.index(SFT_LINES[first_bad - 1]) + 1
    with pytest.raises(InputError, match=re.escape(f"{path}:{line_number}: ") + ".*" + re.escape(reason)):
        SFTDataset([str(path)], tokenizer, max_seq_len=1024, strict=True)


def test_sft_strict_reports_first_of_several(tmp_path, tokenizer):
    path = write_lines(tmp_path / "sft.jsonl", SFT_LINES)
    with pytest.raises(InputError, match=re.escape(f"{path}:2: malformed JSON")) as error:
        SFTDataset([str(path)], tokenizer, max_seq_len=1024, strict=True)
    assert "data.strict=false" in str(error.value)


def test_sft_only_bad_lines_raise(tmp_path, tokenizer):
    path = write_lines(tmp_path / "bad.jsonl", [SFT_LINES[1], SFT_LINES[3], SFT_LINES[6]])
    with pytest.raises(InputError, match=r"no usable conversations in .*bad\.jsonl.*skipped 3 bad records"):
        SFTDataset([str(path)], tokenizer, max_seq_len=1024)
    with pytest.raises(InputError, match="data file not found"):
        SFTDataset([str(tmp_path / "missing.jsonl")], tokenizer, max_seq_len=1024)


PRETRAIN_LINES = [
    {"text": "a good document"},        # 1
    '{"text": "unterminated',           # 2 malformed_json
    {"title": "no text field"},         # 3 missing_text
    {"text": 5},                        # 4 missing_text
    {"text": "   "},                    # 5 empty_text
    "",                                 # 6 blank: ignored
    {"text": "another good one"},       # 7
    [1, 2],                             # 8 missing_text
    {"text": ""},                       # 9 empty_text
]


def test_pretrain_bad_lines_are_skipped_and_counted(tmp_path, tokenizer):
    path = write_lines(tmp_path / "train.jsonl", PRETRAIN_LINES)
    logged = []
    dataset = PretrainDataset([str(path)], tokenizer, 3, cache_dir=tmp_path / "cache", log=logged.append)
    meta = dataset.meta
    assert meta["skipped"] == {"malformed_json": 1, "missing_text": 3, "empty_text": 2}
    assert meta["skipped_examples"] == {"malformed_json": [f"{path}:2"], "missing_text": [f"{path}:3", f"{path}:4",
                                        f"{path}:8"], "empty_text": [f"{path}:5", f"{path}:9"]}
    assert meta["num_documents"] == 2
    stream = expected_stream(tokenizer, ["a good document", "another good one"])
    assert meta["num_tokens"] == len(stream) and unpack(dataset) == stream[:1 + len(dataset) * 3]
    assert len(logged) == 1 and logged[0].startswith("skipped 6 bad records")


def test_pretrain_strict_raises_at_the_first_bad_line(tmp_path, tokenizer):
    path = write_lines(tmp_path / "train.jsonl", PRETRAIN_LINES)
    with pytest.raises(InputError, match=re.escape(f"{path}:2: malformed JSON")):
        PretrainDataset([str(path)], tokenizer, 3, cache_dir=tmp_path / "cache", strict=True)
    path = write_lines(tmp_path / "train2.jsonl", [PRETRAIN_LINES[0], PRETRAIN_LINES[4], PRETRAIN_LINES[2]])
    with pytest.raises(InputError, match=re.escape(f"{path}:2: empty text")):
        PretrainDataset([str(path)], tokenizer, 3, cache_dir=tmp_path / "cache", strict=True)
    assert not list((tmp_path / "cache").iterdir())  # nothing half-written left behind



def test_pretrain_strict_raises_even_when_a_lenient_cache_exists(tmp_path, tokenizer):
    path = write_lines(tmp_path / "train.jsonl", PRETRAIN_LINES)
    PretrainDataset([str(path)], tokenizer, 3, cache_dir=tmp_path / "cache")
    with pytest.raises(InputError, match=re.escape(f"{path}:2: malformed JSON")):
        PretrainDataset([str(path)], tokenizer, 3, cache_dir=tmp_path / "cache", strict=True)

def test_pretrain_only_bad_lines_raise(tmp_path, tokenizer):
    path = write_lines(tmp_path / "bad.jsonl", PRETRAIN_LINES[1:6])
    with pytest.raises(InputError, match=r"no usable documents in .*bad\.jsonl.*skipped 4 bad records"):
        PretrainDataset([str(path)], tokenizer, 3, cache_dir=tmp_path / "cache")
    assert not list((tmp_path / "cache").iterdir())


# ---------------------------------------------------------------------------------------------------------------
# 6. PadCollator
# ---------------------------------------------------------------------------------------------------------------

def test_pad_collator_pads_to_the_longest_in_the_batch():
    samples = [{"input_ids": torch.tensor([5, 6, 7]), "labels": torch.tensor([-100, 6, 7])},
               {"input_ids": torch.tensor([8, 9, 10, 11, 12]), "labels": torch.tensor([-100, -100, 10, 11, 12])},
               {"input_ids": torch.tensor([13]), "labels": torch.tensor([13])}]
    batch = PadCollator(pad_token_id=PAD)(samples)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0, 0], [8, 9, 10, 11, 12], [13, 0, 0, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, -100], [-100, -100, 10, 11, 12],
                                        [13, -100, -100, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert all(t.dtype == torch.long for t in batch.values())
    assert PadCollator(pad_token_id=99)(samples[:1])["input_ids"].tolist() == [[5, 6, 7]]


def test_collated_sft_batch_gives_each_row_its_own_logits(tmp_path, tokenizer):
    short = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    conversations = [TWO_TURNS, MULTI_TURNS, short]
    path = write_lines(tmp_path / "sft.jsonl", [{"conversations": turns} for turns in conversations])
    dataset = SFTDataset([str(path)], tokenizer, max_seq_len=512)
    samples = [dataset[i] for i in range(len(dataset))]
    lengths = [len(sample["input_ids"]) for sample in samples]
    assert len(set(lengths)) == 3
    batch = PadCollator(tokenizer.pad_token_id)(samples)
    assert batch["input_ids"].shape == (3, max(lengths)) and max(lengths) < 512  # the batch's longest, not max_seq_len
    for row, length in enumerate(lengths):
        assert batch["attention_mask"][row].tolist() == [1] * length + [0] * (max(lengths) - length)
        assert (batch["input_ids"][row, length:] == PAD).all() and (batch["labels"][row, length:] == -100).all()
        assert torch.equal(batch["input_ids"][row, :length], samples[row]["input_ids"])
        assert torch.equal(batch["labels"][row, :length], samples[row]["labels"])

    torch.manual_seed(0)
    model = ByteModel(tiny_config(vocab_size=6400, max_position_embeddings=128)).eval()
    with torch.no_grad():
        batched = model(**batch)
        total = 0.0
        for row, sample in enumerate(samples):
            alone = model(input_ids=sample["input_ids"][None], labels=sample["labels"][None], num_items_in_batch=1)
            length = lengths[row]
            # the positions whose logits the loss uses
            trained = (shifted_labels(sample["labels"]) != -100).nonzero().flatten()
            assert len(trained) > 0
            torch.testing.assert_close(batched.logits[row, trained], alone.logits[0, trained], atol=ATOL, rtol=0)
            torch.testing.assert_close(batched.logits[row, :length], alone.logits[0], atol=ATOL, rtol=0)
            total += alone.loss.item()
    num_labels = sum(int((shifted_labels(s["labels"]) != -100).sum()) for s in samples)
    assert batched.loss.item() == pytest.approx(total / num_labels, rel=1e-5)


def shifted_labels(labels: torch.Tensor) -> torch.Tensor:
    """Targets per position: the label of the next token (-100 at the end)."""
    return torch.cat([labels[1:], torch.tensor([-100])])
