"""Typed configuration of `cpt curate`: one dataclass per stage, validated on construction.

Defaults live on the fields; a YAML recipe (recipes/curate/*.yaml) only overrides a few. Unknown keys
are rejected with the list of valid ones, so typos never become silent settings.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

from cpt_megatron.errors import CptError

__all__ = [
    "STAGES",
    "DEFAULT_STAGES",
    "CurateConfig",
    "InputConfig",
    "NormalizeConfig",
    "LangIdConfig",
    "LengthConfig",
    "QualityConfig",
    "ExactDedupConfig",
    "MinHashConfig",
    "PerplexityConfig",
    "PiiConfig",
    "load_config",
    "result_config",
]

# The order data flows through; `--stages` picks a subset, the order stays this one.
STAGES = ("normalize", "langid", "length", "quality", "exact_dedup", "minhash_dedup", "perplexity", "pii")
# perplexity needs a model and langid the `indic` extra: both are opt-in.
DEFAULT_STAGES = ("normalize", "length", "quality", "exact_dedup", "minhash_dedup", "pii")


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise CptError(f"{name}={value!r} is not valid; choose one of {list(choices)}")


@dataclass(kw_only=True)
class InputConfig:
    text_field: str = "text"
    """JSONL/Parquet field holding the document text."""
    id_field: str = "id"
    """Field copied to the output `id` when present; otherwise the id is `<file name>:<position>`."""
    doc_separator: str | None = None
    """Regex (multiline) matching the first line of each document in plain-text files, e.g. `^# ` for
    MedQuAD or `^<<< .* >>>$` for CUAD. None: one document per plain-text file."""
    glob: str = "**/*"
    """Files taken from an input directory (recursive glob); hidden files are skipped."""
    max_docs: int | None = None
    """Read at most this many documents (the first ones, in input order; malformed records not counted)."""

    def __post_init__(self):
        if self.doc_separator is not None:
            import re

            try:
                re.compile(self.doc_separator)
            except re.error as e:
                raise CptError(f"input.doc_separator={self.doc_separator!r} is not a valid regex: {e}") from e
        if self.max_docs is not None and not (isinstance(self.max_docs, int) and self.max_docs > 0):
            raise CptError(f"input.max_docs={self.max_docs!r}: give a positive number of documents (or leave it unset)")


@dataclass(kw_only=True)
class NormalizeConfig:
    nfc: bool = True
    """Unicode NFC. For Indic scripts this already decomposes the nukta letters that Unicode excludes
    from composition (U+0958-095F, U+09DC-09DF, ...), which is the canonical form we keep."""
    strip_control: bool = True
    """Drop control and invisible format characters (C0/C1 except tab/newline, ZWSP, BOM, soft hyphen)."""
    whitespace: bool = True
    """Unicode spaces -> ' ', collapse runs, strip line ends, at most one blank line, CRLF -> LF."""
    indic: bool = False
    """Indic normalization on top of NFC (nukta order, ZWJ/ZWNJ policy, danda and digit options)."""
    zero_width: str = "virama"
    """ZWJ/ZWNJ policy (with indic): `virama` keeps them only right after a virama (where they select
    half-forms/explicit virama), `keep` keeps all, `strip` removes all."""
    danda: str = "keep"
    """`keep`; `unicode`: ASCII '|' / '||' after an Indic letter -> danda U+0964 / double danda U+0965;
    `ascii`: dandas -> '.'."""
    digits: str = "keep"
    """`keep` or `ascii` (Indic digits of any script -> 0-9)."""

    def __post_init__(self):
        _check_choice("normalize.zero_width", self.zero_width, ("virama", "keep", "strip"))
        _check_choice("normalize.danda", self.danda, ("keep", "unicode", "ascii"))
        _check_choice("normalize.digits", self.digits, ("keep", "ascii"))


@dataclass(kw_only=True)
class LangIdConfig:
    keep: list[str] | None = None
    """Language codes to keep (ISO 639-1 as pycld2 reports them, `hi-Latn` for romanized Hindi);
    None keeps every language and only tags documents."""
    romanized_hindi: str = "keep"
    """What to do with Roman-script Hindi/Hinglish: `keep` (tag lang=hi-Latn), `drop`, or `route`
    (written to routes/hi-Latn/ instead of the main shards; counted as kept)."""
    code_mixed_min: float = 0.2
    """A Roman-script document whose romanized-Hindi word share is in [code_mixed_min, 1-code_mixed_min]
    is counted as code-mixed in the report."""

    def __post_init__(self):
        _check_choice("langid.romanized_hindi", self.romanized_hindi, ("keep", "drop", "route"))
        if not 0.0 < self.code_mixed_min < 0.5:
            raise CptError(f"langid.code_mixed_min={self.code_mixed_min} must be in (0, 0.5)")


@dataclass(kw_only=True)
class LengthConfig:
    min_chars: int = 1
    """Minimum characters after normalization (0 disables)."""
    max_chars: int = 0
    """Maximum characters; 0 = no limit."""
    min_tokens: int = 0
    """Minimum tokens of `tokenizer` (0 disables; needs `tokenizer`)."""
    max_tokens: int = 0
    """Maximum tokens of `tokenizer`; 0 = no limit."""
    tokenizer: str | None = None
    """Any tokenizer form `cpt_megatron.tokenizer.load_tokenizer` accepts; loaded only when token limits are set."""

    def __post_init__(self):
        if (self.min_tokens or self.max_tokens) and not self.tokenizer:
            raise CptError("length.min_tokens/max_tokens need length.tokenizer (a tokenizer directory or file)")
        for n in ("min_chars", "max_chars", "min_tokens", "max_tokens"):
            if getattr(self, n) < 0:
                raise CptError(f"length.{n}={getattr(self, n)} must be >= 0")


@dataclass(kw_only=True)
class QualityConfig:
    """Gopher-style heuristics (Rae et al. 2021, appendix A); a threshold of None disables that rule."""

    min_words: int | None = 50
    max_words: int | None = 100_000
    min_mean_word_len: float | None = 3.0
    max_mean_word_len: float | None = 10.0
    max_symbol_word_ratio: float | None = 0.1
    """('#' + '...' + '…') per word."""
    min_alpha_word_frac: float | None = 0.8
    """Share of words that contain at least one letter."""
    max_bullet_line_frac: float | None = 0.9
    max_ellipsis_line_frac: float | None = 0.3
    max_dup_line_frac: float | None = 0.3
    max_dup_para_frac: float | None = 0.3
    max_dup_line_char_frac: float | None = 0.2
    max_dup_para_char_frac: float | None = 0.2
    max_top_ngram_char_frac: dict[int, float] | None = field(default_factory=lambda: {2: 0.2, 3: 0.18, 4: 0.16})
    """n -> max share of characters covered by the most frequent word n-gram."""
    max_dup_ngram_char_frac: dict[int, float] | None = field(
        default_factory=lambda: {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10}
    )
    """n -> max share of characters inside word n-grams that occur more than once."""


@dataclass(kw_only=True)
class ExactDedupConfig:
    lowercase: bool = False
    """Hash the lowercased text (catches case-only copies)."""


@dataclass(kw_only=True)
class MinHashConfig:
    threshold: float = 0.8
    """Jaccard threshold: LSH banding is chosen for high recall at it, candidates are decided against it."""
    num_perm: int = 128
    ngram: int = 5
    """Word n-gram shingles."""
    seed: int = 1
    """MinHash permutation seed."""
    lowercase: bool = False
    decide: str = "exact"
    """How an LSH candidate is decided: `exact` (exact Jaccard of the two shingle sets >= threshold) or
    `estimate` (estimated Jaccard from the MinHash signatures >= threshold: no shingle sets kept, but
    ~0.035 standard error at J=0.8 with 128 permutations, so it also removes pairs well below it)."""
    candidates: str = "prefix"
    """`exact` candidates: `prefix` (an index of each kept document's rarest shingles, `curate/prefix_index.py`:
    every earlier kept document with Jaccard >= threshold is a candidate, without enumerating the documents
    that share a template) or `bands` (documents sharing an LSH band: misses < 0.5% of pairs AT the
    threshold, and a band shared by m documents gives m(m-1)/2 pairs). `decide: estimate` and `lsh`
    (Redis) always use `bands`."""
    prefilter_sigmas: float | None = 6.0
    """`exact` with `candidates: bands` (`prefix` checks every candidate within the size and count bounds
    exactly, no sketch kept): a candidate is not checked exactly when a sketch estimate of its Jaccard is more than this
    many standard errors below the threshold, the standard error taken for the PAIR'S SIZE (`dedup.
    sketch_se`: a 30-shingle paragraph fills ~30 of 128 bins, so its estimate is ~2x noisier than a long
    document's; below ~10 shingles no sketch filters at all). 6 sigmas: < 1e-8 of the true pairs are lost
    per filter. null checks every candidate that passes the exact size bound (decisions then depend on
    the LSH alone)."""

    def __post_init__(self):
        if not 0.0 < self.threshold < 1.0:
            raise CptError(f"minhash_dedup.threshold={self.threshold} must be in (0, 1)")
        if self.num_perm < 8 or self.ngram < 1:
            raise CptError("minhash_dedup.num_perm must be >= 8 and ngram >= 1")
        _check_choice("minhash_dedup.decide", self.decide, ("exact", "estimate"))
        _check_choice("minhash_dedup.candidates", self.candidates, ("prefix", "bands"))
        if self.prefilter_sigmas is not None and not self.prefilter_sigmas > 0:
            raise CptError(f"minhash_dedup.prefilter_sigmas={self.prefilter_sigmas} must be > 0 (null: no sketch "
                           "pre-filter)")


@dataclass(kw_only=True)
class PerplexityConfig:
    model: str | None = None
    """HF causal-LM directory or a .gguf file; required when the perplexity stage runs."""
    max_perplexity: float | None = None
    """Documents above are removed; None only scores."""
    min_perplexity: float | None = None
    """Documents below (often boilerplate/repeats) are removed; None disables."""
    max_tokens: int = 512
    """Tokens scored per document (its beginning)."""
    batch_size: int = 8


@dataclass(kw_only=True)
class PiiConfig:
    types: list[str] = field(
        default_factory=lambda: ["EMAIL", "PHONE", "IPV4", "IPV6", "CREDIT_CARD", "SSN", "AADHAAR", "PAN"]
    )
    """Which kinds are replaced by `<TYPE>` placeholders."""

    def __post_init__(self):
        from cpt_megatron.curate.pii import PII_TYPES

        for t in self.types:
            _check_choice("pii.types[]", t, PII_TYPES)


@dataclass(kw_only=True)
class CurateConfig:
    stages: list[str] = field(default_factory=lambda: list(DEFAULT_STAGES))
    input: InputConfig = field(default_factory=InputConfig)
    normalize: NormalizeConfig = field(default_factory=NormalizeConfig)
    langid: LangIdConfig = field(default_factory=LangIdConfig)
    length: LengthConfig = field(default_factory=LengthConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)
    exact_dedup: ExactDedupConfig = field(default_factory=ExactDedupConfig)
    minhash_dedup: MinHashConfig = field(default_factory=MinHashConfig)
    perplexity: PerplexityConfig = field(default_factory=PerplexityConfig)
    pii: PiiConfig = field(default_factory=PiiConfig)
    shard_docs: int = 100_000
    """Kept documents per output shard."""
    rejected_samples: int = 100
    """Rejected documents written per stage to rejected/<stage>.jsonl.gz."""
    lsh: str | None = None
    """None: in-memory LSH. `redis://host:port[/db][?basename=NAME]`: the band keys in Redis lists."""
    memory_mb: float | None = 80
    """Peak resident memory (MiB) each process aims at (`--memory-mb`; None: unbounded): text is hashed and
    batched in pieces sized from it, and the near-dup index's kept documents (sets, sketches, band table)
    live in memory-mapped temp files whose pages are released after each batch above its share
    (curate/spill.py). The interpreter and libraries take ~40 MiB of it; outputs are identical for any value."""

    def __post_init__(self):
        bad = [s for s in self.stages if s not in STAGES]
        if bad:
            raise CptError(f"unknown stage(s) {bad}; valid stages in order: {','.join(STAGES)}")
        self.stages = [s for s in STAGES if s in self.stages]  # canonical order
        if "perplexity" in self.stages and not self.perplexity.model:
            raise CptError("stage perplexity needs perplexity.model (an HF causal-LM directory or .gguf file)")
        if self.shard_docs < 1:
            raise CptError(f"shard_docs={self.shard_docs} must be >= 1")
        if self.memory_mb is not None and not self.memory_mb >= 48:
            raise CptError(f"memory_mb={self.memory_mb}: give at least 48 (MiB per process; the interpreter and "
                           "libraries take ~40), or null for unbounded")
        if self.lsh is not None and not self.lsh.startswith("redis://"):
            raise CptError(f"lsh={self.lsh!r}: expected redis://host:port (or leave unset for in-memory)")


