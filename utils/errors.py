"""Bad input from a user, told in one line: every script wraps its `main` in `exit_on_input_error`."""

import contextlib
import functools
import sys
from collections.abc import Callable
from typing import Any


class InputError(ValueError):
    """Bad input from the user (config, command line, data file, checkpoint): reported as one line, exit code 2."""


def error_summary(error: BaseException) -> str:
    """The first line of an exception's message (or its type name), for one-line user messages."""
    text = str(error)
    return text.splitlines()[0] if text else type(error).__name__


def exit_on_input_error(main: Callable[[], Any]) -> Callable[[], Any]:
    """Wrap a script's main so that an InputError ends the process with `error: ...` on stderr and exit code 2."""

    @functools.wraps(main)
    def wrapper():
        try:
            return main()
        except InputError as error:
            print(f"error: {error}", file=sys.stderr)
            raise SystemExit(2) from None
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            raise SystemExit(130) from None

    return wrapper


@contextlib.contextmanager
def out_of_memory_as_input_error():
    """Running out of accelerator or host memory is a setting to change, said in one line with the settings that
    help."""
    import torch  # here: the other errors must stay importable without torch

    try:
        yield
    except torch.OutOfMemoryError:
        raise InputError("out of memory: lower train.micro_batch_size (raise train.grad_accum_steps to keep the "
                         "batch), lower data.seq_len, set train.gradient_checkpointing=true, or use "
                         "train.precision=bf16 or train.strategy=fsdp") from None
