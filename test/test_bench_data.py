"""scripts/bench_data.py: one small run, every format at both sizes with identical caches, and its JSON result."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import script_environment

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_data_times_every_format_on_the_same_tokens(tmp_path):
    output = tmp_path / "bench_data.json"
    # One size: a process per format and size (the x4 corpus is checked in-process below).
    run = subprocess.run([sys.executable, "scripts/bench_data.py", "--documents", "300", "--sizes", "1",
                          "--rounds", "1", "--batches", "3", "--train-steps", "1", "--output", str(output)],
                         cwd=ROOT, env=script_environment(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    result = json.loads(output.read_text())
    assert result["documents"] == 300
    sizes = result["tokenize_once"]
    assert sorted(sizes) == ["x1"]
    for rows in sizes.values():
        assert sorted(rows) == ["jsonl", "parquet", "sqlite"]
        assert len({row["tokens"] for row in rows.values()}) == 1  # the script also checks the caches' bytes
        assert all(row["tokens_per_s"] > 0 and row["peak_mib"] >= 0 for row in rows.values())
    assert sorted(result["streaming_loader_tokens_per_s"]) == ["jsonl", "parquet", "sqlite"]
    assert set(result["loader_over_training"]) == {"streaming jsonl", "streaming parquet", "streaming sqlite",
                                                   "cached windows", "SFT batches"}
    assert "vs jsonl" in run.stdout and "target >= 50x" in run.stdout


def measured(monkeypatch, tmp_path, options: list[str]) -> dict:
    """bench_data's main on 40 documents, with `options`: what it measured (tokenize-once runs per format and size,
    the batches each loader was timed over, the training measure's steps and sequence length). The training
    measure itself is not run."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import bench_data

    seen = {"tokenized": [], "batches": [], "training": []}

    def tokenize_in_process(files, tokenizer_folder, cache_dir):
        from transformers import AutoTokenizer

        from utils.data import build_token_cache

        seen["tokenized"].append(files)
        _, meta = build_token_cache(files, AutoTokenizer.from_pretrained(tokenizer_folder), cache_dir)
        return {"seconds": 1.0, "tokens": meta["num_tokens"], "peak_mib": 0.0, "digest": "same", "startup_ms": 0.0}

    def loader_rate(loader, max_batches):
        seen["batches"].append(max_batches)
        return 1.0

    def training_rate(config, tokenizer, batch, steps):
        seen["training"].append((steps, batch["input_ids"].shape[1]))
        return 1.0

    monkeypatch.setattr(bench_data, "timed_tokenize_once", tokenize_in_process)
    monkeypatch.setattr(bench_data, "loader_tokens_per_s", loader_rate)
    monkeypatch.setattr(bench_data, "training_tokens_per_s", training_rate)
    monkeypatch.chdir(ROOT)
    bench_data.main(["--documents", "40", "--sizes", "1", "--output", str(tmp_path / "out.json"), *options])
    return seen


def test_each_option_reaches_what_bench_data_measures(monkeypatch, tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("data:\n  seq_len: 32\n")
    default = measured(monkeypatch, tmp_path, [])
    assert len(default["tokenized"]) == 3 * 3 and set(default["batches"]) == {300}
    assert default["training"] == [(5, 256)]
    assert len(measured(monkeypatch, tmp_path, ["--rounds", "1"])["tokenized"]) == 3
    assert set(measured(monkeypatch, tmp_path, ["--batches", "7"])["batches"]) == {7}
    assert measured(monkeypatch, tmp_path, ["--train-steps", "2"])["training"] == [(2, 256)]
    assert measured(monkeypatch, tmp_path, ["--config", str(config)])["training"] == [(5, 32)]
    measured(monkeypatch, tmp_path, ["--sizes", "1,4", "--rounds", "1"])
    sizes = json.loads((tmp_path / "out.json").read_text())["tokenize_once"]
    assert all(sizes["x4"][name]["tokens"] == 4 * sizes["x1"][name]["tokens"] for name in ("jsonl", "parquet",
                                                                                           "sqlite"))
