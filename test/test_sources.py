"""utils/sources.py: training data from Parquet shards (pyarrow and pandas files), SQLite tables and queries, folders
and glob patterns, read exactly as the same records in JSONL by every dataset; data.text_field; streaming shards and
resume positions; cache identity; bad input named by file, row group or rowid; scripts/jsonl_to_sqlite.py; and, as
real processes, model_pretrain.py on these sources."""

import hashlib
import json
import os
import random
import re
import runpy
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from itertools import islice
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torch.utils.data import DataLoader

import model_pretrain
import utils.data as data_module
import utils.sources as sources_module
from helpers import DEMO, ROOT, cli_arguments, expected_stream, script_environment, write_lines
from scripts.jsonl_to_sqlite import write_table
from test_data_streaming import STREAM_SEQ_LEN, STREAM_TEXTS, shard_windows, window_of
from tokenizer_pretrain import read_texts
from training import make_config
from utils.data import (DataIssues, PreferenceDataset, PretrainDataset, PromptDataset, SFTDataset,
                        StreamingPretrainDataset, build_token_cache, iter_pretrain_documents, read_records)
from utils.errors import InputError
from utils.sources import ParquetSource, data_sources


def demo_records(name: str, count: int) -> list[dict]:
    with open(DEMO / name, encoding="utf-8") as handle:
        return [json.loads(line) for line in islice(handle, count)]


def write_parquet(path: Path, records: list[dict], row_group_size: int | None = None, **options) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(records), path, row_group_size=row_group_size, **options)
    return path


def write_sqlite(path: Path, table: str, records: list[dict]) -> Path:
    """A table written by hand with sqlite3: one column per field, lists and objects as JSON text."""
    columns = list(dict.fromkeys(name for record in records for name in record))
    rows = [[json.dumps(value) if isinstance(value, (list, dict)) else value
             for value in (record.get(name) for name in columns)] for record in records]
    with closing(sqlite3.connect(path)) as connection, connection:
        connection.execute(f"CREATE TABLE {table} ({', '.join(columns)})")
        connection.executemany(f"INSERT INTO {table} VALUES ({', '.join('?' * len(columns))})", rows)
    return path


def table_spec(database: Path, table: str) -> str:
    return f"sqlite:///{database}?table={table}"  # an absolute path: four slashes


def query_spec(database: Path, query: str) -> str:
    return f"sqlite:///{database}?query={quote(query)}"


def rows_in(database: Path, table: str = "docs") -> list[tuple]:
    with closing(sqlite3.connect(database)) as connection:
        return connection.execute(f"SELECT rowid, * FROM {table} ORDER BY rowid").fetchall()


def cache_tokens(tokens_path: Path) -> list[int]:
    return np.fromfile(tokens_path, dtype=np.uint16).tolist()


def windows(dataset: PretrainDataset) -> tuple[torch.Tensor, torch.Tensor]:
    samples = [dataset[index] for index in range(len(dataset))]
    return (torch.stack([sample["input_ids"] for sample in samples]),
            torch.stack([sample["shift_labels"] for sample in samples]))


def no_tokenizing(*args, **kwargs):
    raise AssertionError("the cache should have been reused")


# --------------------------------------------------------------------------------- 1. one corpus, every kind of source

# 298 demo documents and two that look like JSON: the text column is never decoded, whatever the source.
TEXTS = [record["text"] for record in demo_records("pretrain_train.jsonl", 298)]
TEXTS[100:100] = ['["not", "a", "list"]', '{"not": "an object"}']
SHARD_SIZE, ROW_GROUP = 100, 30  # 3 shards of 4 row groups (30, 30, 30, 10)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    """The same documents as every kind of source: name -> data.train_files entries (plus `root`)."""
    root = tmp_path_factory.mktemp("corpus")
    records = [{"id": index, "text": text} for index, text in enumerate(TEXTS)]
    jsonl = write_lines(root / "corpus.jsonl", records)
    for shard in range(3):
        part = records[shard * SHARD_SIZE:(shard + 1) * SHARD_SIZE]
        write_parquet(root / "shards" / f"part-{shard:05d}.parquet", part, row_group_size=ROW_GROUP)
        # A folder: nested, with files that are not data beside the shards.
        write_parquet(root / "folder" / f"year-{2020 + shard}" / "part-0.parquet", part, row_group_size=ROW_GROUP)
    assert [pq.ParquetFile(path).num_row_groups for path in sorted((root / "shards").iterdir())] == [4, 4, 4]
    (root / "folder" / "README.md").write_text("not data\n")
    (root / "folder" / "year-2020" / "_SUCCESS").write_text("")
    # pandas keeps the frame's index as a column of its own (here a RangeIndex written out with index=True).
    frame = pd.DataFrame(records)
    frame.to_parquet(root / "pandas.parquet", index=True)
    assert "__index_level_0__" in pq.read_schema(root / "pandas.parquet").names
    database = write_sqlite(root / "corpus.db", "docs", records)
    shuffled = [{"position": index, "text": text} for index, text in enumerate(TEXTS)]
    random.Random(0).shuffle(shuffled)  # stored out of order: only the query's ORDER BY restores it
    write_sqlite(database, "shuffled", shuffled)
    return {
        "root": root,
        "jsonl": [str(jsonl)],
        "parquet_glob": [str(root / "shards" / "*.parquet")],
        "parquet_recursive_glob": [str(root / "folder" / "**" / "*.parquet")],
        "parquet_folder": [str(root / "folder")],
        "parquet_files_and_glob": [str(root / "shards" / "part-00000.parquet"),
                                   str(root / "shards" / "part-0000[12].parquet")],
        "pandas": [str(root / "pandas.parquet")],
        "sqlite_table": [table_spec(database, "docs")],
        "sqlite_relative_table": ["sqlite:///corpus.db?table=docs"],
        "sqlite_query": [query_spec(database, "SELECT text FROM shuffled ORDER BY position;")],
    }


