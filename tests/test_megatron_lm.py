"""Megatron-LM interop (issue 15): our checkpoints read the way Megatron-LM's loader reads them, and
checkpoints laid out exactly as Megatron-LM's `save_checkpoint` writes them (tracker, iter folder, common.pt
with an argparse.Namespace `args`, optimizer / scheduler / RNG entries; fp32, bf16 + distributed optimizer,
TP2, PP2) export to HF with logits matching the checkpoint's model within 1e-5.

Facts of the format (Megatron-LM core_v0.16.1 megatron/training/checkpointing.py): SAVE/
latest_checkpointed_iteration.txt holds the bare iteration or "release"; SAVE/iter_%07d/ is a megatron-core
torch_dist checkpoint of generate_state_dict(): {'args', 'checkpoint_version': 3.0, 'iteration',
'model' (GPTModel.sharded_state_dict()), 'optimizer' (optimizer.sharded_state_dict(state_dict, metadata)),
'opt_param_scheduler', 'rng_state' (ShardedObject (pp, tp) -> [rng dict]), 'num_floating_point_operations_so_far'}
saved with content_metadata {'distrib_optim_sharding_type': 'dp_reshardable', ...}.
Multi-rank saves run this file as a torchrun worker (`__main__`).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_checkpoint import _tokenizer, make_hf

TOL = 1e-5


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny Llama-3 (GQA, llama3 rope scaling, untied) HF model, its tokenizer and its `cpt import-hf`."""
    from cpt_megatron.checkpoint.hf_import import import_hf

    root = tmp_path_factory.mktemp("mlm")
    _tokenizer(root / "tok")
    hf = make_hf("llama3", root / "hf", vocab=1000, tokenizer=root / "tok")
    cfg = json.loads((hf / "config.json").read_text())
    for key in ("rope_scaling", "rope_parameters"):  # megatron-core's fixed llama3 value (transformers 4 / 5)
        if isinstance(cfg.get(key), dict) and "original_max_position_embeddings" in cfg[key]:
            cfg[key]["original_max_position_embeddings"] = 8192
    (hf / "config.json").write_text(json.dumps(cfg))
    import_hf(hf, root / "ours", verify=False)
    return {"root": root, "hf": hf, "tok": root / "tok", "ours": root / "ours"}


def megatron_lm_args(*, tp: int, pp: int, bf16: bool, dist_opt: bool, tokenizer: str, iteration: int):
    """A Namespace as pretrain_gpt.py builds it for this Llama (the names its arguments.py stores)."""
    return argparse.Namespace(
        num_layers=4, hidden_size=64, ffn_hidden_size=160, num_attention_heads=4, group_query_attention=True,
        num_query_groups=2, kv_channels=16, max_position_embeddings=256, seq_length=64,
        position_embedding_type="rope", use_rotary_position_embeddings=False, add_position_embedding=True,
        rotary_base=500000, rotary_percent=1.0, rotary_interleaved=False, use_rope_scaling=True,
        rope_scaling_factor=8.0, normalization="RMSNorm", layernorm_epsilon=1e-6, swiglu=True,
        add_bias_linear=False, add_qkv_bias=False, qk_layernorm=False, untie_embeddings_and_output_weights=True,
        apply_layernorm_1p=False, num_experts=None, make_vocab_size_divisible_by=128, padded_vocab_size=1024,
        vocab_size=None, tokenizer_type="HuggingFaceTokenizer", tokenizer_model=tokenizer, bf16=bf16, fp16=False,
        params_dtype=torch.bfloat16 if bf16 else torch.float32, tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp, virtual_pipeline_model_parallel_size=None, use_distributed_optimizer=dist_opt,
        ckpt_format="torch_dist", iteration=iteration, consumed_train_samples=iteration * 8, world_size=tp * pp,
        data_parallel_size=1, lr=3e-4, min_lr=3e-5, train_iters=100, global_batch_size=8, micro_batch_size=1,
        no_save_optim=None, no_save_rng=None, save="/somewhere/else", load=None,
    )


