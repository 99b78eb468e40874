"""THE on-disk layout of every checkpoint cpt-megatron writes or reads (Megatron-LM's own layout).

    SAVE/latest_checkpointed_iteration.txt   "release" (converted bases) or the iteration ("10"), written LAST
    SAVE/release/ or SAVE/iter_0000010/      megatron-core torch_dist files (.metadata, __R_S.distcp,
                                             metadata.json, common.pt with checkpoint_version/iteration/args)
                                             + cpt_meta.json, tokenizer/, megatron_args.txt, cpt_manifest.json

`resolve()` turns anything a user may hand us (a save root with Megatron-LM's tracker, an iteration
folder, a checkpoint in our pre-Megatron-LM layout: tensors + cpt_meta.json at the top, or a run's
checkpoints/ with the old `latest` tracker) into the iteration folder that holds the tensors. Every loader
goes through it. `cpt_manifest.json` (sizes + an xxh3_64 checksum per file, written last inside the folder) is checked
by `check_manifest()`; read errors of damaged files become one line naming the file (`read_errors()`).
"""

from __future__ import annotations

import contextlib
import json
import os
import zlib
from pathlib import Path

from cpt_megatron.errors import CptError

__all__ = [
    "TRACKER", "OLD_TRACKER", "RELEASE", "MANIFEST", "iter_name", "is_ckpt_folder", "read_tracker", "resolve",
    "write_tracker", "iteration_folders", "write_manifest", "check_manifest", "read_errors", "load_common",
]

TRACKER = "latest_checkpointed_iteration.txt"
OLD_TRACKER = "latest"  # cpt-megatron before the Megatron-LM layout (RUN/checkpoints/latest -> iter_N)
RELEASE = "release"
MANIFEST = "cpt_manifest.json"
_CHUNK = 8 << 20


def iter_name(step: int) -> str:
    return f"iter_{int(step):07d}"


def is_ckpt_folder(p: str | os.PathLike) -> bool:
    """A folder holding torch_dist tensors (what dist_checkpointing loads)."""
    p = Path(p)
    return (p / "metadata.json").is_file() or (p / ".metadata").is_file()


def read_tracker(root: str | os.PathLike) -> str | None:
    """The iteration folder name the save root's tracker names (Megatron-LM's, else our old one), or None."""
    root = Path(root)
    f = root / TRACKER
    if f.is_file():
        text = f.read_text().strip()
        if text == RELEASE:
            return RELEASE
        try:
            return iter_name(int(text))
        except ValueError:
            raise CptError(f"{f}: expected an iteration number or 'release', found {text[:40]!r}") from None
    old = root / OLD_TRACKER
    if old.is_file():
        name = old.read_text().strip()
        if not name or "/" in name:
            raise CptError(f"{old}: expected a folder name like iter_0000010, found {name[:40]!r}")
        return name
    return None


def resolve(path: str | os.PathLike) -> Path:
    """The iteration folder of a checkpoint given as a save root, an iteration folder or our old layout."""
    p = Path(path)
    if not p.exists():
        raise CptError(f"checkpoint {p} not found")
    if p.is_file() and p.name in (TRACKER, OLD_TRACKER):  # e.g. slurm/convert.sh's CKPT=RUN/checkpoints/latest
        return resolve(p.parent)
    if not p.is_dir():
        raise CptError(f"checkpoint {p} is not a directory (give the save root or an iter_*/release folder)")
    if is_ckpt_folder(p):
        return p
    name = read_tracker(p)
    if name is None:
        if (p / "checkpoints").is_dir() and read_tracker(p / "checkpoints"):
            return resolve(p / "checkpoints")  # a run dir
        raise CptError(f"{p}: not a checkpoint (no {TRACKER}, no iter_*/release folder with metadata.json)")
    d = p / name
    if not is_ckpt_folder(d):
        raise CptError(f"{p}: its tracker names {name} but {d} {'is incomplete' if d.is_dir() else 'does not exist'}")
    return d


def write_tracker(root: str | os.PathLike, folder: str) -> None:
    """Atomically point the save root at `folder` (release or iter_N); call after the folder is complete."""
    from cpt_megatron.utils import atomic_file

    text = RELEASE if folder == RELEASE else str(int(folder.split("_", 1)[1]))
    with atomic_file(Path(root) / TRACKER) as f:
        f.write(text)  # Megatron-LM writes the bare number / 'release'


def iteration_folders(root: str | os.PathLike) -> list[Path]:
    """iter_* folders under a save root, oldest first (complete or not)."""
    root = Path(root)
    out = []
    for p in root.glob("iter_*"):
        with contextlib.suppress(ValueError):
            if p.is_dir():
                out.append((int(p.name.split("_", 1)[1]), p))
    return [p for _, p in sorted(out)]


# -- integrity ---------------------------------------------------------------------------------------------
def _digest(path: Path, algorithm: str = "xxh3_64") -> str:
    """Streamed checksum of a file: xxh3_64 (~20 GB/s, the default) or crc32 (stdlib fallback)."""
    if algorithm == "xxh3_64":
        import xxhash

        h = xxhash.xxh3_64()
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
        return h.hexdigest()
    if algorithm != "crc32":
        raise CptError(f"{path.parent / MANIFEST}: unknown checksum algorithm {algorithm!r}")
    c = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            c = zlib.crc32(chunk, c)
    return f"{c:08x}"


def _algorithm() -> str:
    try:
        import xxhash  # noqa: F401
    except ImportError:
        return "crc32"
    return "xxh3_64"


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST and not p.name.endswith(".tmp"))


