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
           "os_error_line", "lone_surrogate", "read_text", "read_json", "read_yaml", "iter_jsonl", "check_text_file",
           "binary_kind", "parse_size", "check_gguf", "fault_point", "pid_alive", "retire_dir", "publish_dir",
           "remove_stale_temps"]

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


def have_module(module: str) -> bool:
    """True when `module` is importable (found on the path), without importing it."""
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


@contextlib.contextmanager
def hf_quiet(gguf: bool = False) -> Iterator[None]:
    """transformers without its per-tensor progress bars ("Loading weights"; with `gguf`, the GGUF de-quantizing
    one) while we load a model: our steps print one line each, and a bar inside another step's line is noise."""
    import functools
    import importlib

    from transformers.utils import logging as hf_logging

    mod = importlib.import_module("transformers.modeling_gguf_pytorch_utils") if gguf else None
    was, gguf_tqdm = hf_logging.is_progress_bar_enabled(), getattr(mod, "tqdm", None)
    hf_logging.disable_progress_bar()
    if gguf_tqdm is not None:  # that module calls tqdm.auto directly, past transformers' switch
        mod.tqdm = functools.partial(gguf_tqdm, disable=True)
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()
        if gguf_tqdm is not None:
            mod.tqdm = gguf_tqdm


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
        try:
            with open(tmp, mode) as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            _raise_named(e, path)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def fault_point(name: str) -> None:
    """Fault injection for the reliability tests: kill -9 this process at the point `name` when the
    environment says CPT_FAULT=name (never active otherwise). The one place kill points are read."""
    if os.environ.get("CPT_FAULT") == name:
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def pid_alive(pid: int) -> bool:
    """True when `pid` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            return False
        except PermissionError:
            return True


def _host() -> str:
    import socket

    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname().split(".")[0]) or "host"


def _owner_tag() -> str:
    """pid@host: who writes a temp (`.NAME.<pid>@<host>.*.tmp`) or holds an old output aside (`.NAME.<pid>@<host>.old`)."""
    return f"{os.getpid()}@{_host()}"


def remove_stale_temps(path: str | os.PathLike) -> list[str]:
    """Clean what a killed writer of `path` left beside it: its temp folders/files (`.NAME.<pid>@<host>.*.tmp`)
    are removed; an old output it had moved aside (`.NAME.<pid>@<host>.old`) is put back when `path` is
    missing (the swap was cut between its two renames), else removed. Only for writers on this host whose
    pid is gone. Each action is named on stderr; returns the lines."""
    import sys

    path = Path(path)
    if not path.parent.is_dir():
        return []
    pat = re.compile(re.escape(f".{path.name}.") + r"(\d+)@([A-Za-z0-9_-]+)\.(?:(old)|[^/]*\.tmp)$")
    lines = []
    for f in sorted(path.parent.iterdir()):
        m = pat.match(f.name)
        if not m or m.group(2) != _host() or int(m.group(1)) == os.getpid() or pid_alive(int(m.group(1))):
            continue
        if m.group(3) and not path.exists():
            os.replace(f, path)
            lines.append(f"restored {path} from {f.name} (a replace killed between its renames, pid {m.group(1)})")
        else:
            shutil.rmtree(f) if f.is_dir() and not f.is_symlink() else f.unlink()
            lines.append(f"removed stale {f} (left by pid {m.group(1)}, no longer running)")
    for line in lines:
        print(f"cpt: {line}", file=sys.stderr, flush=True)
    return lines


def retire_dir(path: str | os.PathLike) -> None:
    """Delete a folder by renaming it aside first (`.NAME.<pid>@<host>.retired.tmp`), then removing that: a kill at
    any point leaves either the whole folder or none under `path` (the next writer removes the aside)."""
    path = Path(path)
    if not path.exists():
        return
    aside = path.with_name(f".{path.name}.{_owner_tag()}.retired.tmp")
    os.replace(path, aside)
    fault_point("retire")
    shutil.rmtree(aside)


def publish_dir(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """Put the finished folder `tmp` in place at `path`: the old one (if any) aside, the new in place, the old
    deleted last. A kill between the renames leaves the old aside; the next writer puts it back."""
    path = Path(path)
    aside = None
    if path.exists():
        aside = path.with_name(f".{path.name}.{_owner_tag()}.old")
        os.replace(path, aside)
        fault_point("publish.aside")
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    if aside is not None:
        fault_point("publish.retire")
        shutil.rmtree(aside)


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _raise_named(e: OSError, path: Path):
    """Re-raise an OS error; one raised by a write without a file name (numpy, safetensors, gzip: the CLI would
    print '?') gets `path`, the output being written, so a full disk names it."""
    if e.filename or not e.errno:
        raise e
    raise type(e)(e.errno, e.strerror, str(path)) from e


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp directory beside `path` (`.NAME.<pid>@<host>.<random>.tmp`); on success it replaces `path`
    (`publish_dir`: old aside, new in place, old deleted last), on failure it is removed. Temps and asides of
    killed earlier writers of `path` are cleaned first (`remove_stale_temps`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    if path.exists() and not overwrite:
        from cpt_megatron.errors import CptError

        raise CptError(f"output {path} already exists; pass --overwrite to replace it")
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.{_owner_tag()}.", suffix=".tmp", dir=path.parent))
    try:
        _honour_umask(tmp, is_dir=True)
        try:
            yield tmp
        except OSError as e:
            _raise_named(e, path)
        fault_point("atomic_dir.before_publish")
        publish_dir(tmp, path)
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


def read_jsonl(path: str | os.PathLike, what: str = "JSONL file",
               hint: str = "fix or delete that line (a killed run can leave a partial last line)") -> list[dict]:
    return [obj for _, obj in iter_jsonl(path, what, hint=hint)]


# ---------------------------------------------------------------------------------------------------
# Reading user-supplied files: every failure is one CptError line naming the file (and line) and the fix.

_BINARY_MAGIC = {b"\x89PNG": "a PNG image", b"\xff\xd8\xff": "a JPEG image", b"GIF8": "a GIF image",
                 b"%PDF": "a PDF", b"PK\x03\x04": "a zip archive", b"\x1f\x8b": "gzip data",
                 b"GGUF": "a GGUF model file", b"\x7fELF": "an executable"}


def _user_error(msg: str):
    from cpt_megatron.errors import CptError

    return CptError(msg)


def binary_kind(head: bytes) -> str | None:
    """'a PNG image', ... when `head` (a file's first bytes) is not text; None for (probably) text."""
    for magic, kind in _BINARY_MAGIC.items():
        if head.startswith(magic):
            return kind
    # NULs on two or more lines: binary. NULs on one line only are damage to that line (a zeroed block, a stray
    # byte): the readers report it as one malformed line, wherever in the file it sits
    nul_lines = sum(1 for line in head[:8192].split(b"\n") if b"\x00" in line)
    return "binary data (NUL bytes)" if nul_lines >= 2 else None


def check_text_file(path: str | os.PathLike, what: str, hint: str = "give a UTF-8 text file") -> Path:
    """Refuse a missing, directory or binary `path` (checks the first 8 KiB only); returns it as a Path."""
    p = Path(path)
    if p.is_dir():
        raise _user_error(f"{what} {p} is a directory; {hint}")
    try:
        with open(p, "rb") as f:
            head = f.read(8192)
    except FileNotFoundError:
        raise _user_error(f"{what} {p} not found; {hint}") from None
    except OSError as e:
        raise _user_error(f"{what} {p} cannot be read ({e.strerror}); {hint}") from None
    kind = binary_kind(head)
    if kind:
        raise _user_error(f"{what} {p} is {kind}, not text; {hint}")
    return p


def _decode_error(p: Path, data: bytes, e: UnicodeDecodeError, what: str, hint: str):
    line = data.count(b"\n", 0, e.start) + 1
    return _user_error(f"{what} {p}:{line}: not UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start}); "
                       f"re-encode it as UTF-8 (e.g. iconv -f latin1 -t utf-8) or {hint}")


def read_text(path: str | os.PathLike, what: str = "file", *, max_chars: int | None = None,
              hint: str = "give a UTF-8 text file") -> str:
    """The UTF-8 text of a user-given file (at most `max_chars` characters), or one CptError line."""
    p = check_text_file(path, what, hint)
    limit = None if max_chars is None else 4 * max_chars + 4  # UTF-8: at most 4 bytes per character
    with open(p, "rb") as f:
        data = f.read() if limit is None else f.read(limit)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        if len(data) != limit or e.start < len(data) - 4:  # not merely a character cut at the read limit
            raise _decode_error(p, data, e, what, hint) from None
        text = data[: e.start].decode("utf-8")
    return text if max_chars is None else text[:max_chars]


def read_json(path: str | os.PathLike, what: str = "JSON file", *, hint: str = "give a JSON file"):
    """Parse a user-given JSON file; errors name the file, line and column."""
    p = Path(path)
    text = read_text(p, what, hint=hint)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise _user_error(f"{what} {p}:{e.lineno}:{e.colno}: not valid JSON ({e.msg}); {hint}") from None


def read_yaml(path: str | os.PathLike, what: str = "YAML file", *, hint: str = "give a YAML file"):
    """Parse a user-given YAML file (empty -> {}); errors name the file and line."""
    import yaml

    p = Path(path)
    text = read_text(p, what, hint=hint)
    try:
        return yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise _user_error(f"{what} {p}{where}: not valid YAML ({problem}); {hint}") from None


def iter_jsonl(path: str | os.PathLike, what: str = "JSONL file", *, hint: str = "one JSON object per line"
               ) -> Iterator[tuple[int, dict]]:
    """Yield (line number, object) for each non-blank line; a bad line is one CptError naming file:line."""
    p = check_text_file(path, what, hint)
    with open(p, "rb") as f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                raise _user_error(f"{what} {p}:{n}: not UTF-8 (byte 0x{raw[e.start]:02x}); {hint}") from None
            except json.JSONDecodeError as e:
                raise _user_error(f"{what} {p}:{n}: not valid JSON ({e.msg} at column {e.colno}); {hint}") from None
            if not isinstance(obj, dict):
                raise _user_error(f"{what} {p}:{n}: expected a JSON object, got {type(obj).__name__}; {hint}")
            yield n, obj


_SIZE_UNITS = (("GIB", 2**30), ("MIB", 2**20), ("KIB", 2**10), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3), ("B", 1))


