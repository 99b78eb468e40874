"""Child processes die with their parent, so a kill -9 of `cpt` leaves nothing running.

Linux has no process-tree kill, so every child asks the kernel to be sent SIGKILL when its parent goes
(prctl PR_SET_PDEATHSIG, kept across exec):
- Python-level forks (curate -j N pool workers, megatron-core's forked checkpoint writers): an at-fork hook.
- multiprocessing's fork+exec children (its resource tracker, "spawn" children such as the Manager server
  megatron-core starts for save results): `multiprocessing.util.spawnv_passfds` is routed through a
  Python fork so the hook runs before exec.
- Commands we launch ourselves (torchrun): `popen_kwargs()` for subprocess.Popen.
- Processes started by someone else on our behalf (torchrun's ranks, in their own sessions): `install()`
  sets it for the current process when it runs under torchrun.
PR_SET_PDEATHSIG fires when the forking *thread* ends, so forks from non-main threads are left alone.
Elsewhere than Linux all of this is a no-op.
"""

from __future__ import annotations

import functools
import os
import signal
import sys
import threading
from pathlib import Path

from cpt_megatron.utils import pid_alive  # re-exported: the process checks use it

__all__ = ["install", "die_with_parent", "popen_kwargs", "children", "pid_alive", "keep_freed_heap"]

_PR_SET_PDEATHSIG = 1
_installed = False
_fork_from_main = True
_parent_pid = 0


def die_with_parent(sig: int = signal.SIGKILL, parent: int | None = None) -> bool:
    """Ask the kernel to send `sig` to this process when its parent exits; True when set. If `parent` is
    given and already gone (the race between fork and prctl), exit at once."""
    prctl = _prctl()
    if prctl is None:
        return False
    ok = prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    if parent is not None and os.getppid() != parent:
        os._exit(128 + int(sig))
    return ok


@functools.cache
def _prctl():
    """libc's prctl, looked up once in the parent (no dlopen inside a forked child of a threaded process)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters


def keep_freed_heap(mmap_threshold: int = 32 << 20, trim_threshold: int = 64 << 20) -> bool:
    """glibc: serve allocations below `mmap_threshold` from the heap and keep up to `trim_threshold` of
    freed heap, for a process that allocates and frees array-sized temporaries in a loop (curation).
    By default every numpy temporary >= 128 KiB is a fresh mmap and each of its pages a page fault (and
    a zeroed page): `cpt curate` on CUAD paragraphs took 169k minor faults and 0.40 s of system time,
    16k and 0.25 s with this (wall -8%, peak RSS +1 MiB: the heap keeps the high-water mark the run
    reaches anyway). Forked workers inherit it. False where there is no glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold))) and bool(mallopt(_M_TRIM_THRESHOLD, int(trim_threshold)))


def _before_fork() -> None:
    global _fork_from_main, _parent_pid
    _fork_from_main = threading.current_thread() is threading.main_thread()
    _parent_pid = os.getpid()


def _after_fork_in_child() -> None:
    if _fork_from_main:
        die_with_parent(parent=_parent_pid)


def _spawnv_passfds(path, args, passfds):
    """multiprocessing.util.spawnv_passfds through os.fork (runs the at-fork hooks), then exec."""
    passfds = sorted({int(fd) for fd in passfds})
    pid = os.fork()
    if pid == 0:
        try:
            keep = [0, 1, 2, *passfds]
            lo = 3
            for fd in sorted(set(keep)):
                if fd >= lo:
                    os.closerange(lo, fd)
                    lo = fd + 1
            os.closerange(lo, os.sysconf("SC_OPEN_MAX") if hasattr(os, "sysconf") else 65536)
            for fd in passfds:
                os.set_inheritable(fd, True)
            os.execv(path, args)
        finally:
            os._exit(127)
    return pid


def install() -> None:
    """Once per process (the CLI calls it first): hooks for every future child; under torchrun, this
    process itself dies with its agent."""
    global _installed
    if _installed or not sys.platform.startswith("linux"):
        return
    _installed = True
    _prctl()
    os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)
    import multiprocessing.util as mpu

    mpu.spawnv_passfds = _spawnv_passfds
    if "TORCHELASTIC_RUN_ID" in os.environ:
        die_with_parent()


def _preexec(parent: int) -> None:
    die_with_parent(parent=parent)


def popen_kwargs(new_session: bool = True) -> dict:
    """subprocess.Popen kwargs: the child dies with us and (by default) leads its own process group, so
    terminal signals reach only us and we decide what to forward."""
    kw: dict = {"start_new_session": new_session}
    if _prctl() is not None:
        kw["preexec_fn"] = functools.partial(_preexec, os.getpid())
    return kw


def children(pid: int, recursive: bool = False) -> list[int]:
    """Child pids of `pid` from /proc (Linux; [] elsewhere)."""
    by_parent: dict[int, list[int]] = {}
    for p in Path("/proc").iterdir() if Path("/proc").is_dir() else ():
        if not p.name.isdigit():
            continue
        try:
            stat = (p / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        by_parent.setdefault(ppid, []).append(int(p.name))
    out, todo = [], [pid]
    while todo:
        kids = by_parent.get(todo.pop(), [])
        out.extend(kids)
        if recursive:
            todo.extend(kids)
    return out


