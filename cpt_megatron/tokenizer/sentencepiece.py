"""SentencePiece `.model` -> `tokenizers.Tokenizer`, without protobuf and without transformers' converter.

Why our own: under transformers 5.x, `LlamaTokenizerFast(vocab_file=tokenizer.model.v1)` silently
yields a 3-token tokenizer, and `convert_slow_tokenizer` needs the protobuf package. The model file is
a small protobuf message; we read the few fields that decide how text is encoded (piece list with
scores and types, model type, byte fallback, add_dummy_prefix, remove_extra_whitespaces) with a
20-line wire-format reader.

The result mirrors sentencepiece exactly for identity-normalized models (Llama 2, Mistral):
- normalizer: Prepend("▁") (add_dummy_prefix) + Replace(" ", "▁"); no pre-tokenizer, like SP, which
  sees the whole string (a Metaspace pre-tokenizer would drop the second "▁" of a leading space);
- model: BPE with merges derived from the piece list, ranked by the merged piece's score (SP's BPE
  merges the highest-scoring piece first; Mistral's "▁▁" pieces score -1e9 and so merge last);
  or Unigram with the scores;
- decoder: "▁" -> " ", byte fallback, fuse, strip the dummy-prefix space.
"""

from __future__ import annotations

import os
import struct

from cpt_megatron.errors import CptError

__all__ = ["sentencepiece_to_tokenizers", "read_sentencepiece_model"]

# sentencepiece_model.proto field numbers (ModelProto, SentencePiece, TrainerSpec, NormalizerSpec)
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6
_UNIGRAM, _BPE = 1, 2


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, i
        shift += 7


def _fields(buf: bytes):
    """Yield (field_number, wire_type, value) of one protobuf message (value: int, bytes or float)."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        num, wire = key >> 3, key & 7
        if wire == 0:
            val, i = _varint(buf, i)
        elif wire == 1:
            val, i = buf[i : i + 8], i + 8
        elif wire == 2:
            n, i = _varint(buf, i)
            val, i = buf[i : i + n], i + n
        elif wire == 5:
            val, i = struct.unpack("<f", buf[i : i + 4])[0], i + 4
        else:
            raise CptError(f"unsupported protobuf wire type {wire}")
        yield num, wire, val


def read_sentencepiece_model(path: str | os.PathLike) -> dict:
    """The fields of a SentencePiece model that decide encoding: pieces [(piece, score, type)], specs."""
    with open(path, "rb") as f:
        buf = f.read()
    out = {
        "pieces": [],
        "model_type": _UNIGRAM,
        "byte_fallback": False,
        "normalizer_name": "nmt_nfkc",
        "add_dummy_prefix": True,
        "remove_extra_whitespaces": True,
    }
    try:
        for num, _, val in _fields(buf):
            if num == 1:  # SentencePiece piece
                piece, score, ptype = "", 0.0, _NORMAL
                for n2, _, v2 in _fields(val):
                    if n2 == 1:
                        piece = v2.decode("utf-8")
                    elif n2 == 2:
                        score = float(v2)
                    elif n2 == 3:
                        ptype = v2
                out["pieces"].append((piece, score, ptype))
            elif num == 2:  # TrainerSpec
                for n2, _, v2 in _fields(val):
                    if n2 == 3:
                        out["model_type"] = v2
                    elif n2 == 35:
                        out["byte_fallback"] = bool(v2)
            elif num == 3:  # NormalizerSpec
                for n2, _, v2 in _fields(val):
                    if n2 == 1:
                        out["normalizer_name"] = v2.decode("utf-8")
                    elif n2 == 3:
                        out["add_dummy_prefix"] = bool(v2)
                    elif n2 == 4:
                        out["remove_extra_whitespaces"] = bool(v2)
    except (IndexError, ValueError, UnicodeDecodeError, struct.error) as e:
        raise CptError(f"{path} is not a readable SentencePiece model ({e})") from e
    if not out["pieces"]:
        raise CptError(f"{path} has no pieces: not a SentencePiece model")
    return out


def _bpe_merges(pieces: list[tuple[str, float, int]], vocab: dict[str, int]) -> list[tuple[str, str]]:
    """Every split of a mergeable piece into two vocab pieces, ranked by the merged piece's score."""
    ranked = []
    for pid, (piece, score, ptype) in enumerate(pieces):
        if ptype != _NORMAL or len(piece) < 2:
            continue
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in vocab and right in vocab:
                ranked.append((-score, pid, vocab[left], vocab[right], left, right))
    ranked.sort()
    return [(r[4], r[5]) for r in ranked]


def sentencepiece_to_tokenizers(path: str | os.PathLike):
    """Return (tokenizers.Tokenizer, special-token kwargs for PreTrainedTokenizerFast)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers

    spec = read_sentencepiece_model(path)
    pieces = spec["pieces"]
    vocab = {p: i for i, (p, _, _) in enumerate(pieces)}
    unk = next((p for p, _, t in pieces if t == _UNKNOWN), None)
    if spec["model_type"] == _BPE:
        model = models.BPE(
            vocab=vocab,
            merges=_bpe_merges(pieces, vocab),
            unk_token=unk,
            byte_fallback=spec["byte_fallback"],
            fuse_unk=True,
        )
    elif spec["model_type"] == _UNIGRAM:
        unk_id = vocab.get(unk) if unk is not None else None
        model = models.Unigram([(p, s) for p, s, _ in pieces], unk_id, spec["byte_fallback"])
    else:
        raise CptError(f"{path}: SentencePiece model type {spec['model_type']} (word/char) is not supported")
    tok = Tokenizer(model)
    norms = []
    if spec["normalizer_name"] not in ("identity", ""):
        # nmt_nfkc's precompiled charsmap is close to NFKC; exact for the Llama/Mistral identity models.
        norms.append(normalizers.NFKC())
    if spec["remove_extra_whitespaces"]:
        norms += [normalizers.Strip(left=True, right=True), normalizers.Replace(Regex(" {2,}"), " ")]
    if spec["add_dummy_prefix"]:
        norms.append(normalizers.Prepend("▁"))
    norms.append(normalizers.Replace(" ", "▁"))
    tok.normalizer = normalizers.Sequence(norms)
    decs = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if spec["add_dummy_prefix"]:
        decs.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(decs)
    control = [p for p, _, t in pieces if t in (_CONTROL, _UNKNOWN)]
    tok.add_special_tokens([AddedToken(p, special=True, normalized=False) for p in control])
    user = [p for p, _, t in pieces if t == _USER_DEFINED]
    if user:
        tok.add_tokens([AddedToken(p, special=False, normalized=False) for p in user])
    special = {"unk_token": unk}
    for key, names in (("bos_token", ("<s>", "<|begin_of_text|>")), ("eos_token", ("</s>", "<|end_of_text|>"))):
        found = next((p for p in control if p in names), None)
        if found:
            special[key] = found
    return tok, {k: v for k, v in special.items() if v is not None}
