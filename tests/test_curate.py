"""`cpt curate`: readers, accounting, dedup quality on planted near-duplicates, PII, determinism, Redis."""

from __future__ import annotations

import gzip
import json
import random
import shutil
import socket
import subprocess
import time

import numpy as np
import pytest

from cpt_megatron.curate import CurateConfig, curate, load_config
from cpt_megatron.curate.dedup import (
    MinHasher,
    brute_force_removed,
    jaccard,
    lsh_params,
    shingle_hash_reference,
    shingle_hashes,
    shingles,
)
from cpt_megatron.curate.pii import luhn_valid, redact_pii, verhoeff_valid
from cpt_megatron.curate.readers import Doc, Malformed, read_documents


def _write_jsonl(path, docs):
    with open(path, "w") as f:
        for d in docs:
            f.write(json.dumps(d) + "\n")


def _read_out(folder, pattern="shard-*.jsonl.gz"):
    out = []
    for p in sorted(folder.glob(pattern)):
        with gzip.open(p, "rt") as f:
            out.extend(json.loads(line) for line in f)
    return out


def _gutenberg_docs(shared_data, n_docs: int, lines_per_doc: int = 12, skip: int = 0) -> list[str]:
    lines = [ln for ln in (shared_data / "general/gutenberg_nltk17_tokenized.txt").read_text().splitlines() if len(ln.split()) > 8]
    lines = lines[skip:]
    return [" ".join(lines[i * lines_per_doc : (i + 1) * lines_per_doc]) for i in range(n_docs)]


def _edit(text: str, rate: float, rng: random.Random) -> str:
    words = text.split()
    for _ in range(max(1, int(len(words) * rate))):
        i = rng.randrange(len(words))
        op = rng.random()
        if op < 0.4:
            words[i] = rng.choice(["alpha", "beta", "gamma", "delta", "omega", "sigma"])
        elif op < 0.7:
            del words[i]
        else:
            words.insert(i, rng.choice(["new", "old", "red", "blue"]))
    return " ".join(words)


def _jaccard(a: str, b: str) -> float:
    sa, sb = set(shingles(a)), set(shingles(b))
    return len(sa & sb) / len(sa | sb)


DEDUP_ONLY = {"stages": ["normalize", "exact_dedup", "minhash_dedup"]}


# ---------------------------------------------------------------- readers and accounting


def test_readers_all_formats_keep_source_id_position(tmp_path, shared_data):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    _write_jsonl(tmp_path / "a.jsonl", [{"text": "one", "id": "x1"}, {"text": "two"}])
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.write(json.dumps({"text": "three"}) + "\n")
    (tmp_path / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(b'{"text": "four"}\n'))
    pq.write_table(pa.table({"text": ["five", None], "id": [5, 6]}), tmp_path / "d.parquet")
    recs = list(read_documents([tmp_path], load_config(overrides={"input": {"glob": "*"}}).input))
    docs = [r for r in recs if isinstance(r, Doc)]
    assert [d.text for d in docs] == ["one", "two", "three", "four", "five"]
    assert docs[0].id == "x1" and docs[1].id == "a.jsonl:2" and docs[1].position == 2 and docs[4].id == "5"
    assert [str(m).split("/")[-1] for m in recs if isinstance(m, Malformed)] == ["d.parquet:1: row 1: column 'text' is null"]

    # plain text with separators: the real CUAD file, header line starts each contract
    cfg = load_config(overrides={"input": {"doc_separator": r"^<<< .* >>>$"}}).input
    it = read_documents([shared_data / "domain/cuad_contracts.txt"], cfg)
    first, second = next(it), next(it)
    assert first.text.startswith("<<< 2ThemartComInc") and first.position == 1
    assert second.text.startswith("<<< ") and second.position > first.position
    assert "<<< " not in first.text[4:]


def test_accounting_invariant_with_malformed_lines(tmp_path, shared_data):
    docs = _gutenberg_docs(shared_data, 60)
    p = tmp_path / "in.jsonl"
    with open(p, "wb") as f:
        for i, d in enumerate(docs + docs[:5]):  # 5 exact duplicates
            f.write((json.dumps({"text": d, "id": f"d{i}"}) + "\n").encode())
            if i == 3:
                f.write(b'{"text": "broken json\n')
            if i == 7:
                f.write(b'{"title": "no text field"}\n')
            if i == 11:
                f.write(b'{"text": "bad \xff\xfe bytes"}\n')
            if i == 13:
                f.write(b'["not", "an", "object"]\n')
    res = curate([p], tmp_path / "out", CurateConfig())
    assert res.read == 69 and res.malformed == 4
    assert res.kept + sum(res.removed.values()) + res.malformed == res.read
    assert res.removed["exact_dedup"] == 5
    report = json.loads((tmp_path / "out/report.json").read_text())
    lines = [m.split("in.jsonl:")[1] for m in report["malformed_records"]]
    assert [ln.split(":")[0] for ln in lines] == ["5", "10", "15", "18"]
    assert "bad JSON" in lines[0] and "'text' missing" in lines[1] and "undecodable" in lines[2]
    kept = _read_out(tmp_path / "out")
    assert len(kept) == res.kept and all({"text", "id", "source"} <= set(d) for d in kept)
    st = report["stages"]
    for a, b in zip(list(st)[:-1], list(st)[1:]):
        assert st[a]["docs_out"] == st[b]["docs_in"]


