"""utils/logger.py: rank 0 logs to the console and the file, other ranks warnings only; transformers kept quiet."""

import logging
import re

import pytest
from transformers.utils import logging as transformers_logging

from helpers import project_logger_restored
from utils.logger import get_logger, quiet_transformers, setup_logger


@pytest.fixture(autouse=True)
def restore_logger():
    with project_logger_restored():
        yield


@pytest.fixture
def restore_transformers():
    verbosity, bars = transformers_logging.get_verbosity(), transformers_logging.is_progress_bar_enabled()
    yield
    transformers_logging.set_verbosity(verbosity)
    (transformers_logging.enable_progress_bar if bars else transformers_logging.disable_progress_bar)()


def test_get_logger_is_the_project_logger():
    assert get_logger() is logging.getLogger("stellarbyte") is setup_logger()


def test_rank_0_logs_to_console_and_file(tmp_path, capsys):
    log_file = tmp_path / "logs" / "train.log"  # the folder is created
    logger = setup_logger(log_file, rank=0)
    logger.debug("not shown at INFO")
    logger.info("step 1 loss 2.5")
    logger.warning("grad norm is inf")
    lines = log_file.read_text(encoding="utf-8").splitlines()
    assert [line.split(" ", 2)[2] for line in lines] == ["INFO    step 1 loss 2.5", "WARNING grad norm is inf"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}", lines[0][:23])  # full date and time
    err = capsys.readouterr().err
    assert "step 1 loss 2.5" in err and "grad norm is inf" in err and "not shown" not in err
    assert "\x1b[" not in err  # no colour codes when stderr is not a terminal


def test_debug_level(tmp_path):
    log_file = tmp_path / "train.log"
    setup_logger(log_file, level=logging.DEBUG).debug("details")
    assert "DEBUG   details" in log_file.read_text(encoding="utf-8")


def test_other_ranks_log_only_warnings_and_no_file(tmp_path, capsys):
    log_file = tmp_path / "train.log"
    logger = setup_logger(log_file, rank=1)
    logger.info("step 1 loss 2.5")
    logger.warning("rank 1 saw a bad batch")
    assert not log_file.exists() and list(tmp_path.iterdir()) == []
    err = capsys.readouterr().err
    assert "rank 1 saw a bad batch" in err and "step 1" not in err


def test_logger_does_not_reach_the_root_logger(caplog):
    setup_logger()
    with caplog.at_level(logging.INFO):
        get_logger().info("only once")
    assert caplog.records == []


def test_setup_twice_replaces_the_handlers(tmp_path, capsys):
    setup_logger(tmp_path / "first.log")
    logger = setup_logger(tmp_path / "second.log")
    assert len(logger.handlers) == 2
    logger.info("once")
    assert capsys.readouterr().err.count("once") == 1
    assert (tmp_path / "first.log").read_text(encoding="utf-8") == ""
    assert (tmp_path / "second.log").read_text(encoding="utf-8").count("once") == 1


def test_quiet_transformers_disables_progress_bars(restore_transformers):
    transformers_logging.enable_progress_bar()
    transformers_logging.set_verbosity_warning()
    quiet_transformers(errors_only=False)
    assert not transformers_logging.is_progress_bar_enabled()
    assert transformers_logging.get_verbosity() == logging.WARNING


def test_quiet_transformers_errors_only(restore_transformers):
    transformers_logging.enable_progress_bar()
    transformers_logging.set_verbosity_info()
    quiet_transformers()
    assert not transformers_logging.is_progress_bar_enabled()
    assert transformers_logging.get_verbosity() == logging.ERROR
    assert not transformers_logging.get_logger("transformers.modeling_utils").isEnabledFor(logging.WARNING)
