"""Console logging in colour (colorama) plus a rotating log file, one logger for the whole project."""

import logging
import logging.handlers
import sys
from pathlib import Path

from colorama import Fore, Style, just_fix_windows_console

LOGGER_NAME = "stellarbyte"
COLOURS = {logging.DEBUG: Style.DIM, logging.INFO: "", logging.WARNING: Fore.YELLOW, logging.ERROR: Fore.RED,
           logging.CRITICAL: Fore.RED + Style.BRIGHT}


class ColourFormatter(logging.Formatter):
    def __init__(self, use_colour: bool):
        super().__init__("%(asctime)s %(levelname)-7s %(message)s", datefmt="%H:%M:%S")
        self.use_colour = use_colour

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        colour = COLOURS.get(record.levelno, "") if self.use_colour else ""
        return f"{colour}{text}{Style.RESET_ALL}" if colour else text


def get_logger() -> logging.Logger:
    return logging.getLogger(LOGGER_NAME)


def setup_logger(log_file: str | Path | None = None, rank: int = 0, level: int = logging.INFO,
                 max_bytes: int = 10 * 2**20, backups: int = 3) -> logging.Logger:
    """Console output on rank 0 only (other ranks would repeat it), warnings from every rank; the file gets
    everything rank 0 logs. Calling it again replaces the handlers, so a process can start a second run."""
    just_fix_windows_console()
    logger = get_logger()
    logger.setLevel(level)
    logger.propagate = False
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(ColourFormatter(use_colour=sys.stderr.isatty()))
    console.setLevel(level if rank == 0 else logging.WARNING)
    logger.addHandler(console)
    if log_file is not None and rank == 0:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        file_handler = logging.handlers.RotatingFileHandler(log_file, maxBytes=max_bytes, backupCount=backups,
                                                            encoding="utf-8")
        file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(message)s"))
        logger.addHandler(file_handler)
    return logger


def quiet_transformers(errors_only: bool = True) -> None:
    """No per-file loading or saving bars from transformers (they would drown a log or a one-line error), and with
    `errors_only` none of its notices either."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    if errors_only:
        transformers_logging.set_verbosity_error()