# ---------------------------------------------------------------- dedup


def test_shingle_hashes_equal_reference_definition():
    ws = "".join(map(chr, (0x85, 0xA0, 0x1680, *range(0x2000, 0x200B), 0x2028, 0x2029, 0x202F, 0x205F, 0x3000,
                           9, 10, 11, 12, 13, 28, 29, 30, 31)))
    texts = ["a b c d e f g h i j k", "", "short", "x " * 300 + "y z", "  Üñí  cödé\u00a0text here now again ",
             "w1" + ws + "w2 w3\u2003w4 w5 w6 \u00e2\u0080x", " \n ", "one two three four five", "ONE Two thrEE",
             "a b c d e f g h i j k"]
    for lower in (False, True):
        values, offsets = shingle_hashes(texts, 5, lower, seed=3)
        for k, t in enumerate(texts):
            ref = sorted({shingle_hash_reference(s, seed=3) for s in shingles(t, 5, lower)})
            assert values[offsets[k] : offsets[k + 1]].tolist() == ref, (k, lower)
    assert shingles("w1" + ws + "w2") == [("w1", "w2")] and shingles(" \n ") == []
    for end in ("\u00a0", "\x85", "\u3000"):  # a multi-byte whitespace as the batch's last bytes
        values, offsets = shingle_hashes(["a b", "c d e f g h" + end], 5, seed=3)
        assert values[offsets[1] :].tolist() == sorted({shingle_hash_reference(s, seed=3) for s in shingles("c d e f g h")})
    values, offsets = shingle_hashes(texts, 5, True, seed=3)
    assert jaccard(values[offsets[0] : offsets[1]], values[offsets[-2] : offsets[-1]]) == 1.0


def test_shingle_hashes_in_runs_equal_one_pass(monkeypatch):
    """A batch is hashed in runs of texts (bounded temporaries): the same sets and offsets as one pass,
    with empty texts and a text longer than a run anywhere."""
    import cpt_megatron.curate.dedup as dedup

    rng = random.Random(1)
    texts = [" ".join(f"w{rng.randrange(50)}" for _ in range(rng.randrange(0, 40))) for _ in range(60)]
    texts[7] = " ".join(f"long{i}" for i in range(300))
    one = dedup._shingle_hashes(texts, 5, False, 1)
    monkeypatch.setattr(dedup, "_HASH_CHUNK_CHARS", 200)
    runs = dedup.shingle_hashes(texts)
    assert runs[0].tolist() == one[0].tolist() and runs[1].tolist() == one[1].tolist()
    assert len(runs[1]) == 61 and runs[1].dtype == np.int64


def test_lsh_banding_is_high_recall_at_threshold():
    b, r = lsh_params(0.8, 128)
    assert (b, r) == (21, 6) and (1 - 0.8**r) ** b < 0.005  # < 0.5% of pairs AT the threshold missed
    sig = MinHasher().signatures(*shingle_hashes(["a b c d e f g h", "a b c d e f g h x", ""]))
    assert sig.shape == (3, 128) and (sig[0] == sig[1]).mean() > 0.5 and (sig[2] == 0xFFFFFFFF).all()


def _generated_planted(seed=0, n_base=160, n_planted=120):
    """Generated fixture (no shared data): random-vocabulary documents and edited copies planted on both
    sides of J = 0.8, some sharing a template (the hard case for estimates)."""
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(3000)]
    template = " ".join(rng.choice(vocab) for _ in range(120))
    base = []
    for i in range(n_base):
        body = " ".join(rng.choice(vocab) for _ in range(rng.randrange(80, 200)))
        base.append(template + " " + body if i % 3 == 0 else body)
    docs = [{"text": t, "id": f"b{i}"} for i, t in enumerate(base)]
    for k in range(n_planted):
        docs.append({"text": _edit(base[rng.randrange(n_base)], rng.choice([0.005, 0.01, 0.02, 0.03, 0.05]), rng),
                     "id": f"p{k}"})
    return docs


def test_generated_near_duplicates_exact_decisions(tmp_path):
    docs = _generated_planted()
    truth = {docs[j]["id"] for j in brute_force_removed([d["text"] for d in docs])}
    assert 40 <= len(truth) <= 100  # planted on both sides of the threshold
    _write_jsonl(tmp_path / "in.jsonl", docs)
    res = curate([tmp_path / "in.jsonl"], tmp_path / "out", load_config(overrides=DEDUP_ONLY))
    kept = {d["id"] for d in _read_out(tmp_path / "out")}
    flagged = {d["id"] for d in docs} - kept
    tp = len(flagged & truth)
    precision, recall = tp / max(1, len(flagged)), tp / len(truth)
    assert precision >= 0.99 and recall >= 0.95, (precision, recall, len(flagged), len(truth))
    nd = json.loads((tmp_path / "out/report.json").read_text())["near_dup"]
    assert nd["decide"] == "exact" and nd["removed"] == res.removed["minhash_dedup"] == len(flagged)
    assert nd["candidate_pairs"] >= nd["checked_pairs"] >= nd["verified_pairs"] >= nd["removed"]
    assert sum(nd["removed_jaccard_histogram"].values()) == nd["removed"]
    assert all(float(k.split("-")[0]) >= 0.8 for k in nd["removed_jaccard_histogram"])
    # the estimated mode, named as such, decides on the sketch: same report shape, different numbers
    est = curate([tmp_path / "in.jsonl"], tmp_path / "est",
                 load_config(overrides={**DEDUP_ONLY, "minhash_dedup": {"decide": "estimate"}}))
    rep = json.loads((tmp_path / "est/report.json").read_text())["near_dup"]
    assert rep["decide"] == "estimate" and rep["removed"] == est.removed["minhash_dedup"] > 0


