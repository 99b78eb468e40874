"""SentencePiece fast path for `cpt preprocess`: the `sentencepiece` library's own batched C++ encoder.

Used only for a SentencePiece `.model` whose ids from `SentencePieceProcessor.encode` (no BOS/EOS) are
identical to the HF tokenizer's (`cpt_megatron.tokenizer.load`, `split_special_tokens=True`) on the
probe texts plus a sample of the corpus; the verdict is cached with the fast-BPE verdicts (`fast_bpe`).
SentencePiece never turns a control symbol's text ("<s>", "</s>") into its id, which is the plain-text
rule `cpt preprocess` keeps on every path.
"""

from __future__ import annotations

import os

__all__ = ["FastSentencePiece", "is_sentencepiece_model"]


def is_sentencepiece_model(spec: str) -> bool:
    name = os.path.basename(spec)
    return os.path.isfile(spec) and (name.endswith(".model") or ".model." in name)


class FastSentencePiece:
    """`encode_batch(texts)` with sentencepiece (threads: `threads`, default all cores / workers)."""

    name = "sentencepiece"

    def __init__(self, model_path: str, threads: int = 1):
        import sentencepiece as spm

        self.model_path, self.threads = model_path, max(1, int(threads))
        self.sp = spm.SentencePieceProcessor(model_file=model_path)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode(texts, out_type=int, num_threads=self.threads)

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
