"""`cpt eval`: the in-training evaluation, standalone, on an HF model or a megatron checkpoint.

Both paths build the same fixed windows (`batches_from_file`) and aggregate with `evaluate_sources`, so
their numbers are directly comparable (and with the training run's own evaluation on the same text).
The checkpoint path needs an `eval_fn` running megatron's forward-only schedule in the chosen layout
(`Engine.eval_step`); eval/ must not import train/, so the caller passes a factory
`make_eval_fn(chunks, parallel, seq_len, micro_batch) -> eval_fn`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

from cpt_megatron.errors import CptError
from cpt_megatron.eval.perplexity import EvalFn, batches_from_file, evaluate_sources, hf_eval_fn

__all__ = ["evaluate_hf", "evaluate_checkpoint", "source_names"]


def source_names(files: Sequence[str | os.PathLike]) -> list[str]:
    """File stems as source names; a clear error when two files share one."""
    names = [Path(f).stem for f in files]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise CptError(f"eval files share the source name(s) {dup} (the file stem); rename or copy one of them")
    return names


def _sources(files, tokenizer, *, group, seq_len, micro_batch, max_tokens, text_key, dp_rank=0, dp=1):
    return {n: batches_from_file(f, tokenizer, name=n, group=group, seq_len=seq_len, micro_batch=micro_batch,
                                 max_tokens=max_tokens, text_key=text_key, dp_rank=dp_rank, dp=dp)
            for n, f in zip(source_names(files), files)}


def _choices(results: dict, files, tokenizer, model_logprob_fn, *, limit, batch_size, seq_len=None) -> None:
    from cpt_megatron.eval.choice import load_choice_jsonl, score_choices

    for f in files:
        name = Path(f).stem
        items = load_choice_jsonl(f, limit=limit)
        res = score_choices(model_logprob_fn, items, tokenizer, batch_size=batch_size, seq_len=seq_len)
        results[name] = {"group": "general", **res}


def evaluate_hf(hf_dir: str | os.PathLike, files: Sequence[str | os.PathLike], *, seq_len: int = 512,
                micro_batch: int = 4, max_tokens: int | None = None, group: str = "general",
                tokenizer: str | os.PathLike | None = None, text_key: str = "text",
                choice_files: Sequence[str | os.PathLike] = (), choice_limit: int | None = None) -> dict:
    """Perplexity (and choice accuracy) of a transformers model, fp32 on CPU/GPU. Returns {"results": {...}}."""
    import torch
    from transformers import AutoModelForCausalLM

    from cpt_megatron.tokenizer.load import load_tokenizer

    hf_dir = Path(hf_dir)
    if not (hf_dir / "config.json").is_file():
        raise FileNotFoundError(f"{hf_dir} is not an HF model directory (no config.json)")
    tok = load_tokenizer(tokenizer or hf_dir)
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32)
    if torch.cuda.is_available():
        model = model.cuda()
    sources = _sources(files, tok, group=group, seq_len=seq_len, micro_batch=micro_batch, max_tokens=max_tokens,
                       text_key=text_key)
    results = evaluate_sources(hf_eval_fn(model), sources)
    if choice_files:
        from cpt_megatron.eval.choice import hf_logprob_fn

        _choices(results, choice_files, tok, hf_logprob_fn(model), limit=choice_limit, batch_size=micro_batch)
    return {"results": results, "model": str(hf_dir), "seq_len": seq_len}


MakeEvalFn = Callable[..., EvalFn]


def evaluate_checkpoint(ckpt: str | os.PathLike, files: Sequence[str | os.PathLike], *, make_eval_fn: MakeEvalFn,
                        tp: int = 1, pp: int = 1, vpp: int | None = None, seq_len: int = 512, micro_batch: int = 4,
                        max_tokens: int | None = None, group: str = "general",
                        tokenizer: str | os.PathLike | None = None, text_key: str = "text") -> dict:
    """Perplexity of a megatron checkpoint in layout tp/pp (DP = world / (tp*pp)), fp32.

    Collective: call on every rank (a 1-rank world is created when absent). Same dict on every rank.
    """
    import torch

    try:
        from cpt_megatron.checkpoint.io import (
            TOKENIZER_DIR,
            arch_from_ckpt,
            load_model_weights,
            open_checkpoint,
            read_meta,
            tokenizer_path,
        )
    except ImportError as e:  # the checkpoint package is developed in parallel
        raise CptError(f"cpt eval --ckpt needs cpt_megatron.checkpoint (load_model_weights): {e}; use --hf") from e
    from megatron.core import parallel_state as ps

    from cpt_megatron.model import ModelOptions, build_model
    from cpt_megatron.runtime import ParallelConfig, destroy_distributed, init_distributed
    from cpt_megatron.tokenizer.load import load_tokenizer

    ckpt = open_checkpoint(ckpt)  # any layout (ours, old, Megatron-LM's); manifest checked
    tok_spec = tokenizer or tokenizer_path(ckpt, read_meta(ckpt)) or (ckpt / TOKENIZER_DIR)
    if not Path(tok_spec).exists():
        raise CptError(f"{ckpt} carries no tokenizer/; pass --tokenizer")
    tok = load_tokenizer(tok_spec)
    arch = arch_from_ckpt(ckpt, tokenizer)
    parallel = ParallelConfig(tp=tp, pp=pp, vpp=vpp)
    init_distributed(parallel)
    try:
        chunks = build_model(arch, parallel, ModelOptions(dtype="fp32", spec="local"))
        load_model_weights(chunks, ckpt)
        eval_fn = make_eval_fn(chunks, parallel, seq_len=seq_len, micro_batch=micro_batch)
        dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        sources = _sources(files, tok, group=group, seq_len=seq_len, micro_batch=micro_batch, max_tokens=max_tokens,
                           text_key=text_key, dp_rank=dp_rank, dp=dp)
        results = evaluate_sources(eval_fn, sources)
        return {"results": results, "ckpt": str(ckpt), "tp": tp, "pp": pp, "dp": dp, "seq_len": seq_len,
                "rank": torch.distributed.get_rank()}
    finally:
        destroy_distributed()