def save_like_megatron_lm(ours: Path, save: Path, *, tp=1, pp=1, bf16=False, dist_opt=False, iteration=7,
                          tokenizer: str) -> None:
    """Collective: one Megatron-LM torch_dist save (our base's weights, perturbed) at `save`."""
    from megatron.core import dist_checkpointing, tensor_parallel
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    from cpt_megatron.checkpoint import arch_from_ckpt, load_model_weights
    from cpt_megatron.config import OptimConfig
    from cpt_megatron.model import ModelOptions, build_model
    from cpt_megatron.runtime import ParallelConfig, destroy_distributed, init_distributed
    from cpt_megatron.train.engine import Engine

    parallel = ParallelConfig(tp=tp, pp=pp, distributed_optimizer=dist_opt)
    init_distributed(parallel, seed=1)
    try:
        chunks = build_model(arch_from_ckpt(ours), parallel, ModelOptions(dtype="bf16" if bf16 else "fp32",
                                                                        spec="local"))
        load_model_weights(chunks, ours)
        with torch.no_grad():  # a "trained" model: different from the base, deterministic across ranks
            g = torch.Generator().manual_seed(3)
            for c in chunks:
                for _, p in sorted(c.named_parameters()):
                    p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * 0.01)
        engine = Engine(chunks, parallel, OptimConfig(), seq_len=16, micro_batch=1)
        t = torch.randint(0, 512, (1, 17), generator=torch.Generator().manual_seed(5))
        engine.train_step([{"tokens": t[:, :-1], "labels": t[:, 1:]}])  # optimizer state exists, as after iter 1
        meta = {"distrib_optim_sharding_type": "dp_reshardable", "singleton_local_shards": False,
                "chained_optim_avoid_prefix": True}
        args = megatron_lm_args(tp=tp, pp=pp, bf16=bf16, dist_opt=dist_opt, tokenizer=tokenizer, iteration=iteration)
        sd = {"args": args, "checkpoint_version": 3.0, "iteration": iteration,
              "model": engine.chunks[0].sharded_state_dict(metadata=dict(meta))}  # unwrap_model(model)
        sd["optimizer"] = engine.optimizer.sharded_state_dict(sd, metadata=dict(meta))
        sd["opt_param_scheduler"] = {"max_lr": 3e-4, "min_lr": 3e-5, "num_steps": iteration * 8,
                                     "lr_warmup_steps": 0, "lr_decay_steps": 800, "lr_decay_style": "cosine"}
        rng = {"random_rng_state": random.getstate(), "np_rng_state": np.random.get_state(),
               "torch_rng_state": torch.get_rng_state(), "cuda_rng_state": None,
               "rng_tracker_states": tensor_parallel.get_cuda_rng_tracker().get_states()}
        sd["rng_state"] = ShardedObject("rng_state", [rng], (pp, tp), (ps.get_pipeline_model_parallel_rank(),
                                        ps.get_tensor_model_parallel_rank()), replica_id=ps.get_data_parallel_rank())
        sd["num_floating_point_operations_so_far"] = 12345.0
        folder = save / f"iter_{iteration:07d}"
        if torch.distributed.get_rank() == 0:
            folder.mkdir(parents=True, exist_ok=True)
        torch.distributed.barrier()
        dist_checkpointing.save(sd, str(folder), content_metadata=meta)
        torch.distributed.barrier()
        if torch.distributed.get_rank() == 0:
            (save / "latest_checkpointed_iteration.txt").write_text(str(iteration))
    finally:
        destroy_distributed()


def _export_and_check(save: Path, out: Path, **kw) -> dict:
    from cpt_megatron.checkpoint.hf_export import export_hf

    res = export_hf(save, out, verify_tol=TOL, **kw)
    assert res["verify"]["max_abs_diff"] <= TOL and res["verify"]["top1_agreement"] == 1.0, res["verify"]
    return res


