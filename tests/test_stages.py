"""train.stages (train/stages.py): a new-vocab-rows stage leaves every old row and every other tensor
bit-identical to the base (TP1; TP2, PP2, DP2 + distributed optimizer in the heavy tests), moves the new
rows, and a run resumed exactly at the stage boundary equals the uninterrupted one bit for bit."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import cpt_train

NEW = (25000, 50257)  # "added" rows of the tiny base: across the TP2 shard boundary (50304 / 2 = 25152), with EOD
STAGED = "train.stages=[{until: 0.5, trainable: new_vocab_rows, lr: 0.003}, {until: 1.0, trainable: all}]"
ONLY_NEW = "train.stages=[{until: 1.0, trainable: new_vocab_rows}]"
VOCAB_KEYS = ("embedding.word_embeddings.weight", "output_layer.weight")


def _with_new_rows(cache, stem: str, tmp_path_factory) -> Path:
    """A copy of the prepared random base `stem` with resize metadata saying rows NEW were added (what
    `cpt resize-embeddings` writes)."""
    from cpt_megatron.checkpoint import layout

    src = next(p for p in (cache / "models").glob(f"random-{stem}-*") if not p.name.endswith("-hf"))
    dst = tmp_path_factory.mktemp("stages") / "base"
    shutil.copytree(src, dst)
    meta_path = dst / "release" / "cpt_meta.json"
    meta = json.loads(meta_path.read_text())
    meta["tokenizer_extension"] = {"base_vocab_size": NEW[0], "vocab_size": NEW[1], "new_rows": list(NEW)}
    meta_path.write_text(json.dumps(meta))
    layout.write_manifest(dst / "release")
    return dst


@pytest.fixture(scope="module")
def resized(tiny_cpu_cache, tmp_path_factory) -> Path:
    return _with_new_rows(tiny_cpu_cache, "tiny_llama", tmp_path_factory)


@pytest.fixture(scope="module")
def resized_tied(tiny_cpu_cache, tmp_path_factory) -> Path:
    """SmolLM2-style tied embeddings: with PP2 the first stage's embedding and the last stage's output layer."""
    from conftest import cpt_prepare

    cfg = json.loads((Path(__file__).resolve().parents[1] / "recipes/models/tiny_llama.json").read_text())
    path = tmp_path_factory.mktemp("tied") / "tiny_llama_tied.json"
    path.write_text(json.dumps({**cfg, "tie_word_embeddings": True}))
    cpt_prepare(tiny_cpu_cache, f"model.hf_config={path}")
    return _with_new_rows(tiny_cpu_cache, "tiny_llama_tied", tmp_path_factory)


def _train(run_dir, cache, base, *ov, nproc=1):
    return cpt_train(run_dir, cache, "model.hf_config=null", f"model.base={base}", "optim.weight_decay=0.1",
                     "checkpoint.save_interval=2", "eval.interval=null", *ov, nproc=nproc)


def _tensors(ckpt, optimizer: bool = False) -> dict:
    from cpt_megatron.checkpoint import io

    with io.single_process_group():
        md = io.ckpt_tensor_keys(ckpt)
        return {k: io.read_ckpt_tensor(ckpt, k, md[k], None) for k in md
                if "_extra_state" not in k and optimizer == k.startswith("optimizer.")}


def assert_only_new_rows_moved(ckpt, base) -> None:
    before, after = _tensors(Path(base) / "release"), _tensors(ckpt)
    assert set(before) == set(after), sorted(set(before) ^ set(after))
    for k, w0 in before.items():
        w = after[k]
        w0 = w0.to(w.dtype)  # bf16 training starts from the base cast to bf16
        if k in VOCAB_KEYS:
            lo, hi = NEW
            # TP2 pads the vocab to a multiple of 128 x tp: its extra padding rows are zero, and stay so
            assert not w[len(w0):].any(), k
            w = w[:len(w0)]
            assert torch.equal(w[:lo], w0[:lo]), (k, (w[:lo] != w0[:lo]).any(1).nonzero()[:5].flatten().tolist())
            assert torch.equal(w[hi:], w0[hi:]), k  # padding rows are not new rows
            moved = (w[lo:hi] != w0[lo:hi]).any(1)
            assert moved.any(), k
            if k == "output_layer.weight":  # every output row gets a softmax gradient
                assert moved.all(), (k, int(moved.sum()))
        else:
            assert torch.equal(w, w0), k
    moments = _tensors(ckpt, optimizer=True)  # no optimizer drift on frozen rows: their moments stayed zero
    for k, m in moments.items():
        main = next((k.removeprefix(p) for p in ("optimizer.state.param.", "optimizer.state.fp32_param.")
                     if k.startswith(p)), None)
        if main is not None:  # fp32 main params (distributed optimizer, bf16): the weights they are copied to,
            assert torch.equal(m.to(after[main].dtype), after[main]), k  # and frozen parts exactly the base's
            w0 = before[main].to(after[main].dtype).to(m.dtype)
            if main in VOCAB_KEYS:
                m = m[:len(w0)]
                assert torch.equal(m[:NEW[0]], w0[:NEW[0]]) and torch.equal(m[NEW[1]:], w0[NEW[1]:]), k
            else:
                assert torch.equal(m, w0), k
        elif k.endswith(VOCAB_KEYS):
            assert not m[:NEW[0]].any() and not m[NEW[1]:].any(), k
            assert m[NEW[0]:NEW[1]].any(), k
        else:
            assert not m.any(), k


# ---- config and schedule ------------------------------------------------------------------------------------
def test_stage_config_errors():
    from cpt_megatron.config import load_recipe
    from cpt_megatron.errors import CptError

    for bad, msg in ((["train.stages=[{until: 0.5, trainable: new_vocab_rows}]"], "last must be 1.0"),
                     (["train.stages=[{until: 0.6}, {until: 0.4}, {until: 1.0}]"], "must increase"),
                     (["train.stages=[{until: 1.0, trainable: lm_head}]"], "'lm_head' is not one of"),
                     (["train.stages=[{until: 1.0, trainable: 'layers:3-1'}]"], "A <= B"),
                     (["train.stages=[{until: 1.0, lr: -1}]"], "lr=-1.0 must be > 0")):
        with pytest.raises(CptError, match=msg):
            load_recipe("tiny_cpu", bad)
    cfg = load_recipe("tiny_cpu", ["train.stages=[{until: 0.25, trainable: 'new_vocab_rows,layers:0-1'}, {until: 1}]"])
    assert [s.trainable for s in cfg.train.stages] == ["new_vocab_rows,layers:0-1", "all"]


def test_stage_of_step_and_lr():
    from cpt_megatron.config import StageConfig
    from cpt_megatron.train.stages import StageSchedule

    sch = StageSchedule([StageConfig(until=0.05, trainable="new_vocab_rows", lr=2e-3), StageConfig(until=1.0)], 40)
    assert [sch.at(k).index for k in range(40)] == [0, 0] + [1] * 38  # round(0.05 * 40) = 2 steps
    assert sch.at(1).trainable == ("new_vocab_rows",) and sch.at(2).trainable == ("all",)
    assert sch.lr_factor(0, 1e-3) == pytest.approx(2.0) and sch.lr_factor(2, 1e-3) == 1.0


def test_trainable_intervals_per_tp_rank():
    """Vocab-parallel rows: each TP rank trains its own slice of the new rows (global ids -> local rows)."""
    from cpt_megatron.train.stages import trainable_intervals

    class Chunk(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embedding = torch.nn.Module()
            self.embedding.word_embeddings = torch.nn.Embedding(10, 3)  # a TP shard: 10 of 20 padded rows
            self.other = torch.nn.Linear(3, 3)

    c = Chunk()
    emb = c.embedding.word_embeddings.weight
    for rank, want in ((0, [(8 * 3, 10 * 3)]), (1, [(0, 5 * 3)])):
        ivs = trainable_intervals([c], ("new_vocab_rows",), (8, 15), rank)
        assert ivs[emb] == want and ivs[c.other.weight] == [], (rank, ivs[emb])
    assert trainable_intervals([c], ("embeddings",), (8, 15), 0)[emb] is None
    assert trainable_intervals([c], ("new_vocab_rows",), (0, 8), 1)[emb] == []  # none of rank 1's rows is new


def test_trainable_layer_range_uses_global_layer_numbers():
    """layers:A-B counts global layers (megatron's 1-based layer_number, offset on later PP stages)."""
    from cpt_megatron.train.stages import trainable_intervals

    class Layer(torch.nn.Linear):
        def __init__(self, number):
            super().__init__(2, 2, bias=False)
            self.layer_number = number

    chunk = torch.nn.Module()  # a second PP stage holding global layers 2 and 3 (layer_number 3, 4)
    chunk.decoder = torch.nn.Module()
    chunk.decoder.layers = torch.nn.ModuleList([Layer(3), Layer(4)])
    ivs = trainable_intervals([chunk], ("layers:3-3",), None, 0)
    assert [ivs[layer.weight] for layer in chunk.decoder.layers] == [[], None]


def test_new_rows_stage_needs_resize_metadata(tiny_cpu_cache, tmp_path):
    out = cpt_train(tmp_path / "run", tiny_cpu_cache, ONLY_NEW, "train.max_steps=1", expect=2)
    assert "has no tokenizer_extension metadata" in out["stderr"] and "Traceback" not in out["stderr"]


def test_layer_range_must_exist():
    from cpt_megatron.config import StageConfig
    from cpt_megatron.errors import CptError
    from cpt_megatron.train.stages import check_stages

    check_stages([StageConfig(until=1.0, trainable="layers:2-3")], {}, "base", 4)
    with pytest.raises(CptError, match=r"layers:2-4.*the model has layers 0-3"):
        check_stages([StageConfig(until=1.0, trainable="layers:2-4")], {}, "base", 4)


# ---- real training runs --------------------------------------------------------------------------------------
def test_new_rows_stage_freezes_everything_else(resized, tiny_cpu_cache, tmp_path):
    """2 steps of new_vocab_rows (weight decay 0.1, stage lr 3 x optim.lr) then 1 of all: the step-2 checkpoint
    differs from the base only in the new rows (weights and Adam moments); the stage is in the metrics."""
    _train(tmp_path / "run", tiny_cpu_cache, resized, "train.max_steps=3", STAGED)
    ckpts = tmp_path / "run" / "checkpoints"
    assert_only_new_rows_moved(ckpts / "iter_0000002", resized)
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["stage"] for m in metrics] == [0, 0, 1]
    # stage 1: lr 3e-3 = 3 x optim.lr on the schedule (warmup 2: 0.5 x at step index 1); stage 2 (last step): min_lr
    assert metrics[1]["lr"] == pytest.approx(1.5e-3) and metrics[2]["lr"] == pytest.approx(1e-4)
    after, base = _tensors(ckpts / "iter_0000003"), _tensors(resized / "release")
    assert not torch.equal(after["decoder.final_layernorm.weight"], base["decoder.final_layernorm.weight"])