def test_batch_decisions_equal_per_document_and_subsample_filter_is_safe():
    """One batch decides exactly as one document at a time (keys, Jaccards, report); on long documents the
    subsample check skips most pairs below the threshold and never one at or above it."""
    from cpt_megatron.curate.config import MinHashConfig
    from cpt_megatron.curate.dedup import NearDupIndex, SetTable, hash_ranges, pair_jaccard

    rng = random.Random(5)
    vocab = [f"w{i}" for i in range(20000)]
    base = [" ".join(rng.choice(vocab) for _ in range(rng.randrange(1500, 2500))) for _ in range(12)]
    docs = list(base)
    for k in range(60):  # edits from J ~ 0.97 down to ~0.5 of a base document
        docs.append(_edit(base[k % 12], [0.002, 0.01, 0.02, 0.03, 0.04, 0.06, 0.09][k % 7], rng))
    cfg = MinHashConfig()
    hasher = MinHasher(cfg)
    values, offsets = hasher.hash_sets(docs)
    sigs = hasher.signatures(values, offsets)
    keys = [str(i) for i in range(len(docs))]
    one, per_doc = NearDupIndex(cfg), NearDupIndex(cfg)
    try:
        got = one.check_batch(keys, sigs, values, offsets)
        ref = [per_doc.check_batch([keys[i]], sigs[i : i + 1], values[offsets[i] : offsets[i + 1]],
                                   np.array([0, offsets[i + 1] - offsets[i]]))[0] for i in range(len(docs))]
        assert got == ref and one.stats.as_dict() == per_doc.stats.as_dict()
    finally:
        one.close(), per_doc.close()
    assert {i for i, (d, _) in enumerate(got) if d is not None} == brute_force_removed(docs)
    # every (planted, base) pair through the filters: exact where checked, skipped ones all below threshold
    pa = np.arange(12, len(docs))
    pb = (pa - 12) % 12
    tab = SetTable(sigs, values, offsets, hash_ranges(values, offsets))
    js, checked = pair_jaccard(cfg, pa, pb, tab, tab)
    true = np.array([jaccard(values[offsets[a] : offsets[a + 1]], values[offsets[b] : offsets[b + 1]]) for a, b in zip(pa, pb)])
    assert np.allclose(js[checked], true[checked]) and (true[~checked] < 0.8).all()
    assert checked[true >= 0.8].all() and (true >= 0.8).sum() >= 10
    skipped_near = ~checked & (true > 0.6)  # the sketch filter alone lets these through (estimate >= 0.7)
    assert skipped_near.sum() >= 5, (true[~checked], true[checked])


def _short_paragraph_pairs(seed=0, n=400):
    """n random paragraphs of 34-63 words, each followed by a copy with its k-th word from the end changed
    (k changed shingles of s: J = (s-k)/(s+k), k picked for J in [0.82, 0.88))."""
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(5000)]
    docs = []
    for _ in range(n):
        words = [rng.choice(vocab) for _ in range(rng.randrange(34, 64))]
        s = len(words) - 4
        k = next(k for k in (4, 3, 2) if (s - k) / (s + k) >= 0.82)
        copy = list(words)
        copy[-k] = "x" + copy[-k]
        docs += [" ".join(words), " ".join(copy)]
    return docs


def _index_removed(docs, cfg) -> tuple[set[int], dict]:
    from cpt_megatron.curate.dedup import NearDupIndex

    hasher, index = MinHasher(cfg), NearDupIndex(cfg)
    try:
        values, offsets = hasher.hash_sets(docs)
        got = index.check_batch([str(i) for i in range(len(docs))], hasher.signatures(values, offsets), values, offsets)
    finally:
        index.close()
    return {i for i, (d, _) in enumerate(got) if d is not None}, index.stats.as_dict()


def test_short_paragraph_near_duplicates_exact_recall():
    """Bug: a flat 0.1 sketch margin (~3 standard errors of a LONG document's 128-bin estimate) dropped true
    pairs between 30-60-word paragraphs, whose densified estimate is 2-3x noisier (3 of these 400 pairs at
    J 0.82-0.88). The margin is now per pair size: every pair is found, as with no sketch pre-filter."""
    from cpt_megatron.curate.config import MinHashConfig

    docs = _short_paragraph_pairs()
    truth = brute_force_removed(docs)
    assert truth == set(range(1, len(docs), 2))
    removed, stats = _index_removed(docs, MinHashConfig())
    assert removed == truth and stats["verified_pairs"] == len(truth), (len(removed), len(truth))
    assert _index_removed(docs, MinHashConfig(prefilter_sigmas=None))[0] == truth