# -- what `cpt import-hf` writes, read the way Megatron-LM's load_checkpoint reads it ------------------------
def test_import_loads_like_megatron_lm(base):
    from megatron.core import dist_checkpointing

    from cpt_megatron.checkpoint import mapping
    from cpt_megatron.checkpoint.io import HFReader, single_process_group
    from cpt_megatron.model.arch import ModelArch

    root = base["ours"]
    tracker = (root / "latest_checkpointed_iteration.txt").read_text()  # read_metadata(): "release" or an int
    assert tracker == "release"
    folder = root / "release"  # get_checkpoint_name(load_dir, 0, release=True, return_base_dir=True)
    common = torch.load(folder / "common.pt", map_location="cpu", weights_only=True)  # megatron safe globals
    assert common["checkpoint_version"] == 3.0 and common["iteration"] == 0
    a = common["args"]
    assert isinstance(a, argparse.Namespace)
    want = dict(num_layers=4, hidden_size=64, ffn_hidden_size=160, num_attention_heads=4, group_query_attention=True,
                num_query_groups=2, kv_channels=16, normalization="RMSNorm", layernorm_epsilon=1e-6, swiglu=True,
                add_bias_linear=False, add_qkv_bias=False, position_embedding_type="rope", rotary_base=500000,
                use_rope_scaling=True, rope_scaling_factor=8.0, untie_embeddings_and_output_weights=True,
                make_vocab_size_divisible_by=128, padded_vocab_size=1024, max_position_embeddings=256,
                tensor_model_parallel_size=1, pipeline_model_parallel_size=1, add_position_embedding=True,
                use_rotary_position_embeddings=False,
                tokenizer_type="HuggingFaceTokenizer", ckpt_format="torch_dist")
    assert {k: getattr(a, k) for k in want} == want
    assert a.tokenizer_model == str((folder / "tokenizer").resolve())
    # every sharded key of the model Megatron-LM builds from these args, with its global shape and values
    arch = ModelArch.from_hf_config(json.loads((base["hf"] / "config.json").read_text()))
    reader = HFReader(base["hf"])
    with single_process_group():
        md = dist_checkpointing.load_tensors_metadata(str(folder))
        specs = mapping.megatron_specs(arch, a.padded_vocab_size)
        assert {s.key for s in specs} | {k for k in md if k.endswith("_extra_state")} >= set(md)
        for spec in specs:
            assert spec.key in md, spec.key
            n_layers = (a.num_layers,) if spec.layer is not None else ()
            assert tuple(md[spec.key].global_shape) == n_layers + spec.shape, spec.key
            from cpt_megatron.checkpoint.io import read_ckpt_tensor

            got = read_ckpt_tensor(folder, spec.key, md[spec.key], spec.layer)
            assert torch.equal(got, mapping.to_megatron(arch, spec, reader.get, a.padded_vocab_size)), spec
    assert (folder / "cpt_meta.json").is_file() and (folder / "cpt_manifest.json").is_file()