@pytest.fixture(scope="module")
def reference(corpus, tokenizer, tmp_path_factory):
    """The JSONL corpus's token cache (bytes) and windows."""
    cache = tmp_path_factory.mktemp("reference-cache")
    tokens_path, meta = build_token_cache(corpus["jsonl"], tokenizer, cache)
    assert cache_tokens(tokens_path) == expected_stream(tokenizer, TEXTS)
    assert meta["num_documents"] == len(TEXTS) and meta["skipped"] == {}
    return tokens_path.read_bytes(), windows(PretrainDataset(corpus["jsonl"], tokenizer, 32, cache_dir=cache))


SOURCE_KINDS = {"parquet_glob": ["parquet"] * 3, "parquet_recursive_glob": ["parquet"] * 3,
                "parquet_folder": ["parquet"] * 3, "parquet_files_and_glob": ["parquet"] * 3, "pandas": ["parquet"],
                "sqlite_table": ["sqlite"], "sqlite_relative_table": ["sqlite"], "sqlite_query": ["sqlite"]}


@pytest.mark.parametrize("kind", list(SOURCE_KINDS))
def test_every_source_gives_the_jsonl_token_cache_and_windows(corpus, reference, tokenizer, tmp_path, monkeypatch,
                                                             kind):
    if kind == "sqlite_relative_table":
        monkeypatch.chdir(corpus["root"])  # sqlite:///corpus.db is relative to the working directory
    tokens_path, meta = build_token_cache(corpus[kind], tokenizer, tmp_path)
    assert tokens_path.read_bytes() == reference[0]
    assert meta["num_documents"] == len(TEXTS) and meta["skipped"] == {}
    assert [fact["kind"] for fact in meta["files"]] == SOURCE_KINDS[kind]
    input_ids, shift_labels = windows(PretrainDataset(corpus[kind], tokenizer, 32, cache_dir=tmp_path))
    assert torch.equal(input_ids, reference[1][0]) and torch.equal(shift_labels, reference[1][1])


def test_folders_and_patterns_expand_to_their_data_files_sorted(corpus):
    root = corpus["root"]
    folder = [str(source) for source in data_sources(corpus["parquet_folder"])]
    assert folder == [str(root / "folder" / f"year-{year}" / "part-0.parquet") for year in (2020, 2021, 2022)]
    assert [str(source) for source in data_sources(corpus["parquet_glob"])] == \
        [str(root / "shards" / f"part-{shard:05d}.parquet") for shard in range(3)]
    # Entries keep their order; a folder's .jsonl files count as data too.
    mixed = data_sources([corpus["sqlite_table"][0], str(root)])
    assert [type(source).__name__ for source in mixed][:3] == ["SQLiteSource", "JsonlSource", "ParquetSource"]
    assert str(mixed[1]) == str(root / "corpus.jsonl")
    # pandas' stored index is no field of a record
    assert [record for _, record in islice(read_records(corpus["pandas"]), 2)] == \
        [{"id": 0, "text": TEXTS[0]}, {"id": 1, "text": TEXTS[1]}]


# --------------------------------------------------------------------------- 2. SFT, preference and prompt datasets

SFT_RECORDS = demo_records("sft_val.jsonl", 24)
PREFERENCE_MESSAGES = demo_records("rlhf_val.jsonl", 24)
PREFERENCE_STRINGS = [{"prompt": record["prompt"][-1]["content"], "chosen": record["chosen"][0]["content"],
                       "rejected": record["rejected"][0]["content"]} for record in PREFERENCE_MESSAGES]
# The columns besides the prompt are what the reward functions receive: strings, numbers and lists.
PROMPT_MESSAGES = [{**record, "level": index % 3, "tags": ["arithmetic", f"group-{index % 2}"]}
                   for index, record in enumerate(demo_records("arithmetic_val.jsonl", 24))]
PROMPT_STRINGS = [{"prompt": record["prompt"][0]["content"], "answer": record["answer"]}
                  for record in demo_records("arithmetic_val.jsonl", 24)]


def prompt_content(dataset: PromptDataset):
    return dataset.prompts, dataset.ids, dataset.column_names, [dataset[i]["columns"] for i in range(len(dataset))]


DATASETS = {
    "sft": (SFT_RECORDS, lambda files, tokenizer: SFTDataset(files, tokenizer, 1024),
            lambda dataset: dataset.samples),
    "preference_strings": (PREFERENCE_STRINGS, lambda files, tokenizer: PreferenceDataset(files, tokenizer, 1024),
                           lambda dataset: dataset.pairs),
    "preference_messages": (PREFERENCE_MESSAGES, lambda files, tokenizer: PreferenceDataset(files, tokenizer, 1024),
                            lambda dataset: dataset.pairs),
    "prompt_messages": (PROMPT_MESSAGES, lambda files, tokenizer: PromptDataset(files, tokenizer, 1024, 16),
                        prompt_content),
    "prompt_strings": (PROMPT_STRINGS, lambda files, tokenizer: PromptDataset(files, tokenizer, 1024, 16),
                       prompt_content),
}


def written_as(form: str, records: list[dict], folder: Path) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    jsonl = write_lines(folder / "records.jsonl", records)
    if form == "jsonl":
        return [str(jsonl)]
    if form == "parquet":
        return [str(write_parquet(folder / "records.parquet", records, row_group_size=7))]
    if form == "pandas":
        pd.DataFrame(records).to_parquet(folder / "records.parquet", index=True)
        return [str(folder / "records.parquet")]
    if form == "sqlite_write_table":
        assert write_table([str(jsonl)], folder / "records.db", "records") == len(records)
        return [table_spec(folder / "records.db", "records")]
    database = write_sqlite(folder / "records.db", "records", records)
    if form == "sqlite_by_hand":
        return [table_spec(database, "records")]
    assert form == "sqlite_query"
    return [query_spec(database, "SELECT * FROM records ORDER BY rowid")]


@pytest.fixture(scope="module")
def jsonl_datasets(tokenizer, tmp_path_factory) -> dict:
    built = {}
    for name, (records, build, content) in DATASETS.items():
        dataset = build(written_as("jsonl", records, tmp_path_factory.mktemp(name)), tokenizer)
        assert len(dataset) == len(records) and dataset.issues.total == 0
        built[name] = content(dataset)
    return built


