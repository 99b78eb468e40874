"""A failed checkpoint save leaves no partial folder behind and says why in one line.

`save_guard(run_dir, rank0)` wraps one save. Before it, rank 0 (the run-lock holder, so no other trainer is
writing here) removes partial saves a killed run left (`RUN/checkpoints/.iter_*.tmp`). If the save fails,
rank 0 removes the partial folder; when the disk is full (ENOSPC/EDQUOT anywhere in the exception chain,
or torch's writer failing with less space left than the last checkpoint took) the error becomes one
CptError line with the folder, the bytes needed and the bytes free. With `checkpoint.async_save` the
write fails later, in the background writer: the saver's poll/wait/close run under
`save_guard(..., clean_first=False)` (the folder being written is no leftover), with the same outcome.
"""

from __future__ import annotations

import contextlib
import errno
import shutil
from collections.abc import Iterator
from pathlib import Path

from cpt_megatron.errors import CptError

__all__ = ["save_guard", "remove_partial_saves", "disk_full_error"]

_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
_DISK_FULL_TEXT = ("No space left on device", "Disk quota exceeded", "[Errno 28]", "[Errno 122]")


def _tree_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def remove_partial_saves(ckpt_root: Path) -> list[str]:
    removed = []
    for p in sorted(ckpt_root.glob(".iter_*.tmp")):
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p.name)
    return removed


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def disk_full_error(exc: BaseException, folder: Path, needed: int | None, free: int) -> CptError | None:
    """A one-line CptError when `exc` looks like a full disk, else None."""
    full = any(isinstance(e, OSError) and e.errno in _DISK_FULL for e in _chain(exc))
    full = full or any(t in str(e) for e in _chain(exc) for t in _DISK_FULL_TEXT)
    full = full or (needed is not None and free < needed)
    if not full:
        return None
    need = f"~{needed:,} bytes needed (the size of the last checkpoint), " if needed else ""
    return CptError(f"no space left to save checkpoint {folder}: {need}{free:,} bytes free on its file system; "
                    "free space (checkpoint.keep_last prunes old ones) or move run.dir, then resume")


@contextlib.contextmanager
def save_guard(run_dir: str | Path, rank0: bool, clean_first: bool = True) -> Iterator[None]:
    root = Path(run_dir) / "checkpoints"
    if clean_first and rank0 and root.is_dir():
        remove_partial_saves(root)
    try:
        yield
    except BaseException as exc:
        if not root.is_dir():
            raise
        partial = sorted(root.glob(".iter_*.tmp"))
        done = sorted(p for p in root.glob("iter_*") if p.is_dir())
        needed = _tree_bytes(done[-1]) if done else None
        free = shutil.disk_usage(root).free  # before the partial folder is removed
        if rank0:
            remove_partial_saves(root)
        err = disk_full_error(exc, partial[0] if partial else root, needed, free)
        if err is not None:
            raise err from exc
        raise