def test_megatron_args_flags(base, capsys):
    from cpt_megatron.cli import main

    assert main(["megatron-args", "--ckpt", str(base["ours"]), "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    line = res["command_line"]
    for flag in ("--num-layers 4", "--hidden-size 64", "--ffn-hidden-size 160", "--num-attention-heads 4",
                 "--group-query-attention --num-query-groups 2", "--kv-channels 16", "--position-embedding-type rope",
                 "--rotary-base 500000", "--use-rope-scaling --rope-scaling-factor 8", "--normalization RMSNorm",
                 "--norm-epsilon 1e-06", "--swiglu", "--disable-bias-linear", "--untie-embeddings-and-output-weights",
                 "--make-vocab-size-divisible-by 128", "--ckpt-format torch_dist", "--exit-on-missing-checkpoint",
                 f"--load {base['ours'].resolve()}", "--finetune",
                 f"--tokenizer-model {(base['ours'] / 'release' / 'tokenizer').resolve()}"):
        assert flag in line, flag
    assert "--add-qkv-bias" not in line
    text = (base["ours"] / "release" / "megatron_args.txt").read_text()
    assert "--num-query-groups 2 \\\n" in text and "--exit-on-missing-checkpoint" in text


# -- ... and accepted by Megatron-LM's load_checkpoint with and without --finetune (issue 28 item 4) --------------
# Facts of Megatron-LM core_v0.16.1 (read, not imported: megatron.training is not installed here):
# - load_checkpoint (checkpointing.py l. 1746) calls check_checkpoint_args(state_dict['args']) unless --finetune.
# - check_checkpoint_args (l. 102) asserts equality, with the message below, of num_layers, hidden_size,
#   num_attention_heads and add_position_embedding (checkpoint default True); with args.vocab_file (GPT2BPE /
#   BERT tokenizers; HuggingFaceTokenizer has none) also max_position_embeddings, make_vocab_size_divisible_by,
#   tokenizer_type (padded_vocab_size only without a dist checkpoint); data_parallel_random_init when the run
#   sets it; tensor/pipeline sizes only for checkpoint_version >= 3 without a dist checkpoint (torch format).
# - arguments.py l. 1674: `--no-position-embedding` is store_false into add_position_embedding (default True);
#   `--position-embedding-type rope` leaves it True. l. 1652: `--use-rotary-position-embeddings` is a deprecated
#   store_true (default False). l. 1655: `--rotary-base` is type=int.
# - release folders and --no-load-optim / --no-load-rng skip optimizer, scheduler and RNG (l. 1785, 1841).
_MLM_COMPARED = [("num_layers", None), ("hidden_size", None), ("num_attention_heads", None),
                 ("add_position_embedding", True)]
_MLM_VOCAB_FILE_COMPARED = ["max_position_embeddings", "make_vocab_size_divisible_by", "tokenizer_type"]


def megatron_lm_check_checkpoint_args(ckpt_args, run_args) -> None:
    """check_checkpoint_args of Megatron-LM core_v0.16.1 for a torch_dist checkpoint, on plain Namespaces."""
    def compare(name, default=None):
        ckpt = getattr(ckpt_args, name, default) if default is not None else getattr(ckpt_args, name)
        assert ckpt == getattr(run_args, name), (f"{name} value from checkpoint ({ckpt}) is not equal to the input "
                                                 f"argument value ({getattr(run_args, name)}).")

    for name, default in _MLM_COMPARED:
        compare(name, default)
    if run_args.vocab_file:
        for name in _MLM_VOCAB_FILE_COMPARED:
            compare(name)
    if run_args.data_parallel_random_init:
        compare("data_parallel_random_init")


def pretrain_gpt_args(flags: list[str]) -> argparse.Namespace:
    """The Namespace pretrain_gpt.py builds from `cpt megatron-args` flags, for the names check_checkpoint_args
    and the rope setup read (Megatron-LM's actions, types and defaults; the model-size flags as ints)."""
    p = argparse.ArgumentParser(allow_abbrev=False)
    for name in ("--num-layers", "--hidden-size", "--num-attention-heads", "--max-position-embeddings",
                 "--rotary-base", "--make-vocab-size-divisible-by"):
        p.add_argument(name, type=int)
    p.add_argument("--position-embedding-type", default="learned_absolute")
    p.add_argument("--no-position-embedding", action="store_false", dest="add_position_embedding")
    p.add_argument("--use-rotary-position-embeddings", action="store_true")
    p.add_argument("--tokenizer-type", default=None)
    p.add_argument("--vocab-file", default=None)
    p.add_argument("--data-parallel-random-init", action="store_true")
    for name in ("--finetune", "--no-load-optim", "--no-load-rng"):
        p.add_argument(name, action="store_true")
    args, _ = p.parse_known_args(flags)
    if args.use_rotary_position_embeddings:  # validate_args: legacy flag -> rope
        args.position_embedding_type = "rope"
    return args


def test_import_and_trained_args_load_without_finetune(base):
    """Issue 28 item 4: `pretrain_gpt.py` with `cpt megatron-args` flags minus --finetune plus --no-load-optim
    --no-load-rng stopped in check_checkpoint_args on add_position_embedding (False written, True given).
    Now both the imported base (release) and a trained checkpoint's args pass it, and the rope args are
    those a Megatron-LM rope run saves (the Namespace `megatron_lm_args` mirrors) for every model key
    load_args_from_checkpoint (--use-checkpoint-args) copies."""
    from cpt_megatron.checkpoint import megatron_lm
    from cpt_megatron.checkpoint.io import read_meta

    text = (base["ours"] / "release" / "megatron_args.txt").read_text()
    flags = " ".join(ln.rstrip("\\") for ln in text.splitlines() if not ln.startswith("#")).split()
    assert "--finetune" in flags
    run = pretrain_gpt_args([f for f in flags if f != "--finetune"] + ["--no-load-optim", "--no-load-rng"])
    assert run.position_embedding_type == "rope" and run.add_position_embedding is True and not run.finetune
    imported = torch.load(base["ours"] / "release" / "common.pt", map_location="cpu", weights_only=True)["args"]
    trained = megatron_lm.common_entries(read_meta(base["ours"]), iteration=1000, tp=2, pp=2,
                                         extra={"consumed_train_samples": 8000})["args"]
    for ckpt_args in (imported, trained):
        megatron_lm_check_checkpoint_args(ckpt_args, run)
        megatron_lm_check_checkpoint_args(ckpt_args, argparse.Namespace(**{**vars(run), "vocab_file": "vocab.json",
                                                                         "tokenizer_type": "HuggingFaceTokenizer"}))
    assert (trained.iteration, trained.consumed_train_samples) == (1000, 8000)
    mlm = megatron_lm_args(tp=1, pp=1, bf16=False, dist_opt=False, tokenizer="t", iteration=0)
    model_keys = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
                  "group_query_attention", "kv_channels", "max_position_embeddings", "position_embedding_type",
                  "add_position_embedding", "use_rotary_position_embeddings", "rotary_base", "rotary_percent",
                  "rotary_interleaved", "add_bias_linear", "add_qkv_bias", "swiglu",
                  "untie_embeddings_and_output_weights", "apply_layernorm_1p", "normalization", "layernorm_epsilon",
                  "use_rope_scaling", "rope_scaling_factor", "padded_vocab_size", "make_vocab_size_divisible_by")
    assert {k: getattr(imported, k) for k in model_keys} == {k: getattr(mlm, k) for k in model_keys}
    assert type(imported.rotary_base) is int  # `--rotary-base` is type=int in Megatron-LM
    with pytest.raises(AssertionError, match=r"add_position_embedding value from checkpoint \(False\) is not equal "
                                             r"to the input argument value \(True\)"):
        megatron_lm_check_checkpoint_args(argparse.Namespace(**{**vars(imported), "add_position_embedding": False}),
                                          run)


# -- checkpoints Megatron-LM saved -> HF ---------------------------------------------------------------------
@pytest.mark.parametrize("bf16,dist_opt", [(False, False), (True, True)], ids=["fp32", "bf16-distopt"])
def test_export_megatron_lm_save(base, tmp_path, bf16, dist_opt):
    save = tmp_path / "save"
    save_like_megatron_lm(base["ours"], save, bf16=bf16, dist_opt=dist_opt, tokenizer=str(base["tok"]))
    res = _export_and_check(save, tmp_path / "hf")  # the save root: tracker -> iter_0000007
    assert res["dtype"] == ("bfloat16" if bf16 else "float32") and res["vocab_size"] == 512  # the tokenizer's, not the padded rows
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["num_key_value_heads"] == 2
    assert cfg["rope_scaling"]["rope_type"] == "llama3" and cfg["tie_word_embeddings"] is False
    assert (tmp_path / "hf" / "tokenizer.json").is_file()
    # the iteration folder itself, and --tokenizer when args.tokenizer_model is not on this machine
    args_file = save / "iter_0000007" / "common.pt"
    common = torch.load(args_file, weights_only=True)
    common["args"].tokenizer_model = "/cluster/only/tokenizer"
    torch.save(common, args_file)
    from cpt_megatron.checkpoint.io import _MLM_META

    _MLM_META.clear()
    from cpt_megatron.cli import main

    assert main(["export-hf", "--ckpt", str(save / "iter_0000007"), "--out", str(tmp_path / "hf2")]) == 2
    _export_and_check(save / "iter_0000007", tmp_path / "hf2", tokenizer=str(base["tok"]))


@pytest.mark.slow  # two 2-rank torchrun launches (~1 min each on 2 cores)
@pytest.mark.parametrize("name,tp,pp", [("tp2", 2, 1), ("pp2", 1, 2)])
def test_export_megatron_lm_tp2_and_pp2_saves(base, tmp_path, name, tp, pp):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    job = {"ours": str(base["ours"]), "tok": str(base["tok"]), "saves": {name: [tp, pp]}, "root": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           __file__, json.dumps(job)], capture_output=True, text=True, env=env, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = sorted(p.name for p in (tmp_path / name / "iter_0000007").glob("*.distcp"))
    assert {f.split("_")[2] for f in files} == {"0", "1"}, files  # __RANK_I.distcp: both ranks wrote shards
    _export_and_check(tmp_path / name, tmp_path / f"hf_{name}", tokenizer=str(base["tok"]))


def test_refuses_non_llama_megatron_models_by_name(tmp_path, base):
    from cpt_megatron.checkpoint.megatron_lm import hf_config_from_args
    from cpt_megatron.errors import CptError

    a = megatron_lm_args(tp=1, pp=1, bf16=False, dist_opt=False, tokenizer="t", iteration=1)
    for edit, word in ((dict(normalization="LayerNorm"), "normalization=LayerNorm"),
                       (dict(num_experts=8), "mixture-of-experts"), (dict(swiglu=False), "SwiGLU"),
                       (dict(add_bias_linear=True), "add_bias_linear"), (dict(qk_layernorm=True), "qk_layernorm")):
        with pytest.raises(CptError, match=word):
            hf_config_from_args(argparse.Namespace(**{**vars(a), **edit}), 1000, source="x")
    qwen = hf_config_from_args(argparse.Namespace(**{**vars(a), "add_qkv_bias": True}), 1000, source="x")
    assert qwen["model_type"] == "qwen2" and qwen["architectures"] == ["Qwen2ForCausalLM"]


if __name__ == "__main__":  # torchrun worker: Megatron-LM-style multi-rank saves
    job = json.loads(sys.argv[1])
    for name, (tp, pp) in job["saves"].items():
        save_like_megatron_lm(Path(job["ours"]), Path(job["root"]) / name, tp=tp, pp=pp, tokenizer=job["tok"])


# -- mixtures -> Megatron-LM --data-path ---------------------------------------------------------------------
def test_mixture_report_megatron(tmp_path, capsys, shared_data, gpt2_tokenizer_dir):
    from test_mixture import sources as _sources_fixture  # noqa: F401  (the real-data prefixes of test_mixture)

    from cpt_megatron.cli import main

    src = _sources_fixture.__wrapped__(shared_data, gpt2_tokenizer_dir, _Factory(tmp_path))
    y = tmp_path / "mix.yaml"
    y.write_text(f"sources:\n  - {{name: med, prefix: {src['med']}, group: domain}}\n"
                 f"  - {{name: wiki, prefix: {src['wiki']}, group: general}}\n"
                 "alpha: 0.7\nphases: [{until: 0.5, alpha: 0.6}, {alpha: 0.8}]\nvalid_fraction: 0.02\n")
    argv = ["mixture", "report", "--mixture", str(y), "--seq-len", "64", "--train-samples", "2000", "--megatron"]
    assert main(argv + ["--json"]) == 0
    rep = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["megatron"]
    assert [p["args"] for p in rep["phases"]] == [
        f"--data-path 0.6 {src['med']} 0.4 {src['wiki']} --split 98,2,0",
        f"--data-path 0.8 {src['med']} 0.2 {src['wiki']} --split 98,2,0"]
    assert [(p["start_sample"], p["end_sample"]) for p in rep["phases"]] == [(0, 1000), (1000, 2000)]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "phase 1 (samples [1000, 2000)): --data-path 0.8" in text and "caveat: Megatron-LM blends" in text


class _Factory:
    def __init__(self, root):
        self.root = root

    def mktemp(self, name):
        p = self.root / name
        p.mkdir()
        return p
