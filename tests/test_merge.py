"""`cpt merge`: (1-λ)·B + λ·C exactly in fp32, λ=0 / λ=1 bit for bit, averages, TP2/PP2-saved inputs with other
vocabulary padding, bad input in one line, and peak memory bounded by the largest tensor, not the model.

Tiny random models (hidden 64, 4 layers) imported from HF; C = B + noise (a stand-in for a CPT checkpoint).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.test_checkpoint import _tokenizer, make_hf

LAM = 0.3


def _perturbed(src: Path, dst: Path, seed: int, scale: float = 0.05, dtype=None) -> Path:
    """A copy of the HF model at `src` with every tensor + scale·N(0, 1) (seeded): a 'trained' checkpoint."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    g = torch.Generator().manual_seed(seed)
    sd = load_file(src / "model.safetensors")
    sd = {k: (v + scale * torch.randn(v.shape, generator=g)).to(dtype or v.dtype).contiguous() for k, v in sd.items()}
    save_file(sd, str(dst / "model.safetensors"), metadata={"format": "pt"})
    if dtype is not None:
        cfg = json.loads((dst / "config.json").read_text())
        cfg["torch_dtype"] = cfg["dtype"] = "bfloat16"
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{fam: {"B", "C", "hfB", "hfC"} (+ "C2", "hfC2" for smollm2)} for a tied (smollm2) and an untied (llama3) model."""
    from cpt_megatron.checkpoint.hf_import import import_hf

    root = tmp_path_factory.mktemp("merge")
    _tokenizer(root / "tok", vocab=512)
    out = {"root": root}
    for fam in ("smollm2", "llama3"):
        hb = make_hf(fam, root / f"hf_{fam}_B", vocab=512, tokenizer=root / "tok")
        d = {"hfB": hb, "hfC": _perturbed(hb, root / f"hf_{fam}_C", 1)}
        if fam == "smollm2":  # a third checkpoint for the average
            d["hfC2"] = _perturbed(hb, root / f"hf_{fam}_C2", 2)
        for k in [k[2:] for k in d]:
            import_hf(d["hf" + k], root / f"mc_{fam}_{k}", verify=False)
            d[k] = root / f"mc_{fam}_{k}"
        out[fam] = d
    return out


def _tensors(ckpt) -> dict:
    """Every model tensor of a megatron checkpoint, by (key, layer)."""
    from cpt_megatron.checkpoint import mapping
    from cpt_megatron.checkpoint.io import (
        arch_from_ckpt,
        ckpt_tensor_keys,
        read_ckpt_tensor,
        single_process_group,
    )

    arch = arch_from_ckpt(ckpt)
    with single_process_group():
        md = ckpt_tensor_keys(ckpt)
        rows = md[mapping.EMBED_KEY].global_shape[0]
        return {(s.key, s.layer): read_ckpt_tensor(ckpt, s.key, md[s.key], s.layer)
                for s in mapping.megatron_specs(arch, rows)}


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (-0.0 vs +0.0 differ here, unlike torch.equal)."""
    as_int = {2: torch.int16, 4: torch.int32}
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.contiguous().view(as_int[a.element_size()]), b.contiguous().view(as_int[b.element_size()]))


def _cli(argv, capsys) -> tuple[int, str]:
    from cpt_megatron.cli import main

    rc = main(argv)
    cap = capsys.readouterr()
    return rc, (cap.err.strip().splitlines() or [""])[-1] if rc else cap.out.strip().splitlines()[-1]


