"""utils/progressbar.py: plain `step N/total` log lines outside a terminal, a rich bar inside one, silence when off."""

import logging
import sys

import pytest

from utils.logger import get_logger
from utils.progressbar import ProgressBar


@pytest.fixture
def records():
    """Every record the project logger emits during the test (whatever handlers setup_logger left on it)."""
    logger = get_logger()
    collected: list[logging.LogRecord] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = collected.append
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    yield collected
    logger.removeHandler(handler)
    logger.setLevel(level)


def test_log_lines_outside_a_terminal(records, capsys):
    assert not sys.stdout.isatty()
    with ProgressBar(total=200) as bar:
        assert not bar.interactive
        bar.update(10, loss=2.345678, lr=3e-4, tokens=4096)
        bar.update(20)
    assert [(record.levelno, record.getMessage().rstrip()) for record in records] == [
        (logging.INFO, "step 10/200  loss 2.346  lr 0.0003  tokens 4096"),
        (logging.INFO, "step 20/200"),
    ]
    assert capsys.readouterr().out == ""


def test_float_metrics_keep_four_significant_digits(records):
    ProgressBar(total=5).update(5, loss=12345.678, grad_norm=0.000123456, ratio=1.0)
    assert records[0].getMessage() == "step 5/5  loss 1.235e+04  grad_norm 0.0001235  ratio 1"


def test_disabled_writes_nothing(records, capsys, monkeypatch):
    for tty in (False, True):
        monkeypatch.setattr(sys.stdout, "isatty", lambda: tty)
        with ProgressBar(total=10, enabled=False) as bar:
            assert not bar.interactive and bar.progress is None
            bar.update(3, loss=1.0)
    assert records == []
    assert capsys.readouterr() == ("", "")


def test_terminal_shows_a_bar_instead_of_log_lines(records, monkeypatch):
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    bar = ProgressBar(total=50, description="sft", start=5)
    try:
        assert bar.interactive
        task = bar.progress.tasks[0]
        assert (task.description, task.total, task.completed) == ("sft", 50, 5)
        bar.update(7, loss=0.5)
        assert (task.completed, task.fields["metrics"]) == (7, "loss 0.5")
    finally:
        bar.close()
    assert bar.progress is None
    bar.close()  # closing twice is harmless
    assert records == []
