"""Data mixtures: domain + general (replay) sources, alpha, curriculum phases, held-out validation.

Resolution (megatron-core 0.16.1):
- Each source is built through `BlendedMegatronDatasetBuilder` + `GPTDatasetConfig` with a
  one-prefix blend and split `(1 - valid_fraction, valid_fraction, 0)`: its train split is a
  GPTDataset of `train_samples` samples (the source's *stream*), its tail a fixed validation set.
  Megatron builds on rank 0 first, then barriers, then the other ranks load the cache.
- The run is a concatenation of phases; phase k covers global samples
  `[phase_boundaries[k], phase_boundaries[k+1])`. Inside a phase, sources are interleaved with
  megatron's own `helpers.build_blending_indices` (the deterministic greedy `BlendedDataset` uses)
  at weights `alpha * w_domain_i / sum` and `(1 - alpha) * w_general_j / sum`.
- Why not one `BlendedDataset` per phase: every phase would restart each source from its first
  samples (a domain source seen in phase 1 would be replayed in phase 2 while the rest stays unseen),
  and a GPTDataset's sample order depends on its size, so changing the mix later (the forgetting
  monitor's `with_extra_phase`) would change earlier samples. Here each source's stream is fixed by
  (prefix, seed, seq_len, train_samples) and phases keep consuming it where the previous phase
  stopped: earlier samples never change, and epochs per source are what the report says.

Token budgets: a source with `tokens` gets `tokens / planned tokens of its group over the run` of
its group; sources with a weight share the rest of the group by weight.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections import OrderedDict
from pathlib import Path

import numpy as np

from cpt_megatron.errors import CptError

__all__ = [
    "SourceConfig",
    "PhaseConfig",
    "MixtureConfig",
    "Mixture",
    "build_mixture",
    "with_extra_phase",
    "check_dataset_tokenizer",
    "resolve_phases",
    "mixture_config_from_dict",
]

GROUPS = ("domain", "general")


@dataclasses.dataclass(kw_only=True)
class SourceConfig:
    """One preprocessed dataset."""

    name: str
    """Unique name (used in reports and as the validation-set key)."""
    prefix: str
    """Indexed dataset prefix (PREFIX.bin/.idx, ideally with PREFIX.meta.json)."""
    group: str
    """'domain' (new data) or 'general' (replay)."""
    weight: float = 1.0
    """Share inside its group, relative to the other weighted sources of the group."""
    tokens: int | None = None
    """Token budget over the whole run instead of a weight (None = use weight)."""

    def __post_init__(self):
        if self.group not in GROUPS:
            raise CptError(f"source {self.name!r}: group={self.group!r}, expected 'domain' or 'general'")
        if not (self.weight >= 0):
            raise CptError(f"source {self.name!r}: weight={self.weight} must be >= 0")
        if self.tokens is not None and self.tokens < 0:
            raise CptError(f"source {self.name!r}: tokens={self.tokens} must be >= 0 (or None for a weight)")


@dataclasses.dataclass(kw_only=True)
class PhaseConfig:
    """One curriculum phase."""

    until: float | None = None
    """Fraction of planned train samples where the phase ends (None = to the end of the run)."""
    alpha: float | None = None
    """Domain share of training tokens in this phase (None = MixtureConfig.alpha)."""


@dataclasses.dataclass(kw_only=True)
class MixtureConfig:
    """Sources, the domain ratio alpha, optional phases, validation hold-out."""

    sources: list[SourceConfig]
    """All datasets, grouped by SourceConfig.group."""
    alpha: float = 0.7
    """Share of training tokens from the domain group (0..1); the rest is general replay."""
    phases: list[PhaseConfig] = dataclasses.field(default_factory=list)
    """Curriculum, e.g. [{until: 0.3, alpha: 0.5}, {alpha: 0.8}]; empty = one phase at alpha."""
    valid_fraction: float = 0.02
    """Held-out tail of each source's documents: its validation set (forgetting monitor)."""
    seed: int = 1234
    """Seed of megatron's document/sample shuffles."""
    max_epochs_warn: float = 4.0
    """The report warns when a source repeats more epochs than this."""

    def __post_init__(self):
        self.sources = [s if isinstance(s, SourceConfig) else SourceConfig(**s) for s in self.sources]
        self.phases = [p if isinstance(p, PhaseConfig) else PhaseConfig(**p) for p in self.phases]
        if not self.sources:
            raise CptError("sources: give at least one source")
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise CptError(f"sources: duplicate names in {names}")
        if not 0.0 <= self.alpha <= 1.0:
            raise CptError(f"alpha={self.alpha}: must be in [0, 1]")
        if not 0.0 <= self.valid_fraction < 0.5:
            raise CptError(f"valid_fraction={self.valid_fraction}: must be in [0, 0.5)")
        last = 0.0
        for i, p in enumerate(self.phases):
            if p.alpha is not None and not 0.0 <= p.alpha <= 1.0:
                raise CptError(f"phases[{i}].alpha={p.alpha}: must be in [0, 1]")
            if p.until is None:
                if i != len(self.phases) - 1:
                    raise CptError(f"phases[{i}].until is None but it is not the last phase")
            elif not last < p.until <= 1.0:
                raise CptError(f"phases[{i}].until={p.until}: must increase and lie in (0, 1]")
            else:
                last = p.until
        for g in GROUPS:
            if not any(s.group == g for s in self.sources):
                bad = [a for a in self.phase_alphas() if (a > 0 if g == "domain" else a < 1)]
                if bad:
                    raise CptError(
                        f"no {g} source but alpha={bad[0]} asks for {g} tokens; add a {g} source or set alpha "
                        f"to {0 if g == 'domain' else 1}"
                    )

    def phase_alphas(self) -> list[float]:
        return [a for _, _, a in resolve_phases(self, 1_000_000)]


