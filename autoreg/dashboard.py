"""optuna-dashboard over a study's storage, with the study's artifact store, served in this process.

It reads the same storage that ``autoreg tune`` writes (journal file, or any URL), so it can run while a tune runs in
another process and shows trials as they finish, with the pictures, transforms and TRE tables that the workers store
for improving trials (``<study dir>/artifacts``).

The app is optuna-dashboard's own (``optuna_dashboard.wsgi``, what its ``run_server`` serves); the server loop is
ours: ``run_server``'s wsgiref loop swallows a Ctrl-C that lands while a response is being written (wsgiref's
handler catches every exception) and then serves on. Here a signal only sets a flag, checked between requests.
"""

from __future__ import annotations

import errno
import logging
import signal
import socket
import threading
from pathlib import Path
from types import FrameType
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from .artifacts import artifact_dir, artifact_store
from .config import StudyConfig
from .errors import UserError
from .study import StorageSpec, load_existing, open_storage

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
#: How often the server loop looks at the stop flag (seconds).
POLL_S = 0.25
_LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}


def dashboard_url(host: str, port: int) -> str:
    """The address to open in a browser."""
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/dashboard/"


class _Handler(WSGIRequestHandler):
    """Requests go to the log (debug level), not to stderr line by line."""

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        log.debug("%s %s", self.address_string(), format % args)


class _Server6(WSGIServer):
    address_family = socket.AF_INET6


def make_dashboard_server(
    cfg: StudyConfig, spec: StorageSpec, study_directory: Path, *, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT
) -> WSGIServer:
    """A bound (not yet serving) HTTP server of optuna-dashboard for the study of ``cfg``; clear errors otherwise."""
    from optuna_dashboard import wsgi

    if not 0 < port < 65536:
        raise UserError(f"expected a port between 1 and 65535 (got {port})", key="--port")
    load_existing(cfg, spec)  # the study must exist: a typo must not start an empty dashboard
    app = wsgi(open_storage(spec), artifact_store=artifact_store(study_directory))
    log.info("artifacts from %s", artifact_dir(study_directory))
    try:
        server = make_server(
            host, port, app, server_class=_Server6 if ":" in host else WSGIServer, handler_class=_Handler
        )
        if host not in _LOCAL_HOSTS:  # said once the address is bound: an address that cannot be is one error line
            log.warning("serving on %s: anyone who can reach this address can read and change the study", host)
        return server
    except OSError as err:
        if err.errno == errno.EADDRINUSE:
            raise UserError(
                f"port {port} on {host} is already in use (choose another with --port)", key="--port"
            ) from None
        if isinstance(err, socket.gaierror) or err.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT, errno.EACCES):
            raise UserError(f"cannot listen on {host}:{port} ({err.strerror or err})", key="--host") from None
        raise


def serve_until_stopped(server: WSGIServer, stop: threading.Event | None = None) -> None:
    """Serve requests until ``stop`` is set or (in the main thread) SIGINT/SIGTERM arrives; then close the socket."""
    stop = stop or threading.Event()
    previous: dict[int, object] = {}

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, on_signal)
    server.timeout = POLL_S
    try:
        while not stop.is_set():
            server.handle_request()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        server.server_close()
