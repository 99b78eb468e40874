"""One trainer per run directory: RUN/.lock, an flock held by global rank 0 for the whole `cpt train`.

The kernel drops an flock when its holder dies (even by kill -9), so the lock itself never goes stale; the
file's content (host, pid, start time of the holder) is what remains of a dead holder and is only used for
messages: a second trainer refuses with one line naming the live holder, and a trainer that finds the
content of a holder that no longer holds the lock takes over with a warning. The file is never removed
(removing it would let two processes lock two different inodes). On file systems without flock the
content decides: a live pid on this host keeps the lock.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import socket
import sys
import weakref
from pathlib import Path

from cpt_megatron.errors import CptError

__all__ = ["RunLock", "hold_run_lock"]

LOCK_NAME = ".lock"


def _describe(holder: dict) -> str:
    return f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, started {holder.get('started', '?')}"


def _read(fd: int) -> dict:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = os.read(fd, 65536)
    try:
        return json.loads(raw) if raw.strip() else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {"host": "?", "pid": "?", "started": "? (unreadable lock file)"}


def _pid_alive_here(holder: dict) -> bool:
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return False
    from cpt_megatron.runtime.procs import pid_alive

    return holder["pid"] != os.getpid() and pid_alive(holder["pid"])


def _release(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)  # a clean exit leaves no holder behind
        fcntl.flock(fd, fcntl.LOCK_UN)
    with contextlib.suppress(OSError):
        os.close(fd)


class RunLock:
    """Held from construction until `release()` (or until the object is dropped / the process exits)."""

    def __init__(self, run_dir: str | os.PathLike):
        self.path = Path(run_dir) / LOCK_NAME
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            locked = True
        except BlockingIOError:
            holder = _read(fd)
            os.close(fd)
            raise CptError(f"{self.path.parent} is in use by another `cpt train` ({_describe(holder)}; lock "
                           f"{self.path}); wait for it to finish, stop it, or use another run.dir") from None
        except OSError:  # no flock on this file system: the recorded pid decides
            locked = False
        previous = _read(fd)
        if not locked and _pid_alive_here(previous):
            os.close(fd)
            raise CptError(f"{self.path.parent} is in use by another `cpt train` ({_describe(previous)}; lock "
                           f"{self.path}); wait for it to finish, stop it, or use another run.dir")
        if previous:
            print(f"cpt train: warning: taking over the stale lock {self.path} of a trainer that is gone "
                  f"({_describe(previous)})", file=sys.stderr, flush=True)
        me = {"host": socket.gethostname(), "pid": os.getpid(),
              "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
              "argv": sys.argv}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
        os.fsync(fd)
        self.holder = me
        self._finalizer = weakref.finalize(self, _release, fd)

    def release(self) -> None:
        self._finalizer()


def hold_run_lock(run_dir: str | os.PathLike, rank: int) -> RunLock | None:
    """The run lock on global rank 0 (the only rank that writes RUN/ files); None elsewhere."""
    return RunLock(run_dir) if rank == 0 else None