def mixture_config_from_dict(d: dict) -> MixtureConfig:
    """From a plain dict (YAML); unknown keys are errors."""
    if not isinstance(d, dict):
        raise CptError(f"mixture: expected a mapping with sources:, got {type(d).__name__}")
    _check_keys(MixtureConfig, d, "mixture")
    for key, cls in (("sources", SourceConfig), ("phases", PhaseConfig)):
        items = d.get(key) or []
        if not isinstance(items, list):
            raise CptError(f"mixture.{key}: expected a list, got {type(items).__name__}")
        for i, item in enumerate(items):
            _check_keys(cls, item, f"mixture.{key}[{i}]")
    return MixtureConfig(**d)


def _check_keys(cls, d, where: str) -> None:
    """One line naming an unknown or missing key of `cls` in the YAML mapping `d` (not a Python TypeError)."""
    if not isinstance(d, dict):
        raise CptError(f"{where}: expected a mapping, got {d!r}")
    fields = dataclasses.fields(cls)
    known = {f.name for f in fields}
    if unknown := sorted(set(d) - known):
        raise CptError(f"{where}: unknown key(s) {', '.join(map(str, unknown))}; valid keys: {', '.join(sorted(known))}")
    required = [f.name for f in fields if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing := [k for k in required if k not in d]:
        raise CptError(f"{where}: missing required key(s) {', '.join(missing)}")


def resolve_phases(cfg: MixtureConfig, train_samples: int) -> list[tuple[int, int, float]]:
    """[(start, end, alpha)] covering [0, train_samples); boundaries are round(until * train_samples)."""
    out, start = [], 0
    for p in cfg.phases:
        end = train_samples if p.until is None else int(round(p.until * train_samples))
        if end > start:
            out.append((start, end, cfg.alpha if p.alpha is None else p.alpha))
        start = max(start, end)
    if start < train_samples:
        out.append((start, train_samples, cfg.alpha))
    return out


def with_extra_phase(cfg: MixtureConfig, at_sample: int, train_samples: int, alpha: float) -> MixtureConfig:
    """From global sample `at_sample` on, use `alpha`; earlier samples are unchanged."""
    phases = []
    for start, end, a in resolve_phases(cfg, train_samples):
        if start >= at_sample:
            break
        phases.append(PhaseConfig(until=min(end, at_sample) / train_samples, alpha=a))
    if at_sample < train_samples:
        phases.append(PhaseConfig(until=None, alpha=alpha))
    return dataclasses.replace(cfg, phases=phases)


# ---------------------------------------------------------------------------------------------------
# Tokenizer consistency


def check_dataset_tokenizer(prefix: str, vocab_size: int, tokenizer_sha256: dict | None = None) -> dict:
    """Refuse a dataset made with another tokenizer or holding ids >= vocab_size. Returns its meta."""
    from cpt_megatron.data.indexed import IndexArrays, dataset_exists

    if not dataset_exists(prefix):
        raise CptError(f"dataset {prefix}.bin/.idx not found; run `cpt preprocess --out {prefix} ...` first")
    meta_path = Path(f"{prefix}.meta.json")
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    tok = meta.get("tokenizer") or {}
    if tokenizer_sha256 is not None and tok.get("sha256") is not None and tok["sha256"] != tokenizer_sha256:
        raise CptError(
            f"dataset {prefix} was tokenized with {tok.get('name')!r} (files {sorted(tok['sha256'])}, vocab "
            f"{tok.get('vocab_size')}), which differs from the model's tokenizer (files {sorted(tokenizer_sha256)}); "
            f"re-run `cpt preprocess` with the model's tokenizer"
        )
    max_id = meta.get("max_token_id")
    if max_id is None or meta.get("bin_bytes") != os.path.getsize(f"{prefix}.bin"):
        idx = IndexArrays(prefix)
        mm = np.memmap(f"{prefix}.bin", dtype=idx.dtype, mode="r")
        max_id = max((int(mm[i : i + (1 << 24)].max()) for i in range(0, len(mm), 1 << 24)), default=-1)
    if max_id >= vocab_size:
        raise CptError(
            f"dataset {prefix} holds token id {max_id} >= the model's vocab size {vocab_size}: it was tokenized "
            f"with a larger tokenizer ({tok.get('name', 'unknown')}, vocab {tok.get('vocab_size', '?')})"
        )
    return meta


# ---------------------------------------------------------------------------------------------------
# Building


class _Tokenizer:
    """The duck-typed tokenizer GPTDatasetConfig needs: eod, vocab_size, pad, unique_identifiers."""

    def __init__(self, vocab_size: int, eod: int, sha256: dict | None):
        self.vocab_size, self.eod, self.pad = vocab_size, eod, -1
        self.unique_identifiers = OrderedDict(
            [("class", "CptTokenizer"), ("vocab_size", vocab_size), ("eod", eod),
             ("sha256", json.dumps(sha256 or {}, sort_keys=True))]
        )


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def _group_shares(cfg: MixtureConfig, phases, seq_len: int) -> np.ndarray:
    """Share of each source inside its group (constant over the run)."""
    shares = np.zeros(len(cfg.sources))
    for g in GROUPS:
        idx = [i for i, s in enumerate(cfg.sources) if s.group == g]
        if not idx:
            continue
        planned = sum((e - b) * (a if g == "domain" else 1 - a) for b, e, a in phases) * seq_len
        budget = {i: cfg.sources[i].tokens / planned if planned else 0.0 for i in idx if cfg.sources[i].tokens is not None}
        weighted = [i for i in idx if cfg.sources[i].tokens is None]
        used = sum(budget.values())
        if used > 1 + 1e-9:
            raise CptError(
                f"token budgets of the {g} group ({sum(cfg.sources[i].tokens for i in budget):,}) exceed its planned "
                f"tokens over the run ({int(planned):,}); lower them or raise train samples / the group's share"
            )
        wsum = sum(cfg.sources[i].weight for i in weighted)
        if weighted and wsum > 0:
            for i in budget:
                shares[i] = budget[i]
            for i in weighted:
                shares[i] = (1 - used) * cfg.sources[i].weight / wsum
        elif used > 0:
            for i in budget:
                shares[i] = budget[i] / used  # only budgets: they set the split inside the group
        else:
            raise CptError(f"the {g} group has no positive weight or token budget")
    return shares


def _blend_indices(weights_per_phase, phases, n_sources, train_samples):
    from megatron.core.datasets import helpers

    dataset_index = np.zeros(train_samples, dtype=np.int16)
    sample_index = np.zeros(train_samples, dtype=np.int64)
    consumed = np.zeros(n_sources, dtype=np.int64)
    for (start, end, _), w in zip(phases, weights_per_phase):
        active = np.flatnonzero(w > 0)
        n = end - start
        di = np.zeros(n, dtype=np.int16)
        si = np.zeros(n, dtype=np.int64)
        ww = (w[active] / w[active].sum()).astype(np.float64)
        helpers.build_blending_indices(di, si, ww, len(active), n, False)
        src = active[di]
        dataset_index[start:end] = src
        sample_index[start:end] = si + consumed[src]
        consumed += np.bincount(src, minlength=n_sources)
    return dataset_index, sample_index


class _PhasedBlend:
    """Global training samples: phases concatenated; item i = source stream sample (dataset, index)."""

    def __init__(self, datasets, dataset_index, sample_index):
        self.datasets, self.dataset_index, self.sample_index = datasets, dataset_index, sample_index

    def __len__(self) -> int:
        return len(self.dataset_index)

    def __getitem__(self, i: int) -> dict:
        s = int(self.dataset_index[i])
        sample = self.datasets[s][int(self.sample_index[i])]
        return {"source": s, **sample}


def _as_torch_dataset(obj):
    import torch.utils.data

    class PhasedBlendDataset(_PhasedBlend, torch.utils.data.Dataset):
        pass

    return PhasedBlendDataset(obj.datasets, obj.dataset_index, obj.sample_index)


@dataclasses.dataclass
class Mixture:
    """What the training driver consumes (see module docstring)."""

    train: object
    """len == train_samples; train[i] = the i-th global sample: GPTDataset dict + 'source' (int)."""
    valid: dict
    """Per source name: its held-out tail as a GPTDataset (>= valid_samples samples: whole epochs; fixed)."""
    phase_boundaries: list[int]
    """[0, b1, ..., train_samples]: phase k covers [phase_boundaries[k], phase_boundaries[k+1])."""
    source_names: list[str]
    cfg: MixtureConfig
    seq_len: int
    phase_alphas: list[float]
    source_weights: list[list[float]]
    """Per phase, the blend weight of each source (sums to 1)."""
    train_tokens_available: list[int]
    """Tokens in each source's train split (for epochs)."""

    def report(self) -> dict:
        """Realized token shares (from the sample indices, before training), epochs, tokens per phase."""
        di = np.asarray(self.train.dataset_index)
        n = len(self.source_names)
        counts = np.bincount(di, minlength=n)
        total = max(int(counts.sum()), 1)
        groups = [s.group for s in self.cfg.sources]
        sources, warnings = {}, []
        for i, name in enumerate(self.source_names):
            tokens = int(counts[i]) * self.seq_len
            avail = self.train_tokens_available[i]
            epochs = tokens / avail if avail else 0.0
            sources[name] = {"group": groups[i], "samples": int(counts[i]), "tokens": tokens,
                             "share": float(counts[i] / total), "epochs": round(epochs, 4)}
            if epochs > self.cfg.max_epochs_warn:
                warnings.append(f"source {name!r} repeats {epochs:.1f} epochs (> max_epochs_warn="
                                f"{self.cfg.max_epochs_warn}); add data, lower its weight or its group's share")
        group_share = {g: float(sum(counts[i] for i in range(n) if groups[i] == g) / total) for g in GROUPS}
        phases = []
        for k in range(len(self.phase_boundaries) - 1):
            b, e = self.phase_boundaries[k], self.phase_boundaries[k + 1]
            c = np.bincount(di[b:e], minlength=n)
            phases.append({"start": b, "end": e, "alpha": self.phase_alphas[k], "tokens": (e - b) * self.seq_len,
                           "tokens_per_source": {nm: int(c[i]) * self.seq_len for i, nm in enumerate(self.source_names)},
                           "domain_share": float(sum(c[i] for i in range(n) if groups[i] == "domain") / max(e - b, 1))})
        return {"train_samples": total, "seq_len": self.seq_len, "tokens": total * self.seq_len,
                "sources": sources, "groups": group_share, "phases": phases, "warnings": warnings,
                "valid_samples": {k: len(v) for k, v in self.valid.items()}}

    def megatron_lm(self) -> dict:
        """The Megatron-LM `--data-path w1 p1 w2 p2 ... --split` equivalent of each phase, and what does not carry over."""
        prefixes = [s.prefix for s in self.cfg.sources]
        vf = float(self.cfg.valid_fraction)
        train_pct = round(100 * (1 - vf), 4)
        split = f"{train_pct:g},{round(100 - train_pct, 4):g},0"
        phases = []
        for k, w in enumerate(self.source_weights):
            b, e = self.phase_boundaries[k], self.phase_boundaries[k + 1]
            pairs = [f"{wi:.6g} {p}" for wi, p in zip(w, prefixes) if wi > 0]
            phases.append({"phase": k, "start_sample": b, "end_sample": e, "data_path": " ".join(pairs),
                           "args": f"--data-path {' '.join(pairs)} --split {split}"})
        caveats = [
            "Megatron-LM blends by fixed weights over the whole job: it has no phases. Run one pretrain_gpt.py job "
            "per phase, each with --train-samples = that phase's end_sample, --load = the previous phase's --save"
            + (" (the weights above change at each boundary)" if len(phases) > 1 else ""),
            "token budgets (source `tokens:`) and alpha were turned into these weights for this run length; "
            "Megatron-LM knows only weights, so a different --train-samples no longer honours the budgets",
            f"--split {split} is the same per-source document split as data.valid_fraction={vf:g} (the same rule); "
            "Megatron-LM evaluates the blend, cpt-megatron each source separately",
            "Megatron-LM builds ceil(ceil(N*w)*1.005) samples per source and shuffles with its own seed: sample order "
            "differs, realized shares match",
        ]
        return {"phases": phases, "split": split, "caveats": caveats}

    def plot(self, path: str) -> str:
        """PNG of the planned alpha and the realized domain share over the run.

        The realized curve is the cumulative domain share since the start of each phase (samples so far in
        the phase that are domain / samples so far): it converges to the phase's alpha and stays readable
        with a few dozen samples, where a per-sample or windowed curve is a 0/1 sawtooth.
        """
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator

        di = np.asarray(self.train.dataset_index)
        is_domain = np.isin(di, [i for i, s in enumerate(self.cfg.sources) if s.group == "domain"]).astype(float)
        fig, ax = plt.subplots(figsize=(8, 3.2))
        for k in range(len(self.phase_boundaries) - 1):
            b, e = self.phase_boundaries[k], self.phase_boundaries[k + 1]
            share = np.cumsum(is_domain[b:e]) / np.arange(1, e - b + 1)
            ax.step(np.arange(b + 1, e + 1), share, where="post", color="C0", lw=1.2,
                    label="realized (cumulative within phase)" if k == 0 else None)
        xs, ys = [], []
        for k, a in enumerate(self.phase_alphas):
            xs += [self.phase_boundaries[k], self.phase_boundaries[k + 1]]
            ys += [a, a]
        ax.plot(xs, ys, "k--", lw=1.5, label="planned alpha")
        for b in self.phase_boundaries[1:-1]:
            ax.axvline(b, color="grey", lw=0.5)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("global training sample")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("domain share of tokens")
        ax.legend(loc="lower right", fontsize=8)
        fig.tight_layout()
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path


def build_mixture(
    cfg: MixtureConfig,
    *,
    seq_len: int,
    train_samples: int,
    valid_samples: int,
    cache_dir: str,
    tokenizer_vocab_size: int,
    eod_id: int,
    tokenizer_sha256: dict | None = None,
    reset_position_ids: bool = False,
    reset_attention_mask: bool = False,
    eod_mask_loss: bool = False,
) -> Mixture:
    """Resolve `cfg` into train/valid datasets. Call on every rank (after torch.distributed init)."""
    if seq_len < 1 or train_samples < 1 or valid_samples < 0:
        raise CptError(f"seq_len={seq_len}, train_samples={train_samples}, valid_samples={valid_samples}: "
                         "need seq_len >= 1, train_samples >= 1, valid_samples >= 0")
    n = len(cfg.sources)
    if n >= 32767:
        raise CptError("at most 32766 sources (megatron's dataset ids are int16)")
    metas = [check_dataset_tokenizer(s.prefix, tokenizer_vocab_size, tokenizer_sha256) for s in cfg.sources]
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig  # after the cheap checks
    for s, m in zip(cfg.sources, metas):
        if m.get("tokenizer") and m["tokenizer"].get("eod_id") not in (None, eod_id):
            raise CptError(f"dataset {s.prefix} uses EOD id {m['tokenizer']['eod_id']}, the model's is {eod_id}")
    phases = resolve_phases(cfg, train_samples)
    shares = _group_shares(cfg, phases, seq_len)
    is_domain = np.array([s.group == "domain" for s in cfg.sources])
    weights = [np.where(is_domain, a, 1 - a) * shares for _, _, a in phases]
    used = np.any(np.stack(weights) > 0, axis=0)

    tok = _Tokenizer(tokenizer_vocab_size, eod_id, tokenizer_sha256)
    vf = cfg.valid_fraction
    os.makedirs(cache_dir, exist_ok=True)
    train_ds, valid, avail = [], {}, []
    from cpt_megatron.data.indexed import IndexArrays

    for i, s in enumerate(cfg.sources):
        idx = IndexArrays(s.prefix)
        n_docs = idx.document_count - 1
        n_train_docs = n_docs - int(round(n_docs * vf))  # same cut as megatron's split (contiguous tail)
        if vf > 0 and (n_docs - n_train_docs < 1 or n_train_docs < 1):
            raise CptError(f"source {s.name!r} has {n_docs} documents: valid_fraction={vf} leaves an empty train "
                           "or validation part; add documents or change valid_fraction")
        avail.append(int(idx.lengths[: idx.document_indices[n_train_docs]].sum(dtype=np.int64)))
        config = GPTDatasetConfig(
            random_seed=cfg.seed, sequence_length=seq_len, blend=([s.prefix], None),
            split=f"{1 - vf:.8f},{vf:.8f},0", path_to_cache=cache_dir, tokenizer=tok,
            reset_position_ids=reset_position_ids, reset_attention_mask=reset_attention_mask,
            eod_mask_loss=eod_mask_loss, create_attention_mask=False,
        )
        sizes = [train_samples if used[i] else 0, valid_samples if vf > 0 else 0, 0]
        try:
            tr, va, _ = BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, config).build()
        except CptError:
            raise
        except Exception as e:
            raise CptError(f"could not build source {s.name!r} ({s.prefix}): {type(e).__name__}: {e}") from e
        train_ds.append(tr if used[i] else None)
        if vf > 0 and valid_samples > 0:
            valid[s.name] = va

    dataset_index, sample_index = _cached_blend(cfg, phases, weights, train_samples, seq_len, cache_dir)
    train = _as_torch_dataset(_PhasedBlend(train_ds, dataset_index, sample_index))
    return Mixture(
        train=train, valid=valid, phase_boundaries=[phases[0][0]] + [e for _, e, _ in phases],
        source_names=[s.name for s in cfg.sources], cfg=cfg, seq_len=seq_len,
        phase_alphas=[a for _, _, a in phases], source_weights=[w.tolist() for w in weights],
        train_tokens_available=avail,
    )