@pytest.mark.parametrize("fam", ["smollm2", "llama3"])
def test_merge_equals_formula_fp32_and_exports(models, fam, tmp_path, capsys):
    """Every exported HF tensor of `cpt merge --weight 0.3` is (1-0.3)·B + 0.3·C computed in fp32, exactly;
    `cpt export-hf` (with its transformers parity check) and the manifest accept the merge."""
    from safetensors.torch import load_file

    from cpt_megatron.checkpoint import layout, read_meta
    from cpt_megatron.checkpoint.hf_export import export_hf

    d = models[fam]
    out = tmp_path / "m"
    rc, line = _cli(["merge", "--base", str(d["B"]), "--ckpt", str(d["C"]), "--weight", str(LAM), "--out", str(out),
                     "--json"], capsys)
    assert rc == 0, line
    summary = json.loads(line)
    assert summary["coefficients"] == [1 - LAM, LAM] and summary["dtype"] == "float32"
    assert layout.check_manifest(layout.resolve(out))  # sizes + checksums of every file
    meta = read_meta(out)
    assert meta["created_by"] == "cpt merge" and meta["merge"]["weight"] == LAM
    assert [i["coefficient"] for i in meta["merge"]["inputs"]] == [1 - LAM, LAM]
    ex = export_hf(out, tmp_path / "hf")  # verify=True: transformers(export) == megatron(merge)
    assert ex["verify"]["max_abs_diff"] <= 1e-4
    got = load_file(tmp_path / "hf" / "model-00001-of-00001.safetensors")
    b, c = load_file(d["hfB"] / "model.safetensors"), load_file(d["hfC"] / "model.safetensors")
    assert set(got) == set(b)
    for k in b:
        want = b[k].float() * (1 - LAM) + c[k].float() * LAM
        assert torch.equal(got[k], want), k
        assert not torch.equal(got[k], b[k])  # the merge moved every tensor


def test_lambda_0_and_1_are_the_inputs_bit_for_bit(models, tmp_path, capsys):
    d = models["llama3"]
    for lam, want in (("0", "B"), ("1", "C"), ("0.0", "B"), ("1.0", "C")):
        out = tmp_path / f"m{lam}"
        rc, line = _cli(["merge", "--base", str(d["B"]), "--ckpt", str(d["C"]), "--weight", lam, "--out", str(out)],
                        capsys)
        assert rc == 0, line
        ref, got = _tensors(d[want]), _tensors(out)
        assert ref.keys() == got.keys()
        assert all(_bits_equal(got[k], ref[k]) for k in ref), lam


def test_zero_coefficient_terms_are_skipped_so_signed_zeros_survive():
    """0·w would turn a -0.0 of the other input into +0.0 (-0.0 + 0.0 = +0.0): λ=0/1 must be the input's bytes."""
    from cpt_megatron.checkpoint.merge import combine

    b, c = torch.tensor([-0.0, 3.0, -1.5]), torch.tensor([5.0, -0.0, 2.0])
    assert _bits_equal(combine(combine(None, b, 1.0), c, 0.0), b)
    assert _bits_equal(combine(combine(None, b, 0.0), c, 1.0), c)


def test_average_of_checkpoints(models, tmp_path, capsys):
    d = models["smollm2"]
    out = tmp_path / "avg"
    rc, line = _cli(["merge", "--ckpt", str(d["B"]), str(d["C"]), str(d["C2"]), "--out", str(out), "--json"], capsys)
    assert rc == 0, line
    assert json.loads(line)["method"] == "average"
    ts = [_tensors(d[k]) for k in ("B", "C", "C2")]
    got = _tensors(out)
    for k, v in got.items():
        assert torch.equal(v, ts[0][k] * (1 / 3) + ts[1][k] * (1 / 3) + ts[2][k] * (1 / 3)), k


def test_bf16_input_merges_in_fp32_widest_dtype(models, tmp_path, capsys):
    """C stored in bf16, B in fp32: output fp32 (widest), λ=1 gives C's bf16 values exactly; --dtype bf16 casts."""
    from cpt_megatron.checkpoint.hf_import import import_hf

    d = models["llama3"]
    hf16 = _perturbed(d["hfB"], tmp_path / "hf16", 3, dtype=torch.bfloat16)
    c16 = import_hf(hf16, tmp_path / "c16", verify=False)["out"]
    for lam, dtype, want_dt in (("1", None, torch.float32), ("0.5", "bf16", torch.bfloat16)):
        out = tmp_path / f"m{lam}"
        argv = ["merge", "--base", str(d["B"]), "--ckpt", c16, "--weight", lam, "--out", str(out)]
        rc, line = _cli(argv + (["--dtype", dtype] if dtype else []), capsys)
        assert rc == 0, line
        got, b, c = _tensors(out), _tensors(d["B"]), _tensors(c16)
        for k, v in got.items():
            assert v.dtype == want_dt
            want = c[k].float() if lam == "1" else (b[k].float() * 0.5 + c[k].float() * 0.5).to(torch.bfloat16)
            assert torch.equal(v, want), k


