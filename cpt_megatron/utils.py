"""Small shared helpers: atomic writes, hashing, JSON lines. No heavy imports here."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_dir", "atomic_file", "sha256_file", "write_json", "append_jsonl", "read_jsonl", "current_umask",
           "os_error_line", "lone_surrogate"]

_SURROGATE = re.compile("[\ud800-\udfff]")


def lone_surrogate(text: str) -> int | None:
    """Index of the first lone surrogate (U+D800-U+DFFF) in `text`, else None. Valid JSON can carry one as a
    `\\ud800` escape; it cannot be encoded to UTF-8, so readers treat such a record as malformed."""
    m = _SURROGATE.search(text)
    return m.start() if m else None


def current_umask() -> int:
    """The process umask, read without changing it where /proc allows (os.umask can only set-and-return)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def _honour_umask(path: str | os.PathLike, is_dir: bool) -> None:
    """mkstemp/mkdtemp create 0600/0700 (private while being written); the renamed result gets the modes a
    plain open()/mkdir() would have given (0666/0777 & ~umask), like `cp`."""
    os.chmod(path, (0o777 if is_dir else 0o666) & ~current_umask())


def os_error_line(e: OSError, path: str | os.PathLike | None = None, needed: int | None = None) -> str:
    """One line for an OS error: what failed, on which path, and for a full disk the bytes needed/free."""
    import errno

    target = path or e.filename or "?"
    msg = f"{e.strerror or e}: {target}"
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        probe = Path(target)
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        try:
            free = shutil.disk_usage(probe).free
            msg += f" ({free:,} bytes free" + (f", {needed:,} needed" if needed else "") + "); free space or " \
                   "point the output to a bigger file system"
        except OSError:
            pass
    return msg


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w") -> Iterator:
    """Write to a temp file beside `path`, fsync, rename on success; remove it on failure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        _honour_umask(tmp, is_dir=False)
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp directory beside `path`; on success it replaces `path`, on failure it is removed."""
    path = Path(path)
    if path.exists() and not overwrite:
        from cpt_megatron.errors import CptError

        raise CptError(f"output {path} already exists; pass --overwrite to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        _honour_umask(tmp, is_dir=True)
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json(path: str | os.PathLike, obj, indent: int = 2) -> None:
    with atomic_file(path) as f:
        json.dump(obj, f, indent=indent, sort_keys=False, default=str)
        f.write("\n")


def append_jsonl(path: str | os.PathLike, obj) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(obj, default=str) + "\n")


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