def _templated(n: int, seed: int = 0, planted_every: int = 8) -> list[str]:
    """n documents on 3 templates (120 shared words, before or after 50-90 words of their own), every
    `planted_every`-th an edited copy of an earlier one (both sides of J = 0.8), some empty or tiny."""
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(50000)]
    templates = [" ".join(rng.choice(vocab) for _ in range(120)) for _ in range(3)]
    docs: list[str] = []
    for i in range(n):
        if docs and i % planted_every == 0:
            docs.append(_edit(rng.choice(docs) or "x", rng.choice([0.005, 0.02, 0.05, 0.1]), rng))
        elif i % 97 == 5:
            docs.append(rng.choice(["", "tiny text", "tiny text here"]))
        else:
            body = " ".join(rng.choice(vocab) for _ in range(rng.randrange(50, 90)))
            docs.append(templates[i % 3] + " " + body if i % 2 else body + " " + templates[i % 3])
    return docs


def _index_decisions(docs, cfg, batch: int) -> tuple[list, dict]:
    from cpt_megatron.curate.dedup import NearDupIndex

    hasher, index = MinHasher(cfg), NearDupIndex(cfg)
    out = []
    try:
        for b in range(0, len(docs), batch):
            values, offsets = hasher.hash_sets(docs[b : b + batch])
            out += index.check_batch([str(i) for i in range(b, b + len(offsets) - 1)],
                                     hasher.signatures(values, offsets), values, offsets)
    finally:
        index.close()
    return out, index.stats.as_dict()


def test_prefix_candidates_grow_linearly_on_templated_text():
    """Bug: LSH bands made of template shingles put every document of a template in one bucket, and the
    index enumerated all m(m-1)/2 pairs. The prefix index meets a document only through its rarest
    shingles: 4x the documents, ~4x the candidate and checked pairs (the bands: ~16x), and the decisions
    equal brute force at every size, in batches or all at once."""
    from cpt_megatron.curate.config import MinHashConfig

    got = {}
    for n in (200, 800):
        docs = _templated(n)
        truth = brute_force_removed(docs)
        for mode in ("prefix", "bands"):
            dec, st = _index_decisions(docs, MinHashConfig(candidates=mode), batch=64 if n == 800 else n)
            assert {i for i, (d, _) in enumerate(dec) if d is not None} == truth and len(truth) > n // 20
            got[mode, n] = st
            got[mode, n, "removed"] = [(i, d, j) for i, (d, j) in enumerate(dec) if d is not None]
        assert got["prefix", n, "removed"] == got["bands", n, "removed"]  # same dup_of and Jaccard
    ratios = {k: (got[k, 800]["candidate_pairs"] / got[k, 200]["candidate_pairs"],
                  got[k, 800]["checked_pairs"] / got[k, 200]["checked_pairs"]) for k in ("prefix", "bands")}
    p = got["prefix", 800]
    assert p["candidates"] == "prefix" and p["candidate_pairs"] <= 2 * 800, (p["candidate_pairs"], ratios)
    assert max(ratios["prefix"]) < 5, ratios
    assert ratios["bands"][0] > 12, ratios  # the enumeration this replaces: quadratic


def test_prefix_decisions_equal_brute_force_at_any_threshold_and_batch():
    """The prefix and count bounds follow the configured threshold (not 0.8), and the report does not
    depend on the batch size (the choice uses the counts of the documents before each one)."""
    from cpt_megatron.curate.config import MinHashConfig

    for thr in (0.5, 0.9):
        docs = _templated(300, seed=1, planted_every=4)
        cfg = MinHashConfig(threshold=thr)
        truth = brute_force_removed(docs, cfg)
        (one, st1), (many, st2) = (_index_decisions(docs, cfg, batch) for batch in (300, 37))
        assert one == many and st1 == st2 and len(truth) > 10
        assert {i for i, (d, _) in enumerate(one) if d is not None} == truth, thr


