"""The curation pipeline: read -> per-document stages (worker processes) -> dedup (in order) -> write.

Per-document work (normalize, langid, length, quality, hashing + MinHash signatures, PII, the output
line) runs in `workers` processes over tasks: byte ranges of the files a worker can read itself, else
batches of records read here; the decisions that need global state (exact and near-duplicate) are made
in the parent in input order and a writer thread gzips the shards, so the output is byte-identical for
any worker count. At most `2 * workers` tasks are in flight, and the batch, hashing and near-dup index
sizes come from `memory_mb` (`spill.Budget`): memory stays bounded however large the input.

Accounting: every record read is a kept document, a document removed by exactly one stage, or a
malformed record (with file:line) -- `kept + sum(removed) + malformed == read` is checked at the end.
"""

from __future__ import annotations

import collections
import dataclasses
import gzip
import hashlib
import json
import os
import sys
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from cpt_megatron.curate.config import CurateConfig, result_config
from cpt_megatron.curate.readers import Doc, DocumentReader, FilePart, Malformed
from cpt_megatron.curate.spill import Budget
from cpt_megatron.errors import CptError
from cpt_megatron.utils import atomic_dir, write_json

__all__ = ["curate", "CurateResult"]

GZIP_LEVEL = 4  # output shards (`_ShardWriter._open`: 2.5x less CPU than 6 for 7% more bytes)
_BATCH = 256
_MAX_MALFORMED_LISTED = 100
_REJECT_TEXT_CHARS = 4000
_PAIR_BYTES = 160  # a batch's temporaries per candidate pair in NearDupIndex.check_batch (ids, Jaccard, orders)
_PART_BYTES = 256 << 10  # bytes of a file a worker reads itself (-j 2+; at most the budget's batch_bytes)
_IO_CHUNK = 256 << 10  # serialized lines handed to the writer thread at once
_IO_PENDING = 8  # chunks queued for it at most
_PROGRESS_S = 0.5  # the progress bar's redraws at most this often
_CHECKED_BYTES = 8192  # per pair checked exactly: the kept set's mapped pages it reads (released per piece)


@dataclasses.dataclass(slots=True)
class _Out:
    """A document after the per-document stages (built in a worker)."""

    id: str
    source: str
    position: int
    text: str | None  # None once `line` holds it (not pickled twice; `_text` reads it back for a rejected sample)
    chars: list  # [(stage, chars_in, chars_out)]
    length: int = 0  # len(text) after the per-document stages
    removed: str | None = None
    reason: str | None = None
    changes: Counter | None = None
    lang: dict | None = None
    route: str | None = None
    exact: bytes | None = None
    sig: object = None
    shingles: object = None  # sorted unique uint64 shingle hashes (decide: exact)
    ranges: object = None  # dedup.hash_ranges / fine_sketches rows of the shingle set (decide: exact)
    fine: object = None
    line: bytes | None = None  # the output JSONL line, serialized in the worker (when nothing later changes it)
    pii_text: str | None = None
    pii: Counter | None = None
    uid: int | None = None  # the distributed executor's id of a live document (curate/distributed.py)

    def __reduce__(self):
        # pickled as the constructor's arguments: the slots dataclass default (`__setstate__` sets each field
        # in Python) measured 2.7x slower to load in the parent (30,000 CUAD paragraphs: 0.123 vs 0.045 s)
        return _Out, tuple(getattr(self, f) for f in _OUT_FIELDS)


_OUT_FIELDS = tuple(f.name for f in dataclasses.fields(_Out))


@dataclasses.dataclass
class CurateResult:
    read: int
    kept: int
    malformed: int
    removed: dict
    out: str
    report: dict


