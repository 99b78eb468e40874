"""lm-evaluation-harness on our megatron-core model in its own layout (TP/PP/VPP, any DP): no export needed.

Two pieces:
- `LayoutScorer`: forward-only passes of the model chunks through megatron's pipeline schedules, returning
  for each row the log-probability of every label and the model's argmax at every position. Rows are dealt
  to DP replicas, results are broadcast from the last pipeline stage and gathered over DP, so every rank
  gets every row's result. Collective: every rank calls it with the same rows in the same order.
- `MegatronLM`: lm-eval's `LM` interface (loglikelihood, loglikelihood_rolling, generate_until greedy) on a
  scorer, tokenizing exactly like lm-eval's `hf` model (so scores match it on the exported checkpoint).
  Every rank runs the whole lm-eval evaluation on all requests (lm-eval sees rank 0 of 1): the scorer
  does the sharding, and every rank ends with the same results.

Shapes: B = rows per call, W = padded width (tokens per row), V/tp = this rank's vocab shard.
"""

from __future__ import annotations

from functools import partial

import torch
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import (
    _add_special_kwargs,
    handle_stop_sequences,
    has_bos_prefix,
    normalize_gen_kwargs,
    postprocess_generated_text,
)

__all__ = ["LayoutScorer", "MegatronLM"]

Row = tuple[list[int], list[int]]  # (input tokens, labels); labels[i] is the token after inputs[i]


def _argmax_over_tp(logits: torch.Tensor) -> torch.Tensor:
    """Argmax over the full vocab of vocab-parallel logits [b, s, V/tp] -> [b, s] global token ids.

    Ties resolve to the lowest id, like torch.argmax on the full logits (lower TP ranks hold lower ids).
    """
    from megatron.core import parallel_state as ps

    val, idx = logits.max(dim=-1)
    tp = ps.get_tensor_model_parallel_world_size()
    if tp == 1:
        return idx
    idx = idx + ps.get_tensor_model_parallel_rank() * logits.shape[-1]
    group = ps.get_tensor_model_parallel_group()
    vals, idxs = [torch.empty_like(val) for _ in range(tp)], [torch.empty_like(idx) for _ in range(tp)]
    torch.distributed.all_gather(vals, val.contiguous(), group=group)
    torch.distributed.all_gather(idxs, idx.contiguous(), group=group)
    best = torch.stack(vals).argmax(dim=0, keepdim=True)  # first max = lowest rank among equals
    return torch.stack(idxs).gather(0, best).squeeze(0)