def test_prefix_index_finds_pairs_exactly_at_the_threshold():
    """Pigeonhole at the boundary: y's rarest shingles are known (earlier filler documents hold y's others
    0, 1, 2, ... times), and x drops exactly those (and adds others) so that J(x, y) is the smallest value
    >= 0.8 for its sizes: x is found and removed; one more change puts it below 0.8 and it is kept. Sizes
    1-40, x and y in one batch and in two; an off-by-one in the prefix size or the count filter fails."""
    from cpt_megatron.curate.config import MinHashConfig
    from cpt_megatron.curate.dedup import NearDupIndex, oph_sketches

    rng = np.random.default_rng(3)
    cfg = MinHashConfig(prefilter_sigmas=None)
    index, cases = NearDupIndex(cfg), 0  # one index: every case draws fresh shingles

    def check(name: str, sets: list) -> list:
        values = np.concatenate(sets)
        offsets = np.concatenate([[0], np.cumsum([len(z) for z in sets])]).astype(np.int64)
        return index.check_batch([f"{name}{k}" for k in range(len(sets))], oph_sketches(values, offsets, cfg.num_perm),
                                 values, offsets)

    def draw(k: int) -> np.ndarray:
        return rng.integers(0, 2**63, k, dtype=np.uint64)

    try:
        for s in range(1, 41):
            for d in range(s):  # drop y's d rarest, add e new: the largest e with J >= 0.8, then one more
                e = max((e for e in range(s) if (s - d) / (s + e) >= 0.8), default=None)
                for extra, removed in ((e, True), (e + 1, False)) if e is not None else ():
                    y = np.sort(draw(s))
                    # y[i] in i earlier fillers (y[0] rarest); J(filler, anything) < 0.2
                    assert all(dup is None for dup, _ in check("f", [np.sort(np.concatenate([y[j + 1 :], draw(10 * s + 5)]))
                                                                      for j in range(s)]))
                    x = np.sort(np.concatenate([y[d:], draw(extra)]))
                    assert (jaccard(x, y) >= 0.8) == removed
                    got = check("y", [y, x]) if cases % 2 else check("y", [y]) + check("x", [x])  # one batch or two
                    assert got[0][0] is None and (got[1][0] is not None) == removed, (s, d, extra)
                    cases += 1
    finally:
        index.close()
    assert cases > 150


def test_sketch_standard_error_bounds_the_estimators_spread():
    """`sketch_se` (the pre-filter's margin per pair size) is at least the measured spread of both sketch
    estimators at J ~ 0.8, from 8-shingle paragraphs to long documents; a flat long-document value is not."""
    from cpt_megatron.curate.dedup import _fine_estimate, fine_sketches, oph_sketches, sketch_se

    rng = np.random.default_rng(0)
    one = np.array([0])
    for n in (8, 30, 100, 1000):
        inter = round(n * 1.6 / 1.8)  # J = inter / (n + n - inter) ~ 0.8
        j = inter / (2 * n - inter)
        dense, fine, used = [], [], []
        for _ in range(150):
            u = np.unique(rng.integers(0, 2**64, size=2 * n - inter, dtype=np.uint64))
            rng.shuffle(u)
            a, b = np.sort(u[:n]), np.sort(np.concatenate([u[:inter], u[n:]]))
            values, offsets = np.concatenate([a, b]), np.array([0, len(a), len(a) + len(b)])
            s = oph_sketches(values, offsets, 128)
            dense.append((s[0] == s[1]).mean())
            est, nb = _fine_estimate(one, one + 1, *(fine_sketches(values, offsets),) * 2, 8)
            fine.append(est[0]), used.append(nb[0])
        assert abs(np.mean(dense) - j) < 0.03 and abs(np.mean(fine) - j) < 0.01
        assert np.std(dense) <= 1.05 * sketch_se(j, 128, n), (n, np.std(dense), sketch_se(j, 128, n))
        assert np.std(fine) <= 1.05 * sketch_se(j, 512, np.mean(used), densified=False)
        if n <= 30:
            assert np.std(dense) > 1.5 * np.sqrt(j * (1 - j) / 128)  # the long-document value is too small


def test_cuad_paragraph_pairs_the_flat_margin_lost(shared_data):
    """The real case: CUAD paragraphs (lines of >= 30 words) around the 4 true pairs (J 0.806-0.875, 7-56
    shingles) that the flat 0.1 margin dropped; decisions equal the brute-force truth."""
    from cpt_megatron.curate.config import MinHashConfig

    paras = [ln for ln in (shared_data / "domain/cuad_contracts.txt").read_text().split("\n") if len(ln.split()) >= 30]
    docs = [p for lo in (13400, 14900, 17150, 18400, 21900) for p in paras[lo : lo + 100]]
    truth = brute_force_removed(docs)
    removed, _ = _index_removed(docs, MinHashConfig())
    assert len(truth) == 44 and removed == truth, (len(removed), len(removed & truth))


@pytest.mark.heavy  # ~40 s: all 30,592 paragraphs, brute force over every pair
def test_cuad_paragraphs_exact_recall(shared_data):
    from cpt_megatron.curate.config import MinHashConfig

    docs = [ln for ln in (shared_data / "domain/cuad_contracts.txt").read_text().split("\n") if len(ln.split()) >= 30]
    truth = brute_force_removed(docs)
    removed, _ = _index_removed(docs, MinHashConfig())
    assert len(truth) == 1154 and removed == truth, (len(removed), len(removed & truth))


