"""Curated JSONL(.gz) -> Megatron `PREFIX.bin/.idx` + `PREFIX.meta.json`, parallel and resumable.

Flow: the main process cuts each input into chunks of about `chunk_bytes` at line boundaries (the
chunking depends only on the input, never on the worker count) and hands them to worker processes,
which parse JSON, tokenize in batches and write one shard pair per chunk and key under
`PREFIX.shards/`. A shard is finished when its `.done.json` exists; a rerun skips finished shards.
The shards are then merged in order by streaming into the final files (temp + rename), so the output
bytes are identical for any `--workers`, and memory stays bounded by a few chunks.

With several `--json-keys`, each key gets its own dataset `PREFIX_<key>` (one key: `PREFIX`), and
all of them are finalized (Megatron-LM 0.16.1 only finalizes the last one).

No torch or megatron import; transformers is imported only when the tokenizer is not in the
fast-BPE cache or must be used as the encoder (see `fast_bpe`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import gzip
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from cpt_megatron.data import fast_bpe
from cpt_megatron.data.indexed import IndexWriter, optimal_dtype
from cpt_megatron.errors import CptError
from cpt_megatron.utils import (
    flatten_ids,
    iter_jsonl,
    lone_surrogate,
    os_error_line,
    remove_stale_temps,
    retire_dir,
    write_json,
)

__all__ = ["PreprocessConfig", "preprocess", "output_prefixes", "read_meta"]

_FORMAT_VERSION = 1


@dataclasses.dataclass(kw_only=True)
class PreprocessConfig:
    inputs: list[str]
    """JSONL or JSONL.gz files, one document per line."""
    tokenizer: str
    """Tokenizer spec (see cpt_megatron.tokenizer.load)."""
    out: str
    """Output prefix: writes PREFIX.bin/.idx/.meta.json (PREFIX_<key>.* with several json keys)."""
    workers: int = 1
    """Tokenizer processes; 1 runs in-process. Output bytes do not depend on it."""
    append_eod: bool = False
    """Append the tokenizer's EOD id to each (non-empty) document."""
    keep_empty: bool = False
    """Write documents that tokenize to nothing as empty documents (a document boundary with no
    sequence), as Megatron's tools/preprocess_data.py does, so document indices match its output.
    Default: drop them (counted as `empty_docs_skipped`)."""
    json_keys: tuple[str, ...] = ("text",)
    """Fields to tokenize; each becomes its own dataset."""
    chunk_bytes: int = 8 << 20
    """Uncompressed input bytes per shard (changing it invalidates unfinished work)."""
    batch_docs: int = 1000
    """Documents per tokenizer call."""
    fast: bool = True
    """Use the verified tiktoken encoder for byte-level BPE tokenizers when possible."""
    progress: bool = True
    """tqdm bar on stderr."""
    keep_shards: bool = False
    """Keep PREFIX.shards/ after a successful merge."""

    def __post_init__(self):
        from cpt_megatron.tokenizer.load import resolve_spec

        self.tokenizer = resolve_spec(self.tokenizer)  # `@gpt2` -> its local path, as the CLI and `cpt prepare` do
        if not self.inputs:
            raise CptError("inputs: give at least one JSONL(.gz) file")
        if self.workers < 1:
            raise CptError(f"workers={self.workers}: must be >= 1")
        if not self.json_keys:
            raise CptError("json_keys: give at least one key, e.g. ['text']")
        if len(set(self.json_keys)) != len(self.json_keys):
            raise CptError(f"json_keys {list(self.json_keys)} has duplicates")
        self.json_keys = tuple(self.json_keys)


def output_prefixes(out: str, json_keys) -> dict[str, str]:
    keys = list(json_keys)
    return {keys[0]: out} if len(keys) == 1 else {k: f"{out}_{k}" for k in keys}


def read_meta(prefix: str) -> dict | None:
    p = Path(f"{prefix}.meta.json")
    return json.loads(p.read_text()) if p.is_file() else None


# ---------------------------------------------------------------------------------------------------
# Tokenizer set-up (main process; inherited by forked workers)


