"""Data pipeline speed and memory on the demo config, against the training step it feeds, in one run.

The demo corpus (repeated `--sizes` times) is written as JSONL, as Parquet shards and as an SQLite table, the same
texts in each. For every format and size it prints the tokenize-once time (each in a fresh process, so the peak
memory it adds is its own; best of `--rounds`, formats alternating), checks that the token caches are identical,
then times the streaming loader per format (best of `--rounds` too), the cached loader and the SFT loader, and the demo model's training
tokens/s (forward, backward and AdamW step). The loaders should stay far above training (target: 50x) so that data
is never what a run waits for; Parquet should tokenize at least as fast as JSONL, and memory should not grow with
the corpus. pyarrow's one-off initialisation on a process's first read is timed apart (`start ms`). Ends with one JSON line. Run it alone on the machine.
"""

import argparse
import hashlib
import json
import multiprocessing
import re
import sqlite3
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from transformers import AutoTokenizer

from model import ByteModel
from utils.config import TrainingConfig, model_config_from, parse_config
from utils.data import (DataIssues, PadCollator, PretrainDataset, ResumableSampler, SFTDataset,
                        StreamingPretrainDataset, build_token_cache, iter_pretrain_documents)
from utils.sources import ParquetSource, data_sources

FORMATS = ("jsonl", "parquet", "sqlite")
PARQUET_SHARDS = 4
ROW_GROUP_ROWS = 1000


def write_corpus(texts: list[str], folder: Path) -> dict[str, list[str]]:
    """The texts as one JSONL file, as Parquet shards of several row groups, and as an SQLite table: each format's
    `data.train_files` entries."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True)
    with open(folder / "corpus.jsonl", "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps({"text": text}, ensure_ascii=False) + "\n" for text in texts)
    shard_size = -(-len(texts) // PARQUET_SHARDS)
    for shard in range(PARQUET_SHARDS):
        table = pa.table({"text": texts[shard * shard_size:(shard + 1) * shard_size]})
        pq.write_table(table, folder / f"corpus-{shard:05d}.parquet", row_group_size=ROW_GROUP_ROWS)
    with sqlite3.connect(folder / "corpus.db") as connection:
        connection.execute("CREATE TABLE docs (text TEXT)")
        connection.executemany("INSERT INTO docs VALUES (?)", ((text,) for text in texts))
    connection.close()
    return {"jsonl": [str(folder / "corpus.jsonl")], "parquet": [str(folder / "corpus-*.parquet")],
            "sqlite": [f"sqlite:///{folder / 'corpus.db'}?table=docs"]}


def tokenize_once(files: list[str], tokenizer_folder: str, cache_dir: str, results) -> None:
    """In a fresh process: build the token cache and report its time, the memory it added at its peak (resident
    set high-water mark, reset before the build, less the resident set before it) and the cache's digest."""
    import pyarrow.parquet  # noqa: F401  (imported before the baseline: the library is not the data's memory)

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
    # pyarrow initialises itself on a process's first read (tens of ms, once): timed apart, not as throughput.
    start = time.perf_counter()
    parquet = [source for source in data_sources(files) if isinstance(source, ParquetSource)]
    if parquet:
        next(parquet[0].records())
    startup_ms = (time.perf_counter() - start) * 1000 if parquet else 0.0
    Path("/proc/self/clear_refs").write_text("5")
    before = _memory_mib("VmRSS")
    start = time.perf_counter()
    tokens_path, meta = build_token_cache(files, tokenizer, cache_dir)
    seconds = time.perf_counter() - start
    peak_mib = _memory_mib("VmHWM") - before
    digest = hashlib.sha256(Path(tokens_path).read_bytes()).hexdigest()
    results.put({"seconds": seconds, "tokens": meta["num_tokens"], "peak_mib": peak_mib, "digest": digest,
                 "startup_ms": startup_ms})


def _memory_mib(field: str) -> float:
    """A memory figure of this process from /proc (Linux): VmRSS now, VmHWM its high-water mark."""
    status = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+) kB", status).group(1)) / 1024


def timed_tokenize_once(files: list[str], tokenizer_folder: str, cache_dir: Path) -> dict:
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    process = context.Process(target=tokenize_once, args=(files, tokenizer_folder, str(cache_dir), results))
    process.start()
    result = results.get()
    process.join()
    return result


def loader_tokens_per_s(loader, max_batches: int) -> float:
    tokens, start = 0, time.perf_counter()
    for index, batch in enumerate(loader):
        tokens += batch["input_ids"].numel()
        if index + 1 == max_batches:
            break
    return tokens / (time.perf_counter() - start)