def test_bad_inputs_are_one_line(models, tmp_path, capsys):
    from cpt_megatron.checkpoint import layout
    from cpt_megatron.checkpoint.hf_import import import_hf

    root, d = models["root"], models["llama3"]
    B, C = str(d["B"]), str(d["C"])
    other_arch = import_hf(make_hf("mistral", tmp_path / "hf_mis", vocab=512, tokenizer=root / "tok"),
                           tmp_path / "mis", verify=False)["out"]
    hf_v = make_hf("llama3", tmp_path / "hf_v", vocab=640, tokenizer=root / "tok")
    other_vocab = import_hf(hf_v, tmp_path / "v640", verify=False)["out"]
    other_tok = tmp_path / "tok2"  # same size, two tokens' ids swapped
    shutil.copytree(C, other_tok)
    tj = other_tok / "release" / "tokenizer" / "tokenizer.json"
    t = json.loads(tj.read_text())
    vocab = t["model"]["vocab"]
    a, b = list(vocab)[300:302]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    tj.write_text(json.dumps(t))
    layout.write_manifest(other_tok / "release")
    damaged = tmp_path / "damaged"
    shutil.copytree(C, damaged)
    shard = max((damaged / "release").glob("*.distcp"), key=lambda p: p.stat().st_size)
    shard.write_bytes(shard.read_bytes()[:-100])
    exists = tmp_path / "exists"
    exists.mkdir()
    out = tmp_path / "out"
    cases = [
        (["--base", B, "--ckpt", other_arch, "--weight", "0.5"], "a different architecture"),
        (["--base", B, "--ckpt", other_vocab, "--weight", "0.5"], "vocabulary of 640 tokens but"),
        (["--base", B, "--ckpt", str(other_tok), "--weight", "0.5"], "maps tokens to other ids"),
        (["--base", B, "--ckpt", str(damaged), "--weight", "0.5"], "truncated or damaged"),
        (["--base", B, "--ckpt", C, "--weight", "1.5"], "must be in [0, 1]"),
        (["--base", B, "--ckpt", C, "--weight", "x"], "not a number"),
        (["--base", B, "--ckpt", C], "--base needs --weight"),
        (["--base", B, "--ckpt", C, C, "--weight", "0.5"], "exactly one --ckpt"),
        (["--ckpt", C], "averaging needs at least two"),
        (["--ckpt", B, C, "--weight", "0.5"], "--weight applies to --base"),
        (["--base", B, "--ckpt", str(tmp_path / "nope"), "--weight", "0.5"], "not found"),
    ]
    for argv, msg in cases:
        rc, line = _cli(["merge", *argv, "--out", str(out)], capsys)
        assert rc == 2 and msg in line, (argv, line)
        assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")], argv
    rc, line = _cli(["merge", "--base", B, "--ckpt", C, "--weight", "0.5", "--out", str(exists)], capsys)
    assert rc == 2 and "already exists; pass --overwrite" in line
    rc, line = _cli(["merge", "--base", B, "--ckpt", C, "--weight", "0.5", "--out", C, "--overwrite"], capsys)
    assert rc == 2 and "is one of the inputs" in line


