"""utils/metrics_writer.py: metrics.jsonl rows, cut back to the resumed step on resume."""

import json
import math

import pytest

from utils.metrics_writer import MetricsWriter


def test_metrics_writer_truncates_to_the_resumed_step(tmp_path):
    def rows():
        return [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]

    writer = MetricsWriter(tmp_path, True, "disabled", "p", {}, None)
    for step in range(1, 6):
        writer.write({"step": step, "loss": 1.0})
    writer.write({"step": 4, "val_loss": 1.0, "val_ppl": math.e})
    writer.close()
    assert rows() == [1, 2, 3, 4, 5, 4]
    MetricsWriter(tmp_path, True, "disabled", "p", {}, 3).close()
    assert rows() == [1, 2, 3]
    MetricsWriter(tmp_path, False, "disabled", "p", {}, None).close()  # not rank 0: never touches the file
    assert rows() == [1, 2, 3]
    MetricsWriter(tmp_path, True, "disabled", "p", {}, None).close()  # a new run starts an empty file
    assert rows() == []


def test_samples_are_rows_per_prompt_and_are_cut_back_on_resume(tmp_path):
    def samples():
        return [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text(encoding="utf-8").splitlines()]

    writer = MetricsWriter(tmp_path, True, "disabled", "p", {}, None)
    for step in (2, 4):
        writer.write_samples(step, ["The", "我们"], [f"end {step}", f"我们 {step}"])
    writer.write_samples(5, ["The"], ["last"], final=True)
    writer.close()
    assert samples()[1] == {"step": 2, "prompt": "我们", "sample": "我们 2"}
    assert samples()[-1] == {"step": 5, "prompt": "The", "sample": "last", "final": True}
    assert "我们" in (tmp_path / "samples.jsonl").read_text(encoding="utf-8")  # readable, not \\u escapes
    MetricsWriter(tmp_path, True, "disabled", "p", {}, 3).close()
    assert [row["step"] for row in samples()] == [2, 2]


@pytest.mark.parametrize("mode", ["offline", "local"])
def test_swanlab_log_is_written_in_the_run_folder(tmp_path, mode):
    writer = MetricsWriter(tmp_path, True, mode, "p", {"train": {"seed": 1}}, None)
    writer.write({"step": 1, "loss": 2.5, "expert_load": [[0.5, 0.5]]})
    writer.write_samples(1, ["The"], ["cat"])
    writer.close()
    runs = list((tmp_path / "swanlog").glob("run-*"))
    assert len(runs) == 1 and any(path.is_file() and path.stat().st_size > 0 for path in runs[0].rglob("*"))