@pytest.mark.parametrize("form", ["parquet", "pandas", "sqlite_write_table", "sqlite_by_hand", "sqlite_query"])
@pytest.mark.parametrize("name", list(DATASETS))
def test_datasets_from_parquet_and_sqlite_equal_the_jsonl_ones(jsonl_datasets, tokenizer, tmp_path, name, form):
    records, build, content = DATASETS[name]
    dataset = build(written_as(form, records, tmp_path), tokenizer)
    assert dataset.issues.total == 0
    assert content(dataset) == jsonl_datasets[name]


def test_prompt_columns_reach_the_reward_functions_from_sqlite(tokenizer, tmp_path):
    dataset = PromptDataset(written_as("sqlite_by_hand", PROMPT_MESSAGES, tmp_path), tokenizer, 1024, 16)
    assert dataset.column_names == ["answer", "level", "tags"]
    assert dataset[1]["columns"] == {"answer": PROMPT_MESSAGES[1]["answer"], "level": 1,
                                     "tags": ["arithmetic", "group-1"]}


# ------------------------------------------------------------------------------------------------- 3. data.text_field

def test_text_field(tmp_path, tokenizer):
    texts = TEXTS[:60]
    reference_path, _ = build_token_cache([str(write_lines(tmp_path / "text.jsonl", [{"text": t} for t in texts]))],
                                          tokenizer, tmp_path / "cache")
    reference = cache_tokens(reference_path)
    content_records = [{"id": i, "content": text, "title": f"document {i}"} for i, text in enumerate(texts)]
    content_parquet = write_parquet(tmp_path / "content.parquet", content_records, row_group_size=16)
    content_jsonl = write_lines(tmp_path / "content.jsonl", content_records)
    for path in (content_parquet, content_jsonl):
        tokens_path, meta = build_token_cache([str(path)], tokenizer, tmp_path / "cache", text_field="content")
        assert cache_tokens(tokens_path) == reference and meta["text_field"] == "content"

    # The default field: a Parquet file without it is refused, naming the file and the column.
    with pytest.raises(InputError, match=re.escape(f"{content_parquet}: no column 'text' (its columns: id, content, "
                                                   f"title)")):
        build_token_cache([str(content_parquet)], tokenizer, tmp_path / "cache")
    with pytest.raises(InputError, match=r"no usable documents .* missing_text 60"):
        build_token_cache([str(content_jsonl)], tokenizer, tmp_path / "cache")

    # One file with both columns: the field is part of the cache key.
    other = [f"another text, number {i}" for i in range(len(texts))]
    both = write_parquet(tmp_path / "both.parquet", [{"text": o, "content": t} for o, t in zip(other, texts)])
    by_text, _ = build_token_cache([str(both)], tokenizer, tmp_path / "cache")
    by_content, _ = build_token_cache([str(both)], tokenizer, tmp_path / "cache", text_field="content")
    assert by_text != by_content
    assert cache_tokens(by_text) == expected_stream(tokenizer, other) and cache_tokens(by_content) == reference

    # The pretraining script's datasets take data.text_field from the configuration.
    for streaming in (False, True):
        config = make_config(tmp_path / "out", tmp_path / "cache", data={
            "train_files": [str(content_parquet)], "val_files": [str(content_jsonl)], "text_field": "content",
            "streaming": streaming, "seq_len": 32})
        train, val = model_pretrain.pretrain_datasets(tokenizer, config, None)
        assert cache_tokens(Path(val.tokens.filename)) == reference and val.meta["text_field"] == "content"
        if streaming:
            streamed = [window_of(sample) for sample in train]
            assert streamed == [reference[i:i + 33] for i in range(0, len(reference) - 32, 32)]
        else:
            assert train.meta["text_field"] == "content" and train.tokens.tolist() == reference


# ------------------------------------------------------------------------------------------ 4. streaming and resume

@pytest.fixture
def stream_sources(tmp_path) -> dict[str, list[str]]:
    """STREAM_TEXTS as 3 Parquet shards (14, 13, 13 documents, row groups of 4) and as an SQLite table."""
    records = [{"text": text} for text in STREAM_TEXTS]
    for shard, (start, stop) in enumerate([(0, 14), (14, 27), (27, 40)]):
        write_parquet(tmp_path / "shards" / f"part-{shard:05d}.parquet", records[start:stop], row_group_size=4)
    database = write_sqlite(tmp_path / "stream.db", "docs", records)
    return {"parquet": [str(tmp_path / "shards" / "*.parquet")], "sqlite": [table_spec(database, "docs")]}


@pytest.mark.parametrize("kind", ["parquet", "sqlite"])
def test_streaming_shards_over_ranks_and_workers(stream_sources, tokenizer, monkeypatch, kind):
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    by_shard: dict[int, list[dict]] = {}
    for rank in range(2):
        dataset = StreamingPretrainDataset(stream_sources[kind], tokenizer, STREAM_SEQ_LEN, rank=rank, world_size=2)
        for sample in DataLoader(dataset, batch_size=None, num_workers=2):
            by_shard.setdefault(sample["shard"], []).append(sample)
    assert sorted(by_shard) == [0, 1, 2, 3]
    documents_seen = {}
    for shard, samples in by_shard.items():
        assert [window_of(sample) for sample in samples] == shard_windows(tokenizer, shard, 4)
        for document in {sample["document"] for sample in samples}:
            assert document % 4 == shard and document not in documents_seen
            documents_seen[document] = shard
    assert sorted(documents_seen) == list(range(40))  # every document's windows, in exactly one shard


