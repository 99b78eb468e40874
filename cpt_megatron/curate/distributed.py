"""Curation in stages over many tasks (Slurm array jobs, or one machine): the same result as `curate`.

Three stages, each a set of independent tasks whose outputs land atomically in a work folder (a task's
folder appears by one rename when it is complete, so re-running a stage skips the tasks already done):

1. ``sketch`` (N tasks): task k reads shard k of the inputs (a contiguous run of input files, balanced
   by bytes), runs the per-document stages (`pipeline._Worker`: normalize, filters, exact keys, shingle
   hashes + sketches, PII) and writes the results, the live documents' sketches, shingle sets and exact
   keys. Memory: one shard's sketches and sets.
2. ``buckets`` (N tasks): task p owns the exact keys and LSH band values that hash to p. It groups them
   across all shards: every exact key's first occurrence survives; every pair of documents sharing a
   band is a candidate, and the pair's Jaccard is computed here with `dedup.pair_jaccard` (it
   depends only on the two documents, not on what was kept before). Memory: 1/N of the band table.
3. ``write`` (1 task): replays the shards in input order through the one-process accounting loop
   (`pipeline._run`) with the decisions read from stage 2: a document is a near-duplicate iff an
   earlier KEPT document is a candidate of it at Jaccard >= threshold, exactly as `NearDupIndex`
   decides, so the kept documents, the shards and report.json are byte-identical to `curate` (only
   elapsed_s differs) for any N. Memory: one shard's candidate pairs plus one bit per live document.

Shards are runs of input files; an uncompressed JSONL or plain-text file (split by `input.doc_separator`)
bigger than one shard's share is cut into byte ranges (`readers.FilePart`: the records that start in
each, the file's own line numbers), so one big file spreads over every task. Compressed, Parquet and
whole-file plain-text inputs are not split.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import time
from pathlib import Path

import numpy as np

from cpt_megatron.curate.config import CurateConfig, result_config
from cpt_megatron.curate.dedup import _splitmix64 as _mix
from cpt_megatron.curate.readers import DocumentReader, FilePart, Malformed, splittable
from cpt_megatron.curate.spill import Budget
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
def _sketch(plan: _Plan, k: int, workers: int) -> None:
    from cpt_megatron.curate.pipeline import _BATCH, _batches, _ordered_map

    cfg = plan.cfg
    sigs, sets, lens, keys, ids = [], [], [], [], []
    with atomic_dir(plan.sketch_dir(k), overwrite=True) as tmp:
        with open(tmp / "docs.pkl", "wb") as f:
            if plan.files[k]:
                reader = DocumentReader(plan.files[k], cfg.input)
                budget = Budget.of(cfg.memory_mb, workers)
                for n_batch, results in _ordered_map(_batches(reader, _BATCH, budget.batch_bytes), cfg, workers, budget):
                    for o in results:
                        if isinstance(o, Malformed) or o.removed is not None:
                            continue
                        o.uid = (k << _SHARD_BITS) | len(ids)
                        ids.append(f"{o.source}:{o.position}")
                        if o.exact is not None:
                            keys.append(o.exact)
                        if o.sig is not None:
                            sigs.append(o.sig)
                            o.sig = None
                        if o.shingles is not None:
                            sets.append(o.shingles)
                            lens.append(len(o.shingles))
                            o.shingles = None
                    pickle.dump((n_batch, results), f, protocol=pickle.HIGHEST_PROTOCOL)
        p = cfg.minhash_dedup.num_perm
        np.save(tmp / "sigs.npy", np.stack(sigs) if sigs else np.zeros((0, p), np.uint32))
        values = np.concatenate(sets) if sets else np.zeros(0, np.uint64)
        np.save(tmp / "values.npy", values)
        offsets = np.concatenate([[0], np.cumsum(lens, dtype=np.int64)]).astype(np.int64)
        np.save(tmp / "offsets.npy", offsets)
        if sets:
            from cpt_megatron.curate.dedup import fine_sketches, hash_ranges

            np.save(tmp / "ranges.npy", hash_ranges(values, offsets))
            np.save(tmp / "fine.npy", fine_sketches(values, offsets))
        np.save(tmp / "exact.npy", np.frombuffer(b"".join(keys), np.uint64).reshape(-1, 2))
        enc = [k.encode("utf-8", "surrogatepass") for k in ids]  # dup_of keys, read back one at a time
        (tmp / "keys.bin").write_bytes(b"".join(enc))
        np.save(tmp / "key_offsets.npy", np.concatenate([[0], np.cumsum([len(b) for b in enc], dtype=np.int64)])
                .astype(np.int64))


def _load(path: Path) -> np.ndarray:
    """np.load memory-mapped (an empty array cannot be mapped: read it)."""
    try:
        return np.load(path, mmap_mode="r")
    except ValueError:
        return np.load(path)


class _Shard:
    """Read-only view of one sketch folder (arrays memory-mapped)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.sigs, self.values, self.offsets, self.exact = (_load(folder / n) for n in (
            "sigs.npy", "values.npy", "offsets.npy", "exact.npy"))

        self.key_offsets = np.load(folder / "key_offsets.npy")
        self.live = len(self.key_offsets) - 1

    def exact_filters(self) -> tuple[np.ndarray, np.ndarray]:
        """`dedup.hash_ranges` and `dedup.fine_sketches` of the shard's sets (saved by the sketch task)."""
        from cpt_megatron.curate.dedup import fine_sketches, hash_ranges

        r, f = self.folder / "ranges.npy", self.folder / "fine.npy"
        return (_load(r) if r.exists() else hash_ranges(self.values, self.offsets),
                _load(f) if f.exists() else fine_sketches(self.values, self.offsets))

    def key(self, i: int) -> str:
        """`source:position` of live document i (what `dup_of` names)."""
        lo, hi = int(self.key_offsets[i]), int(self.key_offsets[i + 1])
        with open(self.folder / "keys.bin", "rb") as f:
            f.seek(lo)
            return f.read(hi - lo).decode("utf-8", "surrogatepass")


