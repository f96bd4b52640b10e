"""optuna-dashboard over a study's storage, with the study's artifact store, served in this process.

It reads the same storage that ``autoreg tune`` writes (journal file, or any URL), so it can run while a tune runs in
another process and shows trials as they finish, with the pictures, transforms and TRE tables that the workers store
for improving trials (``<study dir>/artifacts``).
"""

from __future__ import annotations

import errno
import logging
import socket
from pathlib import Path

from .artifacts import artifact_dir, artifact_store
from .config import StudyConfig
from .errors import UserError
from .study import StorageSpec, load_existing, open_storage

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
_LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}


def dashboard_url(host: str, port: int) -> str:
    """The address to open in a browser."""
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/dashboard/"


def serve(cfg: StudyConfig, spec: StorageSpec, study_directory: Path, *, host: str = DEFAULT_HOST,
          port: int = DEFAULT_PORT) -> None:
    """Serve optuna-dashboard for the study of ``cfg`` until interrupted; a clear error when it cannot start."""
    from optuna_dashboard import run_server

    if not 0 < port < 65536:
        raise UserError(f"expected a port between 1 and 65535 (got {port})", key="--port")
    load_existing(cfg, spec)  # the study must exist: a typo must not start an empty dashboard
    if host not in _LOCAL_HOSTS:
        log.warning("serving on %s: anyone who can reach this address can read and change the study", host)
    storage = open_storage(spec)
    store = artifact_store(study_directory)
    log.info("artifacts from %s", artifact_dir(study_directory))
    try:
        run_server(storage, host=host, port=port, artifact_store=store)
    except OSError as err:
        if err.errno == errno.EADDRINUSE:
            raise UserError(f"port {port} on {host} is already in use (choose another with --port)", key="--port") from None
        if err.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT) or isinstance(err, socket.gaierror):
            raise UserError(f"cannot listen on {host} ({err.strerror or err})", key="--host") from None
        raise