class _Worker:
    """Per-process state: the stage objects, built once per process."""

    def __init__(self, cfg: CurateConfig, budget: Budget | None = None):
        from cpt_megatron.curate.filters import LengthFilter

        self.cfg = cfg
        hash_bytes = (budget or Budget.of(None)).hash_bytes
        self.stages = set(cfg.stages)
        self.length = LengthFilter(cfg.length)
        self.hasher = None
        if "minhash_dedup" in self.stages:
            from cpt_megatron.curate.dedup import _HASH_CHUNK_CHARS, MinHasher, uses_prefix

            self.hasher = MinHasher(cfg.minhash_dedup, sketch=not uses_prefix(cfg.minhash_dedup, cfg.lsh),
                                    chunk_chars=min(hash_bytes, _HASH_CHUNK_CHARS))

    def run(self, records: list) -> list:
        from cpt_megatron.curate.dedup import exact_key
        from cpt_megatron.curate.filters import quality_reason
        from cpt_megatron.curate.normalize import normalize_text
        from cpt_megatron.curate.pii import redact_pii

        cfg, st = self.cfg, self.stages
        out: list = []
        for rec in records:
            if isinstance(rec, Malformed):
                out.append(rec)
                continue
            o = _Out(rec.id, rec.source, rec.position, rec.text, [])
            text = rec.text
            if "normalize" in st:
                text, o.changes = normalize_text(text, cfg.normalize)
                if rec.bad_bytes:
                    o.changes["utf8_replaced"] += rec.bad_bytes
                o.chars.append(("normalize", len(rec.text), len(text)))
                if not text:
                    o.removed, o.reason = "normalize", "empty_after_normalize"
            if o.removed is None and "langid" in st:
                o.removed, o.reason = self._langid(o, text)
            if o.removed is None and "length" in st:
                o.removed, o.reason = self._stage("length", o, text, self.length(text))
            if o.removed is None and "quality" in st:
                o.removed, o.reason = self._stage("quality", o, text, quality_reason(text, cfg.quality))
            o.text, o.length = text, len(text)
            if o.removed is None:
                if "exact_dedup" in st:
                    o.exact = exact_key(text, cfg.exact_dedup.lowercase)
                if "pii" in st:
                    o.pii_text, o.pii = redact_pii(text, cfg.pii.types)
            out.append(o)
        if self.hasher is not None:
            live = [o for o in out if isinstance(o, _Out) and o.removed is None]
            from cpt_megatron.curate.dedup import fine_sketches, hash_ranges, uses_prefix

            values, offsets = self.hasher.hash_sets([o.text for o in live])
            exact = self.cfg.minhash_dedup.decide == "exact"
            filters = exact and not uses_prefix(self.cfg.minhash_dedup, self.cfg.lsh)  # the bands' pre-filters
            if filters:
                ranges, fine = hash_ranges(values, offsets), fine_sketches(values, offsets)
            for k, (o, sig) in enumerate(zip(live, self.hasher.signatures(values, offsets))):
                o.sig = sig
                if exact:
                    o.shingles = values[offsets[k] : offsets[k + 1]]
                if filters:
                    o.ranges, o.fine = ranges[k], fine[k]
        if "perplexity" not in st:  # the output record is final: serialize it here, not in the parent
            for o in out:
                if isinstance(o, _Out) and o.removed is None:
                    o.line = _line(_record(o, st))
                    if "pii" not in st:  # the line holds the text: ship it once (CUAD: 80 -> 56 MB pickled)
                        o.text = None
        return out

    @staticmethod
    def _stage(name: str, o: _Out, text: str, reason: str | None):
        n = len(text)
        o.chars.append((name, n, 0 if reason else n))
        return (name, reason) if reason else (None, None)

    def _langid(self, o: _Out, text: str):
        from cpt_megatron.curate.langid import identify

        lc = self.cfg.langid
        r = identify(text, lc)
        o.lang = {"lang": r.lang, "script": r.script, "lang_score": r.confidence, "code_mixed": r.code_mixed}
        reason = None
        if r.lang == "hi-Latn" and lc.romanized_hindi != "keep":
            if lc.romanized_hindi == "drop":
                reason = "romanized_hindi"
            else:
                o.route = "hi-Latn"
        elif lc.keep is not None and r.lang not in lc.keep:
            reason = f"lang={r.lang}"
        return self._stage("langid", o, text, reason)


