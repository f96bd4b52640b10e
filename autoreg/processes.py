"""This machine's processes as a tune sees them: which are its workers, and ending them (``/proc``, else ``ps``).

A tune ends its own workers on Ctrl-C; it must find them whether busy (a trial names its worker) or idle (loky's
pool), and never touch another tune's.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

#: How long ``kill`` waits for killed processes to be gone: a worker holding images takes a moment to free them.
KILL_WAIT_S = 1.0


def kill(pids: set[int], wait_s: float = KILL_WAIT_S) -> None:
    """SIGKILL each of ``pids`` that still exists, then wait (up to ``wait_s``) until none of them runs, so that a
    tune that returns has ended them rather than only signalled them."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + wait_s
    while any(map(_running, pids)) and time.monotonic() < deadline:
        time.sleep(0.01)


def _running(pid: int) -> bool:
    """Whether ``pid`` still runs: a zombie (dead, not yet reaped by its parent) does not."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        pass
    # no /proc (macOS, BSD): a zombie still answers, so the wait may run to its end
    return not Path("/proc/self").is_dir() and pid_alive(pid)


def pid_alive(pid: int) -> bool:
    """Whether a process of this machine with this pid exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def pool_workers(me: int) -> set[int]:
    """The loky worker processes ``me`` started (its children running loky's worker entry point; not loky's resource
    trackers, which leave by themselves once their parent's pipe closes)."""
    return {
        pid
        for pid, command in children_with_commands(me).items()
        if "loky" in command and "resource_tracker" not in command
    }


def is_own(pid: int, me: int) -> bool:
    """Whether ``pid`` is ``me`` or one of its children (a worker this tune started)."""
    return pid == me or parent_of(pid) == me


def children_with_commands(me: int) -> dict[int, str]:
    """``{pid: command line}`` of the children of ``me``."""
    tasks = Path(f"/proc/{me}/task")
    if not tasks.is_dir():
        return {pid: command for pid, ppid, command in _ps() if ppid == me}
    found: dict[int, str] = {}
    for task in tasks.glob("*"):
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        for child in map(int, children):
            try:
                found[child] = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
    return found


def parent_of(pid: int) -> int | None:
    """The parent process id of ``pid`` (None when it is gone or cannot be read)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return next((ppid for p, ppid, _ in _ps() if p == pid), None)


def _ps() -> list[tuple[int, int, str]]:
    """``(pid, ppid, command)`` of every process, from ``ps`` (systems without /proc: macOS, BSD)."""
    try:
        out = subprocess.run(["ps", "-A", "-o", "pid=,ppid=,command="], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return []
    rows = []
    for line in out.stdout.splitlines():
        fields = line.split(None, 2)
        if len(fields) >= 2 and fields[0].isdigit() and fields[1].isdigit():
            rows.append((int(fields[0]), int(fields[1]), fields[2] if len(fields) == 3 else ""))
    return rows