def _score_output(labels: torch.Tensor, logits: torch.Tensor):
    """loss_func of the scoring forward: per-token log P(label) and argmax, fp32, in the full vocab."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    logits = logits.float()
    argmax = _argmax_over_tp(logits)
    logprob = -vocab_parallel_cross_entropy(logits.clone(), labels)  # it shifts its input in place
    zero = torch.zeros((), device=logits.device)
    return zero, torch.ones((), dtype=torch.int, device=logits.device), {"logprob": logprob, "argmax": argmax}


def _score_step(data_iterator, model):
    """megatron-core forward_step_func returning logits (no labels: [b, s, V/tp] on the last stage)."""
    batch = next(data_iterator)
    dev = next(model.parameters()).device
    tokens, labels = batch["tokens"].to(dev), batch["labels"].to(dev)
    position_ids = torch.arange(tokens.shape[1], device=dev).unsqueeze(0).expand_as(tokens)
    return model(tokens, position_ids, None), partial(_score_output, labels)


class LayoutScorer:
    """Per-token log-probabilities and argmax of megatron-core model chunks in their parallel layout.

    `model`: the chunks (bare GPTModels or their DDP wrappers, e.g. `Engine.model`), one per virtual stage.
    `micro_batch`: rows per forward pass per DP replica. Rows are right-padded with `pad_id` to a common
    width rounded up to `width_multiple` x tp (fewer distinct shapes; sequence parallelism needs a
    multiple of tp); causal attention keeps padding from affecting real positions.
    """

    def __init__(self, model: list, *, micro_batch: int = 4, pad_id: int = 0, width_multiple: int = 8):
        from megatron.core import parallel_state as ps

        self.model = list(model)
        self.micro_batch, self.pad_id = micro_batch, pad_id
        self._ps = ps
        self.width_multiple = width_multiple * ps.get_tensor_model_parallel_world_size()
        self.device = next(self.model[0].parameters()).device

    def __call__(self, rows: list[Row]) -> list[tuple[list[float], list[int]]]:
        """For each (inputs, labels) row: (log P(label_i | inputs[:i+1]) for each i, argmax at each i)."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        ps = self._ps
        if not rows:
            return []
        dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        n, mb = len(rows), self.micro_batch
        # rows per DP replica: whole micro-batches; the interleaved (VPP) schedule wants a multiple of pp of them
        group = mb * (ps.get_pipeline_model_parallel_world_size() if len(self.model) > 1 else 1)
        per = -(-n // (dp * group)) * group
        padded = list(rows) + [([self.pad_id], [self.pad_id])] * (per * dp - n)
        m = self.width_multiple
        width = -(-max(len(r[0]) for r in rows) // m) * m
        tokens = torch.full((per, width), self.pad_id, dtype=torch.long)
        labels = torch.full((per, width), self.pad_id, dtype=torch.long)
        for k, (inp, lab) in enumerate(padded[dp_rank * per:(dp_rank + 1) * per]):
            if len(inp) != len(lab):
                raise ValueError(f"row {k}: {len(inp)} inputs but {len(lab)} labels")
            tokens[k, :len(inp)] = torch.tensor(inp)
            labels[k, :len(lab)] = torch.tensor(lab)
        mbs = [{"tokens": tokens[i:i + mb], "labels": labels[i:i + mb]} for i in range(0, per, mb)]
        for c in self.model:
            c.eval()
        with torch.no_grad():
            out = get_forward_backward_func()(
                forward_step_func=_score_step, data_iterator=[iter(mbs) for _ in self.model] if len(self.model) > 1
                else iter(mbs), model=self.model, num_microbatches=len(mbs), seq_length=width, micro_batch_size=mb,
                forward_only=True)
        logprob = torch.zeros((per, width), dtype=torch.float32, device=self.device)
        argmax = torch.zeros((per, width), dtype=torch.long, device=self.device)
        if ps.is_pipeline_last_stage(ignore_virtual=True):
            logprob = torch.cat([d["logprob"] for d in out]).to(self.device, torch.float32)
            argmax = torch.cat([d["argmax"] for d in out]).to(self.device, torch.long)
        if ps.get_pipeline_model_parallel_world_size() > 1:
            src, group = ps.get_pipeline_model_parallel_last_rank(), ps.get_pipeline_model_parallel_group()
            torch.distributed.broadcast(logprob, src, group=group)
            torch.distributed.broadcast(argmax, src, group=group)
        if dp > 1:
            lps, ams = [torch.empty_like(logprob) for _ in range(dp)], [torch.empty_like(argmax) for _ in range(dp)]
            torch.distributed.all_gather(lps, logprob, group=ps.get_data_parallel_group())
            torch.distributed.all_gather(ams, argmax, group=ps.get_data_parallel_group())
            logprob, argmax = torch.cat(lps), torch.cat(ams)
        logprob, argmax = logprob.cpu(), argmax.cpu()
        return [(logprob[k, :len(r[0])].tolist(), argmax[k, :len(r[0])].tolist()) for k, r in enumerate(rows)]


class MegatronLM(TemplateLM):
    """lm-eval LM over a `LayoutScorer`; tokenization and truncation as lm-eval's `hf` model does them."""

    def __init__(self, scorer, tokenizer, *, max_length: int, batch_size: int = 16, max_gen_toks: int = 256,
                 add_bos_token: bool | None = None, quiet: bool = False):
        super().__init__()
        self.scorer, self.tokenizer = scorer, tokenizer
        self.max_length, self.batch_size, self.max_gen_toks = max_length, batch_size, max_gen_toks
        self.add_bos_token = add_bos_token
        self.quiet = quiet  # no progress bars (ranks other than 0)

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm or self.quiet)

    # -- tokenization (HFLM's rules) ---------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len=None, **kw):
        kwargs = _add_special_kwargs(add_special_tokens, self.add_bos_token)
        if add_special_tokens is None and has_bos_prefix(string, self.tokenizer.decode(self.prefix_token_id)):
            kwargs["add_special_tokens"] = False
        enc = self.tokenizer.encode(string, **kwargs)
        return enc[-left_truncate_len:] if left_truncate_len else enc

    # -- scoring -----------------------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kw):
        """(sum log P(continuation | context), continuation is the greedy output) per request."""
        rows = []
        for _, ctx, cont in requests:
            if not ctx or not cont:
                raise ValueError("lm-eval request with an empty context or continuation after tokenization")
            seq = (ctx + cont)[-(self.max_length + 1):]  # left truncation, as HFLM
            rows.append((seq[:-1], seq[1:]))
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))  # similar lengths per batch
        res: list = [None] * len(rows)
        for b in range(0, len(order), self.batch_size):
            idx = order[b:b + self.batch_size]
            for i, (lp, am) in zip(idx, self.scorer([rows[i] for i in idx])):
                n = len(requests[i][2])
                labels = rows[i][1][-n:]
                res[i] = (float(sum(lp[-n:])), am[-n:] == labels)
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], res[i])
        return res

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, counts = [], []
        for (string,) in [r.args for r in requests]:
            ws = [(None,) + w for w in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1))]
            windows.extend(ws)
            counts.append(len(ws))
        scores = self._loglikelihood_tokens(windows)
        out, pos = [], 0
        for r, c in zip(requests, counts):
            out.append(sum(s for s, _ in scores[pos:pos + c]))
            pos += c
            self.cache_hook.add_partial("loglikelihood_rolling", r.args, out[-1])
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy decoding, a batch of prompts at a time (full re-forward per token: no KV cache)."""
        eos = self.tokenizer.decode([self.eot_token_id])
        out = []
        for b in range(0, len(requests), self.batch_size):
            batch = [r.args for r in requests[b:b + self.batch_size]]
            res = [None] * len(batch)
            groups: dict = {}
            for i, (_, kw) in enumerate(batch):
                groups.setdefault(repr(sorted(kw.items(), key=str)), []).append(i)
            for idx in groups.values():
                kwargs = normalize_gen_kwargs(dict(batch[idx[0]][1]), self.max_gen_toks)
                until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
                max_gen = int(kwargs.pop("max_gen_toks"))
                if max_gen >= self.max_length:
                    raise ValueError(f"max_gen_toks={max_gen} must be < the model's max length {self.max_length}")
                ctxs = [self.tok_encode(batch[i][0], left_truncate_len=self.max_length - max_gen) for i in idx]
                gens = [[] for _ in idx]
                live = list(range(len(idx)))
                for _ in range(max_gen):
                    if not live:
                        break
                    seqs = [ctxs[j] + gens[j] for j in live]
                    rows = [(s, s[1:] + [self.pad]) for s in seqs]
                    for j, (_, am) in zip(list(live), self.scorer(rows)):
                        gens[j].append(am[-1])
                        text = self.tokenizer.decode(gens[j], skip_special_tokens=True)
                        if am[-1] == self.eot_token_id or any(u in text for u in until):
                            live.remove(j)
                for j, i in enumerate(idx):
                    text = self.tokenizer.decode(gens[j], skip_special_tokens=True)
                    res[i] = postprocess_generated_text(generation=text, stop=until, think_end_token=None)
                    self.cache_hook.add_partial("generate_until", batch[i], res[i])
            out.extend(res)
        return out

    @property
    def pad(self) -> int:
        return self.scorer.pad_id
