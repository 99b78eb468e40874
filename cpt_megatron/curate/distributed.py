"""Curation in stages over many tasks (Slurm array jobs, or one machine): the same result as `curate`.

Three stages, each a set of independent tasks whose outputs land atomically in a work folder (a task's
folder appears by one rename when it is complete, so re-running a stage skips the tasks already done):

1. ``sketch`` (N tasks): task k reads shard k of the inputs (a contiguous run of input files, balanced
   by bytes), runs the per-document stages (`pipeline._Worker`: normalize, filters, exact keys, shingle
   hashes + sketches, PII) and appends the results, the live documents' sketches, shingle sets and exact
   keys to its files a batch at a time. Memory: a few batches.
2. ``buckets`` (N tasks): task p owns the exact keys and LSH band values that hash to p. It groups them
   across all shards: every exact key's first occurrence survives; every pair of documents sharing a
   band is a candidate, and the pair's Jaccard is computed here with `dedup.pair_jaccard` (it
   depends only on the two documents, not on what was kept before), in chunks of later documents
   appended to per-shard pair files. Memory: 1/N of the band entries plus one chunk of pairs.
3. ``write`` (1 task): replays the shards in input order through the one-process accounting loop
   (`pipeline._run`) with the decisions read from stage 2: a document is a near-duplicate iff an
   earlier KEPT document is a candidate of it at Jaccard >= threshold, exactly as `NearDupIndex`
   decides, so the kept documents, the shards and report.json are byte-identical to `curate` (only
   elapsed_s differs) for any N. Memory: one bit per live document (the pairs are memory-mapped).

Shards are runs of input files; an uncompressed JSONL or plain-text file (split by `input.doc_separator`)
bigger than one shard's share is cut into byte ranges (`readers.FilePart`: the records that start in
each, the file's own line numbers), so one big file spreads over every task. Compressed, Parquet and
whole-file plain-text inputs are not split.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import pickle
import time
from pathlib import Path

import numpy as np

from cpt_megatron.curate.config import CurateConfig, result_config
from cpt_megatron.curate.dedup import _splitmix64 as _mix
from cpt_megatron.curate.dedup import uses_prefix
from cpt_megatron.curate.readers import DocumentReader, FilePart, Malformed, splittable
from cpt_megatron.curate.spill import Budget, map_sparse
from cpt_megatron.errors import CptError
from cpt_megatron.utils import atomic_dir, write_json

__all__ = ["STAGES", "run_stage", "shard_files", "default_work_dir"]

STAGES = ("sketch", "buckets", "write")
_SHARD_BITS = 40  # a live document's id: shard << 40 | its index among the shard's live documents
_LOCAL = (1 << _SHARD_BITS) - 1


def default_work_dir(out: str | os.PathLike) -> Path:
    out = Path(out)
    return out.parent / f"{out.name}.work"


def shard_files(files: list[Path], shards: int, separated: bool = False) -> list[list[Path]]:
    """Contiguous runs of `files` (their order kept), balanced by bytes: a file goes to the shard its
    middle byte falls in. An uncompressed JSONL file (or, with `separated`, plain-text file) larger than
    one shard's share is first cut into byte ranges of about that share (`readers.FilePart`: each range
    holds the records starting in it), so one big file still spreads over every task. Other shards are
    empty when there are fewer files."""
    total = sum(max(f.stat().st_size, 1) for f in files)
    share = -(-total // shards)
    parts: list = []
    for f in files:
        size = f.stat().st_size
        if splittable(f, separated) and size > share and shards > 1:
            cuts = list(range(0, size, share)) + [size]
            parts += [FilePart(f, lo, hi) for lo, hi in zip(cuts[:-1], cuts[1:])]
        else:
            parts.append(f)
    files = parts
    sizes = [max((f.hi - f.lo) if isinstance(f, FilePart) else f.stat().st_size, 1) for f in files]
    total = sum(sizes)
    out: list[list[Path]] = [[] for _ in range(shards)]
    before = 0
    for f, n in zip(files, sizes):
        out[min(shards - 1, (2 * before + n) * shards // (2 * total))].append(f)
        before += n
    return out


class _Plan:
    def __init__(self, inputs, cfg: CurateConfig, shards: int, work: Path):
        if cfg.lsh:
            raise CptError("lsh: the distributed executor keeps its band table in the work folder; unset lsh "
                           "(or run `cpt curate` without --shards for the Redis index)")
        self.cfg, self.shards, self.work = cfg, shards, Path(work)
        self.inputs = [str(p) for p in inputs]
        self.reader = DocumentReader(inputs, cfg.input)
        self.files = shard_files(self.reader.files, shards, cfg.input.doc_separator is not None)
        blob = json.dumps({"config": result_config(cfg), "files": [str(f) for f in self.reader.files],
                           "shards": shards}, sort_keys=True, default=str)
        self.fingerprint = hashlib.sha1(blob.encode()).hexdigest()[:16]

    def check_work(self) -> None:
        """The work folder belongs to one (inputs, config, shards): refuse to mix runs."""
        self.work.mkdir(parents=True, exist_ok=True)
        path = self.work / "plan.json"
        if path.exists():
            have = json.loads(path.read_text()).get("fingerprint")
            if have != self.fingerprint:
                raise CptError(f"{path}: made for other inputs/config/--shards (fingerprint {have}, now "
                               f"{self.fingerprint}); pass a fresh --work or delete {self.work}")
            return
        write_json(path, {"fingerprint": self.fingerprint, "shards": self.shards,
                          "files": [[str(f) for f in fs] for fs in self.files]})

    def sketch_dir(self, k: int) -> Path:
        return self.work / "sketch" / f"shard-{k:05d}"

    def bucket_dir(self, p: int) -> Path:
        return self.work / "buckets" / f"part-{p:05d}"


# --- stage 1: per-shard documents, sketches, shingle sets, exact keys ----------------------------------
_COLUMNS = ("sigs", "values", "offsets", "ranges", "fine", "exact", "key_offsets")


def _columns(cfg: CurateConfig) -> dict[str, tuple[np.dtype, int]]:
    """The sketch folder's arrays: name -> (dtype, values per row), raw in NAME.bin (appended per batch)."""
    from cpt_megatron.curate.dedup import _RANGE_BITS, FINE_BINS

    return {"sigs": (np.uint32, cfg.minhash_dedup.num_perm), "values": (np.uint64, 1), "offsets": (np.int64, 1),
            "ranges": (np.int32, (1 << _RANGE_BITS) + 1), "fine": (np.uint32, FINE_BINS), "exact": (np.uint64, 2),
            "key_offsets": (np.int64, 1)}


