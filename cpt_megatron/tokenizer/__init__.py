"""Tokenizers: load any form (HF dir, tokenizer.json, SentencePiece .model, GPT-2 vocab/merges, GGUF),
analyze fertility, extend with domain tokens. Nothing here imports torch or megatron."""

from cpt_megatron.tokenizer.analyze import analyze
from cpt_megatron.tokenizer.extend import ExtendResult, extend_tokenizer, new_token_ids, subtoken_map
from cpt_megatron.tokenizer.load import TokenizerInfo, load_tokenizer, tokenizer_info

__all__ = [
    "load_tokenizer",
    "tokenizer_info",
    "TokenizerInfo",
    "analyze",
    "extend_tokenizer",
    "ExtendResult",
    "subtoken_map",
    "new_token_ids",
]
