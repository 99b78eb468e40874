"""Benchmarks offline, the lm-eval way: `--benchmark-data DIR` / `eval.benchmark_data` point lm-eval's own task
configs (arc_easy, hellaswag, mmlu, ...) at DIR/<task>/<split>.jsonl.

Default run: a small generated DIR in the Hub datasets' columns; scores equal those of the route lm-eval's
docs give (a task YAML that `include:`s lm-eval's YAML with `dataset_path: json`), with every socket
connection refused. With ../shared/data: the real folder resolves for every benchmark, and SmolLM2-135M
scores well above chance on real ARC-Easy items.
"""

from __future__ import annotations

import json
import random
import socket
from pathlib import Path

import pytest

from cpt_megatron.cli import main
from cpt_megatron.errors import CptError
from cpt_megatron.eval.tasks import check_benchmark_data, run_tasks

WORDS = ("water light plant energy river stone cell heat cloud animal seed metal sound wind earth moon sun "
         "rock leaf root salt ice gas wood iron").split()


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def write_benchmark_dir(root: Path, n: int = 8, seed: int = 0, mmlu_subjects=("anatomy", "astronomy")) -> Path:
    """A tiny DIR in the layout of ../shared/data/benchmarks (the Hub datasets' columns)."""
    rng = random.Random(seed)

    def phrase(k=4):
        return " ".join(rng.choice(WORDS) for _ in range(k))

    def arc(i):
        return {"id": f"q{i}", "question": f"Which {phrase(3)} makes {phrase(2)}?",
                "choices": {"text": [phrase(2) for _ in range(4)], "label": list("ABCD")},
                "answerKey": "ABCD"[rng.randrange(4)]}

    _jsonl(root / "arc_easy" / "validation.jsonl", [arc(i) for i in range(n)])
    _jsonl(root / "arc_easy" / "test.jsonl", [arc(100 + i) for i in range(n)])
    _jsonl(root / "hellaswag" / "validation.jsonl", [
        {"ind": i, "activity_label": "Walking", "ctx_a": f"A man {phrase(3)}.", "ctx_b": "he",
         "ctx": f"A man {phrase(3)}. he", "endings": [phrase(3) + "." for _ in range(4)], "source_id": "x",
         "split": "val", "split_type": "indomain", "label": str(rng.randrange(4))} for i in range(n)])
    _jsonl(root / "piqa" / "validation.jsonl", [
        {"goal": f"How to {phrase(3)}?", "sol1": phrase(5), "sol2": phrase(5), "label": rng.randrange(2)}
        for _ in range(n)])
    _jsonl(root / "sciq" / "validation.jsonl", [
        {"question": f"What is {phrase(3)}?", "distractor1": phrase(1), "distractor2": phrase(1),
         "distractor3": phrase(1), "correct_answer": phrase(1), "support": ""} for _ in range(n)])
    for subj in mmlu_subjects:
        for split, k in (("dev", 5), ("validation", n)):
            _jsonl(root / "mmlu" / subj / f"{split}.jsonl", [
                {"question": f"{phrase(4)}?", "subject": subj, "choices": [phrase(2) for _ in range(4)],
                 "answer": rng.randrange(4)} for _ in range(k)])
    return root


@pytest.fixture
def no_network(monkeypatch):
    """Every socket connection refused: the Hub cannot be reached (and HF_*_OFFLINE set, as on a compute node)."""
    def refuse(*a, **k):
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_split_is_lm_evals_else_the_next_present_and_missing_is_one_line(tmp_path, no_network):
    d = write_benchmark_dir(tmp_path / "bench")
    got = check_benchmark_data(["arc_easy", "hellaswag", "piqa", "sciq", "mmlu_anatomy"], d)
    # arc_easy: lm-eval evaluates test (there); hellaswag/piqa: validation (lm-eval's); sciq: test absent -> validation;
    # mmlu: test absent -> validation (dev stays the few-shot pool)
    assert got == {"arc_easy": "test", "hellaswag": "validation", "piqa": "validation", "sciq": "validation",
                   "mmlu_anatomy": "validation"}
    (d / "arc_easy" / "test.jsonl").unlink()
    assert check_benchmark_data(["arc_easy"], d) == {"arc_easy": "validation"}
    with pytest.raises(CptError, match=r"no folder for task arc_challenge .*arc_challenge/") as e:
        check_benchmark_data(["arc_challenge"], d)
    assert "\n" not in str(e.value)
    (d / "piqa" / "validation.jsonl").rename(d / "piqa" / "train.jsonl")
    with pytest.raises(CptError, match=r"no validation.jsonl for task piqa"):
        check_benchmark_data(["piqa"], d)
    with pytest.raises(CptError, match=r"no folder for task mmlu_\w+ .*mmlu/\w+/.*\(and 54 more: mmlu_"):
        check_benchmark_data(["mmlu"], d)  # the group needs every subject's folder: 55 of 57 missing, one line
    with pytest.raises(CptError, match="no such folder"):
        check_benchmark_data(["arc_easy"], tmp_path / "nope")


