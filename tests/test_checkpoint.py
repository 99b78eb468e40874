"""HF -> megatron torch_dist -> HF: parity in TP/PP layouts, bit-exact round trip, bad input, trainer checkpoints.

Tiny random models (hidden 64, 4 layers, 4 heads, 2 KV heads) of each family, fp32 on CPU. Multi-rank
layouts run this file as a torchrun worker (`__main__` below): one launch per world size, every family
and layout inside it, to keep process start-ups few.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch

FAMILIES = ("llama3", "mistral", "qwen2", "smollm2")
TOL = 1e-6  # README claims max |logit diff| <= 1e-6 (fp32): a few ulps; the BLAS reduction order differs by CPU
# (measured 2.4e-7 on the dev machine, 6.0e-7 on the CI machine)


def _tokenizer(out: Path, vocab: int = 512) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(0)
    syl = ["ka", "lo", "mi", "ter", "an", "o", "zu", "pre", "st", "ing", "ed", "ba", "ne", "qu", "ri", "ve"]
    words = ["".join(rng.choice(syl) for _ in range(rng.randint(1, 4))) for _ in range(3000)]
    lines = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(3000)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(lines, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>").save_pretrained(out)


def make_hf(family: str, out: Path, vocab: int = 1000, tokenizer: Path | None = None) -> Path:
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

    kw = dict(vocab_size=vocab, hidden_size=64, intermediate_size=160, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, bos_token_id=0, eos_token_id=0)
    if family == "llama3":
        cfg = LlamaConfig(**kw, rope_theta=500000.0, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64})
    elif family == "mistral":
        cfg = MistralConfig(**kw, sliding_window=None)
    elif family == "qwen2":
        cfg = Qwen2Config(**kw, tie_word_embeddings=False)
    elif family == "smollm2":
        cfg = LlamaConfig(**kw, tie_word_embeddings=True)
    else:
        raise ValueError(family)
    torch.manual_seed(zlib.crc32(family.encode()) % 1000)  # hash() of a str changes every process
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():  # non-trivial norms and biases so a mix-up would show
        for n, p in model.named_parameters():
            if "norm" in n or "bias" in n:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(out)
    if tokenizer is not None:
        for f in tokenizer.iterdir():
            shutil.copy2(f, out / f.name)
    return out


def test_make_hf_is_the_same_in_every_process(tmp_path):
    """The zoo's weights do not depend on PYTHONHASHSEED (they came from hash(family), which does): a process with
    PYTHONHASHSEED=1 makes the bytes this one (a random hash seed) makes."""
    code = ("import sys; from pathlib import Path; sys.path.insert(0, sys.argv[2]); from test_checkpoint import make_hf;"
            "make_hf('llama3', Path(sys.argv[1]))")
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "other"), str(Path(__file__).parent)], check=True,
                   env={**os.environ, "PYTHONHASHSEED": "1", "OMP_NUM_THREADS": "1"}, timeout=300)
    make_hf("llama3", tmp_path / "here")
    assert (tmp_path / "here" / "model.safetensors").read_bytes() == \
        (tmp_path / "other" / "model.safetensors").read_bytes()


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """{family: (hf_dir, ckpt_dir)}: tiny HF models and their imports (import verifies at TP1PP1)."""
    from cpt_megatron.checkpoint.hf_import import import_hf

    root = tmp_path_factory.mktemp("zoo")
    _tokenizer(root / "tok")
    out = {}
    for fam in FAMILIES:
        vocab = 1100 if fam == "qwen2" else 1000  # 1100 pads to 1152 at TP1 but 1280 at TP2: shape-mismatch load
        hf = make_hf(fam, root / f"hf_{fam}", vocab=vocab, tokenizer=root / "tok")
        res = import_hf(hf, root / f"mc_{fam}")
        assert res["verify"]["max_abs_diff"] <= TOL, (fam, res)
        out[fam] = (hf, root / f"mc_{fam}")
    return out


def test_import_layout_and_meta(zoo):
    from megatron.core import dist_checkpointing

    from cpt_megatron.checkpoint import arch_from_ckpt, read_meta
    from cpt_megatron.checkpoint.io import single_process_group

    hf, ck = zoo["qwen2"]
    meta = read_meta(ck)
    assert meta["vocab_size"] == 1100 and meta["padded_vocab_size"] == 1152 and meta["dtype"] == "float32"
    assert (ck / "latest_checkpointed_iteration.txt").read_text() == "release"  # Megatron-LM's layout
    ck = ck / "release"
    assert meta["tokenizer"] == "tokenizer" and (ck / "tokenizer" / "tokenizer.json").is_file()
    assert set(meta["source_shards"]) == {"model.safetensors"}
    assert arch_from_ckpt(ck).qkv_bias
    with single_process_group():
        md = dist_checkpointing.load_tensors_metadata(str(ck))
    assert md["decoder.layers.self_attention.linear_qkv.weight"].global_shape == (4, 128, 64)
    assert md["decoder.layers.self_attention.linear_qkv.bias"].global_shape == (4, 128)
    assert md["decoder.layers.mlp.linear_fc1.weight"].global_shape == (4, 320, 64)
    assert md["decoder.layers.self_attention.linear_qkv.layer_norm_weight"].global_shape == (4, 64)
    assert "output_layer.weight" in md
    assert not any(p.name.startswith(".") for p in ck.parent.parent.iterdir())  # no temp dirs left behind
    with single_process_group():
        assert "output_layer.weight" not in dist_checkpointing.load_tensors_metadata(str(zoo["smollm2"][1] / "release"))


def test_round_trip_bit_exact_and_generates_same(zoo, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from cpt_megatron.checkpoint.hf_export import export_hf

    for fam, (hf, ck) in zoo.items():
        out = tmp_path / fam
        res = export_hf(ck, out, max_shard_size="300KB")
        assert res["verify"]["max_abs_diff"] <= TOL and res["shards"] > 1
        a = load_file(hf / "model.safetensors")
        b = {}
        for f in json.loads((out / "model.safetensors.index.json").read_text())["weight_map"].values():
            b.update(load_file(out / f))
        assert set(a) == set(b), fam
        for k in a:
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), (fam, k)
        assert json.loads((hf / "config.json").read_text()) == json.loads((out / "config.json").read_text())
        assert (out / "tokenizer.json").is_file() and (out / "generation_config.json").is_file()
        card = (out / "README.md").read_text()
        assert "base_model:" not in card and str(hf) not in card and f"Base model: `{hf.name}` (local" in card
        prompt = torch.tensor([[5, 17, 300, 42]])
        g = [AutoModelForCausalLM.from_pretrained(d).generate(prompt, max_new_tokens=8, do_sample=False)
             for d in (hf, out)]
        assert torch.equal(g[0], g[1]), fam


def test_bf16_import_export(zoo, tmp_path):
    from safetensors.torch import load_file

    from cpt_megatron.checkpoint.hf_export import export_hf
    from cpt_megatron.checkpoint.hf_import import import_hf

    hf, _ = zoo["qwen2"]
    res = import_hf(hf, tmp_path / "mc", dtype="bf16")  # verify rounds the HF side to bf16: like for like
    assert res["dtype"] == "bfloat16" and res["verify"]["max_abs_diff"] <= TOL
    export_hf(tmp_path / "mc", tmp_path / "hf")
    a, b = load_file(hf / "model.safetensors"), load_file(next((tmp_path / "hf").glob("*.safetensors")))
    assert all(b[k].dtype == torch.bfloat16 and torch.equal(a[k].to(torch.bfloat16), b[k]) for k in a)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["dtype"] == "bfloat16"


def _worker_cmd(nproc: int, root: Path, layouts: list) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            __file__, json.dumps({"root": str(root), "layouts": layouts})]


@pytest.mark.parametrize("nproc,layouts", [(2, [[2, 1, None], [1, 2, None], [1, 2, 2]]), (4, [[2, 2, None]])],
                         ids=["world2-TP2PP1-TP1PP2-VPP2", "world4-TP2PP2"])
def test_parity_in_parallel_layouts(zoo, nproc, layouts):
    root = next(iter(zoo.values()))[0].parent
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(_worker_cmd(nproc, root, layouts), capture_output=True, text=True, env=env, timeout=300)
    results = [json.loads(line[len("RESULT "):]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(results) == len(layouts) * len(FAMILIES)
    for r in results:
        assert r["max_abs_diff"] <= TOL and r["top1_agreement"] == 1.0, r
        assert abs(r["loss_hf"] - r["loss_mcore"]) < 1e-5, r


def test_training_style_checkpoint_exports(zoo, tmp_path):
    """A trainer-like checkpoint (model keys + optimizer keys, meta copied) exports bit-exactly."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from safetensors.torch import load_file

    from cpt_megatron.checkpoint import arch_from_ckpt, load_model_weights
    from cpt_megatron.checkpoint.hf_export import export_hf
    from cpt_megatron.model import ModelOptions, build_model
    from cpt_megatron.runtime import ParallelConfig, destroy_distributed, init_distributed

    hf, ck = zoo["llama3"]
    it = tmp_path / "run" / "checkpoints" / "iter_0000010"
    it.mkdir(parents=True)
    init_distributed(ParallelConfig())
    try:
        (chunk,) = build_model(arch_from_ckpt(ck), ParallelConfig(), ModelOptions(dtype="fp32", spec="local"))
        load_model_weights([chunk], ck)
        sd = chunk.sharded_state_dict()
        sd["optimizer"] = {"exp_avg": ShardedTensor.from_rank_offsets("optimizer.state.exp_avg.embedding",
                                                                       torch.ones(7, 3), replica_id=0)}
        dist_checkpointing.save(sd, str(it))
    finally:
        destroy_distributed()
    shutil.copy2(ck / "release" / "cpt_meta.json", it / "cpt_meta.json")
    shutil.copytree(ck / "release" / "tokenizer", it / "tokenizer")
    meta = json.loads((it / "cpt_meta.json").read_text())
    meta["training"] = {"mixture": {"medquad": 0.7, "wikitext": 0.3}, "tokens_trained": 123456}
    meta["eval"] = {"val_loss": 2.5, "medquad_ppl": 12.25}
    (it / "cpt_meta.json").write_text(json.dumps(meta))
    out = tmp_path / "export"
    export_hf(it, out)
    a, b = load_file(hf / "model.safetensors"), {}
    for f in sorted(out.glob("*.safetensors")):
        b.update(load_file(f))
    assert all(torch.equal(a[k], b[k]) for k in a)
    card = (out / "README.md").read_text()
    assert "medquad: 0.7" in card and "123,456" in card and "| val_loss | 2.5 |" in card