@pytest.mark.slow  # ~15 s: every pair's exact Jaccard by a sparse product
def test_medquad_exact_decisions_match_brute_force(tmp_path, shared_data):
    import re

    text = (shared_data / "domain/medquad_qa.txt").read_text()
    docs = [d for d in re.split(r"(?m)^(?=# )", text) if d.strip()]
    _write_jsonl(tmp_path / "in.jsonl", [{"text": t, "id": str(i)} for i, t in enumerate(docs)])
    curate([tmp_path / "in.jsonl"], tmp_path / "out", load_config(overrides={"stages": ["minhash_dedup"], "rejected_samples": 100_000}))
    flagged = {int(d["id"]) for d in _read_out(tmp_path / "out", "rejected/minhash_dedup-*.jsonl.gz")}
    truth = brute_force_removed(docs)
    # README: precision 1.0 / recall 1.0, 66 removed (the goal: >= 0.99 / >= 0.95)
    assert len(truth) == 66 and flagged == truth, (len(flagged), len(truth), len(flagged & truth))
    # the former LSH-band candidates: byte-identical outputs, 16x the candidate pairs (templated pages)
    curate([tmp_path / "in.jsonl"], tmp_path / "bands", load_config(overrides={
        "stages": ["minhash_dedup"], "rejected_samples": 100_000, "minhash_dedup": {"candidates": "bands"}}))
    for f in ("shard-00000.jsonl.gz", "rejected/minhash_dedup-00000.jsonl.gz"):
        assert (tmp_path / "out" / f).read_bytes() == (tmp_path / "bands" / f).read_bytes(), f
    nd, nb = (json.loads((tmp_path / d / "report.json").read_text())["near_dup"] for d in ("out", "bands"))
    assert nd["candidates"] == "prefix" and nd["candidate_pairs"] * 10 < nb["candidate_pairs"], (nd, nb)


def _planted_corpus(shared_data, seed=0):
    rng = random.Random(seed)
    base = _gutenberg_docs(shared_data, 300, skip=5000)
    docs, truth = [{"text": t, "id": f"b{i}"} for i, t in enumerate(base)], set()
    for k in range(150):
        i = rng.randrange(len(base))
        near = rng.random() < 0.6
        t = _edit(base[i], 0.01 if near else 0.08, rng)
        j = _jaccard(base[i], t)
        docs.append({"text": t, "id": f"p{k}"})
        if j >= 0.8:
            truth.add(f"p{k}")
    for k in range(20):
        docs.append({"text": base[rng.randrange(len(base))], "id": f"e{k}"})
    return docs, truth


def test_planted_near_duplicates_precision_recall(tmp_path, shared_data):
    docs, truth = _planted_corpus(shared_data)
    assert 60 <= len(truth) <= 120  # the generator planted both sides of the threshold
    _write_jsonl(tmp_path / "in.jsonl", docs)
    res = curate([tmp_path / "in.jsonl"], tmp_path / "out", load_config(overrides=DEDUP_ONLY))
    assert res.removed["exact_dedup"] == 20  # exact copies always removed, by the exact stage
    kept = {d["id"] for d in _read_out(tmp_path / "out")}
    flagged = {d["id"] for d in docs} - kept - {f"e{k}" for k in range(20)}
    tp = len(flagged & truth)
    precision, recall = tp / max(1, len(flagged)), tp / len(truth)
    assert precision >= 0.95 and recall >= 0.9, (precision, recall, len(flagged), len(truth))
    assert all(d.startswith("b") or d.startswith("p") for d in kept)
    assert sum(d.startswith("b") for d in kept) == 300  # no original lost


def test_workers_1_and_2_byte_identical(tmp_path, shared_data):
    docs, _ = _planted_corpus(shared_data, seed=1)
    _write_jsonl(tmp_path / "in.jsonl", docs[:300])
    outs = []
    for w in (1, 2):
        cfg = load_config(overrides={"quality": {"min_words": 20}, "shard_docs": 100})
        res = curate([tmp_path / "in.jsonl"], tmp_path / f"w{w}", cfg, workers=w)
        outs.append(tmp_path / f"w{w}")
        assert res.kept > 100
    files = sorted(p.relative_to(outs[0]) for p in outs[0].rglob("*") if p.is_file())
    assert len([f for f in files if f.name.startswith("shard-")]) >= 2
    assert files == sorted(p.relative_to(outs[1]) for p in outs[1].rglob("*") if p.is_file())
    for f in files:
        assert (outs[0] / f).read_bytes() == (outs[1] / f).read_bytes(), f



def test_worker_ships_kept_text_once_and_rejected_samples_keep_it(tmp_path):
    """A worker drops a kept document's text once its output line holds it (pickled once, not twice);
    the samples of documents the parent removes later (exact and near duplicates) still hold their text,
    cut at 4000 characters, with 1 and 2 workers."""
    from cpt_megatron.curate.pipeline import _Worker

    base = " ".join(f"word{i}" for i in range(900))  # 7,000+ characters
    near = base.replace("word7 ", "changed ")
    docs = [base, base, near, " ".join(f"other{i}" for i in range(60))]
    _write_jsonl(tmp_path / "in.jsonl", [{"id": str(i), "text": d} for i, d in enumerate(docs)])
    cfg = load_config(overrides={"stages": ["normalize", "exact_dedup", "minhash_dedup"], "rejected_samples": 10})
    outs = _Worker(cfg).run(list(read_documents([tmp_path / "in.jsonl"])))
    assert [o.text for o in outs] == [None] * 4
    assert [json.loads(o.line)["text"] for o in outs] == docs and [o.length for o in outs] == list(map(len, docs))
    for w in (1, 2):
        res = curate([tmp_path / "in.jsonl"], tmp_path / f"w{w}", cfg, workers=w)
        assert res.removed["exact_dedup"] == res.removed["minhash_dedup"] == 1
        exact = _read_out(tmp_path / f"w{w}", "rejected/exact_dedup-*.jsonl.gz")
        near_dup = _read_out(tmp_path / f"w{w}", "rejected/minhash_dedup-*.jsonl.gz")
        assert [r["text"] for r in exact] == [base[:4000]] and [r["text"] for r in near_dup] == [near[:4000]]
        assert res.report["stages"]["minhash_dedup"]["chars_in"] == len(base) + len(near) + len(docs[3])