# -- inputs saved in other layouts ---------------------------------------------------------------------------------
def _layout_worker(spec: dict) -> None:
    """torchrun world 2: save the C import as a trainer would in TP2 and in PP2 (model keys + an optimizer key)."""
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from cpt_megatron.checkpoint import arch_from_ckpt, layout, load_model_weights
    from cpt_megatron.model import ModelOptions, build_model
    from cpt_megatron.runtime import ParallelConfig, destroy_distributed, init_distributed

    src = Path(spec["src"])
    init_distributed(ParallelConfig(tp=2))
    try:
        for name, (tp, pp) in {"tp2": (2, 1), "pp2": (1, 2)}.items():
            parallel = ParallelConfig(tp=tp, pp=pp)
            init_distributed(parallel)  # the world exists: this sets up this layout's model-parallel groups
            chunks = build_model(arch_from_ckpt(src), parallel, ModelOptions(dtype="fp32", spec="local",
                                                                              initialize=False))
            load_model_weights(chunks, src)
            sd = {}
            for c in chunks:
                sd.update(c.sharded_state_dict())
            sd["optimizer"] = {"exp_avg": ShardedTensor.from_rank_offsets(
                "optimizer.state.exp_avg.embedding", torch.ones(7, 3), replica_id=int(os.environ["RANK"]))}
            it = Path(spec["out"]) / name / "checkpoints" / "iter_0000004"
            it.mkdir(parents=True, exist_ok=True)
            dist_checkpointing.save(sd, str(it))
            ps.destroy_model_parallel()
            if int(os.environ["RANK"]) == 0:
                rel = src / "release"
                shutil.copy2(rel / "cpt_meta.json", it / "cpt_meta.json")
                shutil.copytree(rel / "tokenizer", it / "tokenizer")
                layout.write_manifest(it)
                layout.write_tracker(it.parent, it.name)
    finally:
        destroy_distributed()


@pytest.mark.heavy  # ~60 s here (a 2-rank torchrun): `make test-all`
def test_inputs_saved_in_tp2_and_pp2_layouts(tmp_path_factory, capsys):
    """A 1100-token model: 1152 embedding rows at TP1, 1280 when a trainer saves it at TP2. Merging the TP1 base with
    the TP2- or PP2-saved C gives the same tensors as with the TP1 C (true rows); λ=1 is C's rows exactly."""
    from cpt_megatron.checkpoint import mapping
    from cpt_megatron.checkpoint.hf_import import import_hf

    root = tmp_path_factory.mktemp("merge_layouts")
    _tokenizer(root / "tok", vocab=512)
    hb = make_hf("qwen2", root / "hfB", vocab=1100, tokenizer=root / "tok")
    B = import_hf(hb, root / "B", verify=False)["out"]
    C = import_hf(_perturbed(hb, root / "hfC", 5), root / "C", verify=False)["out"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", __file__,
           json.dumps({"src": C, "out": str(root)})]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref = {}
    for lam in ("0.5", "1"):
        rc, line = _cli(["merge", "--base", B, "--ckpt", C, "--weight", lam, "--out", str(root / f"ref{lam}")], capsys)
        assert rc == 0, line
        ref[lam] = _tensors(root / f"ref{lam}")
    c_tp1 = _tensors(C)
    for name in ("tp2", "pp2"):
        run = root / name  # the run dir itself: resolved through checkpoints/latest_checkpointed_iteration.txt
        for lam in ("0.5", "1"):
            out = root / f"{name}_{lam}"
            rc, line = _cli(["merge", "--base", B, "--ckpt", str(run), "--weight", lam, "--out", str(out)], capsys)
            assert rc == 0, (name, line)
            got = _tensors(out)
            assert got.keys() == ref[lam].keys()
            for k, v in got.items():
                assert v.shape == ref[lam][k].shape  # the base's 1152 padded rows, whatever C's layout
                n = 1100 if k[0] in (mapping.EMBED_KEY, mapping.OUTPUT_KEY) else v.shape[0]
                assert torch.equal(v[:n], ref[lam][k][:n]), (name, lam, k)
                if lam == "1":
                    assert torch.equal(v[:n], c_tp1[k][:n]), (name, k)