def _sketch(plan: _Plan, k: int, workers: int) -> None:
    """Task k of stage 1, streaming: each batch's results go to docs.pkl and its live documents' arrays are
    appended to the column files (memory: a few batches, whatever the shard's size)."""
    from cpt_megatron.curate.pipeline import _ordered_map, _tasks

    cfg = plan.cfg
    exact_sets = cfg.minhash_dedup.decide == "exact"
    with atomic_dir(plan.sketch_dir(k), overwrite=True) as tmp:
        cols = {n: open(tmp / f"{n}.bin", "wb") for n in _COLUMNS}
        n_live = n_values = n_key_bytes = 0
        cols["offsets"].write(np.zeros(1, np.int64).tobytes())
        cols["key_offsets"].write(np.zeros(1, np.int64).tobytes())
        try:
            with open(tmp / "docs.pkl", "wb") as f, open(tmp / "keys.bin", "wb") as keys_bin:
                budget = Budget.of(cfg.memory_mb, workers)
                tasks = []
                if plan.files[k]:
                    reader = DocumentReader(plan.files[k], cfg.input)
                    tasks = _tasks(reader, workers, budget)
                for n_batch, results in _ordered_map(tasks, cfg, workers, budget):
                    live = [o for o in results if not isinstance(o, Malformed) and o.removed is None]
                    for i, o in enumerate(live):
                        o.uid = (k << _SHARD_BITS) | (n_live + i)
                    n_live += len(live)
                    enc = [f"{o.source}:{o.position}".encode("utf-8", "surrogatepass") for o in live]
                    keys_bin.write(b"".join(enc))  # dup_of keys, read back one at a time
                    cols["key_offsets"].write((n_key_bytes + np.cumsum([len(b) for b in enc], dtype=np.int64)).tobytes())
                    n_key_bytes += sum(map(len, enc))
                    cols["exact"].write(b"".join(o.exact for o in live if o.exact is not None))
                    sigs = [o.sig for o in live if o.sig is not None]
                    if sigs:
                        cols["sigs"].write(np.stack(sigs).astype(np.uint32).tobytes())
                    if exact_sets and sigs:
                        sets = [o.shingles for o in live]
                        offsets = np.concatenate([[0], np.cumsum([len(x) for x in sets])]).astype(np.int64)
                        values = np.concatenate(sets).astype(np.uint64)
                        cols["values"].write(values.tobytes())
                        cols["offsets"].write((n_values + offsets[1:]).tobytes())
                        if live[0].ranges is not None:  # the band pairs' pre-filters (`buckets`); not with prefix
                            cols["ranges"].write(np.stack([o.ranges for o in live]).astype(np.int32).tobytes())
                            cols["fine"].write(np.stack([o.fine for o in live]).astype(np.uint32).tobytes())
                        n_values += len(values)
                    for o in live:
                        o.sig = o.shingles = o.ranges = o.fine = None
                    pickle.dump((n_batch, results), f, protocol=pickle.HIGHEST_PROTOCOL)
        finally:
            for c in cols.values():
                c.close()


