"""utils/graceful_stop.py: SIGINT/SIGTERM set a flag the training loop reads; the previous handlers come back."""

import os
import signal

import pytest

from utils.graceful_stop import GracefulStop


def test_graceful_stop_catches_sigterm_and_restores_handlers():
    previous = signal.getsignal(signal.SIGTERM)
    with GracefulStop() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested
        # Once a stop was requested, SIGINT interrupts at once.
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGTERM) is previous


def test_graceful_stop_first_sigint_is_graceful():
    previous = signal.getsignal(signal.SIGINT)
    with GracefulStop() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested
    assert signal.getsignal(signal.SIGINT) is previous
