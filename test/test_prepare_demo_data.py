"""scripts/prepare_demo_data.py: each option reaches the corpora it writes (--out where, --seed which documents and
splits, --max-mb how much)."""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import prepare_demo_data  # noqa: E402

pytestmark = pytest.mark.slow  # each build reads and samples the source packages for seconds

BUDGETED = ("pretrain_train.jsonl", "pretrain_val.jsonl", "sft_train.jsonl", "sft_val.jsonl")


def built(folder: Path, *options: str) -> dict[str, str]:
    prepare_demo_data.build(prepare_demo_data.parse_args(["--out", str(folder), "--max-mb", "0.55", *options]))
    return {path.name: path.read_text(encoding="utf-8") for path in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def default(tmp_path_factory) -> dict[str, str]:
    return built(tmp_path_factory.mktemp("demo") / "default")


def budgeted_bytes(files: dict[str, str]) -> int:
    return sum(len(files[name].encode("utf-8")) for name in BUDGETED)


def test_out_is_where_every_file_is_written(default):
    assert {*BUDGETED, "rlhf_train.jsonl", "arithmetic_train.jsonl", "NOTICE"} <= set(default)


def test_seed_changes_the_samples_and_splits(default, tmp_path):
    other = built(tmp_path / "seed", "--seed", "1")
    assert other.keys() == default.keys()
    assert all(other[name] != default[name] for name in BUDGETED)


def test_max_mb_bounds_the_pretraining_and_sft_files(default, tmp_path):
    larger = built(tmp_path / "larger", "--max-mb", "0.7")
    assert budgeted_bytes(default) <= 0.55 * prepare_demo_data.MIB < budgeted_bytes(larger) <= 0.7 * prepare_demo_data.MIB
