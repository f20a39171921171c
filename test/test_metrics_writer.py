"""utils/metrics_writer.py: metrics.jsonl rows, cut back to the resumed step on resume."""

import json
import math

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