class _Shard:
    """Read-only view of one sketch folder (arrays memory-mapped; `release()` drops their resident pages)."""

    def __init__(self, folder: Path, cfg: CurateConfig):
        self.folder, self._maps = folder, []
        for name, (dtype, width) in _columns(cfg).items():
            setattr(self, name, self._map(folder / f"{name}.bin", dtype, width))
        self.live = len(self.key_offsets) - 1

    def _map(self, path: Path, dtype, width: int) -> np.ndarray:
        size = path.stat().st_size
        if size == 0:  # an empty file cannot be mapped
            return np.zeros((0, width) if width > 1 else 0, dtype)
        with open(path, "rb") as f:
            mm = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ)
        map_sparse(mm)
        self._maps.append(mm)
        a = np.frombuffer(mm, dtype)
        return a.reshape(-1, width) if width > 1 else a

    def exact_filters(self) -> tuple[np.ndarray, np.ndarray]:
        """`dedup.hash_ranges` and `dedup.fine_sketches` of the shard's sets (saved by the sketch task)."""
        return self.ranges, self.fine

    def release(self) -> None:
        for mm in self._maps:
            if hasattr(mm, "madvise"):
                mm.madvise(mmap.MADV_DONTNEED)

    def key(self, i: int) -> str:
        """`source:position` of live document i (what `dup_of` names)."""
        lo, hi = int(self.key_offsets[i]), int(self.key_offsets[i + 1])
        with open(self.folder / "keys.bin", "rb") as f:
            f.seek(lo)
            return f.read(hi - lo).decode("utf-8", "surrogatepass")


# --- stage 2: one partition of the exact keys and band values ------------------------------------------
_PAIR_FILES = (("j", np.int64), ("i", np.int64), ("js", np.float64))  # pairs-SHARD.NAME.bin, sorted by (j, i)
_PAIR_TEMP_BYTES = 96  # a chunk's temporaries per candidate pair (ids, orders, Jaccard)


