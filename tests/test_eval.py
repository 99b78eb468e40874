"""Evaluation: windows/byte accounting, HF parity of `cpt eval --hf`, megatron TP2/PP2 parity.

Multiple-choice benchmarks go through lm-evaluation-harness: tests/test_lm_eval.py."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from cpt_megatron.cli import main
from cpt_megatron.errors import CptError
from cpt_megatron.eval.perplexity import SourceBatches, batches_from_text, evaluate_sources

WORDS = ("the model reads domain text and general text while the monitor watches perplexity of held out "
         "sources every few steps so forgetting shows early medical question answer café naïve 東京").split()


def _corpus(n_docs: int, seed: int) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    docs = []
    for _ in range(n_docs):
        n = int(torch.randint(5, 60, (1,), generator=g))
        docs.append(" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (n,), generator=g)) + ".")
    return docs


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    """A random tiny Llama (hidden 64, 2 layers, 4 heads, 2 KV heads, vocab 512) with a 300-token BPE tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    d = tmp_path_factory.mktemp("tiny_hf")
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(_corpus(200, 0), trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>", bos_token="<|endoftext|>").save_pretrained(d)
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=512, max_position_embeddings=256, tie_word_embeddings=False,
                      bos_token_id=0, eos_token_id=0)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # larger than default init so the loss is far from uniform (a sharper parity check)
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    model.save_pretrained(d, safe_serialization=True)
    return d


@pytest.fixture(scope="module")
def eval_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("eval_data")
    (d / "general_wiki.txt").write_text("\n".join(_corpus(30, 1)) + "\n", encoding="utf-8")
    with open(d / "domain_med.jsonl", "w", encoding="utf-8") as f:
        for doc in _corpus(20, 2):
            f.write(json.dumps({"text": doc}) + "\n")
    return d


class _CharTok:
    """One token per character (ids = code points + 1), EOD = 0: makes window/byte accounting checkable by hand."""

    eos_token_id = 0
    bos_token_id = None

    def encode(self, text, add_special_tokens=False, split_special_tokens=True):
        return [ord(c) + 1 for c in text]

    def decode(self, ids):
        return "".join(chr(i - 1) for i in ids)


def test_windows_cover_every_token_once_and_count_bytes():
    docs = [("héllo wörld", True), ("abc", True), ("x" * 20, True)]
    ids = []
    for t, _ in docs:
        ids += [ord(c) + 1 for c in t] + [0]
    src = batches_from_text(docs, _CharTok(), name="s", group="general", seq_len=8, micro_batch=2)
    assert src.num_chars == sum(len(t) for t, _ in docs)
    assert src.num_bytes == sum(len(t.encode()) for t, _ in docs)
    labels = torch.cat([mb["labels"][mb["loss_mask"] > 0] for mb in src.microbatches]).tolist()
    assert labels == ids[1:]  # every token after the first is a label exactly once, in order
    assert src.num_tokens == len(ids) - 1
    for mb in src.microbatches:
        assert mb["tokens"].shape == (2, 8) and mb["labels"].shape == (2, 8)
        # the label at position i is the next token of the input window
        assert torch.equal(mb["tokens"][:, 1:], mb["labels"][:, :-1])
    # DP: ranks get disjoint windows, equal microbatch counts, together the same labels
    shards = [batches_from_text(docs, _CharTok(), name="s", group="general", seq_len=8, micro_batch=2, dp_rank=r, dp=2)
              for r in range(2)]
    assert len(shards[0].microbatches) == len(shards[1].microbatches)
    n = sum(float(mb["loss_mask"].sum()) for s in shards for mb in s.microbatches)
    assert n == len(ids) - 1
    # a token budget keeps the beginning and counts only the covered text
    cut = batches_from_text(docs, _CharTok(), name="s", group="general", seq_len=8, max_tokens=5)
    assert cut.num_tokens == 5 and cut.num_chars == 6 and cut.num_bytes == len("héllo ".encode())


def test_evaluate_sources_formulas():
    src = SourceBatches(name="a", group="domain", microbatches=[{}], num_bytes=1000, num_chars=800)
    res = evaluate_sources(lambda mbs: (2.0, 400), {"a": src})["a"]
    assert res["group"] == "domain" and res["tokens"] == 400
    assert res["ppl"] == pytest.approx(math.exp(2.0))
    assert res["bits_per_byte"] == pytest.approx(2.0 * 400 / (math.log(2) * 1000))
    assert res["bits_per_char"] == pytest.approx(2.0 * 400 / (math.log(2) * 800))
    nob = SourceBatches(name="b", group="general", microbatches=[{}])
    res = evaluate_sources(lambda mbs: (2.0, 400), {"b": nob}, bytes_per_token={"b": 4.0})["b"]
    assert res["bits_per_byte"] == pytest.approx(2.0 / (math.log(2) * 4.0)) and res["bits_per_char"] is None
    with pytest.raises(ValueError, match="group"):
        SourceBatches(name="c", group="replay", microbatches=[])