# --- stage 2: one partition of the exact keys and band values ------------------------------------------
def _buckets(plan: _Plan, p: int) -> None:
    from cpt_megatron.curate.dedup import (
        SetTable,
        band_keys,
        equal_runs,
        lsh_params,
        pair_jaccard,
        same_key_pairs,
    )

    cfg, n, parts = plan.cfg, plan.shards, plan.shards
    shards = [_Shard(plan.sketch_dir(s)) for s in range(n)]
    stages = cfg.stages
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
        if "minhash_dedup" in stages:
            mh = cfg.minhash_dedup
            bands, rows = lsh_params(mh.threshold, mh.num_perm)
            keys, gids = [], []
            for s, sh in enumerate(shards):
                bk = band_keys(sh.sigs, bands, rows)
                mine = bk % np.uint64(parts) == p
                keys.append(bk[mine])
                gids.append((s << _SHARD_BITS) | np.nonzero(mine)[0].astype(np.int64))
            pj, pi = same_key_pairs(np.concatenate(keys), np.concatenate(gids))
            js = np.full(len(pj), -1.0)
            tables = [SetTable(sh.sigs, sh.values, sh.offsets, *(sh.exact_filters() if mh.decide == "exact" else ()))
                      for sh in shards]
            sj, si = pj >> _SHARD_BITS, pi >> _SHARD_BITS
            order = np.lexsort((pi, pj, si, sj))  # grouped by (shard of j, shard of i), j ascending inside
            grp = sj[order] * n + si[order]
            for lo, hi in equal_runs(grp):
                k = order[lo:hi]
                a, c = int(sj[k[0]]), int(si[k[0]])
                js[k], _ = pair_jaccard(mh, pj[k] & _LOCAL, pi[k] & _LOCAL, tables[a], tables[c])
            for s in range(n):
                m = sj == s
                np.savez(tmp / f"pairs-{s:05d}.npz", j=pj[m] & _LOCAL, i=pi[m], js=js[m])


def _save_by_shard(folder: Path, name: str, gids: np.ndarray, shards: int) -> None:
    for s in range(shards):
        np.save(folder / f"{name}-{s:05d}.npy", np.sort(gids[(gids >> _SHARD_BITS) == s] & _LOCAL))


# --- stage 3: replay in input order with the decisions --------------------------------------------------
class _ReplayDedup:
    """`pipeline._LocalDedup`'s interface over stage 2's decisions (call `batches()` to drive it)."""

    def __init__(self, plan: _Plan):
        from cpt_megatron.curate.dedup import NearDupStats, lsh_params

        self.plan, self.cfg = plan, plan.cfg.minhash_dedup
        self.near_stats = NearDupStats(self.cfg, *lsh_params(self.cfg.threshold, self.cfg.num_perm))
        self.kept: list[np.ndarray] = []
        self.shards: list[_Shard] = []

    def batches(self):
        plan = self.plan
        for s in range(plan.shards):
            sh = _Shard(plan.sketch_dir(s))
            self.shards.append(sh)
            self.kept.append(np.zeros(sh.live, bool))
            parts = [plan.bucket_dir(p) for p in range(plan.shards)]
            if "exact_dedup" in plan.cfg.stages:
                self.exact = set(np.concatenate([np.load(d / f"exact-{s:05d}.npy") for d in parts]).tolist())
            if "minhash_dedup" in plan.cfg.stages:
                z = [np.load(d / f"pairs-{s:05d}.npz") for d in parts]
                j, i, js = (np.concatenate([x[k] for x in z]) for k in ("j", "i", "js"))
                _, first = np.unique(np.stack([j, i], axis=1), axis=0, return_index=True)  # a pair from 2 parts
                self.pj, self.pi, self.pjs = j[first], i[first], js[first]
            with open(plan.sketch_dir(s) / "docs.pkl", "rb") as f:
                while True:
                    try:
                        yield pickle.load(f)
                    except EOFError:
                        break

    def exact_dup(self, o) -> bool:
        return (o.uid & _LOCAL) in self.exact

    def near_dups(self, outs: list) -> list[tuple[str | None, float]]:
        return [self._near_dup(o) for o in outs]

    def _near_dup(self, o) -> tuple[str | None, float]:
        s, jl = o.uid >> _SHARD_BITS, o.uid & _LOCAL
        lo, hi = np.searchsorted(self.pj, [jl, jl + 1])
        cand, js = self.pi[lo:hi], self.pjs[lo:hi]
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
        pass


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