def write_manifest(folder: str | os.PathLike) -> dict:
    """Record size + checksum (xxh3_64; crc32 without xxhash) of every file in `folder` (call last)."""
    from cpt_megatron.utils import write_json

    folder = Path(folder)
    algo = _algorithm()
    files = {str(p.relative_to(folder)): {"size": p.stat().st_size, "checksum": _digest(p, algo)} for p in _files(folder)}
    man = {"format": "cpt-manifest/1", "algorithm": algo, "files": files}
    write_json(folder / MANIFEST, man)
    return man


def check_manifest(folder: str | os.PathLike, *, checksums: bool = True) -> bool:
    """Raise a one-line CptError naming the first missing/truncated/corrupt file; False when no manifest."""
    folder = Path(folder)
    f = folder / MANIFEST
    if not f.is_file():
        return False
    try:
        man = json.loads(f.read_text())
        files, algo = man["files"], man.get("algorithm", "crc32")
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CptError(f"{f}: corrupt checkpoint manifest ({e}); the checkpoint is damaged") from e
    for rel, want in files.items():
        p = folder / rel
        if not p.is_file():
            raise CptError(f"{p}: missing from the checkpoint (listed in {MANIFEST}); the checkpoint is damaged")
        size = p.stat().st_size
        if size != want["size"]:
            raise CptError(f"{p}: truncated or damaged ({size} bytes, the manifest says {want['size']})")
    if checksums:
        for rel, want in files.items():
            if _digest(folder / rel, algo) != want.get("checksum", want.get("crc32")):
                raise CptError(f"{folder / rel}: checksum mismatch ({algo} differs from {MANIFEST}); the file is corrupt")
    return True


@contextlib.contextmanager
def read_errors(folder: str | os.PathLike):
    """Turn the unpickling/EOF/torch errors of a damaged checkpoint into one line naming the file."""
    import pickle
    import warnings

    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException wrapping rank failures

    try:
        with warnings.catch_warnings():  # torch's planner on megatron-core's ShardedTensors: not the user's concern
            warnings.filterwarnings("ignore", message=".*deprecating ShardedTensor", category=FutureWarning)
            warnings.filterwarnings("ignore", message="`load_state_dict` is deprecated", category=FutureWarning)
            yield
    except CptError:
        raise
    except (EOFError, pickle.UnpicklingError, RuntimeError, ValueError, OSError, KeyError, CheckpointException) as e0:
        from megatron.core.dist_checkpointing.core import CheckpointingException

        e = e0
        if isinstance(e0, CheckpointException):
            inner = [f[0] if isinstance(f, tuple) else f for f in getattr(e0, "failures", {}).values()]
            e = next((x for x in inner if isinstance(x, BaseException)), e0)
        if isinstance(e, CptError):
            raise e from e0
        if isinstance(e, RuntimeError) and not isinstance(e, CheckpointingException) and \
                not _looks_like_read_error(e):
            raise
        raise CptError(f"{_damaged_file(folder, e)}: cannot read the checkpoint ({type(e).__name__}: "
                       f"{str(e).splitlines()[0][:160] if str(e) else 'no detail'}); the file is damaged or truncated") from e0


def _looks_like_read_error(e: BaseException) -> bool:
    text = f"{e} {e.__cause__ or ''}".lower()
    return any(w in text for w in ("unpickl", "eof", "truncat", "corrupt", "pickle", "storage", "read", "invalid",
                                   "unexpected pos", "checkpoint", "magic", "zip"))


def _damaged_file(folder, e: BaseException) -> Path:
    """The file a read error came from: the one named in the error, else the first that fails its manifest."""
    folder = Path(folder)
    text = f"{e} {e.__cause__ or ''}"
    for p in _files(folder):
        if p.name in text:
            return p
    try:
        check_manifest(folder)
    except CptError as bad:
        return Path(str(bad).split(":", 1)[0])
    short = _short_shard(folder)
    return short or folder


def _short_shard(folder: Path) -> Path | None:
    """Without a manifest: the .distcp shorter than the byte ranges .metadata assigns to it (or .metadata)."""
    try:
        from torch.distributed.checkpoint import FileSystemReader

        md = FileSystemReader(str(folder)).read_metadata()
    except BaseException:  # noqa: BLE001 - an unreadable .metadata is the answer
        return folder / ".metadata" if (folder / ".metadata").is_file() else None
    need: dict[str, int] = {}
    for info in (md.storage_data or {}).values():
        rel = getattr(info, "relative_path", None)
        if rel is not None:
            need[rel] = max(need.get(rel, 0), int(info.offset) + int(info.length))
    for rel, n in sorted(need.items()):
        p = folder / rel
        if not p.is_file() or p.stat().st_size < n:
            return p
    return None


def load_common(folder: str | os.PathLike) -> dict:
    """common.pt of an iteration folder (megatron-core's safe globals allow Megatron-LM's argparse Namespace)."""
    import megatron.core  # noqa: F401  (registers argparse.Namespace & co. as torch.load safe globals)
    import torch

    f = Path(folder) / "common.pt"
    if not f.is_file():
        raise CptError(f"{folder}: no common.pt; not a complete megatron-core checkpoint")
    with read_errors(folder):
        try:
            return torch.load(f, map_location="cpu", weights_only=True)
        except Exception as e:  # a pickled class outside the safe list: one line, not a traceback
            if isinstance(e, (EOFError, RuntimeError)) or "Weights only load failed" not in str(e):
                raise
            raise CptError(f"{f}: holds objects torch refuses to unpickle safely ({str(e).splitlines()[-1][:120]})") from e