def _include_yaml(folder: Path, task: str, lm_eval_yaml: str, files: dict, splits: dict) -> None:
    """The route lm-eval's docs give: a task YAML including lm-eval's own, pointed at local JSON."""
    import lm_eval

    src = Path(lm_eval.__file__).parent / "tasks" / lm_eval_yaml
    lines = [f"include: {src}", f"task: {task}", "dataset_path: json", "dataset_name: null",
             "dataset_kwargs:", "  data_files:"] + [f"    {k}: {v}" for k, v in files.items()] + \
        [f"{k}: {v}" for k, v in splits.items()]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{task}.yaml").write_text("\n".join(lines) + "\n")


def _per_doc(res: dict, task: str) -> list[tuple]:
    """(doc, prompts and continuations, acc, acc_norm) of every document: same prompts, same scores."""
    return [(s["doc_id"], json.dumps(s["arguments"]), s["acc"], s.get("acc_norm"))
            for s in sorted(res["samples"][task], key=lambda s: s["doc_id"])]


def test_local_data_scores_equal_lm_evals_include_route(tmp_path, no_network, tiny_hf):
    """Same prompts, same scoring: per-document acc of our route = a hand-written include YAML's, through lm-eval's
    own `hf` model. Catches a dropped process_docs (hellaswag), a wrong split or a lost few-shot pool (mmlu dev)."""
    d = write_benchmark_dir(tmp_path / "bench")
    ours = run_tasks("hf", ["arc_easy", "hellaswag", "mmlu_anatomy"], benchmark_data=d, num_fewshot=2,
                     model_args=f"pretrained={tiny_hf},dtype=float32,device=cpu", batch_size=8, log_samples=True,
                     quiet=True)
    ref_dir = tmp_path / "ref"
    _include_yaml(ref_dir, "ref_arc_easy", "arc/arc_easy.yaml",
                  {"test": d / "arc_easy/test.jsonl", "validation": d / "arc_easy/validation.jsonl"},
                  {"training_split": "null"})
    _include_yaml(ref_dir, "ref_hellaswag", "hellaswag/hellaswag.yaml",
                  {"validation": d / "hellaswag/validation.jsonl"}, {"training_split": "null"})
    _include_yaml(ref_dir, "ref_mmlu_anatomy", "mmlu/default/mmlu_anatomy.yaml",
                  {"validation": d / "mmlu/anatomy/validation.jsonl", "dev": d / "mmlu/anatomy/dev.jsonl"},
                  {"test_split": "null", "validation_split": "validation"})
    ref = run_tasks("hf", [str(ref_dir)], num_fewshot=2, model_args=f"pretrained={tiny_hf},dtype=float32,device=cpu",
                    batch_size=8, log_samples=True, quiet=True)
    for task in ("arc_easy", "hellaswag", "mmlu_anatomy"):
        assert _per_doc(ours["lm_eval"], task) == _per_doc(ref["lm_eval"], f"ref_{task}"), task
        assert ours["summary"][task]["n"] == 8
    assert ours["summary"]["arc_easy"]["split"] == "test"
    assert ours["summary"]["hellaswag"]["split"] == "validation"
    # mmlu's few-shot pool is dev (lm-eval's first_n sampler): the prompts carry the first dev questions
    dev_q = json.loads((d / "mmlu/anatomy/dev.jsonl").read_text().splitlines()[0])["question"]
    first = ours["lm_eval"]["samples"]["mmlu_anatomy"][0]["arguments"][0][0]
    assert dev_q in first


