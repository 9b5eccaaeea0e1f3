"""Processes on this machine: whether one still runs, and ending one with all it started.

spotmesh's local processes (a mesh's servers, the autoscaler's replicas) each run in a session
of their own, so a process group is one server and the children it started (a replica's vLLM
engine core).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` names a running process (a zombie, exited but not yet reaped, is not)."""
    if pid <= 0:  # 0 and negatives name process groups, not a process
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def kill_group(pid: int) -> None:
    """SIGKILL the process group led by ``pid``: the server and everything it started."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
