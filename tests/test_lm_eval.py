"""lm-evaluation-harness through our megatron-core adapter: parity with lm-eval's `hf` model on the export
(TP2, PP2), offline task resolution and errors, the monitor on benchmark scores, benchmarks in training.

Tasks are built here from real held-out text (Gutenberg in ../shared/data; generated text when absent):
a 4-way multiple-choice continuation task and a LAMBADA-style last-word task, as task YAMLs over local
JSON files (`dataset_path: json`), so nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cpt_megatron.cli import main

REPO = Path(__file__).resolve().parents[1]
GUTENBERG = Path(os.environ.get("CPT_SHARED_DATA", REPO.parent / "shared" / "data")) / "general" / "gutenberg_nltk17_tokenized.txt"
TOL = 1e-4


def held_out_sentences(n: int, seed: int = 0) -> list[str]:
    """Sentences of 8-30 words ending in a word then ' .': Gutenberg's last lines, else generated prose."""
    if GUTENBERG.is_file():
        lines = GUTENBERG.read_text(encoding="utf-8").splitlines()[-4000:]
    else:
        rng = random.Random(seed)
        words = ("the old house stood on a hill above the river and every morning she walked down to the water "
                 "with her father who told stories of ships and storms and distant cities").split()
        lines = [" ".join(rng.choice(words) for _ in range(rng.randint(8, 30))) + " ." for _ in range(4 * n)]
    out = []
    for ln in lines:
        w = ln.split()
        if 8 <= len(w) <= 30 and w[-1] == "." and w[-2].isalpha():
            out.append(" ".join(w[:-1]))
    rng = random.Random(seed)
    rng.shuffle(out)
    return out[:n]


def _task_yaml(path: Path, output_type: str, data: Path, templates: str, metrics: list[str]) -> None:
    """An lm-eval task YAML over a local JSONL file (`dataset_path: json`), named after the file stem."""
    path.write_text(f"task: {path.stem}\ndataset_path: json\ndataset_kwargs:\n  data_files: {{test: {data}}}\n"
                    f"output_type: {output_type}\ntest_split: test\n{templates}metric_list:\n"
                    + "".join(f"  - {{metric: {m}, aggregation: mean, higher_is_better: true}}\n" for m in metrics))


