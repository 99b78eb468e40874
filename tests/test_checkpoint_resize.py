"""`cpt resize-embeddings`: old rows bit-exact, new rows = mean of the base sub-token rows (or global mean)."""

from __future__ import annotations

import json
import random

import pytest
import torch

from tests.test_checkpoint import _tokenizer, make_hf


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from cpt_megatron.checkpoint.hf_import import import_hf
    from cpt_megatron.tokenizer.extend import extend_tokenizer

    root = tmp_path_factory.mktemp("resize")
    _tokenizer(root / "tok", vocab=512)
    rng = random.Random(1)
    dom = root / "domain.txt"
    dom.write_text("\n".join(" ".join(rng.choice(["kalomiter", "zupre", "stedbane", "prestedba", "terzu"])
                                      for _ in range(12)) for _ in range(300)))
    extend_tokenizer(root / "tok", [dom], 20, root / "tok_ext", min_frequency=2)
    out = {"root": root}
    for fam in ("smollm2", "llama3"):  # tied and untied
        hf = make_hf(fam, root / f"hf_{fam}", vocab=512, tokenizer=root / "tok")
        import_hf(hf, root / f"mc_{fam}", verify=False)
        out[fam] = (hf, root / f"mc_{fam}")
    return out


def _load_export(d):
    from safetensors.torch import load_file

    t = {}
    for f in sorted(d.glob("*.safetensors")):
        t.update(load_file(f))
    return t


@pytest.mark.parametrize("fam", ["smollm2", "llama3"])
def test_resize_subtoken_mean_and_mean(base, fam, tmp_path, capsys):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cpt_megatron.checkpoint import read_meta
    from cpt_megatron.checkpoint.hf_export import export_hf
    from cpt_megatron.cli import main
    from cpt_megatron.tokenizer.extend import subtoken_map
    from cpt_megatron.tokenizer.load import load_tokenizer

    hf, ck = base[fam]
    new_tok = base["root"] / "tok_ext"
    old = load_file(hf / "model.safetensors")
    smap = subtoken_map(load_tokenizer(base["root"] / "tok"), load_tokenizer(new_tok))
    assert smap and min(smap) == 512
    for init in ("subtoken-mean", "mean"):
        out = tmp_path / init
        assert main(["resize-embeddings", "--ckpt", str(ck), "--tokenizer", str(new_tok), "--out", str(out),
                     "--init", init, "--json"]) == 0
        summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        n = 512 + len(smap)
        assert summary["new_vocab"] == n and summary["padded_vocab_size"] == 640
        meta = read_meta(out)
        assert meta["vocab_size"] == n and meta["tokenizer_extension"]["init"] == init
        ex = tmp_path / f"hf_{init}"
        export_hf(out, ex, verify=False)
        new = _load_export(ex)
        names = ["model.embed_tokens.weight"] + ([] if fam == "smollm2" else ["lm_head.weight"])
        for name in names:
            w, w0 = new[name], old[name]
            assert w.shape == (n, 64)
            assert torch.equal(w[:512], w0)  # old rows unchanged
            for nid, sub in smap.items():
                want = w0[sub].mean(0) if init == "subtoken-mean" else w0.mean(0)
                torch.testing.assert_close(w[nid], want, rtol=0, atol=1e-6)
        assert json.loads((ex / "config.json").read_text())["vocab_size"] == n
        assert len(AutoTokenizer.from_pretrained(ex)) == n
        model = AutoModelForCausalLM.from_pretrained(ex)
        assert model.get_input_embeddings().weight.shape[0] == n


def test_resize_refuses_same_tokenizer(base, tmp_path):
    from cpt_megatron.checkpoint.resize import resize_embeddings
    from cpt_megatron.errors import CptError

    with pytest.raises(CptError, match="adds no tokens"):
        resize_embeddings(base["smollm2"][1], base["root"] / "tok", tmp_path / "x")
    assert not (tmp_path / "x").exists()
