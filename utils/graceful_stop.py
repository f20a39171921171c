"""SIGINT/SIGTERM ask a training loop to stop after its current step (which then saves a checkpoint)."""

import signal

from utils.logger import get_logger


class GracefulStop:
    """Within `with GracefulStop() as stop:`, a signal sets `stop.requested`; a second SIGINT interrupts at once.
    The previous handlers come back on exit."""

    def __init__(self):
        self.requested = False
        self.previous = {}

    def __enter__(self) -> "GracefulStop":
        for signal_number in (signal.SIGINT, signal.SIGTERM):
            self.previous[signal_number] = signal.signal(signal_number, self.handle)
        return self

    def handle(self, signal_number, frame) -> None:
        if self.requested and signal_number == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        get_logger().warning(f"received {signal.Signals(signal_number).name}: saving a checkpoint after this step")

    def __exit__(self, *exc) -> None:
        for signal_number, handler in self.previous.items():
            signal.signal(signal_number, handler)
