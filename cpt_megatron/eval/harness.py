"""lm-evaluation-harness on our megatron-core model in its own layout (TP/PP/VPP, any DP): no export needed.

Two pieces:
- `LayoutScorer`: forward-only passes of the model chunks through megatron's pipeline schedules, returning
  for each row the log-probability of every label and the model's argmax at every position. Rows are dealt
  to DP replicas, results are broadcast from the last pipeline stage and gathered over DP, so every rank
  gets every row's result. Collective: every rank calls it with the same rows in the same order. A row
  may carry candidate last tokens (`alts`) scored from its last position: one-token continuations of one
  context (MMLU's letters) cost one row, not one each.
  `LayoutScorer.generate`: greedy decoding with megatron-core's static KV cache (one prefill pass per group
  of equal-length prompts, then one single-token pass per new token), through the same schedules.
- `MegatronLM`: lm-eval's `LM` interface (loglikelihood, loglikelihood_rolling, generate_until greedy) on a
  scorer, tokenizing exactly like lm-eval's `hf` model (so scores match it on the exported checkpoint).
  Every rank runs the whole lm-eval evaluation on all requests (lm-eval sees rank 0 of 1): the scorer
  does the sharding, and every rank ends with the same results. A scorer without a KV cache (a plain
  callable, or sequence parallelism on) is decoded by re-running the whole sequence for every new token.

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

__all__ = ["LayoutScorer", "MegatronLM", "greedy_reforward"]

Row = tuple  # (inputs, labels) or (inputs, labels, alts): labels[i] is the token after inputs[i]; alts: list[int]


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


def _score_output(labels: torch.Tensor, last: torch.Tensor | None, alts: torch.Tensor | None, logits: torch.Tensor):
    """loss_func of the scoring forward: per-token log P(label) and argmax, fp32, in the full vocab; with
    `alts` [b, K] also log P(alt) at each row's `last` position [b] (candidate tokens sharing one context)."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    logits = logits.float()
    argmax = _argmax_over_tp(logits)
    out = {"argmax": argmax}
    if alts is not None:  # [b, K, V/tp]: the last position's logits once per candidate
        at_last = logits[torch.arange(logits.shape[0], device=logits.device), last.to(logits.device)]
        out["alt_logprob"] = -vocab_parallel_cross_entropy(
            at_last.unsqueeze(1).expand(-1, alts.shape[1], -1).contiguous(), alts.to(logits.device))
    out["logprob"] = -vocab_parallel_cross_entropy(logits.clone(), labels)  # it shifts its input in place
    zero = torch.zeros((), device=logits.device)
    return zero, torch.ones((), dtype=torch.int, device=logits.device), out


def _score_step(data_iterator, model):
    """megatron-core forward_step_func returning logits (no labels: [b, s, V/tp] on the last stage)."""
    batch = next(data_iterator)
    dev = next(model.parameters()).device
    tokens, labels = batch["tokens"].to(dev), batch["labels"].to(dev)
    position_ids = torch.arange(tokens.shape[1], device=dev).unsqueeze(0).expand_as(tokens)
    return model(tokens, position_ids, None), partial(_score_output, labels, batch.get("last"), batch.get("alts"))


def _last_argmax_output(logits: torch.Tensor):
    """loss_func of a decoding forward: the argmax of the last position ([b, 1, V] logits, gathered over TP)."""
    argmax = logits[:, -1].float().argmax(dim=-1)
    zero = torch.zeros((), device=logits.device)
    return zero, torch.ones((), dtype=torch.int, device=logits.device), {"argmax": argmax}


def _decode_step(context, data_iterator, model):
    """forward_step_func of a KV-cached pass: prefill (the whole prompts) or one new token per row, at
    positions sequence_len_offset.. of `context`; this micro-batch's rows are cache rows batch_size_offset.."""
    batch = next(data_iterator)
    dev = next(model.parameters()).device
    tokens = batch["tokens"].to(dev)
    context.batch_size_offset = batch["row"]
    start = context.sequence_len_offset
    position_ids = torch.arange(start, start + tokens.shape[1], device=dev).unsqueeze(0).expand_as(tokens)
    return (model(tokens, position_ids, None, inference_context=context, runtime_gather_output=True),
            _last_argmax_output)