@dataclasses.dataclass
class _Tok:
    info: dict  # name, vocab_size, eod_id, sha256
    fast: object  # fast_bpe.FastBPE, fast_sp.FastSentencePiece or None
    spec: str
    hf: object = None
    encoder_name: str = "hf"

    def encode_flat(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(the documents' ids back to back, each document's length)."""
        if self.fast is not None:
            return self.fast.encode_flat(texts)
        if self.hf is None:
            from cpt_megatron.tokenizer.load import load_tokenizer

            self.hf = load_tokenizer(self.spec)
        return flatten_ids(fast_bpe.hf_encode_batch(self.hf, texts))


def _setup_tokenizer(cfg: PreprocessConfig, sample_texts) -> _Tok:
    from cpt_megatron.tokenizer.load import tokenizer_files

    spec = os.path.abspath(cfg.tokenizer)
    if not os.path.exists(spec):
        raise CptError(f"tokenizer {cfg.tokenizer!r} not found (give a local tokenizer path; nothing is downloaded)")
    from cpt_megatron.utils import sha256_file

    sha = {f.name: sha256_file(f) for f in tokenizer_files(spec)}
    threads = max(1, (os.cpu_count() or 1) // cfg.workers)  # sentencepiece's own threads per worker
    record, fast = fast_bpe.load_cached(sha, spec, threads) if sha else (None, None)
    if record is not None and (fast is not None or not cfg.fast or not record.get("fast")):
        info = {k: record[k] for k in ("name", "vocab_size", "eod_id")} | {"sha256": sha}
        tok = _Tok(info=info, fast=fast if cfg.fast else None, spec=spec)
        tok.encoder_name = f"{tok.fast.name} (verified against HF)" if tok.fast else f"hf ({record.get('why', 'no fast path')})"
        return tok
    from cpt_megatron.tokenizer.load import load_tokenizer, tokenizer_info

    hf = load_tokenizer(spec)
    ti = tokenizer_info(spec, hf)
    name = ti.name if os.path.exists(ti.name) and not ti.name.startswith(tempfile.gettempdir()) else ""
    name = name or "/".join(Path(spec).parts[-2:])  # the loader may stage files in a temp dir
    info = {"name": name, "vocab_size": ti.vocab_size, "eod_id": ti.eod_id, "sha256": ti.sha256}
    fast, why = (None, "disabled")
    if cfg.fast:
        fast, why = fast_bpe.build_and_verify(hf, sample_texts(), spec, threads)
        if sha:
            fast_bpe.save_cached(sha, {k: info[k] for k in ("name", "vocab_size", "eod_id")} | {"why": why}, fast)
    tok = _Tok(info=info, fast=fast, spec=spec, hf=hf)
    tok.encoder_name = f"{fast.name} (verified against HF)" if fast else f"hf ({why})"
    return tok


# ---------------------------------------------------------------------------------------------------
# Reading input into chunks


class _HashingReader:
    """Wraps a raw file: sha256 of the bytes read (the file as stored, compressed or not)."""

    def __init__(self, f):
        self.f, self.h, self.pos = f, hashlib.sha256(), 0

    def read(self, n=-1):
        b = self.f.read(n)
        self.h.update(b)
        self.pos += len(b)
        return b

    def readable(self):
        return True


def _open_input(path: str):
    try:
        raw = open(path, "rb")
    except OSError as e:
        raise CptError(f"cannot read input {path}: {e.strerror}") from e
    hr = _HashingReader(raw)
    with open(path, "rb") as probe:
        magic = probe.read(2)
    stream = gzip.GzipFile(fileobj=hr, mode="rb") if magic == b"\x1f\x8b" else hr
    return raw, hr, stream


def _chunks(paths: list[str], chunk_bytes: int, hashes: dict) -> Iterator[tuple[int, int, int, bytes, int]]:
    """Yield (shard_idx, file_idx, first_line_no, data, raw_pos) with data ending at a line boundary."""
    shard, base = 0, 0
    for fi, path in enumerate(paths):
        raw, hr, stream = _open_input(path)
        line_no, rest = 1, b""
        try:
            while True:
                try:
                    block = stream.read(chunk_bytes)
                except (OSError, EOFError, gzip.BadGzipFile) as e:
                    raise CptError(f"{path}: unreadable input near line {line_no}: {e}") from e
                if not block:
                    break
                data = rest + block
                cut = data.rfind(b"\n")
                if cut < 0:
                    rest = data
                    continue
                rest = data[cut + 1 :]
                data = data[: cut + 1]
                yield shard, fi, line_no, data, base + hr.pos
                shard += 1
                line_no += data.count(b"\n")
            if rest:
                yield shard, fi, line_no, rest, base + hr.pos
                shard += 1
        finally:
            raw.close()
        hashes[path] = hr.h.hexdigest()
        base += hr.pos


# ---------------------------------------------------------------------------------------------------
# Worker side

_WORKER: dict = {}


def _init_worker(tok: _Tok, cfg: PreprocessConfig, shard_dir: str, dtype) -> None:
    _WORKER.update(tok=tok, cfg=cfg, shard_dir=shard_dir, dtype=dtype)


_JSONL_HINT = ("preprocess reads JSONL (one {\"text\": ...} object per line); turn raw text into JSONL with "
               "`cpt curate -i FILE -o DIR` (a text file is one document unless --doc-separator is given)")


def _parse(data: bytes, path: str, first_line: int, keys) -> tuple[dict[str, list[str]], int]:
    out: dict[str, list[str]] = {k: [] for k in keys}
    loads = json.loads
    n = 0
    for i, line in enumerate(data.split(b"\n")):
        if not line.strip():
            continue
        try:
            doc = loads(line)
        except ValueError as e:
            raise CptError(f"{path}:{first_line + i}: bad JSON ({e}); {_JSONL_HINT}") from e
        if not isinstance(doc, dict):
            raise CptError(f"{path}:{first_line + i}: expected a JSON object, found {type(doc).__name__}")
        for k in keys:
            v = doc.get(k, None)
            if v is None:
                if k not in doc:
                    raise CptError(f"{path}:{first_line + i}: no key {k!r} (keys: {sorted(doc)[:8]}); use --json-keys")
                v = ""
            if not isinstance(v, str):
                raise CptError(f"{path}:{first_line + i}: key {k!r} holds {type(v).__name__}, expected a string")
            if b"\\u" in line and (at := lone_surrogate(v)) is not None:  # same verdict for every encoder
                raise CptError(f"{path}:{first_line + i}: key {k!r} holds a lone surrogate (U+{ord(v[at]):04X} at "
                               f"character {at}), which is not valid UTF-8 text; fix the line, or run `cpt curate` "
                               "first (it counts such lines as malformed)")
            out[k].append(v)
        n += 1
    return out, n


def _encode_shard(task) -> dict:
    shard, path, first_line, data = task
    tok: _Tok = _WORKER["tok"]
    cfg: PreprocessConfig = _WORKER["cfg"]
    dtype = _WORKER["dtype"]
    texts_by_key, _ = _parse(data, path, first_line, cfg.json_keys)
    del data
    eod = tok.info["eod_id"]
    stats = {}
    sdir = Path(_WORKER["shard_dir"])
    for key, texts in texts_by_key.items():
        prefix = str(sdir / f"{shard:06d}_{key}")
        empty = 0
        with IndexWriter(prefix, dtype) as w:
            for b in range(0, len(texts), cfg.batch_docs):
                flat, lengths = tok.encode_flat(texts[b : b + cfg.batch_docs])
                keep = lengths > 0
                empty += int((~keep).sum())
                if not keep.all() and not cfg.keep_empty:
                    lengths = lengths[keep]
                    keep = keep[keep]
                if cfg.append_eod:  # never to an empty document (Megatron does the same)
                    flat = np.insert(flat, np.cumsum(lengths)[keep], eod)
                    lengths = lengths + keep
                w.add_documents(flat.astype(dtype, copy=False), lengths)
            max_id = w.max_token_id
            res = w.finalize()
        stats[key] = {"documents": res["documents"], "tokens": res["tokens"], "empty": empty, "max_token_id": max_id}
    write_json(sdir / f"{shard:06d}.done.json", stats)
    return {"shard": shard, "stats": stats}


# ---------------------------------------------------------------------------------------------------
# Driver


def _fingerprint(cfg: PreprocessConfig, tok_sha: dict, dtype) -> dict:
    files = []
    for p in cfg.inputs:
        st = os.stat(p)
        files.append([os.path.abspath(p), st.st_size, st.st_mtime_ns])
    return {
        "format": _FORMAT_VERSION,
        "inputs": files,
        "tokenizer_sha256": tok_sha,
        "json_keys": list(cfg.json_keys),
        "append_eod": cfg.append_eod,
        "keep_empty": cfg.keep_empty,
        "chunk_bytes": cfg.chunk_bytes,
        "dtype": np.dtype(dtype).name,
    }


def _sample_texts(cfg: PreprocessConfig, n_docs: int = 500, max_bytes: int = 1 << 20):
    """The first documents of the first input, for verifying the fast encoder against HF."""

    def get() -> list[str]:
        out: list[str] = []
        raw, _, stream = _open_input(cfg.inputs[0])
        try:
            data = stream.read(max_bytes)
        finally:
            raw.close()
        for line in data.split(b"\n")[:-1][:n_docs]:
            try:
                doc = json.loads(line)
            except ValueError:
                break
            if isinstance(doc, dict):
                out.extend(v for k in cfg.json_keys if isinstance(v := doc.get(k), str))
        return out

    return get


def preprocess(cfg: PreprocessConfig) -> dict:
    """Run the pipeline; returns a summary (one entry per json key, plus timing)."""
    t_start = time.perf_counter()
    _check_inputs(cfg)
    if cfg.workers > 1:  # workers are processes; HF's own threads would fight them for the cores
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    tok = _setup_tokenizer(cfg, _sample_texts(cfg))
    dtype = optimal_dtype(tok.info["vocab_size"])
    prefixes = output_prefixes(cfg.out, cfg.json_keys)
    shard_dir = _shard_dir(cfg, _fingerprint(cfg, tok.info["sha256"], dtype))
    _init_worker(tok, cfg, str(shard_dir), dtype)
    t_tok = time.perf_counter()
    with _disk_full_line(cfg, dtype, shard_dir):
        results, hashes, skipped = _encode_all(cfg, tok, dtype, shard_dir)
        t_merge = time.perf_counter()
        summary: dict = {"outputs": _merge(cfg, tok, dtype, shard_dir, prefixes, results, hashes),
                         "encoder": tok.encoder_name, "workers": cfg.workers, "shards": len(results),
                         "shards_skipped": skipped}
    if not cfg.keep_shards:
        retire_dir(shard_dir)  # renamed aside, then deleted: a kill here never leaves a half-deleted PREFIX.shards
    t_end = time.perf_counter()
    tokens = sum(o["tokens"] for o in summary["outputs"].values())
    summary.update(tokens=tokens, seconds=round(t_end - t_start, 3), tokenize_seconds=round(t_merge - t_tok, 3),
                   merge_seconds=round(t_end - t_merge, 3), tokens_per_s=round(tokens / max(t_end - t_start, 1e-9)))
    return summary


@contextlib.contextmanager
def _disk_full_line(cfg: PreprocessConfig, dtype, shard_dir: Path):
    """A full disk while tokenizing or merging: one line with the file, about how many bytes the run needs
    (shards + merged output, from the tokens per input byte so far, else 0.3) and how many are free."""
    try:
        yield
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        in_bytes = sum(os.path.getsize(p) for p in cfg.inputs)
        done = [json.loads(f.read_text()) for f in shard_dir.glob("*.done.json")]
        tokens = sum(st["tokens"] for d in done for st in d.values())
        per_byte = tokens / (len(done) * cfg.chunk_bytes) if done else 0.3
        needed = int(2 * np.dtype(dtype).itemsize * per_byte * in_bytes)
        raise CptError(f"disk full while writing {cfg.out}: " + os_error_line(e, e.filename or shard_dir, needed)
                       .replace(" needed)", " needed, estimated)") + "; finished shards are kept: the rerun "
                       "resumes") from e


def _check_inputs(cfg: PreprocessConfig) -> None:
    """One line naming the input that is missing, unreadable, empty or not JSONL, before any output."""
    for p in cfg.inputs:
        if os.path.isdir(p):
            raise CptError(f"input {p} is a directory; give its JSONL files (e.g. {p}/*.jsonl.gz, the shards "
                           "`cpt curate` writes)")
        if not os.path.isfile(p):
            raise CptError(f"input {p} not found")
        if not os.access(p, os.R_OK):
            raise CptError(f"cannot read input {p}: permission denied")
        if os.path.getsize(p) == 0:
            raise CptError(f"input {p} is empty: nothing to tokenize; check the file (or the curate run that "
                           "wrote it: its report.json says how many documents were kept)")
        with open(p, "rb") as probe:
            gz = probe.read(2) == b"\x1f\x8b"
        if not gz:  # a text file or an image fails here, before any output exists
            next(iter_jsonl(p, "input", hint=_JSONL_HINT), None)


def _shard_dir(cfg: PreprocessConfig, fp: dict) -> Path:
    """PREFIX.shards, kept from an interrupted run with the same fingerprint, else started afresh."""
    shard_dir = Path(f"{cfg.out}.shards")
    manifest = shard_dir / "manifest.json"
    remove_stale_temps(shard_dir)  # what a killed earlier run was deleting
    if shard_dir.exists():
        try:
            old = json.loads(manifest.read_text())
        except (OSError, ValueError):
            old = None
        if old != fp:  # different inputs/tokenizer/options: old shards are useless
            retire_dir(shard_dir)
    shard_dir.mkdir(parents=True, exist_ok=True)
    write_json(manifest, fp)
    return shard_dir


def _encode_all(cfg: PreprocessConfig, tok: _Tok, dtype, shard_dir: Path) -> tuple[dict[int, dict], dict, int]:
    """Encode every chunk not already done (at most 2 x workers in flight): (results by shard, input
    sha256s, shards skipped)."""
    bar = _progress(cfg, sum(os.path.getsize(p) for p in cfg.inputs))
    hashes: dict[str, str] = {}
    results: dict[int, dict] = {}
    skipped = n_tokens = 0
    t0 = time.perf_counter()

    def tasks():
        nonlocal skipped
        for shard, fi, line, data, pos in _chunks(cfg.inputs, cfg.chunk_bytes, hashes):
            done = shard_dir / f"{shard:06d}.done.json"
            if done.is_file() and all(_shard_intact(shard_dir / f"{shard:06d}_{k}") for k in cfg.json_keys):
                results[shard] = {"shard": shard, "stats": json.loads(done.read_text())}
                skipped += 1
                yield None, pos, results[shard]
            else:
                yield (shard, cfg.inputs[fi], line, data), pos, None

    def on_done(res: dict, pos: int) -> None:
        nonlocal n_tokens
        results[res["shard"]] = res
        n_tokens += sum(s["tokens"] for s in res["stats"].values())
        if bar is not None:
            bar.update(pos - bar.n)
            bar.set_postfix_str(f"{n_tokens / max(time.perf_counter() - t0, 1e-9) / 1e3:,.0f}k tok/s", refresh=False)

    try:
        if cfg.workers == 1:
            for task, pos, done in tasks():
                on_done(done if done is not None else _encode_shard(task), pos)
        else:
            import multiprocessing as mp

            ctx = mp.get_context("fork")  # workers inherit the tokenizer: no re-import, light start
            with ctx.Pool(cfg.workers, initializer=_init_worker, initargs=(tok, cfg, str(shard_dir), dtype)) as pool:
                pending: deque = deque()
                for task, pos, done in tasks():
                    pending.append((done if done is not None else pool.apply_async(_encode_shard, (task,)), pos))
                    while len(pending) > 2 * cfg.workers:  # bounded: never more than a few chunks in flight
                        r, p = pending.popleft()
                        on_done(r if isinstance(r, dict) else r.get(), p)
                while pending:
                    r, p = pending.popleft()
                    on_done(r if isinstance(r, dict) else r.get(), p)
    except BaseException:
        if not any(shard_dir.glob("*.done.json")):  # nothing to resume from: leave no PREFIX.shards behind
            shutil.rmtree(shard_dir, ignore_errors=True)
        raise
    finally:
        if bar is not None:
            bar.close()
    return results, hashes, skipped


def _shard_intact(prefix: Path) -> bool:
    """A finished shard still whole: its .bin and .idx exist and agree in size (else it is redone)."""
    from cpt_megatron.data.indexed import IndexArrays

    try:
        IndexArrays(prefix)
        return Path(f"{prefix}.bin").is_file()
    except (OSError, CptError):
        return False


def _merge(cfg: PreprocessConfig, tok: _Tok, dtype, shard_dir: Path, prefixes: dict[str, str],
           results: dict[int, dict], hashes: dict) -> dict:
    """Merge the shards into PREFIX.bin/.idx + PREFIX.meta.json per json key; the summary's outputs."""
    order = sorted(results)
    for key in prefixes:
        if not sum(results[s]["stats"][key]["documents"] for s in order):
            shutil.rmtree(shard_dir, ignore_errors=True)
            raise CptError(f"no documents with text under {key!r} in {', '.join(cfg.inputs)} (all empty or blank); "
                           "nothing written: check the inputs and --json-keys")
    _check_space(shard_dir, prefixes)
    outputs = {}
    for key, prefix in prefixes.items():
        with IndexWriter(prefix, dtype) as w:
            for s in order:
                w.add_index(shard_dir / f"{s:06d}_{key}")
            res = w.finalize()
        st = [results[s]["stats"][key] for s in order]
        meta = {
            "format": "megatron-indexed",
            "prefix": os.path.abspath(prefix),
            "json_key": key,
            "tokenizer": tok.info,
            "dtype": np.dtype(dtype).name,
            "append_eod": cfg.append_eod,
            "keep_empty": cfg.keep_empty,
            "documents": res["documents"],
            "tokens": res["tokens"],
            "empty_docs": sum(x["empty"] for x in st),
            "empty_docs_skipped": 0 if cfg.keep_empty else sum(x["empty"] for x in st),
            "max_token_id": max((x["max_token_id"] for x in st), default=-1),
            "bin_bytes": os.path.getsize(f"{prefix}.bin"),
            "sources": [{"path": os.path.abspath(p), "sha256": hashes.get(p), "bytes": os.path.getsize(p)}
                        for p in cfg.inputs],
            "encoder": tok.encoder_name,
        }
        write_json(f"{prefix}.meta.json", meta)
        outputs[key] = {k: meta[k] for k in ("prefix", "documents", "tokens", "empty_docs", "empty_docs_skipped",
                                             "max_token_id", "dtype")}
    return outputs


def _check_space(shard_dir: Path, prefixes: dict[str, str]) -> None:
    """The merge copies every shard once more: refuse up front, in one line, when that cannot fit."""
    needed = sum(f.stat().st_size for ext in ("bin", "idx") for f in shard_dir.glob(f"*_*.{ext}"))
    out_dir = Path(next(iter(prefixes.values()))).parent
    free = shutil.disk_usage(out_dir).free
    if free < needed:
        raise CptError(f"not enough space to merge {shard_dir} into {out_dir}: {needed:,} bytes needed, {free:,} "
                       "bytes free; free space or use --out on a bigger file system (finished shards are kept: "
                       "the rerun resumes)")


def _progress(cfg: PreprocessConfig, total: int):
    if not cfg.progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc="tokenize", file=sys.stderr, mininterval=0.5,
                smoothing=0.1, disable=None)
