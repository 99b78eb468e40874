"""Multiple-choice benchmarks scored by log-likelihood (HellaSwag / ARC / MMLU-style JSONL).

Each choice is scored as the sum of log P(choice tokens | context). `acc` picks the highest sum,
`acc_norm` the highest sum divided by the choice's length in characters (lm-evaluation-harness'
acc_norm), which removes the bias toward short answers. The same fixed subset (seeded shuffle, first
`limit` items) is used at every evaluation so scores compare across steps.

The scorer is independent of the model: it takes `logprob_fn(tokens [b, s], labels [b, s]) -> [b, s]`
per-token log-probabilities of `labels`. `hf_logprob_fn` wraps a transformers model; the training
loop supplies one running in its own layout (with `seq_len` set so every batch has its fixed shape).
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
from collections.abc import Callable
from pathlib import Path

import torch

from cpt_megatron.errors import CptError

__all__ = ["ChoiceItem", "load_choice_jsonl", "score_choices", "hf_logprob_fn"]

LogprobFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
_CONTEXT_KEYS = ("context", "ctx", "question", "query", "prompt")
_CHOICE_KEYS = ("choices", "endings", "options")
_ANSWER_KEYS = ("answer", "label", "answerKey", "gold")


@dataclasses.dataclass(frozen=True)
class ChoiceItem:
    context: str
    choices: tuple[str, ...]
    answer: int


def _first(rec: dict, keys, what: str, where: str):
    for k in keys:
        if k in rec and rec[k] is not None:
            return rec[k]
    raise CptError(f"{where}: no {what} field (expected one of {list(keys)}, found {sorted(rec)})")


def _parse(rec: dict, where: str) -> ChoiceItem:
    ctx = _first(rec, _CONTEXT_KEYS, "context", where)
    choices = None
    if isinstance(ctx, dict):  # original ARC: {"question": {"stem", "choices": [{"text","label"}]}, "answerKey"}
        choices, ctx = ctx.get("choices"), ctx.get("stem", "")
    if choices is None:
        choices = _first(rec, _CHOICE_KEYS, "choices", where)
    labels = None
    if isinstance(choices, dict):  # HF ARC: {"text": [...], "label": ["A", ...]}
        labels, choices = list(choices.get("label", [])), list(choices["text"])
    elif choices and isinstance(choices[0], dict):
        labels, choices = [c.get("label") for c in choices], [c["text"] for c in choices]
    choices = tuple(str(c) for c in choices)
    if len(choices) < 2:
        raise CptError(f"{where}: needs >= 2 choices, got {len(choices)}")
    ans = _first(rec, _ANSWER_KEYS, "answer", where)
    idx = None
    if isinstance(ans, bool):
        pass
    elif isinstance(ans, int):
        idx = ans
    elif isinstance(ans, str):
        a = ans.strip()
        if labels and a in labels:
            idx = labels.index(a)
        elif a.isdigit():
            idx = int(a)
        elif len(a) == 1 and a.isalpha():
            idx = ord(a.upper()) - ord("A")
        elif a in choices:
            idx = choices.index(a)
    if idx is None or not 0 <= idx < len(choices):
        raise CptError(f"{where}: answer {ans!r} is not a choice index, letter or choice text for {len(choices)} choices")
    return ChoiceItem(context=str(ctx), choices=choices, answer=idx)


def load_choice_jsonl(path: str | os.PathLike, *, limit: int | None = None, seed: int = 0) -> list[ChoiceItem]:
    """Read a choice benchmark; a fixed subset of `limit` items (seeded shuffle), the same every call."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"choice benchmark {path} not found")
    items = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise CptError(f"{path}:{i}: not valid JSON ({e})") from e
                items.append(_parse(rec, f"{path}:{i}"))
    if not items:
        raise CptError(f"choice benchmark {path} has no items")
    if limit is not None and limit < len(items):
        order = list(range(len(items)))
        random.Random(seed).shuffle(order)
        items = [items[i] for i in sorted(order[:limit])]
    return items


def _encode_pair(tokenizer, context: str, choice: str) -> tuple[list[int], list[int]]:
    sep = "" if not context or context[-1].isspace() or choice[:1].isspace() else " "
    ctx = tokenizer.encode(context, add_special_tokens=False)
    cont = tokenizer.encode(sep + choice, add_special_tokens=False)
    if not cont:
        raise CptError(f"choice {choice!r} encodes to no tokens")
    if not ctx:  # nothing to condition the first choice token on: use EOD/BOS as the start
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        ctx = [start]
    return ctx, cont


def score_choices(logprob_fn: LogprobFn, items: list[ChoiceItem], tokenizer, *, batch_size: int = 8,
                  seq_len: int | None = None, pad_id: int = 0) -> dict:
    """Returns {"acc", "acc_norm", "n"} over `items`.

    Each (context, choice) becomes tokens = (ctx + cont)[:-1], labels = (ctx + cont)[1:]; the
    continuation's log-probs are summed. With `seq_len`, batches are padded to exactly seq_len (long
    contexts lose their left part) and always hold `batch_size` rows, for fixed-shape forward passes.
    """
    rows = []  # (item index, choice index, tokens, labels, number of continuation labels)
    for i, it in enumerate(items):
        for j, ch in enumerate(it.choices):
            ctx, cont = _encode_pair(tokenizer, it.context, ch)
            seq = ctx + cont
            if seq_len is not None and len(seq) - 1 > seq_len:
                if len(cont) > seq_len:
                    raise CptError(f"a choice of {len(cont)} tokens does not fit seq_len={seq_len}")
                seq = seq[len(seq) - 1 - seq_len:]
            rows.append((i, j, seq[:-1], seq[1:], len(cont)))
    scores = [[0.0] * len(it.choices) for it in items]
    for b in range(0, len(rows), batch_size):
        chunk = rows[b : b + batch_size]
        width = seq_len or max(len(r[2]) for r in chunk)
        n_rows = batch_size if seq_len is not None else len(chunk)
        tokens = torch.full((n_rows, width), pad_id, dtype=torch.long)
        labels = torch.full((n_rows, width), pad_id, dtype=torch.long)
        for k, (_, _, t, lab, _) in enumerate(chunk):
            tokens[k, : len(t)] = torch.tensor(t)
            labels[k, : len(lab)] = torch.tensor(lab)
        lp = logprob_fn(tokens, labels).double().cpu()
        for k, (i, j, t, _, n_cont) in enumerate(chunk):
            scores[i][j] = float(lp[k, len(t) - n_cont : len(t)].sum())
    acc = acc_norm = 0
    for it, sc in zip(items, scores):
        acc += int(max(range(len(sc)), key=lambda j: sc[j]) == it.answer)
        normed = [s / max(1, len(c)) for s, c in zip(sc, it.choices)]
        acc_norm += int(max(range(len(sc)), key=lambda j: normed[j]) == it.answer)
    n = len(items)
    return {"acc": acc / n, "acc_norm": acc_norm / n, "n": n}


def hf_logprob_fn(model) -> LogprobFn:
    """Per-token log P(labels | tokens) from a transformers causal LM (fp32 log-softmax)."""

    @torch.no_grad()
    def fn(tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        model.eval()
        dev = next(model.parameters()).device
        logits = model(input_ids=tokens.to(dev)).logits.float()
        return torch.log_softmax(logits, -1).gather(-1, labels.to(dev).unsqueeze(-1)).squeeze(-1)

    return fn
