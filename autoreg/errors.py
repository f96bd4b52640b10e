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


class RegistrationFailed(Exception):
    """A registration that could not run to its end (SimpleITK raised); ``reason`` is short and groupable."""

    def __init__(self, reason: str, detail: str = ""):
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


class RegistrationPruned(Exception):
    """Raised through a level callback to stop a hopeless registration at a coarse level."""

    def __init__(self, stage: int, level: int):
        self.stage = stage
        self.level = level
        super().__init__(f"pruned after stage {stage} level {level}")
