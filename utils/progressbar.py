"""Training progress: a rich progress bar in a terminal, plain log lines otherwise (CI, files, pipes)."""

import sys

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from utils.logger import get_logger


class ProgressBar:
    """`update(step, **metrics)` advances to `step`; the metrics appear beside the bar or in a log line."""

    def __init__(self, total: int, description: str = "train", enabled: bool = True, start: int = 0):
        self.total = total
        self.interactive = enabled and sys.stdout.isatty()
        self.progress = None
        if self.interactive:
            self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[metrics]}"))
            self.task = self.progress.add_task(description, total=total, completed=start, metrics="")
            self.progress.start()
        self.enabled = enabled

    def update(self, step: int, **metrics: float) -> None:
        if not self.enabled:
            return
        text = "  ".join(f"{name} {value:.4g}" if isinstance(value, float) else f"{name} {value}"
                         for name, value in metrics.items())
        if self.interactive:
            self.progress.update(self.task, completed=step, metrics=text)
        else:
            get_logger().info(f"step {step}/{self.total}  {text}")

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def __enter__(self) -> "ProgressBar":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
