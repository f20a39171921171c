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
    run = subprocess.run([sys.executable, "scripts/bench_data.py", "--documents", "300", "--sizes", "1,4",
                          "--rounds", "1", "--batches", "3", "--train-steps", "1", "--output", str(output)],
                         cwd=ROOT, env=script_environment(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    result = json.loads(output.read_text())
    assert result["documents"] == 300
    sizes = result["tokenize_once"]
    assert sorted(sizes) == ["x1", "x4"]
    for rows in sizes.values():
        assert sorted(rows) == ["jsonl", "parquet", "sqlite"]
        assert len({row["tokens"] for row in rows.values()}) == 1  # the script also checks the caches' bytes
        assert all(row["tokens_per_s"] > 0 and row["peak_mib"] >= 0 for row in rows.values())
    assert sizes["x4"]["jsonl"]["tokens"] == 4 * sizes["x1"]["jsonl"]["tokens"]
    assert sorted(result["streaming_loader_tokens_per_s"]) == ["jsonl", "parquet", "sqlite"]
    assert set(result["loader_over_training"]) == {"streaming jsonl", "streaming parquet", "streaming sqlite",
                                                   "cached windows", "SFT batches"}
    assert "vs jsonl" in run.stdout and "target >= 50x" in run.stdout
