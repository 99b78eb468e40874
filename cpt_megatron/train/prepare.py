"""`cpt prepare`: everything a recipe needs before training, in one resumable single-process step.

    base model (import model.gguf / model.hf / a seeded model.hf_config; parity-checked)
    -> sources with `inputs`: curate -> tokenize (prefix sources are checked as they are)
    -> the mixture's sample indices (megatron's caches under data.cache_dir/indices)
    -> manifest data.cache_dir/prepared/<key>.json: paths, sizes + xxh3 checksums of every .bin/.idx.

Every artifact lands in data.cache_dir under a name keyed by its inputs and is written to a temporary name
first, so a rerun after a crash redoes only what is missing. A rerun re-validates what it finds (the base's
manifest, the curated shards' manifest, each source's recorded checksums) and rebuilds what is damaged. It
needs no GPU and no process group (run it on a CPU node, or as the first Slurm step). `cpt train` never
prepares: every rank reads the manifest and checks sizes (`load_prepared`), then rank 0 checks the checksums
once per job before step 1 and broadcasts its verdict (`verify_prepared`, `data.verify`); a missing, stale or
damaged manifest fails with the `cpt prepare` command.
The key covers what changes the prepared files (model source, tokenizer, the sources' inputs, EOD), not
the mixture weights, alpha or the run length: those change without re-preparing.
"""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
from pathlib import Path

from cpt_megatron.errors import CptError

__all__ = ["prepare", "load_prepared", "verify_prepared", "data_checksums", "prepare_command", "manifest_path", "prepare_base", "prepare_sources",
           "special_input", "resolve_tokenizer", "resolve_path"]

MANIFEST_VERSION = 2  # 2: xxh3 checksums of .bin and .idx (1 had the .idx sha256 and the .bin size only)
_CHECKS = "tokens.check.json"  # beside a prepared source's tokens.bin/.idx: their checksums, written last


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def resolve_path(p: str) -> str:
    """A recipe path: as given if it exists, else relative to the repository (recipes ship relative paths)."""
    if Path(p).exists():
        return p
    from cpt_megatron.config import REPO_RECIPES

    cand = REPO_RECIPES.parent / p
    return str(cand) if cand.exists() else p


def resolve_tokenizer(spec: str) -> str:
    """A tokenizer shortcut (`@gpt2`, `@smollm2`: tokenizer/load.py resolve_spec), else a recipe path."""
    from cpt_megatron.tokenizer.load import resolve_spec

    return resolve_spec(spec) if spec.startswith("@") else resolve_path(spec)


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
        gguf = resolve_tokenizer(model_cfg.gguf)  # @smollm2 or a path
        out = cache / f"gguf-{Path(gguf).stem}-{_key(gguf, os.path.getsize(gguf))}"
        if not _intact_import(out):
            _import_atomic(out, lambda tmp: checkpoint.import_hf(None, tmp, gguf=gguf, dtype="fp32", overwrite=True))
        return str(layout.resolve(out))
    if model_cfg.hf:
        out = cache / f"hf-{Path(model_cfg.hf).name}-{_key(str(Path(model_cfg.hf).resolve()))}"
        if not _intact_import(out):
            _import_atomic(out, lambda tmp: checkpoint.import_hf(model_cfg.hf, tmp, dtype="fp32", overwrite=True))
        return str(layout.resolve(out))
    # random init from an HF config: build a seeded HF model, save it, import it (same path as real models)
    hf_config = resolve_path(model_cfg.hf_config)
    cfg_text = Path(hf_config).read_text()
    out = cache / f"random-{Path(model_cfg.hf_config).stem}-{_key(cfg_text, seed, model_cfg.tokenizer)}"
    if not _intact_import(out):
        hf_dir = cache / (out.name + "-hf")
        tok = resolve_tokenizer(model_cfg.tokenizer) if model_cfg.tokenizer else None
        _random_hf_model(hf_config, tok, hf_dir, seed)
        _import_atomic(out, lambda tmp: checkpoint.import_hf(hf_dir, tmp, dtype="fp32", overwrite=True))
    return str(layout.resolve(out))


def _intact_import(out: Path) -> bool:
    """An imported base already in the cache and whole (its manifest's sizes + checksums hold); a damaged one
    is named and retired, so the caller imports it again."""
    from cpt_megatron.checkpoint import layout
    from cpt_megatron.utils import retire_dir

    if not out.exists():
        return False
    try:
        layout.check_manifest(layout.resolve(out))
        return True
    except CptError as e:
        _say(f"{e}: importing the base model again")
        retire_dir(out)
        return False