_WORKER: _Worker | None = None


def _init_worker(cfg: CurateConfig, budget: Budget) -> None:
    global _WORKER
    _WORKER = _Worker(cfg, budget)


_ARRAYS = ("sig", "shingles", "ranges", "fine")  # a live document's arrays, shipped per batch (`_pack`)


def _pack(out: list) -> tuple[list, dict]:
    """Move the live documents' arrays into one array per field: pickling 4 small arrays per document
    costs more than the per-document work itself. `_unpack` puts views back."""
    live = [o for o in out if isinstance(o, _Out) and o.sig is not None]
    arrays = {}
    for name in _ARRAYS:
        rows = [getattr(o, name) for o in live]
        if rows and rows[0] is not None:
            arrays[name] = np.concatenate(rows) if name == "shingles" else np.stack(rows)
            if name == "shingles":
                arrays["offsets"] = np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(np.int64)
        for o in live:
            setattr(o, name, None)
    return out, arrays


def _unpack(out: list, arrays: dict) -> list:
    live = [o for o in out if isinstance(o, _Out) and o.removed is None] if arrays else []
    off = arrays.get("offsets")
    for k, o in enumerate(live):
        for name, a in arrays.items():
            if name == "shingles":
                o.shingles = a[off[k] : off[k + 1]]
            elif name != "offsets":
                setattr(o, name, a[k])
    return out


def _run_task(task) -> tuple[int, list, dict]:
    """(records read, per-record results, their arrays) of a list of records, or of a `FilePart` read here."""
    records = list(DocumentReader([task], _WORKER.cfg.input)) if isinstance(task, FilePart) else task
    return len(records), *_pack(_WORKER.run(records))


def _batches(items, size: int, max_chars: int = 1 << 62):
    """Lists of `size` records, or fewer holding `max_chars` characters of text (decisions do not depend
    on where batches end); a `FilePart` among the items (`DocumentReader.units`) passes through alone."""
    batch, chars = [], 0
    for u in items:
        if isinstance(u, FilePart):
            if batch:
                yield batch
                batch, chars = [], 0
            yield u
            continue
        batch.append(u)
        chars += len(u.text) if isinstance(u, Doc) else 0
        if len(batch) >= size or chars >= max_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _tasks(reader: DocumentReader, workers: int, budget: Budget):
    """Tasks in input order: batches of records sized from the budget; with 2+ workers, also `FilePart`s of
    the files a worker reads itself (uncompressed JSONL, plain text with a separator: the parent only finds
    line ends and counts lines)."""
    if workers <= 1:
        return _batches(reader, _BATCH, budget.batch_bytes)
    return _batches(reader.units(min(budget.batch_bytes, _PART_BYTES)), _BATCH, budget.batch_bytes)


def _ordered_map(tasks, cfg: CurateConfig, workers: int, budget: Budget | None = None):
    """Yield (records read, results) per task (a batch of records or a `FilePart`) in input order, with
    at most 2*workers tasks in flight."""
    budget = budget or Budget.of(None)
    if workers <= 1:
        w = _Worker(cfg, budget)
        for b in tasks:
            b = list(DocumentReader([b], cfg.input)) if isinstance(b, FilePart) else b
            yield len(b), w.run(b)
        return
    import multiprocessing as mp

    ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(cfg, budget)) as pool:
        pending: collections.deque = collections.deque()
        for t in tasks:
            pending.append(pool.submit(_run_task, t))
            if len(pending) >= 2 * workers:
                n, out, arrays = pending.popleft().result()
                yield n, _unpack(out, arrays)
        while pending:
            n, out, arrays = pending.popleft().result()
            yield n, _unpack(out, arrays)


