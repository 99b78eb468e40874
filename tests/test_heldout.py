"""General evaluation separate from replay: held-out general sets (`eval.general`) that no training source
contains, the overlap check that refuses one that does, and the monitor / `cpt select` reading them.

Default run: generated text (the check's units on planted copies, reformatted copies, the same file),
`cpt prepare` of tiny_cpu refusing a held-out set cut from its replay corpus, and the monitor / select on
synthetic evaluations. With ../shared/data: WikiText-2 tokenized vs raw is flagged, TinyShakespeare and
Gutenberg are clean against MedQuAD and WikiText-2 (the demo_medical pairing).
"""

from __future__ import annotations

import gzip
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from cpt_megatron.config import load_recipe
from cpt_megatron.data.overlap import check_heldout, overlap_report
from cpt_megatron.errors import CptError

REPO = Path(__file__).resolve().parents[1]
VOCAB = ("river stone light morning garden window harbor winter letter mountain candle bridge market silver "
         "forest lantern valley shadow meadow thunder captain orchard village compass").split()


def prose(n_paragraphs: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(VOCAB) for _ in range(rng.randint(40, 80))) + "." for _ in range(n_paragraphs)]


def write_shard(path: Path, docs: list[str]) -> Path:
    """A curated shard as cpt curate writes them (JSONL.gz, one {"text"} per line)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"text": d}) + "\n")
    return path


def test_overlap_check_catches_copies_reformatted_copies_and_the_same_file(tmp_path):
    train_docs = prose(200, seed=1)
    shard = write_shard(tmp_path / "curated" / "shard_0.jsonl.gz", train_docs)
    raw = tmp_path / "raw" / "replay.txt"
    raw.parent.mkdir()
    raw.write_text("\n\n".join(train_docs) + "\n")
    clean = tmp_path / "clean.txt"
    clean.write_text("\n\n".join(prose(100, seed=2)) + "\n")
    # 5 of 100 paragraphs copied from training, re-cased and tokenized like WikiText / NLTK (" , " " @-@ ")
    leaked = prose(95, seed=3) + [d.upper().replace(" ", " @-@ ", 3).replace(".", " .") for d in train_docs[:5]]
    leak = tmp_path / "leak.txt"
    leak.write_text("\n\n".join(leaked) + "\n")
    report = overlap_report({"clean": (str(clean), "text"), "leak": (str(leak), "text"), "same": (str(raw), "text")},
                            {"replay": [str(shard)]}, {"replay": [str(raw.parent)]})
    assert report["clean"]["shared"]["replay"] == 0 and not report["clean"]["same_file"]
    frac = report["leak"]["shared"]["replay"] / report["leak"]["ngrams"]
    assert 0.02 < frac < 0.09, frac  # ~5% of its text, estimated from the sampled 13-grams
    assert report["same"]["same_file"] == {"replay": str(raw)}
    check_heldout({"clean": report["clean"]}, 0.01)
    with pytest.raises(CptError, match=r"eval.general\[leak\] .* shares \d+\.\d% of its word 13-grams .* source replay"):
        check_heldout({"leak": report["leak"]}, 0.01)
    check_heldout({"leak": report["leak"]}, 0.10)  # eval.max_overlap raised: accepted
    with pytest.raises(CptError, match=r"eval.general\[same\] .* is training source replay's input"):
        check_heldout({"same": report["same"]}, 0.5)
    copy = tmp_path / "copy_of_replay.txt"  # byte-identical file elsewhere: still the same file
    copy.write_bytes(raw.read_bytes())
    rep = overlap_report({"copy": (str(copy), "text")}, {}, {"replay": [str(raw)]})
    assert rep["copy"]["same_file"] == {"replay": str(raw)}


def test_config_names_and_one_line_errors():
    with pytest.raises(CptError, match=r"eval.general: names \['a'\] appear more than once"):
        load_recipe("tiny_cpu", ["eval.general=[{name: a, path: x.txt},{name: a, path: y.txt}]"])
    with pytest.raises(CptError, match=r"eval.max_overlap=1.5 must be in \[0, 1\)"):
        load_recipe("tiny_cpu", ["eval.max_overlap=1.5"])
    with pytest.raises(CptError, match=r"unknown key\(s\) eval.general\[0\].file"):
        load_recipe("tiny_cpu", ["eval.general=[{name: a, file: x.txt}]"])
    from cpt_megatron.train.checks import recipe_problems

    cfg = load_recipe("tiny_cpu", ["eval.general=[{name: pydoc, path: cpt_megatron/eval/heldout/shakespeare.txt}]"])
    assert any("eval.general[pydoc]: the name of a training source" in p for p in recipe_problems(cfg, 1))
    cfg = load_recipe("tiny_cpu", ["eval.general=[{name: gone, path: nowhere.txt}]"])
    assert any("eval.general[gone].path=nowhere.txt: file not found" in p for p in recipe_problems(cfg, 1))


def test_prepare_refuses_a_heldout_set_cut_from_the_replay_and_train_rechecks(tmp_path, tiny_cpu_cache):
    """tiny_cpu's replay is pydoc: a 'general' set made of pydoc topics is refused by cpt prepare (one line); the
    shipped Tempest passes; a held-out file edited after prepare is refused by cpt train's checks."""
    from pydoc_data.topics import topics

    from cpt_megatron.train.checks import recipe_problems
    from cpt_megatron.train.prepare import load_prepared

    leak = tmp_path / "pydoc_excerpt.txt"
    leak.write_text("\n\n".join(topics[k] for k in sorted(topics)[:12]))
    cmd = [sys.executable, "-m", "cpt_megatron", "prepare", "--recipe", "tiny_cpu", f"data.cache_dir={tiny_cpu_cache}"]
    r = subprocess.run(cmd + [f"eval.general=[{{name: leak, path: {leak}}}]"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 2, r.stderr[-2000:]
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "eval.general[leak]" in err[0] and "training source pydoc" in err[0], err
    # the shipped held-out set is clean: the manifest records its check
    cfg = load_recipe("tiny_cpu", [f"data.cache_dir={tiny_cpu_cache}"])
    manifest = load_prepared(cfg, "cpt prepare")
    entry = manifest["heldout"]["shakespeare"]
    assert entry["ngrams"] > 100 and entry["shared"] == {"stdlib": 0, "pydoc": 0} and entry["same_file"] == {}
    assert recipe_problems(cfg, 1, prepared=manifest) == []
    # a held-out file whose content changed since prepare: refused before training
    edited = tmp_path / "tempest.txt"
    edited.write_text((REPO / "cpt_megatron/eval/heldout/shakespeare.txt").read_text() + "\nmore\n")
    cfg2 = load_recipe("tiny_cpu", [f"data.cache_dir={tiny_cpu_cache}",
                                    f"eval.general=[{{name: shakespeare, path: {edited}}}]"])
    assert any("has not been checked against the training sources" in p
               for p in recipe_problems(cfg2, 1, prepared=manifest))


def test_monitor_and_select_watch_heldout_not_replay(tmp_path):
    from cpt_megatron.eval.monitor import ForgettingMonitor, MonitorConfig
    from cpt_megatron.eval.select import select_checkpoint

    base = {"med": {"group": "domain", "ppl": 10.0}, "wiki": {"group": "replay", "ppl": 30.0},
            "shakespeare": {"group": "general", "ppl": 40.0}}
    mon = ForgettingMonitor(MonitorConfig(policy="warn", warn=0.02, act=0.05), base)
    assert mon.watched == [("shakespeare", "ppl")]
    # the replay corpus got better (it is trained on) while held-out text got 10% worse: forgetting is seen
    ev = mon.observe(10, {"med": {"group": "domain", "ppl": 8.0}, "wiki": {"group": "replay", "ppl": 25.0},
                          "shakespeare": {"group": "general", "ppl": 44.0}})
    assert [(e.source, e.kind) for e in ev] == [("shakespeare", "act")]
    rows = [{"step": 0, "results": base},
            {"step": 10, "results": {"med": {"group": "domain", "ppl": 8.0}, "wiki": {"group": "replay", "ppl": 25.0},
                                     "shakespeare": {"group": "general", "ppl": 44.0}}},
            {"step": 20, "results": {"med": {"group": "domain", "ppl": 8.5}, "wiki": {"group": "replay", "ppl": 35.0},
                                     "shakespeare": {"group": "general", "ppl": 40.4}}}]
    (tmp_path / "evals.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for s in (10, 20):
        (tmp_path / "checkpoints" / f"iter_{s:07d}").mkdir(parents=True)
    sel = select_checkpoint(tmp_path, max_general_regression=0.03, write=False)
    by_step = {c["step"]: c for c in sel["candidates"]}
    assert by_step[10]["general_regression"] == pytest.approx(0.10) and not by_step[10]["feasible"]
    assert by_step[20]["general_regression"] == pytest.approx(0.01) and sel["best"] == "iter_0000020"


@pytest.mark.heavy
def test_shared_corpora_overlap(shared_data):
    """Measured on the real corpora: WikiText-2 tokenized vs raw (the same articles) is flagged; TinyShakespeare
    and Gutenberg share nothing with MedQuAD or the WikiText-2 replay (demo_medical's held-out sets)."""
    g = shared_data / "general"
    rep = overlap_report({"wt2_tokenized": (str(g / "wikitext2_test.txt"), "text"),
                          "tinyshakespeare": (str(g / "tinyshakespeare_input.txt"), "text"),
                          "gutenberg": (str(g / "gutenberg_nltk17_tokenized.txt"), "text")},
                         {"wikitext2": [str(g / "wikitext2_raw_test.txt")],
                          "medquad": [str(shared_data / "domain" / "medquad_qa.txt")]})
    wt = rep["wt2_tokenized"]
    assert wt["shared"]["wikitext2"] / wt["ngrams"] > 0.3, wt
    with pytest.raises(CptError, match=r"eval.general\[wt2_tokenized\]"):
        check_heldout({"wt2_tokenized": wt}, 0.01)
    for name in ("tinyshakespeare", "gutenberg"):
        assert rep[name]["shared"]["wikitext2"] / rep[name]["ngrams"] < 0.001, rep[name]
        assert rep[name]["shared"]["medquad"] / rep[name]["ngrams"] < 0.001, rep[name]
    check_heldout({k: rep[k] for k in ("tinyshakespeare", "gutenberg")}, 0.01)
