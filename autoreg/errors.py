"""User errors: one clear line naming the file and the key, mapped to a non-zero exit by the CLI."""

from __future__ import annotations

import reprlib
import stat
from pathlib import Path
from typing import Any

#: The most characters of the user's input (a value, a key) that any message quotes.
EXCERPT_CHARS = 60
#: A message longer than this is cut in the middle: no error line may carry a file's worth of input.
MAX_MESSAGE_CHARS = 1000

_repr = reprlib.Repr()
_repr.maxstring = _repr.maxother = _repr.maxlong = EXCERPT_CHARS
_repr.maxlist = _repr.maxtuple = _repr.maxdict = _repr.maxset = 6
_repr.maxlevel = 3


def excerpt(value: Any, limit: int = EXCERPT_CHARS, *, quote: bool = True) -> str:
    """A value from the user's input as a short one-line excerpt (repr-quoted unless ``quote=False``): at most
    ``limit`` characters, never built from more than a bounded part of the value."""
    if isinstance(value, str):
        head = value[: limit + 1]
        shown = repr(head) if quote else head.encode("unicode_escape").decode("ascii")
        cut = len(value) > limit
    else:
        shown = _repr.repr(value)
        cut = False
    if cut or len(shown) > limit:
        shown = shown[: max(1, limit - 3)] + "..."
    return shown


def _clamp(text: str, limit: int) -> str:
    return text if len(text) <= limit else f"{text[: limit // 2]} ... {text[-(limit // 2) :]}"


def special_file(path: str | Path) -> str | None:
    """What ``path`` is when it is a pipe, socket or device rather than a file or folder (reading one could block
    forever or never end, like a FIFO without a writer or /dev/zero); None otherwise, or when it does not exist."""
    try:
        mode = Path(path).stat().st_mode
    except OSError:
        return None
    if stat.S_ISFIFO(mode):
        return "a named pipe"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return None


class UserError(Exception):
    """An error in what the user gave us (a file, a key, a value), never a bug of ours.

    ``str(err)`` is the one line the CLI prints: ``FILE: KEY: what was expected``.
    """

    def __init__(self, message: str, *, file: str | Path | None = None, key: str | None = None):
        self.file = _clamp(str(file), MAX_MESSAGE_CHARS // 2) if file is not None else None
        self.key = excerpt(key, 2 * EXCERPT_CHARS, quote=False) if key is not None else None
        self.detail = message = _clamp(message, MAX_MESSAGE_CHARS)
        parts = [p for p in (self.file, self.key) if p]
        super().__init__(": ".join([*parts, message]))


# The engine's own exceptions live with the engine (it imports nothing of autoreg); re-exported here.
from .registration import RegistrationFailed, RegistrationPruned  # noqa: E402,F401