def _record(o: _Out, stages, ppl: float | None = None) -> dict:
    """The output record of a kept document."""
    rec = {"id": o.id, "source": o.source, "position": o.position}
    if "pii" in stages and o.pii:
        rec["pii"] = dict(sorted(o.pii.items()))
    rec["text"] = o.pii_text if "pii" in stages else o.text
    if o.lang:
        rec.update({k: o.lang[k] for k in ("lang", "script", "lang_score")})
    if ppl is not None:
        rec["perplexity"] = ppl
    return rec


_ENCODER = json.JSONEncoder(ensure_ascii=False)  # json.dumps(rec, ensure_ascii=False) builds one per call


def _line(rec: dict) -> bytes:
    return (_ENCODER.encode(rec) + "\n").encode("utf-8")


def _text(o: _Out) -> str:
    """A document's text after the per-document stages (from its output line once the worker dropped it)."""
    return o.text if o.text is not None else json.loads(o.line)["text"]


class _IoThread:
    """One background thread that runs file work (gzip compression and writes) in submission order, off
    the accounting loop's critical path (zlib and file writes release the GIL). At most `_IO_PENDING`
    jobs wait (bounded memory); the first error (e.g. a full disk) is raised in the caller by the next
    `submit` or by `close`."""

    def __init__(self):
        from concurrent.futures import ThreadPoolExecutor

        self._pool = ThreadPoolExecutor(1, thread_name_prefix="cpt-curate-io")
        self._pending: collections.deque = collections.deque()

    def submit(self, fn, *args) -> None:
        self._pending.append(self._pool.submit(fn, *args))
        while len(self._pending) > _IO_PENDING or (self._pending and self._pending[0].done()):
            self._pending.popleft().result()

    def close(self) -> None:
        try:
            while self._pending:
                self._pending.popleft().result()
        finally:
            self._pool.shutdown(wait=True)


class _ShardWriter:
    """Deterministic gzip JSONL shards (mtime 0, no file name in the header). Lines are serialized here
    and handed to the `_IoThread` in chunks of `_IO_CHUNK` bytes, which compresses and writes them."""

    def __init__(self, folder: Path, shard_docs: int, prefix: str = "shard", io: _IoThread | None = None):
        self.folder, self.shard_docs, self.prefix = folder, shard_docs, prefix
        self.n_in_shard = 0
        self.files: list[str] = []
        self._io = io
        self._f = None
        self._buf: list[bytes] = []
        self._buf_bytes = 0

    def write(self, obj: dict | bytes) -> None:
        """One record (a dict, or its line from `_line`)."""
        if not self.files or self.n_in_shard >= self.shard_docs:
            self.close()
            self.folder.mkdir(parents=True, exist_ok=True)
            path = self.folder / f"{self.prefix}-{len(self.files):05d}.jsonl.gz"
            self._run(self._open, path)
            self.files.append(str(path))
            self.n_in_shard = 0
        line = obj if isinstance(obj, bytes) else _line(obj)
        self._buf.append(line)
        self._buf_bytes += len(line)
        self.n_in_shard += 1
        if self._buf_bytes >= _IO_CHUNK:
            self._flush()

    def _run(self, fn, *args) -> None:
        if self._io is None:
            fn(*args)
        else:
            self._io.submit(fn, *args)

    def _flush(self) -> None:
        if self._buf:
            self._run(self._write, b"".join(self._buf))
            self._buf, self._buf_bytes = [], 0

    def _open(self, path: Path) -> None:
        # level 4 (GZIP_LEVEL): measured on the kept text of CUAD paragraphs / MedQuAD (26 / 22 MB), zlib's
        # 6 (gzip's default) costs 2.5-2.7x the CPU (0.75 vs 0.28 s / 0.55 vs 0.22 s) for 6-7% smaller
        # shards, 9 more still: with 2 workers on 2 cores that CPU is taken from the decisions
        self._f = gzip.GzipFile(filename="", mode="wb", fileobj=open(path, "wb"), mtime=0, compresslevel=GZIP_LEVEL)

    def _write(self, data: bytes) -> None:
        self._f.write(data)

    def _close(self) -> None:
        if self._f is not None:
            raw, f = self._f.fileobj, self._f
            self._f = None
            try:
                f.close()  # may fail (a full disk): the file is closed all the same, its blocks freed
            finally:
                raw.close()

    def close(self) -> None:
        """Finish the open shard (queued after its last lines)."""
        if self.files:
            self._flush()
            self._run(self._close)


