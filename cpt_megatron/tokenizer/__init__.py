"""Tokenizers: load any form (HF dir, tokenizer.json, SentencePiece .model, GPT-2 vocab/merges), analyze, extend."""

from cpt_megatron.tokenizer.load import TokenizerInfo, load_tokenizer, tokenizer_info

__all__ = ["load_tokenizer", "tokenizer_info", "TokenizerInfo"]
