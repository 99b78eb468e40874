"""`cpt eval`: the in-training evaluation, standalone, on an HF model or a megatron checkpoint.

Both paths build the same fixed windows (`batches_from_file`) and aggregate with `evaluate_sources`, so
their numbers are directly comparable (and with the training run's own evaluation on the same text).
The checkpoint path needs an `eval_fn` running megatron's forward-only schedule in the chosen layout
(`Engine.eval_step`); eval/ must not import train/, so the caller passes a factory
`make_eval_fn(chunks, parallel, seq_len, micro_batch) -> eval_fn`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from cpt_megatron.errors import CptError
from cpt_megatron.eval.perplexity import EvalFn, batches_from_file, evaluate_sources, hf_eval_fn

__all__ = ["evaluate_hf", "evaluate_checkpoint", "benchmark_checkpoint", "benchmark_hf", "loaded_checkpoint",
           "checkpoint_tokenizer", "source_names"]


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


def evaluate_hf(hf_dir: str | os.PathLike, files: Sequence[str | os.PathLike], *, seq_len: int = 512,
                micro_batch: int = 4, max_tokens: int | None = None, group: str = "general",
                tokenizer: str | os.PathLike | None = None, text_key: str = "text") -> dict:
    """Perplexity of a transformers model, fp32 on CPU/GPU. Returns {"results": {...}}."""
    import torch
    from transformers import AutoModelForCausalLM

    from cpt_megatron.tokenizer.load import load_tokenizer

    hf_dir = Path(hf_dir)
    if not (hf_dir / "config.json").is_file():
        raise FileNotFoundError(f"{hf_dir} is not an HF model directory (no config.json)")
    tok = load_tokenizer(tokenizer or hf_dir)
    from cpt_megatron.runtime.device import current_device

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).to(current_device())
    sources = _sources(files, tok, group=group, seq_len=seq_len, micro_batch=micro_batch, max_tokens=max_tokens,
                       text_key=text_key)
    results = evaluate_sources(hf_eval_fn(model), sources, per_batch=True)
    return {"results": results, "model": str(hf_dir), "seq_len": seq_len}


MakeEvalFn = Callable[..., EvalFn]


@contextlib.contextmanager
def loaded_checkpoint(ckpt: str | os.PathLike, *, tp: int = 1, pp: int = 1, vpp: int | None = None,
                      tokenizer: str | os.PathLike | None = None):
    """(chunks, tokenizer, arch) of a megatron checkpoint in layout tp/pp[/vpp] (DP = world / (tp*pp)), fp32.

    Collective: enter on every rank (a 1-rank world is created when absent); torn down on exit.
    """
    from cpt_megatron.checkpoint.io import arch_from_ckpt, load_model_weights
    from cpt_megatron.checkpoint.layout import resolve
    from cpt_megatron.model import ModelOptions, build_model
    from cpt_megatron.runtime import ParallelConfig, destroy_distributed, init_distributed
    from cpt_megatron.tokenizer.load import load_tokenizer

    ckpt = resolve(ckpt)  # any layout (ours, old, Megatron-LM's); load_model_weights checks the manifest (rank 0)
    tok = load_tokenizer(checkpoint_tokenizer(ckpt, tokenizer))
    arch = arch_from_ckpt(ckpt, tokenizer)
    parallel = ParallelConfig(tp=tp, pp=pp, vpp=vpp)
    init_distributed(parallel)
    try:
        # the spec training uses (TE when present), fp32, no compile; every weight is loaded right after
        chunks = build_model(arch, parallel, ModelOptions(dtype="fp32", spec="auto", compile="off", initialize=False))
        load_model_weights(chunks, ckpt)
        yield chunks, tok, arch
    finally:
        destroy_distributed()


def checkpoint_tokenizer(ckpt: str | os.PathLike, tokenizer: str | os.PathLike | None = None) -> Path:
    """The tokenizer to use with `ckpt` (checked before anything loads): --tokenizer, else CKPT/tokenizer/."""
    from cpt_megatron.checkpoint.io import TOKENIZER_DIR, read_meta, tokenizer_path
    from cpt_megatron.checkpoint.layout import resolve

    if tokenizer is not None:
        if not Path(tokenizer).exists():
            raise CptError(f"--tokenizer {tokenizer}: not found (give an HF tokenizer directory or tokenizer.json)")
        resolve(ckpt)  # one line if the checkpoint is missing or not one
        return Path(tokenizer)
    ckpt = resolve(ckpt)  # save root / iteration folder / old layout -> the tensors' folder (one line if missing)
    found = tokenizer_path(ckpt, read_meta(ckpt)) or (ckpt / TOKENIZER_DIR)
    if not Path(found).exists():
        raise CptError(f"{ckpt} carries no {TOKENIZER_DIR}/; pass --tokenizer")
    return Path(found)


def evaluate_checkpoint(ckpt: str | os.PathLike, files: Sequence[str | os.PathLike], *, make_eval_fn: MakeEvalFn,
                        tp: int = 1, pp: int = 1, vpp: int | None = None, seq_len: int = 512, micro_batch: int = 4,
                        max_tokens: int | None = None, group: str = "general",
                        tokenizer: str | os.PathLike | None = None, text_key: str = "text") -> dict:
    """Perplexity of a megatron checkpoint in layout tp/pp (DP = world / (tp*pp)), fp32.

    Collective: call on every rank (a 1-rank world is created when absent). Same dict on every rank.
    """
    import torch
    from megatron.core import parallel_state as ps

    with loaded_checkpoint(ckpt, tp=tp, pp=pp, vpp=vpp, tokenizer=tokenizer) as (chunks, tok, _):
        from cpt_megatron.runtime import ParallelConfig

        eval_fn = make_eval_fn(chunks, ParallelConfig(tp=tp, pp=pp, vpp=vpp), seq_len=seq_len, micro_batch=micro_batch)
        dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        sources = _sources(files, tok, group=group, seq_len=seq_len, micro_batch=micro_batch, max_tokens=max_tokens,
                           text_key=text_key, dp_rank=dp_rank, dp=dp)
        results = evaluate_sources(eval_fn, sources, per_batch=dp == 1)
        return {"results": results, "ckpt": str(ckpt), "tp": tp, "pp": pp, "dp": dp, "seq_len": seq_len,
                "rank": torch.distributed.get_rank()}


def benchmark_checkpoint(ckpt: str | os.PathLike, tasks: Sequence[str], *, tp: int = 1, pp: int = 1,
                         vpp: int | None = None, tokenizer: str | os.PathLike | None = None, micro_batch: int = 4,
                         batch_size: int = 16, max_length: int | None = None, **run_kw) -> dict:
    """lm-eval tasks on a megatron checkpoint in its layout, through `MegatronLM` (no export). Collective."""
    import torch

    from cpt_megatron.eval.tasks import require_lm_eval, resolve_tasks, run_tasks

    resolve_tasks(list(tasks))  # a bad task path fails before the model loads
    require_lm_eval()
    from cpt_megatron.eval.harness import LayoutScorer, MegatronLM
    with loaded_checkpoint(ckpt, tp=tp, pp=pp, vpp=vpp, tokenizer=tokenizer) as (chunks, tok, arch):
        scorer = LayoutScorer(chunks, micro_batch=micro_batch, pad_id=int(tok.eos_token_id))
        rank = torch.distributed.get_rank()
        lm = MegatronLM(scorer, tok, max_length=max_length or arch.max_position_embeddings, batch_size=batch_size,
                        quiet=rank != 0)
        out = run_tasks(lm, list(tasks), batch_size=batch_size, quiet=rank != 0, **run_kw)
        return {**out, "ckpt": str(ckpt), "tp": tp, "pp": pp, "rank": rank}


def benchmark_hf(hf_dir: str | os.PathLike, tasks: Sequence[str], *, batch_size: int = 16,
                 max_length: int | None = None, **run_kw) -> dict:
    """lm-eval tasks on a transformers model through lm-eval's own `hf` model (fp32), offline."""
    import torch

    from cpt_megatron.eval.tasks import resolve_tasks, run_tasks

    hf_dir = Path(hf_dir)
    if not (hf_dir / "config.json").is_file():
        raise FileNotFoundError(f"{hf_dir} is not an HF model directory (no config.json)")
    resolve_tasks(list(tasks))
    args = f"pretrained={hf_dir},dtype=float32,device={'cuda' if torch.cuda.is_available() else 'cpu'}"
    if max_length:
        args += f",max_length={max_length}"
    out = run_tasks("hf", list(tasks), batch_size=batch_size, model_args=args, **run_kw)
    return {**out, "model": str(hf_dir), "rank": 0}