class _StageStats:
    def __init__(self):
        self.docs_in = self.docs_out = self.chars_in = self.chars_out = 0
        self.reasons: Counter = Counter()

    def add(self, chars_in: int, chars_out: int, reason: str | None) -> None:
        self.docs_in += 1
        self.chars_in += chars_in
        if reason:
            self.reasons[reason] += 1
        else:
            self.docs_out += 1
            self.chars_out += chars_out

    def as_dict(self) -> dict:
        return {
            "docs_in": self.docs_in,
            "docs_out": self.docs_out,
            "chars_in": self.chars_in,
            "chars_out": self.chars_out,
            "removed": self.docs_in - self.docs_out,
            "reasons": dict(sorted(self.reasons.items(), key=lambda kv: (-kv[1], kv[0]))),
        }


def curate(
    inputs: list[str | os.PathLike],
    out: str | os.PathLike,
    cfg: CurateConfig | None = None,
    workers: int = 1,
    overwrite: bool = False,
    progress: bool = False,
) -> CurateResult:
    """Run the pipeline over `inputs` into the folder `out` (written atomically); see module docstring."""
    cfg = cfg or CurateConfig()
    reader = DocumentReader(inputs, cfg.input)
    out = Path(out)
    t0 = time.time()
    try:
        with atomic_dir(out, overwrite=overwrite) as tmp:
            report = _run(reader, tmp, out, cfg, max(1, int(workers)), progress)
            write_json(tmp / "report.json", report)
    except OSError as e:  # a full disk: one line with the output, the bytes free and (at most) needed
        import errno

        from cpt_megatron.utils import os_error_line

        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise CptError(os_error_line(e, out, reader.total_bytes).replace(
            " needed)", " needed at most: the inputs' size)")) from e
    report["elapsed_s"] = round(time.time() - t0, 3)
    return CurateResult(report["read"], report["kept"], report["malformed"], report["removed"], str(out), report)