def _say(line: str) -> None:
    import sys

    print(f"cpt prepare: {line}", file=sys.stderr, flush=True)


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
        _say(f"removed stale {tmp} (an interrupted earlier import)")
        shutil.rmtree(tmp)
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
    from cpt_megatron.checkpoint import layout
    from cpt_megatron.curate.config import CurateConfig, InputConfig
    from cpt_megatron.curate.pipeline import curate
    from cpt_megatron.data.preprocess import PreprocessConfig, preprocess
    from cpt_megatron.utils import fault_point, write_json

    out = []
    for s in data_cfg.sources:
        entry = {"name": s.name, "group": s.group, "weight": s.weight, "tokens": s.tokens}
        if s.prefix:
            entry["prefix"] = s.prefix
            out.append(entry)
            continue
        key = _key(s.inputs, s.doc_separator, s.curate_stages, s.max_docs, tokenizer, data_cfg.append_eod,
                   *(["max_docs applies to files"] if s.max_docs and not all(i.startswith("@") for i in s.inputs) else []))
        root = Path(data_cfg.cache_dir) / "sources" / f"{s.name}-{key}"
        prefix = root / "tokens"
        checks = _intact_source(root, prefix)
        if checks is None:
            inputs = [str(special_input(i, root / "raw", s.max_docs)) if i.startswith("@") else i for i in s.inputs]
            ic = InputConfig(doc_separator=s.doc_separator, max_docs=s.max_docs)  # max_docs: files too
            cc = CurateConfig(input=ic) if s.curate_stages is None else CurateConfig(input=ic, stages=list(s.curate_stages))
            curated = root / "curated"
            if not _intact_curated(curated):
                curate(inputs, curated, cc, workers=workers, overwrite=True)
                layout.write_manifest(curated)
            shards = sorted(str(p) for p in curated.glob("*.jsonl.gz"))
            if not shards:
                raise CptError(f"data.sources[{s.name}]: curation kept no documents from {s.inputs}")
            preprocess(PreprocessConfig(inputs=shards, tokenizer=tokenizer, out=str(prefix), workers=workers,
                                        append_eod=data_cfg.append_eod, progress=False))
            fault_point("prepare.before_checks")
            checks = data_checksums(str(prefix))
            write_json(root / _CHECKS, checks)
        entry["prefix"] = str(prefix)
        entry["checks"] = checks  # the manifest's checksums: each file is read once per prepare
        out.append(entry)
    return out


def _intact_curated(curated: Path) -> bool:
    """Curated shards from an earlier run, whole (their manifest holds): reused; else curated again."""
    from cpt_megatron.checkpoint import layout

    try:
        return layout.check_manifest(curated)
    except CptError as e:
        _say(f"{e}: curating again")
        return False


def _intact_source(root: Path, prefix: Path) -> dict | None:
    """A prepared source whose tokens.bin/.idx still have the checksums recorded when they were written (not
    merely files that exist): reused (returns the checksums just computed). Missing, unrecorded or damaged: None,
    rebuilt (the same bytes again)."""
    checks = root / _CHECKS
    if not Path(f"{prefix}.idx").exists():
        return None
    try:
        want = json.loads(checks.read_text())
    except (OSError, ValueError):
        _say(f"{prefix}.bin/.idx have no recorded checksums (an interrupted prepare): rebuilding them")
        return None
    try:
        now = data_checksums(str(prefix))
    except OSError as e:
        _say(f"{prefix}: {e.strerror}: rebuilding")
        return None
    for ext in ("bin", "idx"):
        if now[f"{ext}_bytes"] != want.get(f"{ext}_bytes") or now[f"{ext}_checksum"] != want.get(f"{ext}_checksum"):
            _say(f"{prefix}.{ext} differs from its recorded {now['algorithm']} checksum (damaged): rebuilding it")
            checks.unlink()
            return None
    return now