def test_worker_result_pickles_as_constructor_arguments():
    """A worker's per-document result crosses to the parent as its constructor's arguments (the slots
    dataclass default measured 2.7x slower to unpickle): every field survives the round trip."""
    import dataclasses
    import pickle
    from collections import Counter

    from cpt_megatron.curate.pipeline import _Out

    values = {f.name: f"v-{f.name}" for f in dataclasses.fields(_Out)}
    values.update(position=7, length=11, chars=[("normalize", 12, 11)], changes=Counter(nfc=2),
                  shingles=np.arange(3, dtype=np.uint64), line=b'{"text": "x"}\n', uid=5)
    o = _Out(**values)
    back = pickle.loads(pickle.dumps(o, protocol=pickle.HIGHEST_PROTOCOL))
    for f in dataclasses.fields(_Out):
        got, want = getattr(back, f.name), getattr(o, f.name)
        assert (got == want).all() if isinstance(want, np.ndarray) else got == want, f.name
    assert _Out.__reduce__(o)[0] is _Out

def test_progress_bar_redraws_at_most_every_half_second(monkeypatch, capsys):
    """A redraw per batch cost ~3% of a run's CPU: the bar appears at the first redraw, 0.5 s in, then
    redraws at most every 0.5 s, and once more (the final counts) when it closes."""
    from types import SimpleNamespace

    from cpt_megatron.curate import pipeline

    clock = [1000.0]
    monkeypatch.setattr(pipeline.time, "time", lambda: clock[0])
    reader = SimpleNamespace(total_bytes=1000, bytes_done=lambda: int((clock[0] - 1000) * 100))
    acc = SimpleNamespace(n_read=0, n_kept=0)
    bar = pipeline._Progress(reader, acc)
    draws = []
    for k in range(1, 11):  # a batch every 0.1 s for 1 s
        clock[0], acc.n_read, acc.n_kept = 1000 + 0.1 * k + 1e-6, 10 * k, 9 * k
        bar.update()
        if bar.bar is not None and not draws:
            def counted(*a, real=bar.bar.refresh, **kw):
                draws.append(bar.bar.n)
                return real(*a, **kw)

            bar.bar.refresh = counted
            draws.append(bar.bar.n)
        assert (bar.bar is None) == (k < 5)
    bar.close()
    assert draws == [50, 100, 100], draws  # 0.5 s, 1.0 s, close
    assert "100 docs" in capsys.readouterr().err

@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.skip("redis-server binary not found (apt-get install -y redis-server); CI installs it")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    d = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(d)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    import redis

    for _ in range(100):
        try:
            redis.Redis(port=port).ping()
            break
        except redis.exceptions.ConnectionError:
            time.sleep(0.05)
    yield f"redis://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(10)


def test_redis_backend_same_decisions(tmp_path, shared_data, redis_url):
    docs, _ = _planted_corpus(shared_data, seed=2)
    _write_jsonl(tmp_path / "in.jsonl", docs)
    mem = curate([tmp_path / "in.jsonl"], tmp_path / "mem", load_config(overrides=DEDUP_ONLY))
    red = curate([tmp_path / "in.jsonl"], tmp_path / "red", load_config(overrides={**DEDUP_ONLY, "lsh": redis_url}))
    assert red.removed == mem.removed and mem.removed["minhash_dedup"] > 50
    for f in ("shard-00000.jsonl.gz", "rejected/minhash_dedup-00000.jsonl.gz"):
        assert (tmp_path / "mem" / f).read_bytes() == (tmp_path / "red" / f).read_bytes()


# ---------------------------------------------------------------- PII


def test_pii_each_type_and_checksums():
    cases = {
        "EMAIL": "write to jane.roe+news@mail.example.org today",
        "PHONE": "call +91 98765 43210 or (415) 555-0199",
        "IPV4": "host 10.0.12.254 answered",
        "IPV6": "bind to 2001:db8:85a3::8a2e:370:7334 now",
        "CREDIT_CARD": "card 4539 1488 0343 6467 expired",
        "SSN": "SSN 219-09-9999 on file",
        "AADHAAR": "Aadhaar 2345 6789 0124 linked",
        "PAN": "PAN ABCPE1234F filed",
    }
    for kind, text in cases.items():
        out, counts = redact_pii(text)
        assert f"<{kind}>" in out and counts[kind] >= 1, (kind, out)
        assert not any(ch.isdigit() for ch in out.split(f"<{kind}>")[0][-3:])
    assert luhn_valid("4539148803436467") and not luhn_valid("4539148803436468")
    assert verhoeff_valid("234567890124") and not verhoeff_valid("234567890125")
    # invalid checksums are left alone
    for text in ("card 4539 1488 0343 6468 expired", "Aadhaar 2345 6789 0125 linked"):
        assert redact_pii(text)[0] == text