# -- memory -------------------------------------------------------------------------------------------------------
_MEM_SCRIPT = r"""
import json, sys, threading, time
from pathlib import Path

def anon():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024

import torch
from cpt_megatron.checkpoint.merge import merge_checkpoints
from cpt_megatron.checkpoint.io import ckpt_tensor_keys, single_process_group
with single_process_group():  # warm up every import and code path the merge uses
    ckpt_tensor_keys(sys.argv[1])
peak, done = [anon()], threading.Event()
base = peak[0]
def sample():
    while not done.is_set():
        peak[0] = max(peak[0], anon())
        time.sleep(0.005)
th = threading.Thread(target=sample, daemon=True)
th.start()
merge_checkpoints([sys.argv[2]], sys.argv[3], base=sys.argv[1], weight=0.5)
done.set()
th.join()
print(json.dumps({"base": base, "peak": peak[0]}))
"""


@pytest.mark.heavy  # ~90 s here (two 169 MB imports and a merge in a child process): `make test-all`
def test_peak_memory_is_bounded_by_the_largest_tensor_not_the_model(tmp_path, capsys):
    """A 48-layer model of 169 MB per checkpoint (largest tensor, one layer's fc1, 1.6 MB): the merge's anonymous RSS
    grows by far less than one model. Measured: +23.8 MB at 48 layers, +22.5 MB at 24 layers (85 MB): ~5 MB while
    merging, the rest megatron's writer; without the per-tensor heap trim glibc keeps ~1/4 of the bytes read."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from cpt_megatron.checkpoint.hf_import import import_hf

    _tokenizer(tmp_path / "tok", vocab=512)
    cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=800, num_hidden_layers=48,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256, bos_token_id=0,
                      eos_token_id=0, tie_word_embeddings=True)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(tmp_path / "hfB")
    for f in (tmp_path / "tok").iterdir():
        shutil.copy2(f, tmp_path / "hfB" / f.name)
    B = import_hf(tmp_path / "hfB", tmp_path / "B", verify=False)
    C = import_hf(_perturbed(tmp_path / "hfB", tmp_path / "hfC", 7), tmp_path / "C", verify=False)["out"]
    model_bytes = B["bytes"]
    assert model_bytes > 160e6
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.run([sys.executable, "-c", _MEM_SCRIPT, B["out"], C, str(tmp_path / "M")], capture_output=True,
                          text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    grown = r["peak"] - r["base"]
    print(f"model {model_bytes / 1e6:.1f} MB, anon RSS grew {grown / 1e6:.1f} MB")
    assert grown < 0.25 * model_bytes, (grown, model_bytes)


if __name__ == "__main__":  # torchrun worker of test_inputs_saved_in_tp2_and_pp2_layouts
    _layout_worker(json.loads(sys.argv[1]))


# -- cpt select --merge-grid ------------------------------------------------------------------------------------
# λ: (domain ppl, general ppl); base 20 / 10. Budget 4% (the run's eval.monitor.act): 0.75 (+6%) and 1 (+10%) are
# over it; 0.25 (+15% gain, +3% regression) is dominated by 0.5 (+25% gain, +2.5%): the pick is λ = 0.5.
GRID = {0.0: (20.0, 10.0), 0.25: (17.0, 10.3), 0.5: (15.0, 10.25), 0.75: (14.0, 10.6), 1.0: (13.5, 11.0)}


def _fake_run(root: Path, ckpt: Path) -> Path:
    run = root / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copytree(layout_folder(ckpt), run / "checkpoints" / "iter_0000008")
    (run / "checkpoints" / "latest_checkpointed_iteration.txt").write_text("8")
    (run / "config.yaml").write_text("eval:\n  interval: 4\n  monitor: {policy: warn, warn: 0.02, act: 0.04}\n")
    return run


def layout_folder(ckpt: Path) -> Path:
    from cpt_megatron.checkpoint import layout

    return layout.resolve(ckpt)


def _constructed_evaluate(base: Path, calls: list):
    from cpt_megatron.checkpoint.io import read_meta

    def evaluate(path) -> dict:
        merge = read_meta(path).get("merge")
        lam = merge["weight"] if merge else (0.0 if Path(path).resolve() == layout_folder(base).resolve() else 1.0)
        calls.append(lam)
        dom, gen = GRID[lam]
        return {"med": {"group": "domain", "ppl": dom}, "wiki": {"group": "general", "ppl": gen}}
    return evaluate


def test_select_merge_grid_picks_on_the_pareto_front_under_the_budget(models, tmp_path):
    from cpt_megatron.checkpoint.io import read_meta
    from cpt_megatron.eval.select import select_merge

    d = models["smollm2"]
    run = _fake_run(tmp_path, d["C"])
    calls = []
    res = select_merge(run, base=d["B"], grid=[0.25, 0.5, 0.75], evaluate=_constructed_evaluate(d["B"], calls))
    assert sorted(calls) == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert res["max_general_regression"] == 0.04 and res["lambda"] == 0.5  # the recipe's budget
    by = {c["lambda"]: c for c in res["candidates"]}
    assert by[0.5]["domain_gain"] == pytest.approx(0.25) and by[0.5]["general_regression"] == pytest.approx(0.025)
    assert {k for k, c in by.items() if c["pareto"]} == {0.0, 0.5, 0.75, 1.0}
    assert {k for k, c in by.items() if c["feasible"]} == {0.0, 0.25, 0.5}
    best = Path(res["best"])
    assert read_meta(best)["merge"]["weight"] == 0.5 and best.is_relative_to(run / "merges")
    assert (run / "best_merge").read_text().strip() == str(best)
    assert "| 0.5 | +25.00% | +2.50% |" in (run / "merge_selection.md").read_text()
    assert (run / "merge_selection.png").stat().st_size > 1000
    assert json.loads((run / "merge_selection.json").read_text())["lambda"] == 0.5
    # a re-run reuses the merges; a looser budget picks the checkpoint itself, a tighter one nothing (no files)
    stamp = (best / "cpt_manifest.json").stat().st_mtime_ns
    res = select_merge(run, base=d["B"], grid=[0.5, 0.75, 0.25], evaluate=_constructed_evaluate(d["B"], []),
                       max_general_regression=0.1)
    assert res["lambda"] == 1.0 and (best / "cpt_manifest.json").stat().st_mtime_ns == stamp
    (run / "best_merge").unlink()
    res = select_merge(run, base=d["B"], grid=[0.5], evaluate=_constructed_evaluate(d["B"], []),
                       max_general_regression=0.01)
    assert res["best"] is None and not (run / "best_merge").exists()


def test_select_merge_grid_cli_scores_real_text(models, tmp_path, capsys):
    """End to end through `cpt select --merge-grid`: real merges, real perplexities on held-out files; λ=0 is the
    baseline (gain 0, regression 0), gains/regressions are the relative perplexity changes, the pick is the best
    feasible point of the front; bad grids are one line. (The noisy C plays the base, B the checkpoint.)"""
    d = models["smollm2"]
    run = _fake_run(tmp_path, d["B"])
    words = ["kalomiter", "zupre", "stedbane", "anoqu", "terzu", "mive"]
    (tmp_path / "dom.txt").write_text(" ".join(words[i % 6] for i in range(3000)))
    (tmp_path / "gen.txt").write_text(" ".join(words[(i * 7) % 5] + "ing" for i in range(3000)))
    argv = ["select", "--run", str(run), "--base", str(d["C"]), "--domain-data", str(tmp_path / "dom.txt"),
            "--general-data", str(tmp_path / "gen.txt"), "--seq-len", "64", "--max-tokens", "512",
            "--max-general-regression", "10", "--json"]
    rc, line = _cli(argv + ["--merge-grid", "0.5"], capsys)
    assert rc == 0, line
    res = json.loads(line)
    by = {c["lambda"]: c for c in res["candidates"]}
    assert sorted(by) == [0.0, 0.5, 1.0]
    assert by[0.0]["domain_gain"] == 0 and by[0.0]["general_regression"] == 0
    assert by[0.5]["results"]["dom"]["group"] == "domain" and by[0.5]["results"]["gen"]["group"] == "general"
    for c in by.values():
        b, r = by[0.0]["results"], c["results"]
        assert c["domain_gain"] == pytest.approx((b["dom"]["ppl"] - r["dom"]["ppl"]) / b["dom"]["ppl"])
        assert c["general_regression"] == pytest.approx((r["gen"]["ppl"] - b["gen"]["ppl"]) / b["gen"]["ppl"])
    assert by[0.5]["results"]["dom"]["ppl"] != by[1.0]["results"]["dom"]["ppl"]
    ok = [c for c in by.values() if c["pareto"] and c["lambda"] > 0]
    assert ok and res["lambda"] == max(ok, key=lambda c: c["domain_gain"])["lambda"]
    for grid, msg in (("0,0.5", "strictly between 0 and 1"), ("0.5,2", "must be in [0, 1]"), ("a", "not a number")):
        rc, line = _cli(argv + ["--merge-grid", grid], capsys)
        assert rc == 2 and msg in line, (grid, line)
    rc, line = _cli(["select", "--run", str(run), "--merge-grid", "0.5", "--base", str(d["C"])], capsys)
    assert rc == 2 and "needs --domain-data" in line


@pytest.mark.heavy  # 7 min on the loaded dev box (prepare, two short trainings): `make test-all`
def test_cpt_train_continues_from_a_merge(tiny_cpu_cache, tmp_path, capsys):
    """tiny_cpu trained 4 steps, merged half-way with its base, is a `model.base` `cpt prepare` / `cpt train` accept;
    the merge's step-0 evaluation lies between the base's and the checkpoint's on the domain source."""
    from tests.conftest import cpt_train

    run = tmp_path / "run"
    cpt_train(run, tiny_cpu_cache, "train.max_steps=4")
    base = json.loads(sorted((tiny_cpu_cache / "prepared").glob("*.json"))[-1].read_text())["base"]
    merged = tmp_path / "merged"
    rc, line = _cli(["merge", "--base", base, "--ckpt", str(run), "--weight", "0.5", "--out", str(merged)], capsys)
    assert rc == 0, line
    run2 = tmp_path / "run2"
    cpt_train(run2, tiny_cpu_cache, "train.max_steps=2", "model.hf_config=null", f"model.base={merged}")
    ev = [json.loads(x) for x in (run.joinpath("evals.jsonl")).read_text().splitlines()]
    ev2 = [json.loads(x) for x in (run2.joinpath("evals.jsonl")).read_text().splitlines()]
    dom = lambda e: e["results"]["stdlib"]["ppl"]  # noqa: E731
    start, end, mid = dom(ev[0]), dom(ev[-1]), dom(ev2[0])
    assert min(start, end) < mid < max(start, end), (start, mid, end)