def _cached_blend(cfg, phases, weights, train_samples, seq_len, cache_dir):
    """Blending indices, built once (rank 0) into cache_dir and memory-mapped by every rank."""
    desc = json.dumps({"class": "CptPhasedBlend", "prefixes": [s.prefix for s in cfg.sources], "seed": cfg.seed,
                       "seq_len": seq_len, "train_samples": train_samples, "phases": phases,
                       "weights": [w.tolist() for w in weights]}, sort_keys=True)
    h = hashlib.md5(desc.encode()).hexdigest()
    paths = [Path(cache_dir) / f"{h}-CptPhasedBlend-train-{k}.npy" for k in ("dataset_index", "sample_index")]
    dist = _dist()
    if not all(p.is_file() for p in paths) and (dist is None or dist.get_rank() == 0):
        arrays = _blend_indices(weights, phases, len(cfg.sources), train_samples)
        for p, a in zip(paths, arrays):
            tmp = p.with_suffix(f".tmp{os.getpid()}.npy")
            np.save(tmp, a)
            os.replace(tmp, p)
        (Path(cache_dir) / f"{h}-CptPhasedBlend-train-description.txt").write_text(desc)
    if dist is not None:
        dist.barrier()
    return tuple(np.load(p, mmap_mode="r") for p in paths)