def _buckets(plan: _Plan, p: int) -> None:
    """Task p of stage 2. The partition's band entries are grouped by key; the candidate pairs (j, i) are
    made and decided in chunks of later documents j (all of a j's pairs in one chunk, so each chunk's
    pairs are unique), each chunk small enough for the memory budget, and appended to the per-shard
    pair files in (j, i) order: the task never holds more than one chunk of pairs."""
    from cpt_megatron.curate.dedup import (
        SetTable,
        _unique_pairs,
        band_keys,
        equal_runs,
        lsh_params,
        pair_jaccard,
        prefilter_chunk,
    )
    from cpt_megatron.utils import gather_runs

    cfg, n, parts = plan.cfg, plan.shards, plan.shards
    shards = [_Shard(plan.sketch_dir(s), cfg) for s in range(n)]
    stages = cfg.stages
    budget = Budget.of(cfg.memory_mb)
    with atomic_dir(plan.bucket_dir(p), overwrite=True) as tmp:
        if "exact_dedup" in stages:  # the first occurrence of each key survives
            ks, gs = [], []
            for s, sh in enumerate(shards):
                e = np.asarray(sh.exact)
                mine = np.flatnonzero(_mix(e[:, 0] ^ _mix(e[:, 1])) % np.uint64(parts) == p)
                ks.append(e[mine])
                gs.append((s << _SHARD_BITS) | mine.astype(np.int64))
            k, g = np.concatenate(ks), np.concatenate(gs)
            order = np.lexsort((g, k[:, 1], k[:, 0]))
            k, g = k[order], g[order]
            dup = np.zeros(len(g), bool)
            dup[1:] = (k[1:] == k[:-1]).all(axis=1)
            _save_by_shard(tmp, "exact", g[dup], n)
        if "minhash_dedup" in stages and not uses_prefix(cfg.minhash_dedup):  # prefix: decided in `write`
            mh = cfg.minhash_dedup
            bands, rows = lsh_params(mh.threshold, mh.num_perm)
            keys, gids = [], []
            step = max(1, budget.index_bytes // (64 * bands))
            for s, sh in enumerate(shards):
                for lo in range(0, sh.live, step):  # band keys a slice of sketches at a time
                    bk = band_keys(sh.sigs[lo : lo + step], bands, rows)
                    mine = bk % np.uint64(parts) == p
                    keys.append(bk[mine])
                    gids.append((s << _SHARD_BITS) | (lo + np.nonzero(mine)[0].astype(np.int64)))
                sh.release()
            key = np.concatenate(keys) if keys else np.zeros(0, np.uint64)
            gid = np.concatenate(gids) if gids else np.zeros(0, np.int64)
            del keys, gids
            order = np.lexsort((gid, key))
            key, gid = key[order], gid[order]
            new = np.ones(len(key), bool)
            new[1:] = key[1:] != key[:-1]
            first = np.maximum.accumulate(np.where(new, np.arange(len(key)), 0))  # each entry's key run start
            earlier = np.arange(len(key)) - first  # entries before it in its run: its pairs as the later one
            del key, new, order
            byj = np.argsort(gid, kind="stable")
            uj, at = np.unique(gid[byj], return_index=True)
            per_j = np.add.reduceat(earlier[byj], at) if len(at) else np.zeros(0, np.int64)
            tables = [SetTable(sh.sigs, sh.values, sh.offsets, *(sh.exact_filters() if mh.decide == "exact" else ()))
                      for sh in shards]
            outs = {(s, name): open(tmp / f"pairs-{s:05d}.{name}.bin", "wb") for s in range(n) for name, _ in _PAIR_FILES}
            try:
                cap = max(budget.index_bytes // _PAIR_TEMP_BYTES, 1)  # pairs per chunk
                sketch_rows = prefilter_chunk(budget.index_bytes)
                cum = np.cumsum(per_j)
                a = 0
                while a < len(uj):
                    b = max(a + 1, int(np.searchsorted(cum, (cum[a - 1] if a else 0) + cap, "right")))
                    sel = byj[at[a] : at[b] if b < len(at) else len(byj)]
                    pj = np.repeat(gid[sel], earlier[sel])
                    pi = gather_runs(gid, first[sel], earlier[sel])
                    keep = pj != pi  # one document with a key twice (two equal bands) is not a pair
                    pj, pi = _unique_pairs(pj[keep], pi[keep])
                    js = np.full(len(pj), -1.0)
                    sj, si = pj >> _SHARD_BITS, pi >> _SHARD_BITS
                    order = np.lexsort((pi, pj, si, sj))  # grouped by (shard of j, shard of i), j ascending inside
                    grp = sj[order] * n + si[order]
                    for lo, hi in equal_runs(grp):
                        kk = order[lo:hi]
                        c, d = int(sj[kk[0]]), int(si[kk[0]])
                        js[kk], _ = pair_jaccard(mh, pj[kk] & _LOCAL, pi[kk] & _LOCAL, tables[c], tables[d], sketch_rows)
                    for s in np.unique(sj).tolist():
                        m = sj == s
                        for (name, dtype), col in zip(_PAIR_FILES, (pj[m] & _LOCAL, pi[m], js[m])):
                            outs[(s, name)].write(np.ascontiguousarray(col, dtype).tobytes())
                    for sh in shards:
                        sh.release()
                    a = b
            finally:
                for f in outs.values():
                    f.close()


def _save_by_shard(folder: Path, name: str, gids: np.ndarray, shards: int) -> None:
    for s in range(shards):
        np.save(folder / f"{name}-{s:05d}.npy", np.sort(gids[(gids >> _SHARD_BITS) == s] & _LOCAL))


# --- stage 3: replay in input order with the decisions --------------------------------------------------
class _ReplayDedup:
    """`pipeline._LocalDedup`'s interface over stage 2's decisions (call `batches()` to drive it)."""

    def __init__(self, plan: _Plan):
        from cpt_megatron.curate.dedup import NearDupIndex, NearDupStats, lsh_params
        from cpt_megatron.curate.pipeline import _fixed_bytes

        self.plan, self.cfg = plan, plan.cfg.minhash_dedup
        # `candidates: prefix`: the one-process index itself, fed in input order from the sketch folders
        near = "minhash_dedup" in plan.cfg.stages and uses_prefix(self.cfg)
        budget = Budget.of(plan.cfg.memory_mb, 1, _fixed_bytes(plan.cfg))
        self.index = NearDupIndex(self.cfg, workdir=str(plan.work),
                                  resident_bytes=budget.index_bytes if budget.memory_mb else None) if near else None
        self.near_stats = self.index.stats if self.index is not None else \
            NearDupStats(self.cfg, *lsh_params(self.cfg.threshold, self.cfg.num_perm))
        self.kept: list[np.ndarray] = []
        self.shards: list[_Shard] = []
        self.pairs: list[tuple[np.ndarray, ...]] = []  # per buckets part: this shard's (j, i, js), sorted by (j, i)

    def batches(self):
        plan = self.plan
        parts = [plan.bucket_dir(p) for p in range(plan.shards)]
        for s in range(plan.shards):
            sh = _Shard(plan.sketch_dir(s), plan.cfg)
            self.shards.append(sh)
            self.kept.append(np.zeros(sh.live, bool))
            if "exact_dedup" in plan.cfg.stages:
                self.exact = set(np.concatenate([np.load(d / f"exact-{s:05d}.npy") for d in parts]).tolist())
            if "minhash_dedup" in plan.cfg.stages and self.index is None:  # memory-mapped: a document's pairs at a time
                self.pairs = [tuple(sh._map(d / f"pairs-{s:05d}.{name}.bin", dtype, 1) for name, dtype in _PAIR_FILES)
                              for d in parts]
            with open(plan.sketch_dir(s) / "docs.pkl", "rb") as f:
                while True:
                    try:
                        yield pickle.load(f)
                    except EOFError:
                        break
                    for x in self.shards:
                        x.release()

    def exact_dups(self, outs: list) -> list[bool]:
        return [(o.uid & _LOCAL) in self.exact for o in outs]

    def near_dups(self, outs: list) -> list[tuple[str | None, float]]:
        if self.index is not None:
            sh = [(self.shards[o.uid >> _SHARD_BITS], o.uid & _LOCAL) for o in outs]
            sets = [s.values[s.offsets[i] : s.offsets[i + 1]] for s, i in sh]
            offsets = np.concatenate([[0], np.cumsum([len(x) for x in sets])]).astype(np.int64)
            return self.index.check_batch([f"{o.source}:{o.position}" for o in outs],  # prefix: no sketches
                                          np.zeros((len(outs), 0), np.uint32), np.concatenate(sets), offsets)
        return [self._near_dup(o) for o in outs]

    def _near_dup(self, o) -> tuple[str | None, float]:
        s, jl = o.uid >> _SHARD_BITS, o.uid & _LOCAL
        cand, js = [], []
        for pj, pi, pjs in self.pairs:
            lo, hi = np.searchsorted(pj, [jl, jl + 1])
            cand.append(pi[lo:hi])
            js.append(pjs[lo:hi])
        cand, js = np.concatenate(cand), np.concatenate(js)
        cand, first = np.unique(cand, return_index=True)  # by earlier document; a pair from 2 parts once
        js = js[first]
        live = np.array([self.kept[c >> _SHARD_BITS][c & _LOCAL] for c in cand.tolist()], bool)
        cand, js = cand[live], js[live]
        checked = int((js != -1.0).sum()) if self.cfg.decide == "exact" else len(js)
        ok = js >= self.cfg.threshold
        if ok.any():
            b = int(np.argmax(js))  # first maximum: the earliest kept document
            self.near_stats.add(len(cand), checked, int(ok.sum()), float(js[b]))
            c = int(cand[b])
            return self.shards[c >> _SHARD_BITS].key(c & _LOCAL), float(js[b])
        self.near_stats.add(len(cand), checked, 0, None)
        self.kept[s][jl] = True
        return None, float(max(js.max(initial=0.0), 0.0))

    def close(self) -> None:
        if self.index is not None:
            self.index.close()


def _write(plan: _Plan, out: Path, overwrite: bool) -> dict:
    from cpt_megatron.curate.pipeline import _run

    dedup = _ReplayDedup(plan)
    t0 = time.time()
    with atomic_dir(out, overwrite=overwrite) as tmp:
        report = _run(plan.reader, tmp, out, plan.cfg, 1, False, batches=dedup.batches(), dedup=dedup)
        write_json(tmp / "report.json", report)
    write_json(plan.work / "write.done", {"fingerprint": plan.fingerprint, "out": str(out.resolve())})
    report["elapsed_s"] = round(time.time() - t0, 3)
    return report


def _write_done(plan: _Plan, out: Path) -> bool:
    done = plan.work / "write.done"
    return done.exists() and out.exists() and json.loads(done.read_text()).get("out") == str(out.resolve())


# --- driver ---------------------------------------------------------------------------------------------
def _tasks_of(stage: str, shards: int) -> int:
    return 1 if stage == "write" else shards


def run_stage(inputs, out, cfg: CurateConfig, shards: int, stage: str = "all", task: int | None = None,
              work: str | os.PathLike | None = None, workers: int = 1, overwrite: bool = False) -> dict:
    """Run `stage` ("all" = the three in order) for one `task` (None = every task, one after another).
    Done tasks are skipped. Returns {"done": [...], "skipped": [...], "report": report or None}."""
    if shards < 1:
        raise CptError(f"--shards {shards}: give at least 1")
    if cfg.input.max_docs is not None:  # each task would apply it to its own share
        raise CptError(f"input.max_docs={cfg.input.max_docs} needs one task: drop --shards, or cut the inputs first")
    out = Path(out)
    plan = _Plan(inputs, cfg, shards, Path(work) if work else default_work_dir(out))
    plan.check_work()
    if stage in ("all", "write") and out.exists() and not overwrite and not _write_done(plan, out):
        raise CptError(f"output {out} already exists; pass --overwrite to replace it")
    result: dict = {"work": str(plan.work), "done": [], "skipped": [], "report": None}
    for st in (STAGES if stage == "all" else (stage,)):
        if st not in STAGES:
            raise CptError(f"--stage {st}: expected one of all, {', '.join(STAGES)}")
        n = _tasks_of(st, shards)
        if task is not None and not 0 <= task < n:
            raise CptError(f"--task {task}: stage {st} has tasks 0..{n - 1}")
        for k in (range(n) if task is None else [task]):
            name = f"{st}:{k}"
            prev = {"buckets": ("sketch", plan.sketch_dir), "write": ("buckets", plan.bucket_dir)}.get(st)
            if prev and (missing := [t for t in range(shards) if not prev[1](t).exists()]):
                raise CptError(f"stage {st} needs every {prev[0]} task; tasks {missing[:5]} are not done in {plan.work} "
                               f"(run --stage {prev[0]} first)")
            if st == "write":
                if _write_done(plan, out):
                    result["skipped"].append(name)
                    continue
                result["report"] = _write(plan, out, overwrite)
            else:
                folder = plan.sketch_dir(k) if st == "sketch" else plan.bucket_dir(k)
                if folder.exists():
                    result["skipped"].append(name)
                    continue
                if st == "buckets":
                    _buckets(plan, k)
                else:
                    _sketch(plan, k, workers)
            result["done"].append(name)
    return result
