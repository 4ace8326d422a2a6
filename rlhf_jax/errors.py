"""The one error type for mistakes in what a user gave us.

A `UserError` names the config field, file (and line) or path that is wrong, says what is wrong
and how to fix it. Entry points catch it and print one line, `error: <where>: <what>; <fix>`,
then exit 2; anything else that escapes is a bug in our code and keeps its traceback (exit 1).

It subclasses ValueError so code and tests that catch ValueError keep working.
"""

from __future__ import annotations


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
