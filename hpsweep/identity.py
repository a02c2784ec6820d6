"""Who runs a run: a process identity (host, pid, start time) that stays true after pid reuse,
and the one question asked of it: is that process certainly gone?"""

from __future__ import annotations

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
