"""The one error type for mistakes in what a user gave us, and how entry points report it.

A `UserError` names the config field, file (and line) or path that is wrong, says what is wrong
and how to fix it. Entry points (`config_utils.run_with_config`, `rlhf_jax.convert`) run their
work through `report_user_errors`: a `UserError` prints one line, `error: <where>: <what>;
<fix>`, and exits with status 2; anything else that escapes is a bug in our code and keeps its
traceback (exit 1). `--verbose` (or `RLHF_JAX_VERBOSE=1`) prints a user error's traceback too.

It subclasses ValueError so code and tests that catch ValueError keep working. Errors raised
inside libraries (TFDS, Orbax, tokenizers) are caught where we call them and re-raised as a
`UserError` naming our field or file, with the library's message folded into `what`.
"""

from __future__ import annotations

import argparse
import difflib
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any

VERBOSE_FLAG = "--verbose"
EXIT_USER_ERROR = 2


class UserError(ValueError):
    """A bad config value, data file, path, mesh, preset or checkpoint, named by `where`."""

    def __init__(self, where: str, what: str, fix: str = ""):
        self.where, self.what, self.fix = str(where), str(what), str(fix)
        super().__init__(self.line())

    def line(self) -> str:
        """`<where>: <what>; <fix>` on one line (newlines in library messages are folded)."""
        text = f"{self.where}: {self.what}" if self.where else self.what
        if self.fix:
            text += f"; {self.fix}"
        return " ".join(text.split())

    def __reduce__(self):  # picklable with its three parts (multiprocessing, subprocess pools)
        return (self.__class__, (self.where, self.what, self.fix))


def pop_verbose(argv: Sequence[str]) -> tuple[list[str], bool]:
    """(argv without `--verbose`, whether to show user errors' tracebacks).

    `RLHF_JAX_VERBOSE=1` in the environment turns it on too (for wrappers that own the argv).
    """
    argv = list(argv)
    verbose = VERBOSE_FLAG in argv[1:] or os.environ.get("RLHF_JAX_VERBOSE", "") not in ("", "0")
    return [a for i, a in enumerate(argv) if i == 0 or a != VERBOSE_FLAG], verbose


def print_user_error(err: UserError, verbose: bool = False, file=None) -> None:
    """One line on stderr (the traceback before it with `verbose`)."""
    file = sys.stderr if file is None else file
    if verbose:
        traceback.print_exception(type(err), err, err.__traceback__, file=file)
    file.write(f"error: {err.line()}\n")
    file.flush()


def report_user_errors(fn: Callable[..., Any], *args, verbose: bool = False, **kwargs) -> Any:
    """`fn(*args, **kwargs)`; a `UserError` becomes one stderr line and `SystemExit(2)`.

    Any other exception propagates with its traceback (Python exits 1): it is a bug.
    """
    try:
        return fn(*args, **kwargs)
    except UserError as err:
        print_user_error(err, verbose)
        raise SystemExit(EXIT_USER_ERROR) from None


class ArgumentParser(argparse.ArgumentParser):
    """`argparse.ArgumentParser` whose usage errors raise a `UserError` (one line, exit 2 at the
    entry point) instead of printing the usage block before the message and exiting.

    An unknown flag is named with the closest known one; `--help` still prints the usage."""

    def error(self, message: str):
        prefix = "unrecognized arguments: "
        if message.startswith(prefix):
            flags = message[len(prefix):].split()
            name = flags[0].split("=", 1)[0]
            known = [o for a in self._actions for o in a.option_strings]
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            raise UserError(flags[0], f"is not a flag of {self.prog}",
                            f"{hint}see {self.prog} --help")
        raise UserError(self.prog, message, f"see {self.prog} --help")
