"""User errors: one clear line naming the file and the key, mapped to a non-zero exit by the CLI."""

from __future__ import annotations

from pathlib import Path


class UserError(Exception):
    """An error in what the user gave us (a file, a key, a value), never a bug of ours.

    ``str(err)`` is the one line the CLI prints: ``FILE: KEY: what was expected``.
    """

    def __init__(self, message: str, *, file: str | Path | None = None, key: str | None = None):
        self.file = str(file) if file is not None else None
        self.key = key
        self.detail = message
        parts = [p for p in (self.file, key) if p]
        super().__init__(": ".join([*parts, message]))


# The engine's own exceptions live with the engine (it imports nothing of autoreg); re-exported here.
from .registration import RegistrationFailed, RegistrationPruned  # noqa: E402,F401
