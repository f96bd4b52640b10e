"""Library diagnostics kept off the terminal: what ITK, GDCM or HDF5 write to the C-level stderr becomes a log record.

Those libraries write to file descriptor 2 directly, past Python's ``sys.stderr``; only a swap of the descriptor
itself catches them. What was caught is logged at debug level on ``LIBRARY_LOG`` (the CLI shows it with ``-v``).
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager

#: The logger of whatever the libraries said (C-level stderr, Python warnings); enabled by ``autoreg -v``.
LIBRARY_LOG = "autoreg.library"

log = logging.getLogger(LIBRARY_LOG)

_lock = threading.RLock()
_depth = 0


@contextmanager
def captured_stderr(what: str) -> Iterator[None]:
    """Run the block with fd 2 sent to a temporary file; its text is logged at debug level, tagged ``what``.

    Keep the block tight around the library call: anything else written to fd 2 meanwhile (other threads, a
    logging handler) is caught too. Nested uses share the outermost capture.
    """
    global _depth
    with _lock:
        if _depth:
            _depth += 1
            try:
                yield
            finally:
                _depth -= 1
            return
        try:
            sys.stderr.flush()
            saved = os.dup(2)
        except (OSError, ValueError):  # no usable fd 2: nothing to protect
            saved = -1
        if saved < 0:
            yield
            return
        text = ""
        with tempfile.TemporaryFile() as sink:
            try:
                os.dup2(sink.fileno(), 2)
                _depth = 1
                yield
            finally:
                _depth = 0
                try:
                    sys.stderr.flush()
                except (OSError, ValueError):
                    pass
                os.dup2(saved, 2)
                os.close(saved)
                sink.seek(0)
                text = sink.read().decode("utf-8", errors="replace").strip()
                if text:
                    log.debug("%s: %d line(s) on stderr:\n%s", what, text.count("\n") + 1, text)