def _unwrap(chunk):
    """The GPTModel inside DDP / Float16Module wrappers (torch.compile's wrapper forwards attributes)."""
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def greedy_reforward(scorer, prompts: list[list[int]], max_new: int, stop) -> list[list[int]]:
    """Greedy continuations by re-running each whole sequence for every new token (any scorer, no cache).

    `stop(i, tokens)`: whether prompt i is done after appending its latest token."""
    gens = [[] for _ in prompts]
    live = list(range(len(prompts)))
    for _ in range(max_new):
        if not live:
            break
        seqs = [prompts[j] + gens[j] for j in live]
        for j, (_, am) in zip(list(live), scorer([(s, s[1:] + [scorer.pad_id]) for s in seqs])):
            gens[j].append(am[-1])
            if stop(j, gens[j]):
                live.remove(j)
    return gens


class LayoutScorer:
    """Per-token log-probabilities and argmax of megatron-core model chunks in their parallel layout.

    `model`: the chunks (bare GPTModels or their DDP wrappers, e.g. `Engine.model`), one per virtual stage.
    `micro_batch`: rows per forward pass per DP replica. Rows are right-padded with `pad_id` to a common
    width rounded up to `width_multiple` x tp (fewer distinct shapes; sequence parallelism needs a
    multiple of tp); causal attention keeps padding from affecting real positions.
    """

    def __init__(self, model: list, *, micro_batch: int = 4, pad_id: int = 0, width_multiple: int = 8,
                 kv_cache: bool = True):
        from megatron.core import parallel_state as ps

        self.model = list(model)
        self.micro_batch, self.pad_id = micro_batch, pad_id
        self._ps = ps
        self.width_multiple = width_multiple * ps.get_tensor_model_parallel_world_size()
        self.device = next(self.model[0].parameters()).device
        # megatron-core's static KV cache keeps whole sequences per rank: not with sequence parallelism
        config = getattr(_unwrap(self.model[0]), "config", None)
        self.kv_cache = kv_cache and config is not None and not config.sequence_parallel
        self.scores_alternatives = True  # rows may carry candidate last tokens (see __call__)

    def __call__(self, rows: list[Row]) -> list[tuple]:
        """For each (inputs, labels) row: (log P(label_i | inputs[:i+1]) for each i, argmax at each i).

        A row (inputs, labels, alts) also gets, third, log P(a | inputs) at its last position for each
        token a in alts: candidates that share the row's context cost no extra forward pass."""
        ps = self._ps
        if not rows:
            return []
        dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        n, mb = len(rows), self.micro_batch
        per = self._rows_per_replica(n)
        padded = list(rows) + [([self.pad_id], [self.pad_id])] * (per * dp - n)
        m = self.width_multiple
        width = -(-max(len(r[0]) for r in rows) // m) * m
        num_alts = max((len(r[2]) for r in rows if len(r) > 2), default=0)
        tokens = torch.full((per, width), self.pad_id, dtype=torch.long)
        labels = torch.full((per, width), self.pad_id, dtype=torch.long)
        last = torch.zeros(per, dtype=torch.long)
        alts = torch.zeros((per, num_alts), dtype=torch.long)
        for k, (inp, lab, *alt) in enumerate(padded[dp_rank * per:(dp_rank + 1) * per]):
            if len(inp) != len(lab):
                raise ValueError(f"row {k}: {len(inp)} inputs but {len(lab)} labels")
            tokens[k, :len(inp)] = torch.tensor(inp)
            labels[k, :len(lab)] = torch.tensor(lab)
            last[k] = len(inp) - 1
            if alt:
                alts[k, :len(alt[0])] = torch.tensor(alt[0])
        mbs = [{"tokens": tokens[i:i + mb], "labels": labels[i:i + mb]} for i in range(0, per, mb)]
        outputs = {"logprob": (torch.float32, (width,)), "argmax": (torch.long, (width,))}
        if num_alts:
            for i, m in zip(range(0, per, mb), mbs):
                m.update(last=last[i:i + mb], alts=alts[i:i + mb])
            outputs["alt_logprob"] = (torch.float32, (num_alts,))
        logprob, argmax, *alt_lp = self._run(_score_step, mbs, width, outputs)
        return [(logprob[k, :len(r[0])].tolist(), argmax[k, :len(r[0])].tolist(),
                 *([alt_lp[0][k, :len(r[2])].tolist()] if len(r) > 2 else [])) for k, r in enumerate(rows)]

    def _rows_per_replica(self, n: int) -> int:
        """Rows each DP replica runs for n rows: whole micro-batches (a multiple of pp of them for VPP)."""
        ps = self._ps
        group = self.micro_batch * (ps.get_pipeline_model_parallel_world_size() if len(self.model) > 1 else 1)
        return -(-n // (ps.get_data_parallel_world_size() * group)) * group

    def _run(self, step_func, mbs: list[dict], width: int, outputs: dict) -> list[torch.Tensor]:
        """One forward-only pass of this replica's micro-batches. Each `outputs` entry of the loss_func's dict
        ({name: (dtype, shape of one row)}), concatenated over micro-batches, sent from the last stage to every
        stage and gathered over DP (replica order): [dp x rows, *shape] on every rank, on the CPU."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        ps = self._ps
        for c in self.model:
            c.eval()
        with torch.no_grad():
            out = get_forward_backward_func()(
                forward_step_func=step_func, data_iterator=[iter(mbs) for _ in self.model] if len(self.model) > 1
                else iter(mbs), model=self.model, num_microbatches=len(mbs), seq_length=width,
                micro_batch_size=self.micro_batch, forward_only=True)
        per = sum(len(m["tokens"]) for m in mbs)
        res = []
        for name, (dtype, shape) in outputs.items():
            if ps.is_pipeline_last_stage(ignore_virtual=True):
                t = torch.cat([d[name] for d in out]).to(self.device, dtype)
            else:
                t = torch.zeros((per, *shape), dtype=dtype, device=self.device)
            if ps.get_pipeline_model_parallel_world_size() > 1:
                torch.distributed.broadcast(t, ps.get_pipeline_model_parallel_last_rank(),
                                            group=ps.get_pipeline_model_parallel_group())
            if ps.get_data_parallel_world_size() > 1:
                parts = [torch.empty_like(t) for _ in range(ps.get_data_parallel_world_size())]
                torch.distributed.all_gather(parts, t, group=ps.get_data_parallel_group())
                t = torch.cat(parts)
            res.append(t.cpu())
        return res

    def generate(self, prompts: list[list[int]], max_new: int, stop) -> list[list[int]]:
        """Greedy continuations (up to max_new tokens) with megatron-core's static KV cache.

        Prompts of equal length are decoded together: one prefill pass over the prompts, then one pass of
        one token per row per new token (positions continue after the prompt; the cache holds the keys and
        values of every earlier position). `stop(i, tokens)` says whether prompt i is done; every rank sees
        every row's tokens, so all ranks stop at the same step. Without the cache (sequence parallelism,
        kv_cache=False) this is `greedy_reforward`. Collective.
        """
        if not self.kv_cache:
            return greedy_reforward(self, prompts, max_new, stop)
        from megatron.core.inference.contexts import StaticInferenceContext

        dp_rank, mb = self._ps.get_data_parallel_rank(), self.micro_batch
        gens: list[list[int]] = [[] for _ in prompts]
        by_len: dict[int, list[int]] = {}
        for i, p in enumerate(prompts):
            by_len.setdefault(len(p), []).append(i)
        for length, idx in sorted(by_len.items()):
            per = self._rows_per_replica(len(idx))
            rows = [prompts[i] for i in idx]
            rows += [rows[0]] * (per * self._ps.get_data_parallel_world_size() - len(rows))  # filler rows
            tokens = torch.tensor(rows[dp_rank * per:(dp_rank + 1) * per], dtype=torch.long)
            context = StaticInferenceContext(per, length + max_new)
            live = set(range(len(idx)))
            for _ in range(max_new):
                mbs = [{"tokens": tokens[r:r + mb], "row": r} for r in range(0, per, mb)]
                (new,) = self._run(partial(_decode_step, context), mbs, tokens.shape[1], {"argmax": (torch.long, ())})
                context.sequence_len_offset += tokens.shape[1]
                for j in sorted(live):
                    gens[idx[j]].append(int(new[j]))
                    if stop(idx[j], gens[idx[j]]):
                        live.discard(j)
                if not live:
                    break
                tokens = new[dp_rank * per:(dp_rank + 1) * per].unsqueeze(1)
        return gens


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
        """(sum log P(continuation | context), continuation is the greedy output) per request.

        Requests whose continuation is one token after the same context (MMLU's " A"/" B"/" C"/" D", one-word
        choices) share one row when the scorer supports it: one forward pass, and the last position's
        log-softmax scores every candidate, as lm-eval's hf model does."""
        share = getattr(self.scorer, "scores_alternatives", False)
        rows, members, by_context = [], [], {}  # members[r]: the requests that row r scores
        for i, (_, ctx, cont) in enumerate(requests):
            if not ctx or not cont:
                raise ValueError("lm-eval request with an empty context or continuation after tokenization")
            seq = (ctx + cont)[-(self.max_length + 1):]  # left truncation, as HFLM
            if share and len(cont) == 1:
                r = by_context.setdefault(tuple(seq[:-1]), len(rows))
                if r < len(rows):
                    members[r].append(i)
                    continue
            rows.append((seq[:-1], seq[1:]))
            members.append([i])
        rows = [(*row, [requests[i][2][0] for i in mem]) if len(mem) > 1 else row for row, mem in zip(rows, members)]
        order = sorted(range(len(rows)), key=lambda r: -len(rows[r][0]))  # similar lengths per batch
        res: list = [None] * len(requests)
        for b in range(0, len(order), self.batch_size):
            idx = order[b:b + self.batch_size]
            for r, (lp, am, *alt_lp) in zip(idx, self.scorer([rows[r] for r in idx])):
                if alt_lp:  # one-token continuations of a shared context
                    for i, a in zip(members[r], alt_lp[0]):
                        res[i] = (float(a), am[-1] == requests[i][2][0])
                else:
                    i, n = members[r][0], len(requests[members[r][0]][2])
                    res[i] = (float(sum(lp[-n:])), am[-n:] == rows[r][1][-n:])
                for i in members[r]:
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
        """Greedy decoding, a batch of prompts at a time: with the scorer's KV cache (`generate`) when it has
        one, else by re-running every sequence for each new token (`greedy_reforward`); the same tokens."""
        eos = self.tokenizer.decode([self.eot_token_id])
        decode = self.scorer.generate if getattr(self.scorer, "kv_cache", False) else partial(greedy_reforward,
                                                                                           self.scorer)
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

                def stop(_, gen, until=until):
                    text = self.tokenizer.decode(gen, skip_special_tokens=True)
                    return gen[-1] == self.eot_token_id or any(u in text for u in until)

                for i, gen in zip(idx, decode(ctxs, max_gen, stop)):
                    text = self.tokenizer.decode(gen, skip_special_tokens=True)
                    res[i] = postprocess_generated_text(generation=text, stop=until, think_end_token=None)
                    self.cache_hook.add_partial("generate_until", batch[i], res[i])
            out.extend(res)
        return out

    @property
    def pad(self) -> int:
        return self.scorer.pad_id
