"""Perplexity per held-out source: token-weighted loss, plus bits per byte / per character.

Shapes: b = micro batch, s = sequence length. A microbatch is a dict of int64 `tokens`/`labels` [b, s]
and float `loss_mask` [b, s] (0 on padding), the same layout `train.engine.forward_step` consumes, so
the training loop evaluates with `Engine.eval_step` in its own TP/PP layout (no model copy) and
standalone `cpt eval --hf` with transformers on exactly the same windows.

Why bits per byte: perplexity per token is not comparable across tokenizers (an extended tokenizer
makes tokens longer, so per-token loss rises while the model may be no worse). Loss summed over the
text divided by its UTF-8 bytes (or characters) is tokenizer-independent:
    bits_per_byte = loss_nats * tokens / (ln 2 * bytes)
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from cpt_megatron.errors import CptError
from cpt_megatron.utils import check_text_file, iter_jsonl, read_text

__all__ = ["SourceBatches", "evaluate_sources", "loss_stderr", "paired_loss_difference", "batches_from_text", "batches_from_file", "batches_from_dataset",
           "read_documents", "hf_eval_fn"]

GROUPS = ("domain", "general")
EvalFn = Callable[[list[dict]], tuple[float, int]]


@dataclasses.dataclass(kw_only=True)
class SourceBatches:
    """One held-out source: a fixed list of microbatches and the size of the text they cover."""

    name: str
    """Source name (the key in results, evals.jsonl and the monitor's events)."""
    group: str
    """'domain' (new data) or 'general' (replay / what must not be forgotten)."""
    microbatches: list[dict]
    """This rank's microbatches (`tokens`, `labels`, `loss_mask`); same on TP/PP peers, disjoint across DP."""
    num_bytes: int | None = None
    """UTF-8 bytes of the text whose tokens are labels (all DP ranks together); None = unknown."""
    num_chars: int | None = None
    """Characters of that text; None = unknown."""
    num_tokens: int = 0
    """Loss tokens over all DP ranks (informational; evaluate_sources uses what eval_fn reports)."""

    def __post_init__(self):
        if self.group not in GROUPS:
            raise CptError(f"source {self.name!r}: group={self.group!r}; expected one of {GROUPS}")


def evaluate_sources(eval_fn: EvalFn, sources: dict[str, SourceBatches], *,
                     bytes_per_token: dict[str, float] | None = None, per_batch: bool = False) -> dict[str, dict]:
    """Run `eval_fn(microbatches) -> (token-mean loss in nats, loss tokens)` on every source.

    Returns {name: {"group", "loss", "ppl", "tokens", "bits_per_byte", "bits_per_char"}}. When a source
    does not know its byte count (a preprocessed validation set), `bytes_per_token[name]` (e.g. from the
    dataset's preprocessing stats) estimates it; bits_per_byte is None when neither is known.
    per_batch: score each microbatch on its own and add "loss_stderr" (the standard error of the token-mean
    loss with microbatches as the sampling units, `loss_stderr`) and "batch_losses" ([[loss, tokens], ...] in
    window order: two models scored on the same text can be compared pair by pair, `paired_loss_difference`).
    Only for one data-parallel rank (every rank must make the same calls); the loss is the same up to
    summation order.
    Collective when eval_fn is (Engine.eval_step): call on every rank with the same source names.
    """
    bytes_per_token = bytes_per_token or {}
    out = {}
    for name, src in sources.items():
        batches = None
        if per_batch:
            batches = [(float(x), int(n)) for x, n in (eval_fn([mb]) for mb in src.microbatches)]
            tokens = sum(n for _, n in batches)
            loss = sum(x * n for x, n in batches) / max(tokens, 1)
        else:
            loss, tokens = eval_fn(src.microbatches)
        loss, tokens = float(loss), int(tokens)
        nbytes = src.num_bytes
        if nbytes is None and name in bytes_per_token:
            nbytes = bytes_per_token[name] * tokens
        total_bits = loss * tokens / math.log(2)
        out[name] = {
            "group": src.group,
            "loss": loss,
            "ppl": math.exp(min(loss, 700.0)),
            "tokens": tokens,
            "bits_per_byte": total_bits / nbytes if nbytes else None,
            "bits_per_char": total_bits / src.num_chars if src.num_chars else None,
        }
        if batches is not None:
            out[name]["loss_stderr"] = loss_stderr(batches)
            out[name]["batch_losses"] = [[round(x, 7), n] for x, n in batches]
    return out


def loss_stderr(batches: list[tuple[float, int]]) -> float | None:
    """Standard error of the token-weighted mean loss, the batches being the units (a ratio estimator):
    L = sum(n_i l_i) / sum(n_i), se^2 = k/(k-1) * sum(n_i^2 (l_i - L)^2) / sum(n_i)^2. Tokens inside one window
    are not independent; windows far apart nearly are, so units of whole windows give an honest figure.
    None for fewer than 2 units."""
    k = len(batches)
    total = sum(n for _, n in batches)
    if k < 2 or total == 0:
        return None
    mean = sum(x * n for x, n in batches) / total
    return math.sqrt(k / (k - 1) * sum((n * (x - mean)) ** 2 for x, n in batches)) / total


def paired_loss_difference(a: list, b: list) -> tuple[float, float | None]:
    """(D, se) of D = mean loss of `b` minus that of `a`, both `batch_losses` of the same text (same windows,
    same tokens): the per-batch differences are the units, so the part of the variance that the two models share
    (hard and easy passages) cancels. The relative perplexity change is exp(D) - 1, with stderr ~ exp(D) * se."""
    if len(a) != len(b) or any(int(x[1]) != int(y[1]) for x, y in zip(a, b)):
        raise CptError("paired_loss_difference: the two evaluations did not score the same windows "
                       "(different text, tokenizer, --seq-len or --max-tokens)")
    diffs = [(float(y[0]) - float(x[0]), int(x[1])) for x, y in zip(a, b)]
    total = sum(n for _, n in diffs)
    return sum(d * n for d, n in diffs) / max(total, 1), loss_stderr(diffs)


# ------------------------------------------------------------------------------------------------
def read_documents(path: str | os.PathLike, *, text_key: str = "text", chunk_bytes: int = 1 << 16) -> Iterable[tuple[str, bool]]:
    """Yield (text piece, ends_document) from a .txt or .jsonl file.

    .jsonl: one document per line (`text_key`). .txt: the whole file is one document (the usual
    WikiText convention), yielded in line-aligned pieces of ~chunk_bytes so a token budget can stop early.
    """
    hint = "give a UTF-8 .txt (one document) or .jsonl (one document per line) file"
    path = check_text_file(path, "eval data", hint=hint)
    if path.suffix in (".jsonl", ".json"):
        for i, rec in iter_jsonl(path, "eval data", hint=hint):
            if text_key not in rec:
                raise CptError(f"{path}:{i}: no {text_key!r} field (has {sorted(rec)}); pass --text-key")
            yield str(rec[text_key]), True
        return
    buf, size = [], 0
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                buf.append(line)
                size += len(line)
                if size >= chunk_bytes:
                    yield "".join(buf), False
                    buf, size = [], 0
    except UnicodeDecodeError:
        read_text(path, "eval data", hint=hint)  # raises the error with its line number
        raise
    yield "".join(buf), True


def batches_from_text(pieces: Iterable[tuple[str, bool]], tokenizer, *, name: str, group: str, seq_len: int,
                      micro_batch: int = 1, max_tokens: int | None = None, dp_rank: int = 0, dp: int = 1,
                      eod_id: int | None = None) -> SourceBatches:
    """Tokenize pieces (documents joined with EOD) into fixed windows of seq_len + 1 tokens.

    Windows follow megatron's GPTDataset convention: consecutive windows share one boundary token, so
    every token after the first is a label exactly once (non-overlapping labels, no token scored twice).
    The last partial window is padded (loss_mask 0), so the whole covered text counts. `max_tokens`
    caps the label tokens (a fixed subset: the file's beginning). Windows are dealt round-robin to DP
    ranks and padded with empty windows so every rank runs the same number of microbatches.
    Byte/char counts cover all the text taken (its first token is context only; a cut document counts
    its decoded prefix).
    """
    if seq_len < 1 or micro_batch < 1:
        raise CptError(f"seq_len={seq_len}, micro_batch={micro_batch}: both must be >= 1")
    eod = tokenizer.eos_token_id if eod_id is None else eod_id
    if eod is None:
        raise CptError("the tokenizer has no eos token to separate documents; pass eod_id")
    budget = None if max_tokens is None else max_tokens + 1  # +1: the first token is context only
    ids: list[int] = []
    nbytes = nchars = 0
    for text, ends in pieces:
        if budget is not None and len(ids) >= budget:
            break
        # as preprocessing tokenizes training data (data.fast_bpe.hf_encode_batch): no BOS/EOS, and special-token
        # text in a document (a literal <|endoftext|>) is plain text, never the EOD id
        piece = tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True) if text else []
        if ends:
            piece = piece + [eod]
        if budget is not None and len(ids) + len(piece) > budget:
            piece = piece[: budget - len(ids)]
            text = tokenizer.decode([t for t in piece if t != eod])
        ids.extend(piece)
        nbytes += len(text.encode("utf-8"))
        nchars += len(text)
    if len(ids) < 2:
        raise CptError(f"source {name!r}: fewer than 2 tokens of text; nothing to evaluate")
    windows, masks = [], []
    for start in range(0, len(ids) - 1, seq_len):
        w = ids[start : start + seq_len + 1]
        n_lab = len(w) - 1
        windows.append(w + [eod] * (seq_len + 1 - len(w)))
        masks.append([1.0] * n_lab + [0.0] * (seq_len - n_lab))
    per_rank = -(-len(windows) // (dp * micro_batch)) * micro_batch
    while len(windows) < per_rank * dp:
        windows.append([eod] * (seq_len + 1))
        masks.append([0.0] * seq_len)
    w_all, m_all = torch.tensor(windows, dtype=torch.long), torch.tensor(masks, dtype=torch.float)
    mine = torch.arange(dp_rank, len(windows), dp)
    w_mine, m_mine = w_all[mine], m_all[mine]
    mbs = [{"tokens": w_mine[i : i + micro_batch, :-1].contiguous(), "labels": w_mine[i : i + micro_batch, 1:].contiguous(),
            "loss_mask": m_mine[i : i + micro_batch].contiguous()} for i in range(0, len(mine), micro_batch)]
    return SourceBatches(name=name, group=group, microbatches=mbs, num_bytes=nbytes, num_chars=nchars,
                         num_tokens=int(m_all.sum()))


def batches_from_file(path: str | os.PathLike, tokenizer, *, seq_len: int, group: str = "general",
                      name: str | None = None, text_key: str = "text", **kw) -> SourceBatches:
    """`batches_from_text` on a .txt/.jsonl file; the source name defaults to the file stem."""
    name = name or Path(path).stem
    return batches_from_text(read_documents(path, text_key=text_key), tokenizer, name=name, group=group,
                             seq_len=seq_len, **kw)


def batches_from_dataset(dataset, *, name: str, group: str, micro_batch: int, max_samples: int | None = None,
                         dp_rank: int = 0, dp: int = 1) -> SourceBatches:
    """Fixed microbatches from a validation dataset whose items are dicts of tokens/labels/loss_mask[/position_ids].

    Takes the first `max_samples` items (the same ones at every evaluation), deals them round-robin to
    DP ranks, pads with zero-mask copies so every rank has whole, equal microbatches. Byte counts are
    unknown here: pass `bytes_per_token` to evaluate_sources for bits per byte.
    """
    n = len(dataset) if max_samples is None else min(max_samples, len(dataset))
    if n < 1:
        raise CptError(f"validation set {name!r} is empty")
    items = [dataset[i] for i in range(n)]
    items = [{k: torch.as_tensor(v) for k, v in it.items() if k in ("tokens", "labels", "loss_mask", "position_ids")}
             for it in items]
    per_rank = -(-n // (dp * micro_batch)) * micro_batch
    while len(items) < per_rank * dp:
        pad = dict(items[0])
        pad["loss_mask"] = torch.zeros_like(pad.get("loss_mask", pad["labels"]), dtype=torch.float)
        items.append(pad)
    mine = items[dp_rank::dp]
    tokens = sum(float(torch.as_tensor(it.get("loss_mask", torch.ones_like(it["labels"]))).sum()) for it in items)
    mbs = [{k: torch.stack([it[k] for it in mine[i : i + micro_batch]]) for k in mine[0]}
           for i in range(0, len(mine), micro_batch)]
    for mb in mbs:
        mb.setdefault("loss_mask", torch.ones_like(mb["labels"], dtype=torch.float))
        mb["loss_mask"] = mb["loss_mask"].float()
    return SourceBatches(name=name, group=group, microbatches=mbs, num_tokens=int(tokens))


def hf_eval_fn(model) -> EvalFn:
    """An eval_fn for a transformers causal LM: exact token-mean cross-entropy over loss_mask (fp64 sums)."""

    @torch.no_grad()
    def fn(microbatches: list[dict]) -> tuple[float, int]:
        model.eval()
        dev = next(model.parameters()).device
        total, count = 0.0, 0.0
        for mb in microbatches:
            logits = model(input_ids=mb["tokens"].to(dev)).logits.float()
            nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), mb["labels"].to(dev).flatten(), reduction="none")
            mask = mb.get("loss_mask", torch.ones_like(mb["labels"], dtype=torch.float)).to(dev).flatten().float()
            total += float((nll.double() * mask.double()).sum())
            count += float(mask.sum())
        return total / max(count, 1.0), int(count)

    return fn
