"""utils/data.py PretrainDataset and build_token_cache: the packed pretraining token cache and its windows."""

import copy
import json
from itertools import islice

import numpy as np
import pytest
import torch

import utils.data as data_module
from helpers import BOS, DEMO, EOS, PAD, expected_stream, unpack, write_lines
from utils.data import PretrainDataset, build_token_cache
from utils.errors import InputError


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