@pytest.mark.heavy  # ~55 s on the loaded dev box (two Megatron-LM-style saves, an export with parity): `make test-all`
def test_average_of_megatron_lm_saves(tmp_path_factory, capsys):
    """Checkpoints Megatron-LM's pretrain_gpt.py saved (common.pt args, no cpt_meta.json; one fp32, one bf16 with the
    distributed optimizer) average in fp32; the merge carries their tokenizer and exports with transformers parity."""
    from tests.test_megatron_lm import base as mlm_base
    from tests.test_megatron_lm import save_like_megatron_lm

    b = mlm_base.__wrapped__(tmp_path_factory)
    root = b["root"]
    save_like_megatron_lm(b["ours"], root / "s32", tokenizer=str(b["tok"]))
    save_like_megatron_lm(b["ours"], root / "s16", bf16=True, dist_opt=True, tokenizer=str(b["tok"]))
    out = root / "avg"
    rc, line = _cli(["merge", "--ckpt", str(root / "s32"), str(root / "s16"), "--out", str(out), "--json"], capsys)
    assert rc == 0, line
    assert json.loads(line)["dtype"] == "float32"
    got, a, c = _tensors(out), _tensors(root / "s32"), _tensors(root / "s16")
    assert c[("embedding.word_embeddings.weight", None)].dtype == torch.bfloat16
    for k, v in got.items():
        assert torch.equal(v, a[k].float() * 0.5 + c[k].float() * 0.5), k
    from cpt_megatron.checkpoint.hf_export import export_hf

    res = export_hf(out, root / "hf_avg")
    assert res["vocab_size"] == 512 and res["verify"]["max_abs_diff"] <= 1e-4