class _LocalDedup:
    """The global decisions of one process: the exact keys seen (a `SortedBands` of the keys' first 8
    bytes, their last 8 as the row: 16 bytes per kept document, spilled under a budget) and a
    `NearDupIndex`, in input order. curate/distributed.py supplies the same interface from precomputed
    decisions."""

    def __init__(self, cfg: CurateConfig, tmp: Path, final_out: Path, budget: Budget | None = None):
        from cpt_megatron.curate.spill import SortedBands

        bounded = budget is not None and budget.memory_mb is not None
        self.seen = SortedBands(str(tmp), budget.index_bytes // 4 if bounded else 1 << 62)
        self.near = None
        if "minhash_dedup" in cfg.stages:
            from cpt_megatron.curate.dedup import NearDupIndex

            base = "cpt_curate:" + hashlib.sha1(str(final_out.resolve()).encode()).hexdigest()[:12]
            self.near = NearDupIndex(cfg.minhash_dedup, cfg.lsh, basename=base, workdir=str(tmp),
                                     resident_bytes=budget.index_bytes if budget and budget.memory_mb else None)
        self.near_stats = self.near.stats if self.near is not None else None
        self.n_docs = 0
        self.pair_bytes = budget.index_bytes if budget is not None and budget.memory_mb else None

    def exact_dups(self, outs: list[_Out]) -> list[bool]:
        """Per document, in order: is its exact key that of an earlier one (earlier batches or earlier in
        this batch)?"""
        if not outs:
            return []
        key = np.frombuffer(b"".join(o.exact for o in outs), np.uint64).reshape(len(outs), 2)
        hi, lo = key[:, 0], key[:, 1].view(np.int64)
        doc, row = self.seen.query(hi)
        dup = np.ones(len(outs), bool)
        dup[np.unique(key, axis=0, return_index=True)[1]] = False  # first in the batch
        dup[doc[row == lo[doc]]] = True
        self.seen.insert(lo[~dup], hi[~dup])
        return dup.tolist()

    def near_dups(self, outs: list[_Out]) -> list[tuple[str | None, float]]:
        """(dup_of or None, Jaccard) per document, decided in order (one batch; under a memory budget in
        pieces whose expected candidate and checked pairs, at the run's rates so far, fit its share:
        templated text gives hundreds of pairs per document; the decisions do not depend on the pieces)."""
        size = len(outs)
        if self.pair_bytes is not None and self.n_docs:
            st = self.near.stats
            per_doc = max((st.candidate_pairs * _PAIR_BYTES + st.checked_pairs * _CHECKED_BYTES) / self.n_docs, 1.0)
            size = int(min(max(self.pair_bytes / per_doc, 16), len(outs)))
        self.n_docs += len(outs)
        return [r for lo in range(0, len(outs), size) for r in self._near_dups(outs[lo : lo + size])]

    def _near_dups(self, outs: list[_Out]) -> list[tuple[str | None, float]]:
        sigs = np.stack([o.sig for o in outs])
        values = offsets = None
        ranges = fine = None
        if self.near.cfg.decide == "exact":
            values = np.concatenate([o.shingles for o in outs])
            offsets = np.concatenate([[0], np.cumsum([len(o.shingles) for o in outs])]).astype(np.int64)
            if outs[0].ranges is not None:  # computed by the workers (`candidates: bands`)
                ranges, fine = np.stack([o.ranges for o in outs]), np.stack([o.fine for o in outs])
        return self.near.check_batch([f"{o.source}:{o.position}" for o in outs], sigs, values, offsets, ranges, fine)

    def close(self) -> None:
        self.seen.close()
        if self.near is not None:
            self.near.close()


class _Accounts:
    """The accounting of one curation run: every record read ends kept, removed by one stage (with a
    sample written to rejected/), or malformed; the kept ones go to the output shards in input order."""

    def __init__(self, tmp: Path, cfg: CurateConfig, dedup):
        self.tmp, self.cfg, self.dedup, self.stages = tmp, cfg, dedup, cfg.stages
        self.stats = {s: _StageStats() for s in cfg.stages}
        self.removed = {s: 0 for s in cfg.stages}
        self.changes: Counter = Counter()
        self.pii: Counter = Counter()
        self.langs: Counter = Counter()
        self.scripts: Counter = Counter()
        self.routes: Counter = Counter()
        self.code_mixed = 0
        self.malformed: list[str] = []
        self.n_read = self.n_malformed = self.n_kept = 0
        self.io = _IoThread()
        self.writers: dict[str | None, _ShardWriter] = {None: _ShardWriter(tmp, cfg.shard_docs, io=self.io)}
        self.rejects: dict[str, _ShardWriter] = {}
        self.reject_counts: Counter = Counter()
        self.scorer = None
        if "perplexity" in cfg.stages:
            from cpt_megatron.curate.perplexity import PerplexityScorer

            self.scorer = PerplexityScorer(cfg.perplexity)
        self.ppl_pending: list[_Out] = []

    def batch(self, n_batch: int, results: list) -> None:
        """One batch in input order: per-document stages and exact dedup, the batch's near-dup decisions
        at once, then perplexity (batched) and the output."""
        self.n_read += n_batch
        dups = iter([])
        if "exact_dedup" in self.stages:  # the documents that reach it, in order
            dups = iter(self.dedup.exact_dups([o for o in results if not isinstance(o, Malformed) and not o.removed]))
        live = [o for o in results if self._account(o, dups)]
        if "minhash_dedup" in self.stages and live:
            survivors = []
            for o, (dup_of, j) in zip(live, self.dedup.near_dups(live)):
                n = o.length
                self.stats["minhash_dedup"].add(n, n, "near_duplicate" if dup_of else None)
                if dup_of:
                    self.reject(o, "minhash_dedup", "near_duplicate", {"dup_of": dup_of, "jaccard": round(j, 4)})
                else:
                    survivors.append(o)
            live = survivors
        for o in live:
            if self.scorer is None:
                self.finish(o, None)
                continue
            self.ppl_pending.append(o)
            if len(self.ppl_pending) >= self.cfg.perplexity.batch_size:
                self.flush_ppl()

    def _account(self, o, dups) -> bool:
        """Count one record's per-document results; True if it is still live after exact dedup (`dups`:
        the exact-dedup verdicts of the batch's documents that reach it, in order)."""
        if isinstance(o, Malformed):
            self.n_malformed += 1
            if len(self.malformed) < _MAX_MALFORMED_LISTED:
                self.malformed.append(str(o))
            return False
        if o.changes:
            self.changes.update(o.changes)
        if o.lang:
            self.langs[o.lang["lang"]] += 1
            self.scripts[o.lang["script"]] += 1
            self.code_mixed += bool(o.lang["code_mixed"])
        for stage, cin, cout in o.chars:
            self.stats[stage].add(cin, cout, o.reason if stage == o.removed else None)
        if o.removed:
            self.reject(o, o.removed, o.reason)
            return False
        if "exact_dedup" in self.stages:
            n = o.length
            dup = next(dups)
            self.stats["exact_dedup"].add(n, n, "exact_duplicate" if dup else None)
            if dup:
                self.reject(o, "exact_dedup", "exact_duplicate")
                return False
        return True

    def reject(self, o: _Out, stage: str, reason: str, extra: dict | None = None) -> None:
        self.removed[stage] += 1
        if self.reject_counts[stage] < self.cfg.rejected_samples:
            self.reject_counts[stage] += 1
            if stage not in self.rejects:
                self.rejects[stage] = _ShardWriter(self.tmp / "rejected", 1 << 62, prefix=stage, io=self.io)
            w = self.rejects[stage]
            rec = {"id": o.id, "source": o.source, "position": o.position, "reason": reason, **(extra or {})}
            rec["text"] = _text(o)[:_REJECT_TEXT_CHARS]
            w.write(rec)

    def finish(self, o: _Out, ppl: float | None) -> None:
        if self.scorer is not None:
            why = self.scorer.reason(ppl)
            self.stats["perplexity"].add(o.length, o.length, why)
            if why:
                self.reject(o, "perplexity", why, {"perplexity": ppl})
                return
        if "pii" in self.stages:
            self.stats["pii"].add(o.length, len(o.pii_text), None)
            self.pii.update(o.pii)
        if o.route:
            self.routes[o.route] += 1
            if o.route not in self.writers:
                self.writers[o.route] = _ShardWriter(self.tmp / "routes" / o.route, self.cfg.shard_docs, io=self.io)
        self.writers[o.route].write(o.line if o.line is not None else _record(o, self.stages, ppl))
        self.n_kept += 1

    def flush_ppl(self) -> None:
        if self.ppl_pending:
            for o, ppl in zip(self.ppl_pending, self.scorer.score([o.text for o in self.ppl_pending])):
                self.finish(o, ppl)
            self.ppl_pending.clear()

    def close(self) -> None:
        try:
            for w in list(self.writers.values()) + list(self.rejects.values()):
                w.close()
        finally:
            self.io.close()
            self.dedup.close()

    def report(self, reader: DocumentReader) -> dict:
        stages, tmp = self.stages, self.tmp
        total_removed = sum(self.removed.values())
        assert self.n_kept + total_removed + self.n_malformed == self.n_read, (self.n_kept, self.removed,
                                                                              self.n_malformed, self.n_read)
        rel = lambda p: str(Path(p).relative_to(tmp))  # noqa: E731
        report = {
            "read": self.n_read,
            "kept": self.n_kept,
            "malformed": self.n_malformed,
            "removed": self.removed,
            "inputs": [str(p) for p in reader.files],
            "stages": {s: self.stats[s].as_dict() for s in stages},
            "normalize_changes": dict(sorted(self.changes.items())),
            "pii": dict(sorted(self.pii.items())),
            "malformed_records": self.malformed,
            "shards": [rel(p) for w in self.writers.values() for p in w.files],
            "rejected": {s: rel(w.files[0]) for s, w in sorted(self.rejects.items())},
            "config": result_config(self.cfg),
        }
        if "minhash_dedup" in stages:
            report["near_dup"] = self.dedup.near_stats.as_dict()
        if "langid" in stages:
            report["languages"] = dict(sorted(self.langs.items(), key=lambda kv: (-kv[1], kv[0])))
            report["scripts"] = dict(sorted(self.scripts.items(), key=lambda kv: (-kv[1], kv[0])))
            report["code_mixed"] = self.code_mixed
            report["routes"] = dict(sorted(self.routes.items()))
        return report


class _Progress:
    """The stderr progress bar (bytes read, documents, rate, kept), redrawn at most every `_PROGRESS_S`
    seconds: a redraw per batch (tqdm's import, the reader's `tell` and the formatting) measured ~3% of the
    CPU of a CUAD or MedQuAD run. The bar appears at the first redraw (a shorter run shows none)."""

    def __init__(self, reader: DocumentReader, acc: _Accounts):
        self.reader, self.acc = reader, acc
        self.t0 = self.last = time.time()
        self.bar = None

    def update(self, force: bool = False) -> None:
        now = time.time()
        if now - self.last < _PROGRESS_S and not force:
            return
        self.last = now
        done = self.reader.bytes_done()
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=self.reader.total_bytes, initial=done, unit="B", unit_scale=True, desc="curate",
                            file=sys.stderr, dynamic_ncols=True)
        self.bar.n = done
        rate = self.acc.n_read / max(now - self.t0, 1e-9)
        self.bar.set_postfix_str(f"{self.acc.n_read} docs, {rate:,.0f} docs/s, kept {self.acc.n_kept}", refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.update(force=True)
            self.bar.close()


def _fixed_bytes(cfg: CurateConfig) -> int:
    """Bytes a run holds whatever its budget: the near-dup prefix index's count slots and bitmap, and the
    writer thread's queue."""
    from cpt_megatron.curate.dedup import uses_prefix
    from cpt_megatron.curate.prefix_index import PrefixIndex

    near = "minhash_dedup" in cfg.stages and uses_prefix(cfg.minhash_dedup, cfg.lsh)
    return (PrefixIndex.FIXED_BYTES if near else 0) + _IO_PENDING * _IO_CHUNK


def _run(reader: DocumentReader, tmp: Path, final_out: Path, cfg: CurateConfig, workers: int, progress: bool,
         batches=None, dedup=None) -> dict:
    """The accounting loop. `batches` (default: the worker pool over `reader`) yields (records read,
    per-record results) in input order; `dedup` (default `_LocalDedup`) makes the exact/near decisions."""
    budget = Budget.of(cfg.memory_mb, workers, _fixed_bytes(cfg))
    acc = _Accounts(tmp, cfg, dedup if dedup is not None else _LocalDedup(cfg, tmp, final_out, budget))
    if batches is None:
        tasks = _tasks(reader, workers, budget)
        batches = _ordered_map(tasks, cfg, workers, budget)
    bar = _Progress(reader, acc) if progress else None
    try:
        for n_batch, results in batches:
            acc.batch(n_batch, results)
            if bar is not None:
                bar.update()
        if acc.scorer is not None:
            acc.flush_ppl()
    finally:
        if bar is not None:
            bar.close()
        acc.close()
    return acc.report(reader)