def test_per_batch_stderr_and_paired_difference():
    """per_batch: the same token-weighted loss as one call, a ratio-estimator stderr over the batches (checked
    against numpy's weighted formula), and a paired difference whose stderr drops the variance two models share."""
    import numpy as np

    from cpt_megatron.eval.perplexity import loss_stderr, paired_loss_difference

    rng = np.random.default_rng(0)
    mbs = [{"l": float(x), "n": int(n)} for x, n in zip(rng.normal(3.0, 0.5, 40), rng.integers(100, 129, 40))]
    fn = lambda batch: (sum(m["l"] * m["n"] for m in batch) / sum(m["n"] for m in batch), sum(m["n"] for m in batch))  # noqa: E731
    src = SourceBatches(name="a", group="general", microbatches=mbs)
    whole = evaluate_sources(fn, {"a": src})["a"]
    per = evaluate_sources(fn, {"a": src}, per_batch=True)["a"]
    assert per["loss"] == pytest.approx(whole["loss"], rel=1e-12) and per["tokens"] == whole["tokens"]
    assert "loss_stderr" not in whole and len(per["batch_losses"]) == 40
    x, n = np.array([m["l"] for m in mbs]), np.array([m["n"] for m in mbs], float)
    mean = (x * n).sum() / n.sum()
    want = math.sqrt(40 / 39 * ((n * (x - mean)) ** 2).sum()) / n.sum()
    assert per["loss_stderr"] == pytest.approx(want, rel=1e-9)
    # equal weights: the textbook standard error of the mean
    assert loss_stderr([(x, 1) for x in (1.0, 2.0, 3.0, 4.0)]) == pytest.approx(np.std([1, 2, 3, 4], ddof=1) / 2)
    assert loss_stderr([(1.0, 5)]) is None
    # model b = model a + 0.01 nats everywhere + small noise: the paired se is ~the noise's, far below a's own se
    b = [[x + 0.01 + float(e), k] for (x, k), e in zip(per["batch_losses"], rng.normal(0, 0.001, 40))]
    d, se = paired_loss_difference(per["batch_losses"], b)
    assert d == pytest.approx(0.01, abs=0.001) and se < per["loss_stderr"] / 50
    with pytest.raises(CptError, match="same windows"):
        paired_loss_difference(per["batch_losses"], b[:-1])


def _direct_hf_loss(hf_dir, path, seq_len, jsonl=False):
    """Reference: transformers' own shifted loss (labels=input_ids) over the same token stream, token-weighted."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    text = path.read_text(encoding="utf-8")
    docs = [json.loads(line)["text"] for line in text.splitlines()] if jsonl else [text]
    ids = []
    for d in docs:
        ids += tok.encode(d, add_special_tokens=False) + [tok.eos_token_id]
    total = count = 0.0
    with torch.no_grad():
        for s in range(0, len(ids) - 1, seq_len):
            w = torch.tensor([ids[s : s + seq_len + 1]])
            n = w.shape[1] - 1
            total += float(model(input_ids=w, labels=w).loss) * n
            count += n
    return total / count, int(count), len(text.encode()) if not jsonl else sum(len(d.encode()) for d in docs)


def _cli_json(argv, capsys):
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_hf_eval_matches_transformers(tiny_hf, eval_files, capsys):
    out = _cli_json(["eval", "--hf", str(tiny_hf), "--data", str(eval_files / "general_wiki.txt"),
                     str(eval_files / "domain_med.jsonl"), "--seq-len", "64", "--micro-batch", "3", "--json"], capsys)
    for name, jsonl in (("general_wiki", False), ("domain_med", True)):
        ref_loss, ref_tokens, nbytes = _direct_hf_loss(tiny_hf, eval_files / f"{name}.{'jsonl' if jsonl else 'txt'}", 64, jsonl)
        r = out["results"][name]
        assert r["tokens"] == ref_tokens
        assert r["ppl"] == pytest.approx(math.exp(ref_loss), rel=1e-4)
        assert r["bits_per_byte"] == pytest.approx(ref_loss * ref_tokens / (math.log(2) * nbytes), rel=1e-4)
        assert math.isfinite(r["ppl"]) and r["ppl"] > 1.0


def test_megatron_eval_tp2_pp2_matches_hf(tiny_hf, eval_files, tmp_path, capsys):
    pytest.importorskip("megatron.core")
    from cpt_megatron.checkpoint import import_hf

    ckpt = tmp_path / "ckpt"
    import_hf(str(tiny_hf), str(ckpt), dtype="fp32", verify=False)
    data = [str(eval_files / "general_wiki.txt"), str(eval_files / "domain_med.jsonl")]
    ref = _cli_json(["eval", "--hf", str(tiny_hf), "--data", *data, "--seq-len", "64", "--json"], capsys)["results"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for layout in (["--tp", "2"], ["--pp", "2"]):
        cmd = [sys.executable, "-m", "cpt_megatron", "eval", "--ckpt", str(ckpt), "--data", *data, "--seq-len", "64",
               "--micro-batch", "2", *layout, "--nproc", "2", "--json"]
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]
        got = json.loads(p.stdout.strip().splitlines()[-1])["results"]
        for name in ref:
            assert got[name]["tokens"] == ref[name]["tokens"], layout
            assert got[name]["ppl"] == pytest.approx(ref[name]["ppl"], rel=1e-4), layout


def test_ckpt_eval_without_checkpoint_dir_is_one_line_error(tmp_path, capsys):
    f = tmp_path / "a.txt"
    f.write_text("hello")
    assert main(["eval", "--ckpt", str(tmp_path / "missing"), "--data", str(f)]) == 2
    assert "not found" in capsys.readouterr().err
