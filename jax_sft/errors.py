"""Errors that mean "the input is wrong", as opposed to a bug in jax_sft.

Every error raised for bad user input (a config value, a data file, a model folder, a tokenizer)
derives from `InputError`. The command-line tools print it as `error: ...` lines and exit with
status 2 (`USAGE_EXIT_CODE`); anything else is a bug and keeps its traceback. Each class also
derives from the built-in exception that describes it (ValueError, FileNotFoundError, ...), so
callers that catch those keep working.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import TypeVar

__all__ = [
    "InputError",
    "ConfigError",
    "DataError",
    "MissingFileError",
    "UsageError",
    "SettingError",
    "RunFailure",
    "RUN_FAILURE_EXIT_CODE",
    "USAGE_EXIT_CODE",
    "exit_on_input_error",
]

USAGE_EXIT_CODE = 2  # as argparse and the shells use for bad usage

T = TypeVar("T")


class InputError(Exception):
    """Marker base: the user's input is wrong; the message says what and where."""


class ConfigError(InputError, ValueError):
    """A bad config. `problems`: one line each, "<dotted.key>=<value>: expected ...[; fix]"; all the
    problems of a stage come in one error."""

    def __init__(self, problems: Sequence[str], source: str = "config"):
        self.problems, self.source = list(problems), source
        n = len(self.problems)
        if n == 1:  # one line
            super().__init__(f"{source}: {self.problems[0]}")
            return
        lines = "".join(f"\n  - {p}" for p in self.problems)
        super().__init__(f"{source}: {n} config problems:{lines}")


class DataError(InputError, ValueError):
    """A dataset row, file or dataset setting is wrong (names the file and 1-based line, or row)."""


class MissingFileError(InputError, FileNotFoundError):
    """A file or folder named by the user does not exist."""


def exit_on_input_error(fn: Callable[[], T]) -> T:
    """`fn()`, except that an InputError prints `error: <message>` on stderr and exits with
    USAGE_EXIT_CODE, without a traceback."""
    try:
        return fn()
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(USAGE_EXIT_CODE) from None


class UsageError(InputError, ValueError):
    """A command-line flag, or a setting that does not fit the devices or processes present."""


RUN_FAILURE_EXIT_CODE = 1


class RunFailure(RuntimeError):
    """The run stopped for a reason the message states that is neither bad input nor a bug in
    jax_sft (the disk filled up, training diverged); it says what was kept. The command-line
    tools print it as `error: ...` and exit with RUN_FAILURE_EXIT_CODE, without a traceback."""


class SettingError(InputError, ValueError):
    """A config setting of the right type that cannot be honoured (an unsupported optimizer or
    scheduler, say); the message names the key."""