def test_pii_leaves_ordinary_numbers_and_dates():
    text = (
        "On 2021-03-04 (12/05/2020, 12.03.2021) at 12:30:45 we sold 1,234,567 units for $1,234.56 "
        "(version 1.2.3, pi 3.14159, ISBN 978-3-16-148410-0, order 1234567890123, year 1999, "
        "ratio 3:2:1, 100 000 people, room 4111, 5 + 3 = 8, +5 points, 16:9 screens, chapter 10.2.1)."
    )
    out, counts = redact_pii(text)
    assert out == text and not counts


# ---------------------------------------------------------------- CLI


def test_cli_json_last_line_and_separator(tmp_path, shared_data, capsys):
    from cpt_megatron.cli import main

    src = tmp_path / "mq.txt"
    with open(shared_data / "domain/medquad_qa.txt") as f:
        head = [next(f) for _ in range(1500)]
    src.write_text("".join(head))
    rc = main(["curate", "-i", str(src), "-o", str(tmp_path / "o"), "--doc-separator", "^# ",
               "--stages", "normalize,exact_dedup,minhash_dedup,pii", "--json", "--no-progress"])  # fmt: skip
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(summary) >= {"read", "kept", "malformed", "removed", "out"}
    assert summary["read"] == sum(1 for ln in head if ln.startswith("# "))
    assert summary["kept"] + sum(summary["removed"].values()) + summary["malformed"] == summary["read"]
    assert list(summary["removed"]) == ["normalize", "exact_dedup", "minhash_dedup", "pii"]
    assert summary["near_dup"]["removed"] == summary["removed"]["minhash_dedup"]
    rc = main(["curate", "-i", str(src), "-o", str(tmp_path / "o"), "--stages", "nope"])
    assert rc == 2


def test_curate_import_is_light():
    import subprocess
    import sys

    code = "import sys, cpt_megatron.curate, cpt_megatron.cli.curate; print('torch' in sys.modules or 'megatron' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"


def test_perplexity_stage_scores_and_filters(tmp_path, shared_data, gpt2_tokenizer_dir):
    torch = pytest.importorskip("torch")
    from transformers import LlamaConfig, LlamaForCausalLM

    from cpt_megatron.tokenizer.load import load_tokenizer

    model_dir = tmp_path / "tiny"
    load_tokenizer(gpt2_tokenizer_dir).save_pretrained(model_dir)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=50257, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256)  # fmt: skip
    LlamaForCausalLM(cfg).save_pretrained(model_dir)
    docs = [{"text": t, "id": i} for i, t in enumerate(_gutenberg_docs(shared_data, 6))]
    _write_jsonl(tmp_path / "in.jsonl", docs)
    over = {"stages": ["perplexity"], "perplexity": {"model": str(model_dir), "max_tokens": 64}}
    res = curate([tmp_path / "in.jsonl"], tmp_path / "a", load_config(overrides=over))
    ppl = [d["perplexity"] for d in _read_out(tmp_path / "a")]
    assert res.kept == 6 and all(1.0 < p < 1e6 for p in ppl)
    cut = sorted(ppl)[2]
    over["perplexity"]["max_perplexity"] = cut
    res = curate([tmp_path / "in.jsonl"], tmp_path / "b", load_config(overrides=over))
    assert res.kept == 3 and res.removed["perplexity"] == 3


def test_ngram_fractions_equal_plain_python_definition():
    """The vectorized Gopher repetition measures (top n-gram share, duplicated n-gram char share) equal
    their definition computed naively, on texts with heavy and no repetition."""
    from collections import Counter

    from cpt_megatron.curate.filters import _ngram_fracs

    rng = random.Random(3)
    for trial in range(40):
        vocab = [f"w{i}" * rng.randint(1, 3) for i in range(rng.choice([3, 8, 50, 1000]))]
        words = [rng.choice(vocab) for _ in range(rng.randint(1, 120))]
        total = sum(map(len, words))
        top, dup = _ngram_fracs(words, total, [2, 3, 4], [5, 6, 10])
        for n in (2, 3, 4):
            grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
            if not grams:
                assert top[n] == 0.0
                continue
            c = Counter(grams)
            best = max(c.values())
            g = next(x for x in grams if c[x] == best) if best > 1 else None  # any most frequent: same share
            want = 0.0 if g is None else sum(map(len, g)) * best / total
            shares = {sum(map(len, x)) * best / total for x in c if c[x] == best}
            assert (top[n] == 0.0 and best < 2) or top[n] in shares, (trial, n, top[n], want)
        for n in (5, 6, 10):
            grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
            c = Counter(grams)
            covered = set()
            for i, x in enumerate(grams):
                if c[x] > 1:
                    covered.update(range(i, i + n))
            assert dup[n] == pytest.approx(sum(len(words[i]) for i in covered) / total), (trial, n)