def training_tokens_per_s(config: TrainingConfig, tokenizer, batch: dict, steps: int) -> float:
    model = ByteModel(model_config_from(config.model, tokenizer)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    for step in range(steps + 1):
        if step == 1:  # the first step warms up the allocator and optimizer state
            start = time.perf_counter()
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return steps * batch["input_ids"].numel() / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/model_pretrain.yaml")
    parser.add_argument("--sizes", default="1,4", help="corpus sizes, in copies of the demo training corpus")
    parser.add_argument("--documents", type=int, default=None, help="use only the corpus's first N documents")
    parser.add_argument("--rounds", type=int, default=3, help="tokenize-once runs per format and size (best kept)")
    parser.add_argument("--batches", type=int, default=300, help="batches to time each loader over")
    parser.add_argument("--train-steps", type=int, default=5)
    parser.add_argument("--output", default="model_info/bench_data.json")
    args = parser.parse_args(argv)
    config, _ = parse_config(TrainingConfig, args.config, "bench", argv=["--config", args.config])
    tokenizer_folder = config.data.tokenizer or "tokenizer"
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
    texts = [text for _, text in iter_pretrain_documents(data_sources(config.data.train_files), DataIssues(),
                                                         config.data.text_field)][:args.documents]
    sizes = [int(size) for size in args.sizes.split(",")]
    micro, seq_len = config.train.micro_batch_size, config.data.seq_len

    tokenize: dict[str, dict[str, dict]] = {}
    streaming: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as work:
        for size in sizes:
            corpus = write_corpus(texts * size, Path(work) / f"x{size}")
            runs: dict[str, list[dict]] = {name: [] for name in FORMATS}
            for round_index in range(args.rounds):
                for name in FORMATS:
                    cache = Path(work) / f"cache-{size}-{name}-{round_index}"
                    runs[name].append(timed_tokenize_once(corpus[name], tokenizer_folder, cache))
            best = {name: min(results, key=lambda result: result["seconds"]) for name, results in runs.items()}
            if len({result["digest"] for result in best.values()}) != 1:
                raise SystemExit(f"the formats gave different token caches at size {size}")
            tokenize[f"x{size}"] = {name: {"seconds": result["seconds"], "tokens": result["tokens"],
                                           "tokens_per_s": result["tokens"] / result["seconds"],
                                           "peak_mib": result["peak_mib"], "startup_ms": result["startup_ms"]}
                                    for name, result in best.items()}
            if size == sizes[0]:
                for _ in range(args.rounds):  # formats alternating, best kept, as for tokenize-once
                    for name in FORMATS:
                        dataset = StreamingPretrainDataset(corpus[name], tokenizer, seq_len)
                        rate = loader_tokens_per_s(DataLoader(dataset, batch_size=micro), args.batches)
                        streaming[name] = max(rate, streaming.get(name, 0.0))

        dataset = PretrainDataset(config.data.train_files, tokenizer, seq_len, Path(work) / "demo-cache",
                                  text_field=config.data.text_field)
        loader = DataLoader(dataset, batch_size=micro, sampler=ResumableSampler(len(dataset), seed=0),
                            drop_last=True)
        cached_rate = loader_tokens_per_s(_cycle(loader), args.batches)  # cycled: the demo set is small
        batch = next(iter(loader))

    sft = SFTDataset(["datasets/demo/sft_train.jsonl"], tokenizer, seq_len)
    sft_loader = DataLoader(sft, batch_size=micro, collate_fn=PadCollator(tokenizer.pad_token_id),
                            sampler=ResumableSampler(len(sft), seed=0, lengths=sft.lengths, group_size=64 * micro))
    sft_rate = loader_tokens_per_s(_cycle(sft_loader), args.batches)
    train_rate = training_tokens_per_s(config, tokenizer, batch, args.train_steps)

    print(f"tokenize once ({len(texts)} demo documents x size; best of {args.rounds}; peak = memory added):")
    print(f"{'size':>5} {'format':>8} {'tokens':>11} {'seconds':>8} {'tok/s':>11} {'vs jsonl':>8} {'peak MiB':>9} "
          f"{'start ms':>8}")
    for size, rows in tokenize.items():
        for name, row in rows.items():
            print(f"{size:>5} {name:>8} {row['tokens']:>11,} {row['seconds']:>8.2f} {row['tokens_per_s']:>11,.0f} "
                  f"{row['tokens_per_s'] / rows['jsonl']['tokens_per_s']:>8.2f} {row['peak_mib']:>9.1f} "
                  f"{row['startup_ms']:>8.0f}")
    print(f"\nloaders against training ({train_rate:,.0f} tok/s, batch {micro} x {seq_len}):")
    rates = {**{f"streaming {name}": rate for name, rate in streaming.items()}, "cached windows": cached_rate,
             "SFT batches": sft_rate}
    for name, rate in rates.items():
        print(f"  {name:<18} {rate:>12,.0f} tok/s   {rate / train_rate:>7.0f}x training (target >= 50x)")
    result = {"documents": len(texts), "tokenize_once": tokenize, "streaming_loader_tokens_per_s": streaming,
              "cached_loader_tokens_per_s": cached_rate, "sft_loader_tokens_per_s": sft_rate,
              "train_tokens_per_s": train_rate,
              "loader_over_training": {name: rate / train_rate for name, rate in rates.items()}}
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


def _cycle(loader: DataLoader):
    while True:
        yield from loader


if __name__ == "__main__":
    main()