@pytest.mark.heavy
@pytest.mark.parametrize("opt", [[], ["parallel.distributed_optimizer=true"]], ids=["plain", "distributed_optimizer"])
def test_resume_at_stage_boundary_is_exact(resized, tiny_cpu_cache, tmp_path, opt):
    """The staged run stopped at the boundary (step 2) and resumed equals the uninterrupted one bit for bit at
    step 4: weights, Adam state (restarted at the boundary) and every loss; also with the distributed optimizer
    (torch Adam), whose resume megatron-core 0.16.1 failed (Engine.load_optimizer_state)."""
    full = _train(tmp_path / "full", tiny_cpu_cache, resized, "train.max_steps=4", STAGED, *opt)
    for _ in range(2):  # stop at the boundary (exit_interval), then resume into stage 2
        _train(tmp_path / "resumed", tiny_cpu_cache, resized, "train.max_steps=4", "train.exit_interval=2", STAGED,
               *opt)
    a_dir, b_dir = (tmp_path / r / "checkpoints" / "iter_0000004" for r in ("full", "resumed"))
    for opt in (False, True):
        a, b = _tensors(a_dir, opt), _tensors(b_dir, opt)
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    ma, mb = ([json.loads(x) for x in (tmp_path / r / "metrics.jsonl").read_text().splitlines()]
              for r in ("full", "resumed"))
    assert [m["loss"] for m in mb] == [m["loss"] for m in ma] == full["losses"]
    assert [m["stage"] for m in mb] == [0, 0, 1, 1]


LAYOUTS = {"tp2": (["parallel.tp=2"], 2), "pp2": (["parallel.pp=2"], 2),
           "dp2_distributed_optimizer": (["parallel.distributed_optimizer=true"], 2),
           "bf16": (["model.options.dtype=bf16"], 1)}  # megatron's Float16Optimizer: fp32 main copies


@pytest.mark.heavy
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_new_rows_stage_exact_in_layout(name, resized, tiny_cpu_cache, tmp_path):
    flags, nproc = LAYOUTS[name]
    _train(tmp_path / "run", tiny_cpu_cache, resized, "train.max_steps=2", ONLY_NEW, *flags, nproc=nproc)
    assert_only_new_rows_moved(tmp_path / "run" / "checkpoints" / "iter_0000002", resized)


@pytest.mark.heavy
def test_new_rows_stage_exact_tied_pp2(resized_tied, tiny_cpu_cache, tmp_path):
    _train(tmp_path / "run", tiny_cpu_cache, resized_tied, "train.max_steps=2", ONLY_NEW, "parallel.pp=2", nproc=2)
    assert_only_new_rows_moved(tmp_path / "run" / "checkpoints" / "iter_0000002", resized_tied)
