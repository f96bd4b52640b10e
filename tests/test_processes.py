"""A tune's process handling (``autoreg.processes``): what it kills is gone by the time ``kill`` returns."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import alive

from autoreg.processes import kill, pool_workers

needs_proc = pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc to read states")

#: A child that holds memory, so that its exit takes a moment after SIGKILL.
HOLDER = (
    "import time; b = bytearray(1 << 29); b[::4096] = b'x' * len(b[::4096]); print('ready', flush=True); time.sleep(60)"
)


@needs_proc
def test_kill_returns_once_the_killed_processes_no_longer_run() -> None:
    children = [subprocess.Popen([sys.executable, "-c", HOLDER], stdout=subprocess.PIPE) for _ in range(2)]
    try:
        for child in children:
            assert child.stdout.readline().strip() == b"ready"
        pids = {child.pid for child in children}
        kill(pids)
        assert not alive(pids)  # zombies (not yet reaped here) count as gone
    finally:
        for child in children:
            child.kill()
            child.wait(timeout=30)


@needs_proc
def test_pool_workers_are_only_loky_workers_of_the_given_parent() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert pool_workers(child.pid) == set()
        assert child.pid not in pool_workers(os.getpid())  # a child, but not running loky's worker entry point
    finally:
        child.kill()
        child.wait(timeout=30)
