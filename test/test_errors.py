"""utils/errors.py: one-line summaries of exceptions and the exit codes scripts end with."""

import pytest

from utils.errors import InputError, error_summary, exit_on_input_error


def test_input_error_is_a_value_error():
    assert issubclass(InputError, ValueError)


@pytest.mark.parametrize("error, expected", [
    (ValueError("first line\nsecond line\nthird"), "first line"),
    (InputError("only line"), "only line"),
    (KeyError("missing"), "'missing'"),
    (RuntimeError(), "RuntimeError"),
    (InputError(""), "InputError"),
])
def test_error_summary(error, expected):
    assert error_summary(error) == expected


def test_exit_on_input_error_passes_the_return_value_through(capsys):
    @exit_on_input_error
    def main():
        return {"steps": 3}

    assert main() == {"steps": 3}
    assert capsys.readouterr() == ("", "")


def test_exit_on_input_error_keeps_the_wrapped_name():
    def main():
        """Train."""

    wrapped = exit_on_input_error(main)
    assert (wrapped.__name__, wrapped.__doc__, wrapped.__wrapped__) == ("main", "Train.", main)


def test_exit_on_input_error_turns_input_error_into_exit_2(capsys):
    @exit_on_input_error
    def main():
        raise InputError("config.yaml: train.max_steps must be positive")

    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    assert exit_info.value.__cause__ is None and exit_info.value.__suppress_context__
    out, err = capsys.readouterr()
    assert out == ""
    assert err == "error: config.yaml: train.max_steps must be positive\n"


def test_exit_on_input_error_turns_keyboard_interrupt_into_exit_130(capsys):
    @exit_on_input_error
    def main():
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 130
    assert capsys.readouterr().err == "interrupted\n"


def test_exit_on_input_error_lets_other_errors_through(capsys):
    @exit_on_input_error
    def main():
        raise ValueError("a bug, not bad input")

    with pytest.raises(ValueError, match="a bug"):
        main()
    assert capsys.readouterr().err == ""