def test_streaming_resumes_in_a_later_shard_and_row_group(stream_sources, tokenizer, monkeypatch):
    def stream(positions=None):
        return list(StreamingPretrainDataset(stream_sources["parquet"], tokenizer, STREAM_SEQ_LEN,
                                             positions=positions))

    full = stream()
    assert [window_of(sample) for sample in full] == shard_windows(tokenizer, 0, 1)
    # Row groups read, per shard: spied on the pyarrow file each ParquetSource opens.
    read: list[tuple[str, int]] = []
    original_file = ParquetSource._file

    def spied_file(source):
        parquet = original_file(source)
        iter_batches = parquet.iter_batches

        def spied_iter_batches(*args, row_groups, **kwargs):
            read.extend((Path(source.path).stem, group) for group in row_groups)
            return iter_batches(*args, row_groups=row_groups, **kwargs)

        parquet.iter_batches = spied_iter_batches
        return parquet

    monkeypatch.setattr(ParquetSource, "_file", spied_file)
    # positions inside document 19 (shard 1, row group 1) and 33 (shard 2, row group 1), mid-document
    for document, shard, first_row in ((19, 1, 14), (33, 2, 27)):
        k = next(k for k, sample in enumerate(full) if sample["document"] == document and sample["offset"] > 0)
        read.clear()
        resumed = stream({0: (full[k]["document"], full[k]["offset"])})
        assert len(resumed) == len(full) - k - 1
        for got, want in zip(resumed, full[k + 1:], strict=True):
            assert torch.equal(got["input_ids"], want["input_ids"])
            assert torch.equal(got["shift_labels"], want["shift_labels"])
            assert (got["document"], got["offset"]) == (want["document"], want["offset"])
        # Earlier shards and the shard's earlier row groups were skipped unread.
        later = [(f"part-{other:05d}", group) for other in range(shard + 1, 3) for group in range(4)]
        assert read == [(f"part-{shard:05d}", group) for group in range((document - first_row) // 4, 4)] + later


@pytest.fixture
def mixed_sources(tmp_path) -> tuple[list[str], list[str | None]]:
    """JSONL, Parquet, an SQLite table, an SQLite query (ending in ";") and plain text, with bad records among
    them: (entries, the text of every record in order, None for a bad one)."""
    words = [f"document {i} of the mixed corpus" for i in range(40)]
    documents: list[str | None] = []
    jsonl = write_lines(tmp_path / "a.jsonl", [{"text": words[0]}, "{broken", {"text": words[1]}, {"text": ""}, "",
                                               {"title": words[2]}, {"text": words[3]}])
    documents += [words[0], None, words[1], None, None, words[3]]
    parquet_texts = [words[4], None, words[5], words[6], "", words[7], "  ", words[8], words[9]]
    parquet = write_parquet(tmp_path / "b.parquet", [{"text": text} for text in parquet_texts], row_group_size=2)
    documents += [text if text and text.strip() else None for text in parquet_texts]
    table_texts = [words[10], "", words[11], words[12], words[13]]
    database = write_sqlite(tmp_path / "c.db", "docs", [{"text": text} for text in table_texts])
    documents += [text or None for text in table_texts]
    query_texts = [words[14], None, words[15], words[16]]
    ordered = [{"position": index, "text": text} for index, text in enumerate(query_texts)]
    write_sqlite(database, "ordered", ordered[::-1])
    documents += query_texts
    plain = tmp_path / "d.txt"
    plain.write_text(f"{words[17]}\n\n{words[18]}\n", encoding="utf-8")
    documents += [words[17], words[18]]
    entries = [str(jsonl), str(parquet), table_spec(database, "docs"),
               query_spec(database, "SELECT text FROM ordered ORDER BY position;"), str(plain)]
    return entries, documents


@pytest.mark.parametrize("read_batch", [1024, 2])
def test_documents_from_any_start_are_the_tail_of_the_full_run(mixed_sources, monkeypatch, read_batch):
    monkeypatch.setattr(sources_module, "READ_BATCH", read_batch)
    entries, documents = mixed_sources
    issues = DataIssues()
    full = list(iter_pretrain_documents(data_sources(entries), issues))
    assert full == [(index, text) for index, text in enumerate(documents) if text is not None]
    assert dict(issues.counts) == {"malformed_json": 1, "missing_text": 3, "empty_text": 4}
    for start in range(len(documents) + 2):
        assert list(iter_pretrain_documents(data_sources(entries), DataIssues(), start=start)) == \
            [(index, text) for index, text in full if index >= start], start


# --------------------------------------------------------------------------------------------------- 5. cache identity

def test_rewritten_parquet_shard_rebuilds_the_cache_and_unchanged_shards_reuse_it(tmp_path, tokenizer, monkeypatch):
    shards = [write_parquet(tmp_path / "shards" / f"part-{n}.parquet",
                            [{"text": text} for text in STREAM_TEXTS[n * 10:(n + 1) * 10]], row_group_size=4)
              for n in range(3)]
    pattern, cache = str(tmp_path / "shards" / "*.parquet"), tmp_path / "cache"
    first, meta = build_token_cache([pattern], tokenizer, cache)
    assert cache_tokens(first) == expected_stream(tokenizer, STREAM_TEXTS[:30])
    with monkeypatch.context() as patch:
        patch.setattr(data_module, "encode_documents", no_tokenizing)
        assert build_token_cache([pattern], tokenizer, cache) == (first, meta)
        # the same files named by their folder are the same sources: the same cache
        assert build_token_cache([str(tmp_path / "shards")], tokenizer, cache) == (first, meta)

    rewritten = STREAM_TEXTS[10:20][::-1] + ["a document the first version of this shard did not have"]
    write_parquet(shards[1], [{"text": text} for text in rewritten], row_group_size=4)
    second, _ = build_token_cache([pattern], tokenizer, cache)
    assert second != first and first.is_file()
    assert cache_tokens(second) == expected_stream(tokenizer, STREAM_TEXTS[:10] + rewritten + STREAM_TEXTS[20:30])
    with monkeypatch.context() as patch:
        patch.setattr(data_module, "encode_documents", no_tokenizing)
        assert build_token_cache([pattern], tokenizer, cache)[0] == second


@pytest.mark.parametrize("journal_mode", ["delete", "wal"])
def test_inserted_sqlite_row_rebuilds_the_cache(tmp_path, tokenizer, monkeypatch, journal_mode):
    database, cache = tmp_path / "corpus.db", tmp_path / "cache"
    texts = STREAM_TEXTS[:12]
    writer = sqlite3.connect(database, isolation_level=None)  # stays open: a WAL holds the rows until it closes
    try:
        writer.execute(f"PRAGMA journal_mode = {journal_mode}")
        writer.execute("PRAGMA wal_autocheckpoint = 0")
        writer.execute("CREATE TABLE docs (text TEXT)")
        writer.executemany("INSERT INTO docs VALUES (?)", [(text,) for text in texts])
        # Backdated, so that the insert below changes the modification time whatever the clock's resolution.
        stat = database.stat()
        os.utime(database, ns=(stat.st_atime_ns, stat.st_mtime_ns - 10 ** 9))
        spec = table_spec(database, "docs")
        first, meta = build_token_cache([spec], tokenizer, cache)
        assert cache_tokens(first) == expected_stream(tokenizer, texts)
        with monkeypatch.context() as patch:
            patch.setattr(data_module, "encode_documents", no_tokenizing)
            assert build_token_cache([spec], tokenizer, cache) == (first, meta)

        before = database.stat()
        writer.execute("INSERT INTO docs VALUES (?)", ("one more row",))
        if journal_mode == "wal":  # only the write-ahead log changed
            assert (database.stat().st_size, database.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)
        second, _ = build_token_cache([spec], tokenizer, cache)
        assert second != first
        assert cache_tokens(second) == expected_stream(tokenizer, texts + ["one more row"])
        with monkeypatch.context() as patch:
            patch.setattr(data_module, "encode_documents", no_tokenizing)
            assert build_token_cache([spec], tokenizer, cache)[0] == second
    finally:
        writer.close()


# ------------------------------------------------------------------------------------------------------- 6. bad input

CORRUPT_TEXTS = [f"document number {i} " + "word " * (i % 7) for i in range(30)]


def corrupt_row_group(tmp_path: Path, compression: str, use_dictionary: bool) -> Path:
    """A Parquet file of three 10-row groups whose group 1 has 8 bytes overwritten in the middle of its text column
    chunk; the footer, at the end of the file, still parses."""
    path = tmp_path / f"corrupt-{compression}.parquet"
    pq.write_table(pa.table({"text": CORRUPT_TEXTS, "n": list(range(30))}), path, row_group_size=10,
                   compression=compression, use_dictionary=use_dictionary)
    chunk = pq.ParquetFile(path).metadata.row_group(1).column(0)
    middle = (chunk.dictionary_page_offset or chunk.data_page_offset) + chunk.total_compressed_size // 2
    data = bytearray(path.read_bytes())
    data[middle:middle + 8] = b"\xff" * 8
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("compression,use_dictionary", [("none", False), ("snappy", True)])
def test_corrupt_row_group_is_named(tmp_path, tokenizer, compression, use_dictionary):
    path = corrupt_row_group(tmp_path, compression, use_dictionary)
    source = data_sources([str(path)])[0]
    assert source.count() == 30  # the footer is intact
    rows = []
    with pytest.raises(InputError, match=re.escape(f"{path}: row group 1 is not readable (")) as error:
        for row, _, record in source.records(columns=["text"]):
            rows.append((row, record["text"]))
    assert rows == list(enumerate(CORRUPT_TEXTS[:10]))  # group 0 was read before
    assert "\n" not in str(error.value)
    with pytest.raises(InputError, match="row group 1 is not readable"):
        build_token_cache([str(path)], tokenizer, tmp_path / "cache")
    assert not list((tmp_path / "cache").glob("pretrain-*"))  # nothing half-written


def test_truncated_parquet_file_is_named(tmp_path, tokenizer):
    path = write_parquet(tmp_path / "cut.parquet", [{"text": text} for text in CORRUPT_TEXTS])
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(InputError, match=re.escape(f"{path}: not a readable Parquet file (")) as error:
        build_token_cache([str(path)], tokenizer, tmp_path / "cache")
    assert "\n" not in str(error.value)
    with pytest.raises(InputError, match="not a readable Parquet file"):
        list(read_records([str(path)]))


def sqlite_docs(tmp_path: Path) -> Path:
    return write_sqlite(tmp_path / "docs.db", "docs", [{"text": text} for text in STREAM_TEXTS[:5]])


def parquet_missing_column(tmp: Path) -> tuple[list[str], str]:
    # written by pandas with its index as a column, which is not one of the file's fields
    pd.DataFrame({"body": ["a", "b"]}, index=[5, 9]).to_parquet(tmp / "body.parquet")
    return [str(tmp / "body.parquet")], re.escape(f"{tmp / 'body.parquet'}: no column 'text' (its columns: body)")


def sqlite_missing_column(tmp: Path) -> tuple[list[str], str]:
    spec = table_spec(write_sqlite(tmp / "body.db", "docs", [{"body": "a"}]), "docs")
    return [spec], re.escape(f"{spec}: no column 'text' (its columns: body)")


def sqlite_query_missing_column(tmp: Path) -> tuple[list[str], str]:
    spec = query_spec(sqlite_docs(tmp), "SELECT text AS body FROM docs")
    return [spec], re.escape(f"{spec}: no column 'text' (its columns: body)")


def missing_table(tmp: Path) -> tuple[list[str], str]:
    spec = table_spec(sqlite_docs(tmp), "nope")
    return [spec], re.escape(f"{spec}: cannot read table 'nope': no such table: nope")


def query_syntax_error(tmp: Path) -> tuple[list[str], str]:
    spec = query_spec(sqlite_docs(tmp), "SELEC text FROM docs")
    return [spec], re.escape(f"{spec}: the query failed: ") + ".*syntax error"


def query_without_columns(tmp: Path) -> tuple[list[str], str]:
    spec = query_spec(sqlite_docs(tmp), "PRAGMA query_only = OFF")
    return [spec], re.escape(f"{spec}: the statement returns no columns (a query must be a SELECT)")


def missing_database(tmp: Path) -> tuple[list[str], str]:
    return [table_spec(tmp / "absent.db", "docs")], re.escape(f"data file not found: {tmp / 'absent.db'}")


def sqlite_options(options: str, message: str):
    def case(tmp: Path) -> tuple[list[str], str]:
        spec = f"sqlite:///{sqlite_docs(tmp)}{options}"
        return [spec], re.escape(f"{spec}: {message}")
    return case


def host_instead_of_path(tmp: Path) -> tuple[list[str], str]:
    return ["sqlite://docs.db?table=docs"], re.escape(
        "sqlite://docs.db?table=docs: write sqlite:///relative/path.db or sqlite:////absolute/path.db")


def glob_matching_nothing(tmp: Path) -> tuple[list[str], str]:
    write_parquet(tmp / "shards" / "part-0.parquet", [{"text": "a"}])
    pattern = str(tmp / "shards" / "*.jsonl")
    return [pattern], re.escape(f"no data files match {pattern}")


def folder_without_data_files(tmp: Path) -> tuple[list[str], str]:
    (tmp / "data" / "sub").mkdir(parents=True)
    (tmp / "data" / "notes.txt").write_text("not data")
    (tmp / "data" / "sub" / "table.csv").write_text("a,b\n")
    return [str(tmp / "data")], re.escape(f"{tmp / 'data'}: no .parquet or .jsonl files in this folder")


EXACTLY_ONE = "give exactly one of ?table=NAME or ?query=SELECT..."
BAD_SOURCES = {
    "parquet_missing_column": parquet_missing_column,
    "sqlite_missing_column": sqlite_missing_column,
    "sqlite_query_missing_column": sqlite_query_missing_column,
    "missing_table": missing_table,
    "query_syntax_error": query_syntax_error,
    "query_without_columns": query_without_columns,
    "missing_database": missing_database,
    "table_and_query": sqlite_options("?table=docs&query=SELECT%20text%20FROM%20docs", EXACTLY_ONE),
    "neither_table_nor_query": sqlite_options("", EXACTLY_ONE),
    "unknown_option": sqlite_options("?table=docs&limit=5", EXACTLY_ONE + " (unknown: limit)"),
    "empty_table_name": sqlite_options("?table=", "empty table name"),
    "empty_query": sqlite_options("?query=", "empty query"),
    "host_instead_of_path": host_instead_of_path,
    "glob_matching_nothing": glob_matching_nothing,
    "folder_without_data_files": folder_without_data_files,
}


@pytest.mark.parametrize("case", list(BAD_SOURCES))
def test_bad_source_is_named_in_one_line(tmp_path, tokenizer, case):
    entries, message = BAD_SOURCES[case](tmp_path)
    with pytest.raises(InputError, match=message) as error:
        build_token_cache(entries, tokenizer, tmp_path / "cache")
    assert "\n" not in str(error.value)
    if not case.endswith("missing_column"):  # records without a column asked for are read whole
        with pytest.raises(InputError, match=message):
            list(read_records(entries))


WRITING_QUERIES = ["DELETE FROM docs", "INSERT INTO docs VALUES ('written')", "UPDATE docs SET text = ''",
                   "DROP TABLE docs", "CREATE TABLE more (x)", "ATTACH DATABASE '{folder}/created.db' AS other",
                   "VACUUM INTO '{folder}/copy.db'"]


@pytest.mark.parametrize("query", WRITING_QUERIES)
def test_a_query_that_writes_fails_and_the_database_keeps_its_rows(tmp_path, tokenizer, query):
    folder = tmp_path / "data"
    folder.mkdir()
    database = sqlite_docs(folder)
    rows, files = rows_in(database), sorted(os.listdir(folder))
    spec = query_spec(database, query.format(folder=folder))
    with pytest.raises(InputError, match=re.escape(f"{spec}: the query failed: ") + ".*" +
                       re.escape("(the database is opened read-only: a query may only read)")):
        build_token_cache([spec], tokenizer, tmp_path / "cache")
    with pytest.raises(InputError, match="read-only"):
        list(read_records([spec]))
    assert rows_in(database) == rows and len(rows) == 5
    assert sorted(os.listdir(folder)) == files  # no file created either


def test_bad_records_in_parquet_and_sqlite_are_skipped_with_their_location(tmp_path, tokenizer):
    good = STREAM_TEXTS[:3]
    texts = [good[0], None, good[1], "", "   ", good[2]]
    parquet = write_parquet(tmp_path / "bad.parquet", [{"text": text} for text in texts], row_group_size=2)
    spec = table_spec(write_sqlite(tmp_path / "bad.db", "docs", [{"text": text} for text in texts]), "docs")
    for entry, location in ((str(parquet), lambda row: f"{parquet}: row group {row // 2}, row {row}"),
                            (spec, lambda row: f"{spec} rowid {row + 1}")):
        logged = []
        tokens_path, meta = build_token_cache([entry], tokenizer, tmp_path / "cache", log=logged.append)
        assert cache_tokens(tokens_path) == expected_stream(tokenizer, good)
        assert meta["skipped"] == {"missing_text": 1, "empty_text": 2}
        assert meta["skipped_examples"] == {"missing_text": [location(1)], "empty_text": [location(3), location(4)]}
        assert logged == [f"skipped 3 bad records: empty_text 2 (first: {location(3)}, {location(4)}); "
                          f"missing_text 1 (first: {location(1)})"]
        with pytest.raises(InputError, match=re.escape(f"{location(1)}: 'text' is not a string (set data.strict")):
            build_token_cache([entry], tokenizer, tmp_path / "strict-cache", strict=True)
        # Streaming skips them too, and counts them in the document indices.
        streamed = list(iter_pretrain_documents(data_sources([entry]), DataIssues()))
        assert streamed == [(0, good[0]), (2, good[1]), (5, good[2])]
        with pytest.raises(InputError, match=re.escape(f"{location(1)}: 'text' is not a string")):
            list(StreamingPretrainDataset([entry], tokenizer, 4, strict=True))


def test_conversation_without_assistant_turn_is_skipped_with_its_location(tmp_path, tokenizer):
    lonely = {"conversations": [{"role": "user", "content": "Is anyone there?"}]}
    records = [SFT_RECORDS[0], SFT_RECORDS[1], lonely, SFT_RECORDS[2]]
    parquet = write_parquet(tmp_path / "sft.parquet", records, row_group_size=2)
    spec = table_spec(write_sqlite(tmp_path / "sft.db", "records", records), "records")
    reference = SFTDataset([str(write_lines(tmp_path / "sft.jsonl", records))], tokenizer, 1024).samples
    for entry, location in ((str(parquet), f"{parquet}: row group 1, row 2"), (spec, f"{spec} rowid 3")):
        dataset = SFTDataset([entry], tokenizer, 1024)
        assert dataset.samples == reference and len(reference) == 3
        assert dict(dataset.issues.counts) == {"no_assistant": 1}
        assert dataset.issues.examples == {"no_assistant": [location]}
        with pytest.raises(InputError, match=re.escape(f"{location}: no assistant turn to learn from")):
            SFTDataset([entry], tokenizer, 1024, strict=True)


# ---------------------------------------------------------------------------------------- 7. scripts/jsonl_to_sqlite

# The last record brings a field the others lack: the table grows a column for it.
CONVERTED = SFT_RECORDS[:12] + [{**SFT_RECORDS[12], "source": "written by hand"}]


@pytest.fixture(scope="module")
def conversions(tmp_path_factory) -> dict:
    """scripts/jsonl_to_sqlite.py as real processes, all started at once: name -> (code, stdout, stderr, paths)."""
    root = tmp_path_factory.mktemp("jsonl_to_sqlite")
    records = write_lines(root / "sft.jsonl", CONVERTED)
    existing = write_sqlite(root / "existing.db", "docs", [{"text": "already here"}, {"text": "and here"}])
    malformed = write_lines(root / "malformed.jsonl", [{"text": "fine"}, {"text": "fine too"}, '{"text": "cut'])
    planned = {"round_trip": ([records], root / "sft.db"), "existing_table": ([records], existing),
               "malformed": ([malformed], root / "new.db")}
    processes = {name: subprocess.Popen([sys.executable, "scripts/jsonl_to_sqlite.py", *map(str, files), "--db",
                                         str(database)], cwd=ROOT, env=script_environment(), text=True,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                 for name, (files, database) in planned.items()}
    digest = hashlib.sha256(existing.read_bytes()).hexdigest()
    results = {}
    for name, process in processes.items():
        out, err = process.communicate(timeout=120)
        results[name] = (process.returncode, out, err, planned[name])
    results["existing_digest"] = digest
    return results


def test_jsonl_to_sqlite_round_trip(conversions, tokenizer):
    code, out, err, (files, database) = conversions["round_trip"]
    assert code == 0, err
    spec = table_spec(database, "docs")
    assert out == f"{len(CONVERTED)} rows -> {spec}\n"
    read = list(read_records([spec]))
    assert read[0][0] == f"{spec} rowid 1"
    assert [record for _, record in read] == [{**record, "source": record.get("source")} for record in CONVERTED]
    assert SFTDataset([spec], tokenizer, 1024).samples == SFTDataset(list(map(str, files)), tokenizer, 1024).samples


def test_jsonl_to_sqlite_refuses_an_existing_table(conversions):
    code, out, err, (_, database) = conversions["existing_table"]
    assert code == 2 and out == ""
    assert err.strip().splitlines() == [f"error: {database} already has a table 'docs'"]
    assert hashlib.sha256(database.read_bytes()).hexdigest() == conversions["existing_digest"]


def test_jsonl_to_sqlite_malformed_line_leaves_no_database(conversions):
    code, out, err, (files, database) = conversions["malformed"]
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {files[0]}:3: malformed JSON"), err
    assert not database.exists() and not list(database.parent.glob("new.db*"))


def test_jsonl_to_sqlite_writes_the_table_it_is_told(tmp_path, monkeypatch, capsys):
    records = write_lines(tmp_path / "sft.jsonl", CONVERTED[:3])
    database = tmp_path / "named.db"
    monkeypatch.setattr(sys, "argv", ["jsonl_to_sqlite.py", str(records), "--db", str(database), "--table", "chats"])
    runpy.run_path(str(ROOT / "scripts" / "jsonl_to_sqlite.py"), run_name="__main__")
    assert capsys.readouterr().out == f"3 rows -> {table_spec(database, 'chats')}\n"
    with closing(sqlite3.connect(database)) as connection:
        assert connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall() == [("chats",)]
    assert [record for _, record in read_records([table_spec(database, "chats")])] == CONVERTED[:3]


def test_write_table_is_one_transaction(tmp_path):
    database = write_sqlite(tmp_path / "kept.db", "other", [{"text": "kept"}])
    before = database.read_bytes()
    malformed = write_lines(tmp_path / "malformed.jsonl", [{"text": "a"}, {"text": "b"}, "{cut"])
    with pytest.raises(InputError, match=re.escape(f"{malformed}:3: malformed JSON")):
        write_table([str(malformed)], database, "docs")
    assert database.read_bytes() == before and rows_in(database, "other") == [(1, "kept")]


# ------------------------------------------------------------------------------------ 8. the tokenizer trainer's texts

def test_tokenizer_training_reads_parquet_and_sqlite_like_jsonl(corpus, tmp_path):
    assert read_texts(corpus["parquet_glob"]) == read_texts(corpus["pandas"]) == read_texts(corpus["jsonl"]) == TEXTS
    # `text` holds documents: one that looks like JSON stays the text it is
    assert any(text[:1] in "[{" for text in TEXTS)
    assert read_texts(corpus["sqlite_table"]) == read_texts(corpus["sqlite_query"]) == TEXTS
    conversations = written_as("parquet", SFT_RECORDS, tmp_path)
    contents = [turn["content"] for record in SFT_RECORDS for turn in record["conversations"]]
    assert read_texts(conversations) == read_texts([str(tmp_path / "records.jsonl")]) == contents


# --------------------------------------------------------------------------- 9. model_pretrain.py as real processes

def pretrain_arguments(out_dir: Path, train_files: list[str], max_steps: int, streaming: bool = False) -> list[str]:
    """A tiny model for a few steps at a constant learning rate (so that a shorter run shares its steps' schedule)."""
    return cli_arguments({
        "model": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                  "max_position_embeddings": 64},
        "data": {"train_files": train_files, "val_files": [], "seq_len": 32, "streaming": streaming,
                 "cache_dir": str(out_dir.parent / "cache")},
        "train": {"out_dir": str(out_dir), "max_steps": max_steps, "micro_batch_size": 2, "grad_accum_steps": 1,
                  "precision": "fp32", "seed": 7, "compile": False},
        "optim": {"lr": 1e-2, "min_lr": 1e-2, "warmup_steps": 0},
        "checkpoint": {"every_steps": 1000},
        "logging": {"every_steps": 1, "swanlab_mode": "disabled", "sample_tokens": 2, "plots": False}})


def losses(out_dir: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [(row["step"], row["loss"]) for row in rows if "loss" in row]


def same_losses(got: list[tuple[int, float]], expected: list[tuple[int, float]]) -> bool:
    return [step for step, _ in got] == [step for step, _ in expected] and \
        [loss for _, loss in got] == pytest.approx([loss for _, loss in expected], rel=1e-6)


@pytest.fixture(scope="module")
def script_runs(tmp_path_factory) -> dict:
    """model_pretrain.py runs, all started at once (the resumed one when the run it continues has ended):
    name -> (exit code, stderr, out_dir)."""
    root = tmp_path_factory.mktemp("pretrain-runs")
    records = [{"text": text} for text in TEXTS[:200]]
    jsonl = write_lines(root / "corpus.jsonl", records)
    for shard in range(4):
        write_parquet(root / "shards" / f"part-{shard}.parquet", records[shard * 50:(shard + 1) * 50],
                      row_group_size=16)
    database = write_sqlite(root / "corpus.db", "docs", records)
    # Short documents, one in the first shard and three in each further one (a row group each): the stopped run's
    # position lies in a later shard and row group.
    for shard, first in enumerate(range(-2, len(STREAM_TEXTS), 3)):
        write_parquet(root / "stream-shards" / f"part-{shard:02d}.parquet",
                      [{"text": text} for text in STREAM_TEXTS[max(first, 0):first + 3]], row_group_size=1)
    stream = [str(root / "stream-shards" / "*.parquet")]
    write_parquet(root / "no_text.parquet", [{"body": "a document in the wrong column"}] * 4)
    runs = {  # name: (out_dir, train_files, max_steps, streaming); the run that is continued starts first
        "stream_stopped": (root / "stream-resumed", stream, 2, True),
        "stream_resumed": (root / "stream-resumed", stream, 4, True),
        "stream": (root / "stream", stream, 4, True),
        "jsonl": (root / "jsonl", [str(jsonl)], 2, False),
        "parquet": (root / "parquet", [str(root / "shards" / "*.parquet")], 2, False),
        "sqlite": (root / "sqlite", [table_spec(database, "docs")], 2, False),
        "no_text": (root / "no_text", [str(root / "no_text.parquet")], 2, False),
    }
    environment = {**script_environment(), "PYTHONUNBUFFERED": "1"}

    def start(name: str) -> subprocess.Popen:
        arguments = pretrain_arguments(*runs[name]) + (["--resume", "auto"] if name == "stream_resumed" else [])
        with open(root / f"{name}.err", "w") as log:
            return subprocess.Popen([sys.executable, "model_pretrain.py", *arguments], cwd=ROOT, env=environment,
                                    stdout=subprocess.DEVNULL, stderr=log)

    running = {name: start(name) for name in runs if name != "stream_resumed"}
    results, deadline = {}, time.monotonic() + 300
    try:
        while running:
            assert time.monotonic() < deadline, f"still running: {sorted(running)}"
            for name, process in list(running.items()):
                if process.poll() is not None:
                    del running[name]
                    results[name] = (process.returncode, (root / f"{name}.err").read_text(errors="replace"),
                                     runs[name][0])
                    if name == "stream_stopped" and process.returncode == 0:
                        state = runs[name][0] / "checkpoints" / "step_2" / "trainer_state.json"
                        results["stopped_state"] = json.loads(state.read_text())
                        running["stream_resumed"] = start("stream_resumed")
            time.sleep(0.2)
    finally:
        for process in running.values():
            process.kill()
            process.wait()
    return results


@pytest.mark.slow
def test_pretraining_on_parquet_and_sqlite_matches_jsonl(script_runs):
    for name in ("jsonl", "parquet", "sqlite"):
        code, err, _ = script_runs[name]
        assert code == 0, err[-3000:]
    reference = losses(script_runs["jsonl"][2])
    assert [step for step, _ in reference] == [1, 2]
    for name in ("parquet", "sqlite"):
        assert same_losses(losses(script_runs[name][2]), reference), name


@pytest.mark.slow
def test_streamed_parquet_run_resumes_mid_epoch_with_the_same_losses(script_runs):
    for name in ("stream", "stream_stopped", "stream_resumed"):
        assert name in script_runs, sorted(script_runs)
        code, err, _ = script_runs[name]
        assert code == 0, err[-3000:]
    (document, offset), = script_runs["stopped_state"]["sampler"]["positions"].values()
    assert document >= 1 and (document - 1) % 3 > 0, (document, offset)  # not a shard's first row group
    assert "resumed from" in script_runs["stream_resumed"][1]
    straight = losses(script_runs["stream"][2])
    assert [step for step, _ in straight] == [1, 2, 3, 4]
    assert same_losses(losses(script_runs["stream_resumed"][2]), straight)


@pytest.mark.slow
def test_pretraining_on_parquet_without_the_text_column_exits_2(script_runs):
    code, err, out_dir = script_runs["no_text"]
    assert code == 2, err[-3000:]
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: {out_dir.parent / 'no_text.parquet'}: no column 'text' (its columns: body)"], err
    assert not (out_dir / "checkpoints").exists()