def parse_size(s: str | int, what: str = "--max-shard-size") -> int:
    """'5GB' / '500MiB' / '1e9' / 123 -> bytes (> 0); anything else is one CptError line."""
    if isinstance(s, int) and not isinstance(s, bool):
        n = s
    else:
        t = str(s).strip().upper().replace("_", "")
        mult = 1
        for unit, m in _SIZE_UNITS:
            if t.endswith(unit):
                t, mult = t[: -len(unit)].strip(), m
                break
        try:
            n = int(float(t) * mult)
        except ValueError:
            raise _user_error(f"{what}: cannot parse {s!r}; give a size like 5GB, 500MB or 2GiB") from None
    if n <= 0:
        raise _user_error(f"{what} {s!r}: must be a positive size, e.g. 5GB")
    return n


def check_gguf(path: str | os.PathLike, what: str = "GGUF file") -> Path:
    """Refuse a missing, empty or non-GGUF file before transformers tries to memory-map it."""
    p = Path(path)
    if not p.is_file():
        raise _user_error(f"{what} {p} not found; give the path of a .gguf model file")
    with open(p, "rb") as f:
        head = f.read(4)
    if head != b"GGUF":
        found = "is empty" if not head else f"does not start with the GGUF magic (starts with {head!r})"
        raise _user_error(f"{what} {p} {found}: not a GGUF model; re-download or re-copy it")
    return p


def gather_runs(values, starts, lens):
    """values[starts[0]:starts[0]+lens[0]] ++ values[starts[1]:...] ++ ... in one fancy index (numpy)."""
    import numpy as np

    total = int(lens.sum())
    if total == 0:
        return values[:0]
    base = np.repeat(starts - np.concatenate([[0], np.cumsum(lens)[:-1]]), lens)
    return values[base + np.arange(total)]


def equal_runs(sorted_keys) -> list[tuple[int, int]]:
    """(start, end) of each run of equal values in a sorted array."""
    import numpy as np

    if len(sorted_keys) == 0:
        return []
    cut = np.flatnonzero(sorted_keys[1:] != sorted_keys[:-1]) + 1
    edges = np.concatenate([[0], cut, [len(sorted_keys)]])
    return list(zip(edges[:-1].tolist(), edges[1:].tolist()))


def flatten_ids(ids):
    """(lists of token ids back to back as int64, each list's length), the shape `encode_flat` returns."""
    from itertools import chain

    import numpy as np

    lengths = np.fromiter(map(len, ids), np.int64, len(ids))
    return np.fromiter(chain.from_iterable(ids), np.int64, int(lengths.sum())), lengths