def test_cli_benchmark_data_names_split_and_checks_before_loading(tmp_path, capsys, no_network, tiny_hf):
    d = write_benchmark_dir(tmp_path / "bench")
    assert main(["eval", "--hf", str(tiny_hf), "--tasks", "sciq,piqa", "--benchmark-data", str(d), "--limit", "4",
                 "--json"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    res = json.loads(lines[-1])["benchmarks"]
    assert res["sciq"]["split"] == "validation" and res["sciq"]["n"] == 4 and 0 <= res["piqa"]["acc"] <= 1
    assert any(ln.startswith("sciq") and "split validation" in ln for ln in lines[:-1])
    # a missing file is one line, before the model loads (the model path does not even exist)
    assert main(["eval", "--hf", str(tmp_path / "no_model"), "--tasks", "arc_challenge", "--benchmark-data", str(d)]) == 2
    err = capsys.readouterr().err.strip()
    assert "no folder for task arc_challenge" in err and len(err.splitlines()) == 1


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory, gpt2_tokenizer_dir) -> Path:
    """A random tiny Llama (recipes/models/tiny_llama.json) with the GPT-2 tokenizer, as an HF folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from cpt_megatron.tokenizer.load import load_tokenizer

    repo = Path(__file__).resolve().parents[1]
    out = tmp_path_factory.mktemp("bench_model") / "hf"
    cfg = LlamaConfig(**{k: v for k, v in json.loads((repo / "recipes/models/tiny_llama.json").read_text()).items()
                         if k not in ("architectures", "model_type", "torch_dtype")})
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(out)
    load_tokenizer(gpt2_tokenizer_dir).save_pretrained(out)
    return out


# -- the real data (../shared/data/benchmarks) -----------------------------------------------------------------
def test_shared_benchmarks_resolve_for_every_task(shared_data, no_network):
    got = check_benchmark_data(["arc_easy", "hellaswag", "piqa", "sciq", "lambada_openai", "openbookqa", "mmlu"],
                               shared_data / "benchmarks")
    assert {k: got[k] for k in ("arc_easy", "hellaswag", "piqa", "sciq", "lambada_openai", "openbookqa")} == {
        "arc_easy": "test", "hellaswag": "validation", "piqa": "validation", "sciq": "validation",
        "lambada_openai": "test", "openbookqa": "test"}
    mmlu = {k: v for k, v in got.items() if k.startswith("mmlu_")}
    assert len(mmlu) == 57 and set(mmlu.values()) == {"validation"}


@pytest.mark.heavy
@pytest.mark.slow
def test_smollm2_arc_easy_real_items_above_chance(shared_data, smollm2_mcore, capsys, no_network):
    """SmolLM2-135M through our megatron adapter on 200 real ARC-Easy test items: well above chance (0.25).
    Measured (cpt eval --ckpt, CPU fp32): acc 0.510 ± 0.035, acc_norm 0.465 ± 0.035 (and piqa, first 200 of
    validation: acc 0.640 ± 0.034, acc_norm 0.655 ± 0.034)."""
    ckpt, _ = smollm2_mcore
    assert main(["eval", "--ckpt", str(ckpt), "--tasks", "arc_easy", "--benchmark-data",
                 str(shared_data / "benchmarks"), "--limit", "200", "--batch-size", "32", "--json"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["benchmarks"]["arc_easy"]
    print("SmolLM2-135M arc_easy (200 test items):", {k: row[k] for k in ("acc", "acc_stderr", "acc_norm",
                                                                           "acc_norm_stderr")})
    assert row["split"] == "test" and row["n"] == 200
    assert row["acc"] - 3 * row["acc_stderr"] > 0.25, row


# -- in training (eval.benchmark_data + eval.benchmarks) ----------------------------------------------------
def test_recipe_missing_benchmark_file_is_one_line_before_training(tmp_path):
    from cpt_megatron.config import load_recipe
    from cpt_megatron.train.checks import recipe_problems

    d = write_benchmark_dir(tmp_path / "bench")
    cfg = load_recipe("tiny_cpu", [f"eval.benchmark_data={d}", "eval.benchmarks=[{task: sciq}, {task: arc_challenge}]"])
    problems = [p for p in recipe_problems(cfg, 1) if "benchmark" in p]
    assert len(problems) == 1 and problems[0].startswith("eval.benchmark_data: benchmark data ") and \
        "no folder for task arc_challenge" in problems[0] and "\n" not in problems[0], problems
    cfg = load_recipe("tiny_cpu", [f"eval.benchmark_data={d}", "eval.benchmarks=[{task: sciq}]"])
    assert not [p for p in recipe_problems(cfg, 1) if "benchmark" in p]


@pytest.mark.heavy  # ~80 s here: a tiny_cpu run (test_lm_eval covers benchmarks in training in make test)
def test_training_scores_local_benchmarks(tmp_path, tiny_cpu_cache, no_network):
    """cpt train with eval.benchmark_data: lm-eval's piqa on the local file at step 0 and the end, split named."""
    from conftest import cpt_train

    d = write_benchmark_dir(tmp_path / "bench")
    run = tmp_path / "run"
    cpt_train(run, tiny_cpu_cache, f"eval.benchmark_data={d}", "eval.benchmarks=[{task: piqa, limit: 4, interval: 8}]",
              "train.max_steps=8", "eval.interval=8", "checkpoint.save_interval=8")
    evals = [json.loads(x) for x in (run / "evals.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [0, 8]
    for e in evals:
        row = e["results"]["piqa"]
        assert row["benchmark"] and row["group"] == "general" and row["split"] == "validation" and row["n"] == 4
