"""Who runs a run: a process identity (host, pid, start time) that stays true after pid reuse,
and the one question asked of it: is that process certainly gone? And a child that must not
outlive its parent."""

from __future__ import annotations

import ctypes
import socket

import psutil


def process_identity(pid: int | None = None) -> str:
    """``host:pid:start``: with its start time a pid names one process, even after the pid is reused."""
    process = psutil.Process(pid)
    return f"{socket.gethostname()}:{process.pid}:{process.create_time():.2f}"


def identity_is_dead(identity: str | None) -> bool:
    """True only when we can tell for sure: the process ran on this host and is gone (or the pid is
    now another process's). Another host's process, or an identity we cannot parse: False."""
    if not identity or identity.count(":") < 2:
        return False
    host, pid, start = identity.rsplit(":", 2)
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        return f"{psutil.Process(int(pid)).create_time():.2f}" != start
    except psutil.NoSuchProcess:
        return True
    except psutil.Error:  # e.g. access denied: it exists
        return False


PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int) -> bool:
    """Ask Linux to send this process ``sig`` when the thread that started it ends (so its parent,
    when that was the main thread); False where the OS cannot (not Linux)."""
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, sig) == 0
    except (OSError, AttributeError):
        return False