def write_tasks(root: Path, n_docs: int = 12) -> Path:
    """root/tasks/{heldout_mc,heldout_lastword}.yaml over local JSONL; returns the folder."""
    sents = held_out_sentences(n_docs * 5)
    d = root / "tasks"
    d.mkdir(parents=True, exist_ok=True)
    rng = random.Random(1)
    with open(d / "mc.jsonl", "w") as f:
        for i in range(n_docs):
            w = sents[i].split()
            k = len(w) // 2
            others = [s.split() for s in sents[n_docs + 3 * i:n_docs + 3 * i + 3]]
            choices = [" ".join(w[k:])] + [" ".join(o[len(o) // 2:]) for o in others]
            gold = rng.randrange(4)
            choices[0], choices[gold] = choices[gold], choices[0]
            f.write(json.dumps({"query": " ".join(w[:k]), "choices": choices, "gold": gold}) + "\n")
    with open(d / "lastword.jsonl", "w") as f:
        for s in sents[4 * n_docs:5 * n_docs]:
            f.write(json.dumps({"text": s}) + "\n")
    _task_yaml(d / "heldout_mc.yaml", "multiple_choice", d / "mc.jsonl", """doc_to_text: "{{query}}"
doc_to_target: "{{gold}}"
doc_to_choice: "{{choices}}"
""", ["acc", "acc_norm"])
    _task_yaml(d / "heldout_lastword.yaml", "loglikelihood", d / "lastword.jsonl", """doc_to_text: "{{text.split(' ')[:-1]|join(' ')}}"
doc_to_target: "{{' '+text.split(' ')[-1]}}"
""", ["acc"])
    return d


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, gpt2_tokenizer_dir):
    """recipes/models/tiny_llama.json (random, sharpened init) with the GPT-2 tokenizer: (hf, ckpt, export, tasks)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from cpt_megatron.checkpoint.hf_export import export_hf
    from cpt_megatron.checkpoint.hf_import import import_hf
    from cpt_megatron.tokenizer.load import load_tokenizer

    root = tmp_path_factory.mktemp("lm_eval")
    hf = root / "hf"
    cfg = LlamaConfig(**{k: v for k, v in json.loads((REPO / "recipes/models/tiny_llama.json").read_text()).items()
                         if k not in ("architectures", "model_type", "torch_dtype")})
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.06)
    model.save_pretrained(hf)
    load_tokenizer(gpt2_tokenizer_dir).save_pretrained(hf)
    ckpt = root / "ckpt"
    import_hf(hf, ckpt, dtype="fp32", verify=False)
    exp = root / "export"
    export_hf(ckpt, exp, verify=False)
    return hf, ckpt, exp, write_tasks(root)


# -- parity: our adapter in TP2 / PP2 vs lm-eval's hf model on the export -----------------------------------
@pytest.fixture(scope="module")
def hf_reference(tiny):
    from cpt_megatron.eval.standalone import benchmark_hf

    _, _, exp, tasks = tiny
    return benchmark_hf(exp, [str(tasks)], batch_size=8, log_samples=True)


def _resps(lm_eval_res: dict) -> dict:
    """{(task, doc_id, request index): (loglikelihood, is_greedy)} from lm-eval's logged samples."""
    out = {}
    for task, samples in lm_eval_res["samples"].items():
        for s in samples:
            for j, r in enumerate(s["resps"]):
                ll, greedy = r[0]
                out[(task, s["doc_id"], j)] = (float(ll), bool(greedy))
    return out


@pytest.mark.parametrize("layout", [["--tp", "2"], pytest.param(["--pp", "2"], marks=pytest.mark.slow)], ids=["TP2", "PP2"])
def test_adapter_matches_hf_per_document(tiny, hf_reference, tmp_path, layout):
    _, ckpt, _, tasks = tiny
    out = tmp_path / "results.json"
    cmd = [sys.executable, "-m", "cpt_megatron", "eval", "--ckpt", str(ckpt), "--tasks", str(tasks), *layout,
           "--nproc", "2", "--micro-batch", "2", "--batch-size", "8", "--output", str(out), "--log-samples", "--json"]
    p = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    summary = json.loads(p.stdout.strip().splitlines()[-1])["benchmarks"]
    ref = hf_reference["summary"]
    assert set(summary) == {"heldout_mc", "heldout_lastword"}
    for task in ref:
        for m in ("acc", "acc_norm", "acc_stderr"):
            if m in ref[task]:
                assert summary[task][m] == ref[task][m], (task, m)
        assert summary[task]["n"] == ref[task]["n"] == 12
    got, want = _resps(json.loads(out.read_text())), _resps(hf_reference["lm_eval"])
    assert set(got) == set(want) and len(want) == 12 * 4 + 12
    worst = max(abs(got[k][0] - want[k][0]) for k in want)
    assert worst <= TOL, worst
    assert all(got[k][1] == want[k][1] for k in want)


def test_cli_hf_writes_lm_eval_json_and_summary(tiny, tmp_path, capsys):
    _, _, exp, tasks = tiny
    out = tmp_path / "r.json"
    assert main(["eval", "--hf", str(exp), "--tasks", str(tasks / "heldout_mc.yaml"), "--limit", "6", "--output", str(out),
                 "--json"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(lines[-1])["benchmarks"]["heldout_mc"]
    assert summary["n"] == 6 and set(summary) >= {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "higher_is_better"}
    assert any(ln.startswith("heldout_mc") and "acc " in ln and "±" in ln for ln in lines[:-1])
    res = json.loads(out.read_text())  # lm-eval's own results JSON
    assert res["results"]["heldout_mc"]["acc,none"] == summary["acc"] and res["n-samples"]["heldout_mc"]["effective"] == 6


@pytest.mark.slow
def test_adapter_vpp_matches_hf(tiny, hf_reference, tmp_path):
    """PP2 x VPP2 (interleaved schedule), through the library entry point in a torchrun worker."""
    _, ckpt, _, tasks = tiny
    out = tmp_path / "vpp.json"
    spec = json.dumps({"ckpt": str(ckpt), "tasks": str(tasks), "out": str(out)})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", __file__, spec]
    p = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    got, want = _resps(json.loads(out.read_text())), _resps(hf_reference["lm_eval"])
    assert set(got) == set(want) and max(abs(got[k][0] - want[k][0]) for k in want) <= TOL


def _vpp_worker(spec: dict) -> None:
    from cpt_megatron.eval.standalone import benchmark_checkpoint

    res = benchmark_checkpoint(spec["ckpt"], [spec["tasks"]], pp=2, vpp=2, micro_batch=2, batch_size=8, log_samples=True)
    if res["rank"] == 0:
        from lm_eval.utils import handle_non_serializable

        Path(spec["out"]).write_text(json.dumps(res["lm_eval"], default=handle_non_serializable))


def test_adapter_rolling_and_generation_match_hf(tiny):
    """MegatronLM's loglikelihood_rolling windows and greedy generate_until equal lm-eval hf's, on a scorer
    backed by the same HF model (the adapter's own logic; the layouts are covered above)."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from cpt_megatron.eval.harness import MegatronLM

    _, _, exp, _ = tiny
    ref = HFLM(pretrained=str(exp), dtype="float32", device="cpu", batch_size=4, max_length=24)

    def scorer(rows):
        width = max(len(r[0]) for r in rows)
        ids = torch.tensor([r[0] + [0] * (width - len(r[0])) for r in rows])
        with torch.no_grad():
            lp = torch.log_softmax(ref.model(ids).logits.float(), -1)
        return [(lp[k, torch.arange(len(r[0])), torch.tensor(r[1])].tolist(), lp[k, :len(r[0])].argmax(-1).tolist())
                for k, r in enumerate(rows)]

    scorer.pad_id = 0
    lm = MegatronLM(scorer, ref.tokenizer, max_length=24, batch_size=3)
    texts = held_out_sentences(5, seed=3)
    roll = [Instance("loglikelihood_rolling", {}, (t + " " + t,), i) for i, t in enumerate(texts)]  # > 24 tokens
    got, want = lm.loglikelihood_rolling(roll), ref.loglikelihood_rolling(roll)
    assert max(abs(a - b) for a, b in zip(got, want)) <= TOL
    gen = [Instance("generate_until", {}, (t, {"until": ["."], "max_gen_toks": 6}), i) for i, t in enumerate(texts)]
    assert lm.generate_until(gen) == ref.generate_until(gen)


@pytest.mark.parametrize("layout", [{"tp": 2, "pp": 1}, pytest.param({"tp": 1, "pp": 1}, marks=pytest.mark.slow),
                                    pytest.param({"tp": 1, "pp": 2}, marks=pytest.mark.slow)], ids=["TP2", "DP2", "PP2"])
def test_kv_cache_generation_equals_reforward(tiny, tmp_path, layout):
    """Greedy generate_until with megatron-core's static KV cache (LayoutScorer.generate) gives the same text
    as re-running every sequence for each new token, in TP2 / DP2 / PP2 (2 ranks). TP2 also covers the
    vocab-padding mask on TP-gathered logits (model/build.py), which the cached path reads.
    Same worker: one-token continuations of a shared context scored in one row (`alts`) equal one row each."""
    _, ckpt, _, _ = tiny
    out = tmp_path / "gen.json"
    spec = json.dumps({"kind": "kv", "ckpt": str(ckpt), "out": str(out), **layout})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", __file__, spec]
    p = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["kv"] == res["reforward"] and len(res["kv"]) == 12
    assert max(res["group_sizes"]) >= 2  # prompts of equal length share a prefill and the cache
    assert sum(len(t) for t in res["kv"]) > 12 * 4  # real continuations, not empty strings
    shared, plain = res["shared"], res["plain"]
    assert res["rows"] == {"shared": 12 * 2, "plain": 12 * 4}  # 3 one-token candidates per context: 1 row
    assert len(shared) == len(plain) == 12 * 4
    assert max(abs(a[0] - b[0]) for a, b in zip(shared, plain)) <= 1e-5
    assert [a[1] for a in shared] == [b[1] for b in plain] and sum(a[1] for a in shared) == 12  # the greedy ones


class _RowCounter:
    """A scorer that counts the rows it is asked for, with candidate sharing on or off."""

    def __init__(self, scorer, share: bool):
        self.scorer, self.scores_alternatives, self.pad_id, self.rows = scorer, share, scorer.pad_id, 0

    def __call__(self, rows):
        self.rows += len(rows)
        return self.scorer(rows)


def _kv_worker(spec: dict) -> None:
    from lm_eval.api.instance import Instance

    from cpt_megatron.eval.harness import LayoutScorer, MegatronLM
    from cpt_megatron.eval.standalone import loaded_checkpoint

    texts = [" ".join(t.split()[:4]) for t in held_out_sentences(12, seed=5)]
    reqs = [Instance("generate_until", {}, (t, {"until": ["\n\n"], "max_gen_toks": 10}), i) for i, t in enumerate(texts)]
    with loaded_checkpoint(spec["ckpt"], tp=spec["tp"], pp=spec["pp"]) as (chunks, tok, arch):
        res = {}
        for kv in (True, False):
            scorer = LayoutScorer(chunks, micro_batch=2, pad_id=int(tok.eos_token_id), kv_cache=kv)
            res["kv" if kv else "reforward"] = MegatronLM(scorer, tok, max_length=64, batch_size=12).generate_until(reqs)
        lens = [len(tok.encode(t)) for t in texts]
        res["group_sizes"] = [lens.count(n) for n in set(lens)]
        # each context: its greedy next token, two other tokens, and a two-token continuation
        ctxs = [tok.encode(t) for t in texts]
        greedy = scorer.generate(ctxs, 1, lambda i, g: True)
        lreqs = [(None, c, cont) for c, g in zip(ctxs, greedy) for cont in (g, [11], [262], [11, 262])]
        res["rows"] = {}
        for share in (True, False):
            counted = _RowCounter(scorer, share)
            lm = MegatronLM(counted, tok, max_length=64, batch_size=8)
            res["shared" if share else "plain"] = [list(r) for r in lm._loglikelihood_tokens(lreqs)]
            res["rows"]["shared" if share else "plain"] = counted.rows
        if torch.distributed.get_rank() == 0:
            Path(spec["out"]).write_text(json.dumps(res))


# -- offline task resolution and errors (no model) ----------------------------------------------------------
def test_task_specs_resolve_and_missing_dataset_is_one_line(tmp_path, monkeypatch):
    import socket

    from cpt_megatron.errors import CptError
    from cpt_megatron.eval.tasks import resolve_tasks, run_tasks

    def no_network(*a, **k):
        raise AssertionError(f"network access attempted: {a}")

    monkeypatch.setattr(socket.socket, "connect", no_network)  # importing and running lm-eval stays offline

    d = write_tasks(tmp_path, n_docs=4)
    assert resolve_tasks([str(d)]) == (["heldout_lastword", "heldout_mc"], [str(d.resolve())], False)
    assert resolve_tasks([str(d / "heldout_mc.yaml"), "arc_easy"])[0] == ["heldout_mc", "arc_easy"]
    with pytest.raises(CptError, match="no such file"):
        resolve_tasks([str(tmp_path / "nope.yaml")])
    ok = run_tasks("dummy", [str(d)], limit=3)["summary"]  # lm-eval's random model: the plumbing, offline
    assert ok["heldout_mc"]["n"] == 3 and "acc_stderr" in ok["heldout_mc"] and "acc" in ok["heldout_lastword"]
    (d / "mc.jsonl").unlink()  # a local task whose data file is gone: one line naming the task, no download
    with pytest.raises(CptError, match=r"task 'heldout_mc': its dataset is not available offline.*dataset_path: json"):
        run_tasks("dummy", [str(d / "heldout_mc.yaml")], limit=2)


def test_eval_checks_inputs_before_loading(tmp_path, capsys):
    """Issue 19 item 8: a missing --data file (or task YAML) fails at once, before any model loads."""
    import time

    ck = tmp_path / "ck"
    (ck / "tokenizer").mkdir(parents=True)
    t0 = time.time()
    assert main(["eval", "--ckpt", str(ck), "--data", str(tmp_path / "missing.txt"), "--json"]) == 2
    err = capsys.readouterr().err
    assert "--data" in err and "missing.txt" in err and "not found" in err and "Traceback" not in err
    assert main(["eval", "--ckpt", str(ck), "--tasks", str(tmp_path / "t.yaml")]) == 2
    assert "t.yaml: no such file" in capsys.readouterr().err
    assert main(["eval", "--ckpt", str(ck)]) == 2
    assert "nothing to evaluate" in capsys.readouterr().err
    assert main(["eval", "--ckpt", str(ck), "--tasks", "arc_easy", "--tokenizer", str(tmp_path / "tok")]) == 2
    assert "--tokenizer" in capsys.readouterr().err  # names the missing --tokenizer, not the checkpoint
    assert time.time() - t0 < 10


# -- the monitor on benchmark scores: acts on a real drop, not on one inside the stderr ---------------------
def _bench(acc: float, n: int = 1000) -> dict:
    se = (acc * (1 - acc) / (n - 1)) ** 0.5
    return {"group": "general", "benchmark": True, "watch": "acc", "acc": acc, "acc_stderr": se, "n": n,
            "higher_is_better": {"acc": True}}


def test_monitor_benchmark_noise_vs_regression():
    from cpt_megatron.eval.monitor import ForgettingMonitor, MonitorConfig

    base = {"pydoc": {"group": "general", "ppl": 20.0}, "arc_easy": _bench(0.60)}
    mon = ForgettingMonitor(MonitorConfig(policy="stop", warn=0.02, act=0.03), base)
    assert ("arc_easy", "acc") in mon.watched and ("pydoc", "ppl") in mon.watched
    # 0.60 -> 0.58: a 3.3% relative drop (past act) but 2 points < sqrt(2) x 1.55 points of stderr: noise
    ev = {e.source: e for e in mon.observe(100, {"pydoc": {"group": "general", "ppl": 20.0}, "arc_easy": _bench(0.58)})}
    a = ev["arc_easy"]
    assert a.kind == "noise" and a.action is None and a.regression == pytest.approx(1 / 30)
    assert a.stderr == pytest.approx(((0.6 * 0.4 + 0.58 * 0.42) / 999) ** 0.5)
    assert "noise" in a.format() and "stderr" in a.format()
    # the benchmark not due at this evaluation: skipped, perplexity still watched
    assert [e.source for e in mon.observe(150, {"pydoc": {"group": "general", "ppl": 20.1}})] == ["pydoc"]
    # 0.60 -> 0.50 (planted regression, e.g. a too-high LR): far outside the noise -> the policy acts
    ev = {e.source: e for e in mon.observe(200, {"pydoc": {"group": "general", "ppl": 20.0}, "arc_easy": _bench(0.50)})}
    assert ev["arc_easy"].kind == "act" and ev["arc_easy"].action == "stop"
    # noise_z=0 treats the same 2-point drop as real
    mon0 = ForgettingMonitor(MonitorConfig(policy="stop", noise_z=0.0), base)
    ev0 = {e.source: e for e in mon0.observe(100, {"pydoc": {"group": "general", "ppl": 20.0}, "arc_easy": _bench(0.58)})}
    assert ev0["arc_easy"].kind == "act" and ev0["arc_easy"].action == "stop"
    # a base accuracy of 0 cannot regress
    mz = ForgettingMonitor(MonitorConfig(policy="stop"), {"lw": _bench(0.0, 12)})
    assert mz.observe(4, {"lw": _bench(0.0, 12)})[0].kind == "ok"


# -- benchmarks in real (tiny) training runs ---------------------------------------------------------------------
@pytest.mark.slow
def test_training_logs_benchmarks_at_step0_and_each_interval(tmp_path, tiny_cpu_cache):
    from conftest import cpt_train

    tasks = write_tasks(tmp_path, n_docs=8)
    gen_task = tmp_path / "gen" / "heldout_gen.yaml"  # greedy generation (KV-cached) on the training model
    gen_task.parent.mkdir()
    _task_yaml(gen_task, "generate_until", tasks / "lastword.jsonl", """doc_to_text: "{{text.split(' ')[:-1]|join(' ')}}"
doc_to_target: "{{' '+text.split(' ')[-1]}}"
generation_kwargs: {until: ["\\n"], max_gen_toks: 4}
""", ["exact_match"])
    run = tmp_path / "run"
    bench = (f"[{{task: {tasks / 'heldout_mc.yaml'}, limit: 8, interval: 2, batch_size: 8}}, "
             f"{{task: {gen_task}, limit: 4, interval: 2, metric: exact_match, "
             f"general: false}}]")
    cpt_train(run, tiny_cpu_cache, "train.max_steps=4", "eval.interval=4", f"eval.benchmarks={bench}",
              "eval.monitor.policy=stop", "checkpoint.save_interval=2")
    evals = [json.loads(x) for x in (run / "evals.jsonl").read_text().splitlines()]
    gen = {e["step"]: e["results"]["heldout_gen"] for e in evals if "heldout_gen" in e["results"]}
    assert sorted(gen) == [0, 2, 4] and all(r["group"] == "domain" and r["n"] == 4 and 0 <= r["exact_match"] <= 1
                                            for r in gen.values())
    assert "exact_match,none" in json.loads((run / "benchmarks" / "step_0000004.heldout_gen.json").read_text())[
        "results"]["heldout_gen"]
    scored = {e["step"]: e["results"]["heldout_mc"] for e in evals if "heldout_mc" in e["results"]}
    assert sorted(scored) == [0, 2, 4]
    for r in scored.values():
        assert r["benchmark"] and r["group"] == "general" and r["n"] == 8 and 0 <= r["acc"] <= 1
        assert r["acc_stderr"] == pytest.approx((r["acc"] * (1 - r["acc"]) / 7) ** 0.5)
    assert "ppl" in evals[0]["results"]["pydoc"]
    saved = json.loads((run / "benchmarks" / "step_0000004.heldout_mc.json").read_text())  # lm-eval's own JSON
    assert saved["results"]["heldout_mc"]["acc,none"] == scored[4]["acc"]
    events = [json.loads(x) for x in (run / "events.jsonl").read_text().splitlines()]
    watched = [e for e in events if e["source"] == "heldout_mc"]
    assert {e["step"] for e in watched} == {0, 2, 4} and all(e["stderr"] is not None for e in watched if e["step"])
    # 8 documents: any change is inside the stderr, so the benchmark never makes the monitor act
    assert all(e["action"] is None for e in watched)


def base_preference_task(hf_dir: Path, out: Path, *, n: int = 200, wrong: int = 50, fragile: int = 8,
                         seed: int = 0) -> Path:
    """A next-word multiple-choice task whose answers are the BASE model's own preferences, so that a random
    model has something to forget: out/base_pref.yaml over local JSONL; base accuracy exactly (n - wrong) / n.

    Each question is a held-out sentence prefix; its choices are single-token words, scored by lm-eval as
    log P(" word" | prefix). "Robust" questions have two choices 0.15-0.3 nats apart in the base model: a
    gentle run (lr 1e-4) moves such a gap by ~0.01 and never reorders it, a high-LR run scrambles it. The gold
    label is the base's favourite for n - wrong questions and the other choice for `wrong` of them, so the base
    scores (n - wrong) / n with a real binomial stderr (not 1.0, whose stderr is 0). The first `fragile`
    questions (gold = the favourite) have four choices within 1e-3 nats instead: any training reorders them,
    so even the gentle run loses some (at most `fragile`), a drop that the monitor must read as noise.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    queries = []  # the longest prefix of <= 7 tokens: a row is 8 tokens, the scorer's narrowest padded width
    for sent in held_out_sentences(n, seed=seed):
        w = sent.split()
        k = max((k for k in range(1, len(w)) if len(tok.encode(" ".join(w[:k]))) <= 7), default=1)
        queries.append(" ".join(w[:k]))
    assert len(queries) == n
    enc = [tok.encode(q) for q in queries]  # lm-eval's context tokens; each choice is the one token " word"
    width = max(map(len, enc))
    with torch.no_grad():  # log P(next token | query) at each query's last position, over the whole vocab
        h = model.model(torch.tensor([e + [0] * (width - len(e)) for e in enc])).last_hidden_state
        lp = torch.log_softmax(model.lm_head(h[torch.arange(n), torch.tensor([len(e) - 1 for e in enc])]), -1)
    words = [(i, t[1:]) for t, i in sorted(tok.get_vocab().items(), key=lambda x: x[1])
             if t.startswith("\u0120") and t[1:].isalpha() and t[1:].islower() and len(t) >= 5]  # "Ġword"
    ids = torch.tensor([i for i, _ in words])
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "base_pref.jsonl", "w") as f:
        for q in range(n):
            v = lp[q, ids]
            top = int(v.argsort()[len(v) // 2])  # a middling word as the favourite
            gap = v[top] - v
            (lo, hi), k = ((1e-4, 1e-3), 3) if q < fragile else ((0.15, 0.3), 1)
            choices = [top] + rng.sample([int(j) for j in torch.nonzero((gap > lo) & (gap < hi)).flatten()], k)
            gold = 1 if q >= n - wrong else 0
            perm = rng.sample(range(k + 1), k + 1)
            f.write(json.dumps({"query": queries[q], "choices": [words[choices[j]][1] for j in perm],
                                "gold": perm.index(gold)}) + "\n")
    _task_yaml(out / "base_pref.yaml", "multiple_choice", out / "base_pref.jsonl", """doc_to_text: "{{query}}"
doc_to_target: "{{gold}}"
doc_to_choice: "{{choices}}"
""", ["acc"])
    return out / "base_pref.yaml"


@pytest.mark.slow
def test_monitor_acts_on_planted_benchmark_regression_not_on_noise(tmp_path, tiny_cpu_cache):
    """Issue 21: two real tiny_cpu runs (one `cpt prepare`) with eval.benchmarks, monitor policy stop and its
    default thresholds (warn 2%, act 3%, noise_z 1), differing only in the LR. The high-LR run (lr 0.1, 100x the
    recipe's) scrambles the base's preferences: accuracy falls far past the stderr and the monitor stops the run
    at its first evaluation. The gentle run (lr 1e-4) loses a few fragile questions: a drop past the thresholds
    but inside the stderr, logged as noise and never acted on; the run completes.
    Measured (Gutenberg held-out text; generated fallback in brackets): base 0.750 +- 0.031 (n 200); high LR
    0.515 [0.475] at step 4 (combined stderr 4.7 points) -> stop; gentle 0.730 [0.715] at steps 4 and 8
    (-2.0 [-3.5] points, combined stderr 4.4) -> noise."""
    from conftest import cpt_train

    from cpt_megatron.checkpoint.hf_export import export_hf

    base = json.loads(next((tiny_cpu_cache / "prepared").glob("*.json")).read_text())["base"]
    export_hf(base, tmp_path / "base_hf", verify=False)
    task = base_preference_task(tmp_path / "base_hf", tmp_path / "tasks")
    bench = f"[{{task: {task}, limit: 200, interval: 4, batch_size: 100}}]"
    # eval.general=[]: no held-out text set (the lr-0.1 run would blow up its perplexity too): the benchmark is
    # the general set whose noise vs regression this test is about
    common = ("train.max_steps=8", "eval.interval=4", "checkpoint.save_interval=8", f"eval.benchmarks={bench}",
              "eval.monitor.policy=stop", "eval.general=[]")
    n, se0 = 200, (0.75 * 0.25 / 199) ** 0.5

    def scores_and_events(run):
        evals = [json.loads(x) for x in (run / "evals.jsonl").read_text().splitlines()]
        events = [json.loads(x) for x in (run / "events.jsonl").read_text().splitlines()]
        return ({e["step"]: e["results"]["base_pref"] for e in evals},
                {e["step"]: e for e in events if e["source"] == "base_pref"}, events)

    hi = cpt_train(tmp_path / "high_lr", tiny_cpu_cache, *common, "optim.lr=0.1")
    acc, ev, events = scores_and_events(tmp_path / "high_lr")
    assert hi["stopped"] == "forgetting monitor stopped the run at step 4" and hi["last_step"] == 4
    assert sorted(acc) == [0, 4] and acc[0]["acc"] == 0.75 and acc[0]["n"] == n  # the base scores as designed
    assert acc[0]["acc_stderr"] == pytest.approx(se0)
    se = (se0 ** 2 + acc[4]["acc_stderr"] ** 2) ** 0.5
    assert acc[4]["acc"] < 0.75 - 3 * se  # far outside the noise (measured 0.515, se 0.047)
    assert ev[0]["kind"] == "baseline"
    assert ev[4]["kind"] == "act" and ev[4]["action"] == "stop" and ev[4]["threshold"] == 0.03
    assert ev[4]["stderr"] == pytest.approx(se)
    assert ev[4]["regression"] == pytest.approx((0.75 - acc[4]["acc"]) / 0.75)
    assert [e["source"] for e in events if e["action"]] == ["base_pref"]  # the benchmark acted, not perplexity

    lo = cpt_train(tmp_path / "low_lr", tiny_cpu_cache, *common, "optim.lr=1e-4")
    acc, ev, events = scores_and_events(tmp_path / "low_lr")
    assert lo["stopped"] is None and lo["last_step"] == 8  # not stopped
    assert sorted(acc) == [0, 4, 8] and acc[0]["acc"] == 0.75
    for step in (4, 8):
        drop = 0.75 - acc[step]["acc"]
        se = (se0 ** 2 + acc[step]["acc_stderr"] ** 2) ** 0.5
        assert 3 / n <= drop <= min(se, 8 / n + 1e-9)  # past `warn`, inside the stderr: only fragile ones lost
        assert ev[step]["kind"] == "noise" and ev[step]["action"] is None and ev[step]["stderr"] == pytest.approx(se)
    assert not any(e["action"] for e in events)


def test_select_and_plot_include_benchmarks(tmp_path):
    from cpt_megatron.eval.plot import plot_run
    from cpt_megatron.eval.select import select_checkpoint

    def ev(step, dom, gen, acc):
        return {"step": step, "results": {"med": {"group": "domain", "ppl": dom}, "wiki": {"group": "general", "ppl": gen},
                                          "arc_easy": _bench(acc)}}
    # step 10: best domain gain but ARC dropped 10 points (real); step 20: ARC -2 points (inside the stderr)
    rows = [ev(0, 10.0, 20.0, 0.60), ev(10, 8.0, 20.1, 0.50), ev(20, 8.5, 20.1, 0.58)]
    (tmp_path / "evals.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for s in (10, 20):
        (tmp_path / "checkpoints" / f"iter_{s:07d}").mkdir(parents=True)
    sel = select_checkpoint(tmp_path, max_general_regression=0.03)
    by_step = {c["step"]: c for c in sel["candidates"]}
    assert by_step[10]["general_regression"] == pytest.approx(0.1 / 0.6) and not by_step[10]["feasible"]
    assert by_step[20]["general_regression"] == pytest.approx(0.005) and by_step[20]["feasible"]  # wiki ppl only
    assert sel["best"] == "iter_0000020" and by_step[20]["benchmarks"] == {"arc_easy": 0.58}
    assert "arc_easy 0.5800" in (tmp_path / "selection.md").read_text()
    assert str(tmp_path / "plots" / "benchmarks.png") in plot_run(tmp_path)["plots"]


@pytest.mark.slow  # the session's SmolLM2 import and export (conftest), then two 40-document evaluations
def test_smollm2_last_word_accuracy_matches_export(smollm2_mcore, smollm2_export, tmp_path):
    """Real SmolLM2-135M: the held-out last-word task through our adapter (TP1, CLI) equals lm-eval hf on the export."""
    from cpt_megatron.eval.standalone import benchmark_hf

    ckpt, exp = smollm2_mcore[0], smollm2_export[0]
    task = write_tasks(tmp_path, n_docs=40) / "heldout_lastword.yaml"
    ref = benchmark_hf(exp, [str(task)], batch_size=8)["summary"]["heldout_lastword"]
    cmd = [sys.executable, "-m", "cpt_megatron", "eval", "--ckpt", str(ckpt), "--tasks", str(task), "--batch-size", "8",
           "--json"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=dict(os.environ, OMP_NUM_THREADS="2"))
    assert p.returncode == 0, p.stderr[-3000:]
    got = json.loads(p.stdout.strip().splitlines()[-1])["benchmarks"]["heldout_lastword"]
    assert got["n"] == ref["n"] == 40
    assert got["acc"] == ref["acc"] and got["acc_stderr"] == pytest.approx(ref["acc_stderr"])
    assert ref["acc"] > 0  # a real model gets some last words right (measured: 1 of 40 on Gutenberg)


if __name__ == "__main__":
    _spec = json.loads(sys.argv[1])
    (_kv_worker if _spec.get("kind") == "kv" else _vpp_worker)(_spec)