def data_checksums(prefix: str) -> dict:
    """Sizes + checksums (full, and the sampled one for `data.verify=sampled`) of a dataset's .bin and .idx."""
    from cpt_megatron.checkpoint.io import file_checksum, sampled_checksum

    out: dict = {}
    for ext in ("bin", "idx"):
        path = f"{prefix}.{ext}"
        out[f"{ext}_bytes"] = os.path.getsize(path)
        out["algorithm"], out[f"{ext}_checksum"] = file_checksum(path)
    out["bin_sampled"] = sampled_checksum(f"{prefix}.bin", out["algorithm"])[1]
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
        s.update(s.pop("checks", None) or data_checksums(s["prefix"]))  # a `prefix` source: computed here
    manifest = {"version": MANIFEST_VERSION, "key": prepare_key(cfg), "base": base,
                "base_meta_sha256": sha256_file(_base_meta(base)), "tokenizer": tok_spec,
                "vocab_size": vocab, "eod_id": int(tokenizer.eos_token_id),
                "sources": [{k: s[k] for k in ("name", "prefix", *_CHECK_KEYS)} for s in sources]}
    manifest["heldout"] = heldout_overlap(cfg, sources)  # refuses a held-out set that overlaps training text
    mixture = recipe_mixture(cfg, manifest, valid_samples=max(1, cfg.eval.batches * cfg.train.micro_batch))
    manifest["mixture"] = mixture.report()
    write_json(manifest_path(cfg), manifest)
    return {**manifest, "manifest": str(manifest_path(cfg))}


_CHECK_KEYS = ("algorithm", "bin_bytes", "idx_bytes", "bin_checksum", "idx_checksum", "bin_sampled")


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
               {s["name"]: s.get("idx_checksum") for s in sources}, inputs)
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
    for s in manifest["sources"]:  # sizes here (every rank, cheap); checksums in verify_prepared (rank 0)
        for ext in ("bin", "idx"):
            try:
                size = os.path.getsize(f"{s['prefix']}.{ext}")
            except OSError:
                raise stale(f"lacks {s['prefix']}.{ext} (source {s['name']})") from None
            if size != s[f"{ext}_bytes"]:
                raise stale(f"changed since it was prepared: {s['prefix']}.{ext} has {size:,} bytes, "
                            f"{s[f'{ext}_bytes']:,} recorded (source {s['name']})")
    manifest["prepare_command"] = command
    return manifest


VERIFY_MODES = ("full", "sampled", "size")


def verify_prepared(manifest: dict, mode: str = "full") -> dict | None:
    """Check the prepared data against the checksums `cpt prepare` recorded, once per job before step 1.

    Collective when a process group is up (every rank calls it): rank 0 alone reads the files and broadcasts its
    verdict, so every rank raises the same one line naming the damaged file and the `cpt prepare` command that
    rebuilds it. `mode`: full (every byte, xxh3), sampled (the .idx in full + 64 MiB of each .bin: see
    docs/reliability.md), size (load_prepared's size check only). Returns rank 0's cost (bytes, seconds)."""
    import time

    import torch

    from cpt_megatron.checkpoint.io import file_checksum, sampled_checksum

    def check() -> dict:
        t0, nbytes = time.perf_counter(), 0
        for s in manifest["sources"] if mode != "size" else ():
            for ext, sampled in (("idx", False), ("bin", mode == "sampled")):
                path = f"{s['prefix']}.{ext}"
                algo = s["algorithm"]
                got = sampled_checksum(path, algo)[1] if sampled else file_checksum(path, algo)[1]
                if got != s["bin_sampled" if sampled else f"{ext}_checksum"]:
                    raise CptError(f"prepared data {path} is damaged ({algo} checksum differs from the one `cpt "
                                   f"prepare` recorded; source {s['name']}); run `{manifest.get('prepare_command', 'cpt prepare')}`"
                                   " (it rebuilds what is damaged)")
                nbytes += min(os.path.getsize(path), 64 << 20) if sampled else os.path.getsize(path)
        cost = {"mode": mode, "bytes": nbytes, "seconds": time.perf_counter() - t0}
        if nbytes:
            gb = nbytes / 1e9
            print(f"data: verified {gb:.3f} GB of prepared data ({mode}, {manifest['sources'][0]['algorithm']}) in "
                  f"{cost['seconds']:.2f} s ({gb / max(cost['seconds'], 1e-9):.2f} GB/s)", flush=True)
        return cost

    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return check()
    verdict: list = [None]
    if dist.get_rank() == 0:
        try:
            verdict[0] = check()
        except (CptError, OSError) as e:
            verdict[0] = str(e)
    dist.broadcast_object_list(verdict, src=0)
    if isinstance(verdict[0], str):
        raise CptError(verdict[0])
    return verdict[0]

