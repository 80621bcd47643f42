"""Errors meant for users: printed as one clear message, never as a traceback."""

from __future__ import annotations


class WftError(Exception):
    """A user-facing error: bad input, missing file, unsupported model. Exit code 2."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\nhint: {self.hint}"
