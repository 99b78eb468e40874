"""SentencePiece fast path for `cpt preprocess`: exact segment-level caching over the `sentencepiece` library.

Used only for a SentencePiece `.model` whose ids from `SentencePieceProcessor.encode` (no BOS/EOS) are
identical to the HF tokenizer's (`cpt_megatron.tokenizer.load`, `split_special_tokens=True`) on the
probe texts plus a sample of the corpus; the verdict is cached with the fast-BPE verdicts (`fast_bpe`).
SentencePiece never turns a control symbol's text ("<s>", "</s>") into its id, which is the plain-text
rule `cpt preprocess` keeps on every path.

Why segments can be cached exactly: BPE only ever merges two adjacent symbols into a piece of the
vocabulary (and unigram's Viterbi only uses such pieces), so no output token spans a position where no
vocabulary piece contains the two characters around it. Encoding splits at such positions into
independent problems. For models with the identity normalizer (Llama 2, Mistral, ...), where no piece
has a "▁" right after another character and some characters (newline, tab) occur in no multi-character piece,
a document is `" " + text` (the dummy prefix) cut before every space (or literal "▁") that follows
another character and around those characters; each distinct segment is encoded once (batched, by sentencepiece itself, with
the dummy prefix off) and the document's ids are the concatenation. The conditions are read from the
model file; a model that does not meet them is encoded document by document, as before.
"""

from __future__ import annotations

import os
import re
from itertools import chain

import numpy as np

from cpt_megatron.utils import flatten_ids, gather_runs

__all__ = ["FastSentencePiece", "is_sentencepiece_model", "segmenter"]

_CANDIDATE_ISOLATED = "\n\r\t\x0b\x0c"
_MAX_CACHE = 1 << 20  # distinct segments kept per process before the cache starts over


def is_sentencepiece_model(spec: str) -> bool:
    name = os.path.basename(spec)
    return os.path.isfile(spec) and (name.endswith(".model") or ".model." in name)


def segmenter(model_proto: bytes) -> tuple[re.Pattern | None, bytes | None, str]:
    """(segment regex, the model with the dummy prefix off, why not) for exact segment-wise encoding."""
    try:
        from sentencepiece import sentencepiece_model_pb2 as pb
    except ImportError:  # the model proto needs protobuf
        return None, None, "protobuf not installed (pip install protobuf)"
    m = pb.ModelProto()
    m.ParseFromString(model_proto)
    ns, ts = m.normalizer_spec, m.trainer_spec
    if ns.name != "identity" or ns.precompiled_charsmap:
        return None, None, f"normalizer {ns.name!r} is not the identity"
    if ns.remove_extra_whitespaces or not ns.escape_whitespaces or ts.treat_whitespace_as_suffix:
        return None, None, "whitespace handling is not the plain '▁' prefix scheme"
    if ts.model_type not in (ts.UNIGRAM, ts.BPE):
        return None, None, f"model type {ts.model_type} is not unigram or BPE"
    if any(p.type == p.USER_DEFINED for p in m.pieces):
        return None, None, "the model has user-defined symbols (matched across segments)"
    multi = [p.piece for p in m.pieces if len(p.piece) > 1 and p.type in (p.NORMAL, p.UNUSED)]
    if any(re.search("[^▁]▁", p) for p in multi):
        return None, None, "a piece has '▁' after another character"
    in_multi = set(chain.from_iterable(multi))
    iso = "".join(c for c in _CANDIDATE_ISOLATED if c not in in_multi)
    cls = re.escape(iso)
    # a literal "▁" in the text is the escaped space after normalization: it cuts like a space
    pattern = re.compile(f"[{cls}]|[ ▁]+[^ ▁{cls}]*|[^ ▁{cls}]+" if iso else "[ ▁]+[^ ▁]*|[^ ▁]+")
    ns.add_dummy_prefix = False
    return pattern, m.SerializeToString(), "ok"