def result_config(cfg: CurateConfig) -> dict:
    """The config as report.json records it: the fields that can change a result (not `memory_mb`, which,
    like the worker count, only changes how the run gets there)."""
    d = dataclasses.asdict(cfg)
    d.pop("memory_mb")
    return d


_SECTION_CLASSES = {
    "input": InputConfig,
    "normalize": NormalizeConfig,
    "langid": LangIdConfig,
    "length": LengthConfig,
    "quality": QualityConfig,
    "exact_dedup": ExactDedupConfig,
    "minhash_dedup": MinHashConfig,
    "perplexity": PerplexityConfig,
    "pii": PiiConfig,
}


def _build(cls, data: dict, where: str):
    if not isinstance(data, dict):
        raise CptError(f"{where}: expected a mapping, found {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise CptError(f"{where}: unknown key(s) {unknown}; valid keys: {sorted(names)}")
    kwargs = {}
    for k, v in data.items():
        sub = _SECTION_CLASSES.get(k) if cls is CurateConfig else None
        kwargs[k] = _build(sub, v or {}, f"{where}.{k}") if sub else v
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise CptError(f"{where}: {e}") from e


def load_config(path: str | os.PathLike | None = None, overrides: dict | None = None) -> CurateConfig:
    """CurateConfig from a YAML recipe (optional) with `overrides` (same nested shape) applied on top."""
    data: dict = {}
    if path is not None:
        import yaml

        if not os.path.isfile(path):
            what = "is a directory; give a curate YAML file" if os.path.isdir(path) else "not found"
            raise CptError(f"config {path} {what}; see recipes/curate/ for examples")
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    for k, v in (overrides or {}).items():
        if isinstance(v, dict):
            data.setdefault(k, {}).update(v)
        else:
            data[k] = v
    return _build(CurateConfig, data, str(path) if path else "config")
