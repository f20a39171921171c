"""utils/checkpoint.py through the engine: damaged and incompatible checkpoints are refused and the previous one
used, explicit and missing resume paths, a fresh start never overwrites checkpoints, pruning keeps what it wrote."""

import shutil
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from training import fit, make_config, read_metrics, step_folders, stop_before_call, tree_digest
from utils.checkpoint import resume_mismatch
from utils.config import TrainingConfig, config_to_dict
from utils.errors import InputError

pytestmark = pytest.mark.slow  # every test here runs a whole training


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("token-cache")


@pytest.fixture(scope="module")
def stopped_at_8(tmp_path_factory, cache_dir):
    """A 12-step run stopped after step 8: checkpoints step_4 and step_8 (each test copies it)."""
    out_dir = tmp_path_factory.mktemp("stopped") / "out"
    with pytest.MonkeyPatch.context() as monkeypatch:
        stop_before_call(monkeypatch, 9)
        summary = fit(make_config(out_dir, cache_dir))
    assert summary["reason"] == "stopped by signal" and summary["step"] == 8
    assert step_folders(out_dir) == ["step_4", "step_8"]
    return out_dir


@pytest.fixture
def stopped_copy(stopped_at_8, tmp_path) -> Path:
    out_dir = tmp_path / "out"
    shutil.copytree(stopped_at_8, out_dir)
    return out_dir


def test_damaged_checkpoint_is_refused_and_the_previous_one_used(stopped_copy, cache_dir):
    damaged = stopped_copy / "checkpoints" / "step_8" / "model.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:5])
    summary = fit(make_config(stopped_copy, cache_dir), "auto")
    assert summary["reason"] == "finished" and summary["step"] == 12
    assert len(summary["losses"]) == 8  # steps 5..12: resumed from step_4
    log = (stopped_copy / "train.log").read_text()
    warnings = [line for line in log.splitlines() if "WARNING" in line and "refused" in line]
    assert len(warnings) == 1 and "step_8" in warnings[0], warnings
    assert "step_4 (step 4)" in log
    train_rows, eval_rows = read_metrics(stopped_copy)
    assert [row["step"] for row in train_rows] == list(range(1, 13))
    assert [row["step"] for row in eval_rows] == [4, 8, 12]
    assert (stopped_copy / "final" / "model.safetensors").is_file()
    # step_8 was written again by the resumed run and loads now.
    assert load_file(stopped_copy / "checkpoints" / "step_8" / "model.safetensors")


def test_incompatible_checkpoint_is_refused(stopped_copy, cache_dir):
    config_file = stopped_copy / "checkpoints" / "step_8" / "config.yaml"
    saved = yaml.safe_load(config_file.read_text())
    saved["model"]["hidden_size"] = 64
    config_file.write_text(yaml.safe_dump(saved, sort_keys=False))
    summary = fit(make_config(stopped_copy, cache_dir), "auto")
    assert summary["reason"] == "finished" and summary["step"] == 12
    assert len(summary["losses"]) == 8
    log = (stopped_copy / "train.log").read_text()
    warnings = [line for line in log.splitlines() if "WARNING" in line and "refused" in line]
    assert len(warnings) == 1
    assert "step_8" in warnings[0] and "incompatible" in warnings[0] and "model.hidden_size" in warnings[0]


def test_only_incompatible_checkpoints_raise_and_touch_nothing(stopped_copy, cache_dir):
    before = tree_digest(stopped_copy / "checkpoints")
    metrics_before = (stopped_copy / "metrics.jsonl").read_bytes()
    config_before = (stopped_copy / "config.yaml").read_bytes()
    config = make_config(stopped_copy, cache_dir, model={"hidden_size": 64})
    with pytest.raises(InputError, match="no usable checkpoint"):
        fit(config, "auto")
    assert tree_digest(stopped_copy / "checkpoints") == before
    assert (stopped_copy / "metrics.jsonl").read_bytes() == metrics_before
    assert (stopped_copy / "config.yaml").read_bytes() == config_before
    log = (stopped_copy / "train.log").read_text()
    refused = [line for line in log.splitlines() if "refused" in line]
    assert len(refused) == 2 and all("model.hidden_size was 32, this run has 64" in line for line in refused)


def test_resume_from_explicit_missing_path_raises(stopped_copy, cache_dir):
    with pytest.raises(InputError, match="checkpoint not found"):
        fit(make_config(stopped_copy, cache_dir), str(stopped_copy / "checkpoints" / "step_99"))


def test_fresh_start_into_existing_checkpoints_raises(stopped_copy, cache_dir):
    before = tree_digest(stopped_copy / "checkpoints")
    metrics_before = (stopped_copy / "metrics.jsonl").read_bytes()
    with pytest.raises(InputError, match="already holds checkpoints"):
        fit(make_config(stopped_copy, cache_dir))
    assert tree_digest(stopped_copy / "checkpoints") == before
    assert (stopped_copy / "metrics.jsonl").read_bytes() == metrics_before


def test_resume_from_an_explicit_older_checkpoint(stopped_copy, cache_dir):
    summary = fit(make_config(stopped_copy, cache_dir), str(stopped_copy / "checkpoints" / "step_4"))
    assert summary["reason"] == "finished" and summary["step"] == 12 and len(summary["losses"]) == 8
    assert "refused" not in (stopped_copy / "train.log").read_text()
    assert [row["step"] for row in read_metrics(stopped_copy)[0]] == list(range(1, 13))




def test_pruning_never_deletes_the_checkpoint_just_written(stopped_copy, cache_dir, monkeypatch):
    # Branch off step_4 (say, to retry with other settings) while step_8 of the first attempt still exists.
    stop_before_call(monkeypatch, 3)
    config = make_config(stopped_copy, cache_dir, checkpoint={"keep_last": 1})
    summary = fit(config, str(stopped_copy / "checkpoints" / "step_4"))
    assert summary["reason"] == "stopped by signal" and summary["step"] == 6
    latest = (stopped_copy / "checkpoints" / "latest").read_text().strip()
    assert latest == "step_6"
    assert (stopped_copy / "checkpoints" / latest).is_dir(), step_folders(stopped_copy)
    # keep_last applies to this line of checkpoints; the abandoned branch's later folder is not deleted
    assert step_folders(stopped_copy) == ["step_6", "step_8"]


def test_a_key_added_since_the_checkpoint_counts_as_its_default():
    defaults = config_to_dict(TrainingConfig())
    current = config_to_dict(TrainingConfig())
    saved = config_to_dict(TrainingConfig())
    del saved["model"]["attention_bias"]  # a checkpoint written before the model section had this key
    assert resume_mismatch(saved, current, defaults) is None
    current["model"]["attention_bias"] = True
    assert resume_mismatch(saved, current, defaults) == "model.attention_bias was False, this run has True"