class FastSentencePiece:
    """`encode_flat(texts)` / `encode_batch(texts)` with sentencepiece (threads: `threads`, default all
    cores / workers), segment-cached when the model allows it (`segments_why == "ok"`)."""

    name = "sentencepiece"

    def __init__(self, model_path: str, threads: int = 1):
        import sentencepiece as spm

        self.model_path, self.threads = model_path, max(1, int(threads))
        self.sp = spm.SentencePieceProcessor(model_file=model_path)
        with open(model_path, "rb") as f:
            self._pattern, plain, self.segments_why = segmenter(f.read())
        self._plain = spm.SentencePieceProcessor(model_proto=plain) if plain else None
        self._reset()

    def _reset(self) -> None:
        # segment table: a word w (text between single spaces) is segment "▁w"; its ids are
        # _tok[_off[k]:_off[k] + _len[k]] for k = _index[w]; arrays grow geometrically (_ntok ids used)
        self._index: dict[str, int] = {}
        self._tok, self._off, self._len = np.zeros(1024, np.int64), np.zeros(1024, np.int64), np.zeros(1024, np.int64)
        self._ntok = 0

    def _learn(self, words: list[str]) -> None:
        ids = self._plain.encode([" " + w for w in words], out_type=int, num_threads=self.threads)
        lens = np.fromiter(map(len, ids), np.int64, len(ids))
        n, m, total = len(self._index), len(words), int(lens.sum())
        if n + m > len(self._off):
            grow = max(n + m, 2 * len(self._off)) - len(self._off)
            self._off, self._len = np.append(self._off, np.zeros(grow, np.int64)), np.append(self._len, np.zeros(grow, np.int64))
        if self._ntok + total > len(self._tok):
            self._tok = np.append(self._tok, np.zeros(max(self._ntok + total, 2 * len(self._tok)) - len(self._tok), np.int64))
        self._off[n : n + m] = self._ntok + np.cumsum(lens) - lens
        self._len[n : n + m] = lens
        self._tok[self._ntok : self._ntok + total] = np.fromiter(chain.from_iterable(ids), np.int64, total)
        self._ntok += total
        self._index.update(zip(words, range(n, n + m)))

    def encode_flat(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(all documents' ids back to back, int64; each document's length)."""
        if self._pattern is None:
            return flatten_ids(self.sp.encode(texts, out_type=int, num_threads=self.threads))
        # single-spaced texts: `text.split(" ")` gives the segments (each "▁" + word) in C; others go
        # through the segment regex (runs of spaces, where "▁▁" pieces may merge)
        simple = [bool(t) and "  " not in t and t[0] != " " and "▁" not in t for t in texts]
        words: list[str] = []
        counts = np.zeros(len(texts), np.int64)
        for k, t in enumerate(texts):
            if simple[k]:
                w = t.split(" ")
                words += w
                counts[k] = len(w)
        if words:
            index = self._index
            new = [w for w in dict.fromkeys(words) if w not in index]
            if len(index) + len(new) > _MAX_CACHE:  # bounded memory: the table starts over
                self._reset()
                new = list(dict.fromkeys(words))
            if new:
                self._learn(new)
            seg = np.fromiter(map(self._index.__getitem__, words), np.int64, len(words))
            seg_len = self._len[seg]
            flat = gather_runs(self._tok, self._off[seg], seg_len)
            cut = np.concatenate([[0], np.cumsum(counts)])
            lengths = np.add.reduceat(np.append(seg_len, 0), cut[:-1]) * (counts > 0)
        else:
            flat, lengths = np.zeros(0, np.int64), np.zeros(len(texts), np.int64)
        if all(simple):
            return flat, lengths
        other = [k for k, ok in enumerate(simple) if not ok]
        o_flat, o_len = flatten_ids(self._encode_segments([texts[k] for k in other]))
        pieces, starts = [], np.concatenate([[0], np.cumsum(lengths)])
        oi = np.concatenate([[0], np.cumsum(o_len)])
        j = 0
        for k in range(len(texts)):  # merge the two kinds back into input order
            if simple[k]:
                pieces.append(flat[starts[k] : starts[k + 1]])
            else:
                pieces.append(o_flat[oi[j] : oi[j + 1]])
                lengths[k] = o_len[j]
                j += 1
        return np.concatenate(pieces) if pieces else flat, lengths

    def _encode_segments(self, texts: list[str]) -> list[list[int]]:
        find = self._pattern.findall
        segs = [find(" " + t) if t else [] for t in texts]  # sentencepiece adds no prefix to an empty text
        uniq = list(dict.fromkeys(chain.from_iterable(segs)))
        ids = dict(zip(uniq, self._plain.encode(uniq, out_type=int, num_threads=self.threads)))
        return [list(chain.from_iterable(map(ids.__getitem__, ss))) for ss in segs]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        flat, lengths = self.encode_flat(texts)
        ends = np.cumsum(lengths)
        return [flat[e - n : e].tolist() for e, n in zip(ends.tolist(), lengths.tolist())]

    def __getstate__(self):
        return (self.model_path, self.threads)

    def __setstate__(self, state):
        self.__init__(*state)

    @classmethod
    def from_model(cls, model_path: str, threads: int = 1) -> tuple[FastSentencePiece | None, str]:
        try:
            return cls(model_path, threads), "ok"
        except ImportError:
            return None, "sentencepiece not installed"
        except (OSError, RuntimeError) as e:
            return None, f"sentencepiece refused the model: {e}"