def test_verify_cli_json_and_detects_wrong_weights(zoo, capsys):
    from cpt_megatron.cli import main

    hf, ck = zoo["llama3"]
    assert main(["verify", "--hf", str(hf), "--ckpt", str(ck), "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"max_abs_diff", "mean_abs_diff", "top1_agreement", "loss_hf", "loss_mcore"} <= set(res)
    code, line = _cli(["verify", "--hf", str(zoo["mistral"][0]), "--ckpt", str(ck)], capsys)  # other weights
    assert code == 2 and "parity check FAILED" in line, line


# -- bad input ------------------------------------------------------------------------------------------
def _cli(argv, capsys):
    from cpt_megatron.cli import main

    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    return code, (err[-1] if err else "")


def test_bad_inputs_fail_cleanly(zoo, tmp_path, capsys):
    hf, ck = zoo["llama3"]
    bad = tmp_path / "bad"

    def variant(name, edit):
        d = tmp_path / name
        shutil.copytree(hf, d)
        edit(d)
        return d

    def cfg_edit(**kw):
        def f(d):
            c = json.loads((d / "config.json").read_text())
            c.update(kw)
            (d / "config.json").write_text(json.dumps(c))
        return f

    def truncate(d):
        f = d / "model.safetensors"
        f.write_bytes(f.read_bytes()[:-1000])

    def index_missing(d):
        (d / "model.safetensors.index.json").write_text(json.dumps(
            {"weight_map": {"model.embed_tokens.weight": "model.safetensors", "model.norm.weight": "gone.safetensors"}}))

    cases = {
        "missing": (lambda d: (d / "model.safetensors").unlink(), "no weights found"),
        "corrupt": (truncate, "corrupt"),
        "index": (index_missing, "do not exist: gone.safetensors"),
        "arch": (cfg_edit(model_type="gpt2"), "model_type 'gpt2' is not supported"),
        "shape": (cfg_edit(intermediate_size=128), "config.json implies"),
    }
    for name, (edit, msg) in cases.items():
        src = variant(name, edit)
        code, line = _cli(["import-hf", "--hf", str(src), "--out", str(bad), "--no-verify"], capsys)
        assert code == 2 and msg in line, (name, line)
        assert not bad.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".bad")], name
    small = make_hf("llama3", tmp_path / "small", vocab=400)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(hf / f, small / f)
    code, line = _cli(["import-hf", "--hf", str(small), "--out", str(bad), "--no-verify"], capsys)
    assert code == 2 and "tokenizer has 512 tokens but the model has only 400" in line, line
    code, line = _cli(["import-hf", "--hf", str(hf), "--out", str(ck), "--no-verify"], capsys)
    assert code == 2 and "already exists; pass --overwrite" in line


# -- torchrun worker ------------------------------------------------------------------------------------
def _worker(spec: dict) -> None:
    from cpt_megatron.checkpoint.verify import verify_checkpoint
    from cpt_megatron.runtime import ParallelConfig, destroy_distributed, init_distributed

    root = Path(spec["root"])
    init_distributed(ParallelConfig(tp=spec["layouts"][0][0], pp=spec["layouts"][0][1]))
    try:
        for tp, pp, vpp in spec["layouts"]:
            for fam in FAMILIES:
                r = verify_checkpoint(root / f"hf_{fam}", root / f"mc_{fam}", tp=tp, pp=pp, vpp=vpp)
                if torch.distributed.get_rank() == 0:
                    print("RESULT " + json.dumps({**r, "family": fam}), flush=True)
    finally:
        destroy_distributed()


if __name__ == "__main__":
    import warnings

    warnings.filterwarnings("ignore")
    _worker(json.loads(sys.argv[1]))
