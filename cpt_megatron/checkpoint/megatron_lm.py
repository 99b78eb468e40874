"""Megatron-LM (`pretrain_gpt.py`) <-> our ModelArch: the `args` Namespace in common.pt and the CLI flags.

One table (`_FIELDS`) drives both directions so that what we write in common.pt['args'], what
`cpt megatron-args` prints and what we read back from a checkpoint saved by Megatron-LM itself agree.
Names are those of Megatron-LM core_v0.16.1 `megatron/training/arguments.py` (TransformerConfig fields
become args; `--norm-epsilon` is stored as `layernorm_epsilon`, `--disable-bias-linear` as
`add_bias_linear=False`). Only the Llama family (Llama 2/3/3.1, Mistral, Qwen2, SmolLM2) maps onto HF.
"""

from __future__ import annotations

import argparse
import os

from cpt_megatron.errors import CptError
from cpt_megatron.model.arch import ModelArch

__all__ = ["args_namespace", "hf_config_from_args", "pretrain_flags", "check_supported"]

# megatron-core's llama3 rope scaling has these three fixed (only the factor is a flag)
_LLAMA3_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def args_namespace(arch: ModelArch, *, padded_vocab: int, divisor: int, dtype: str, tp: int = 1, pp: int = 1,
                   tokenizer_model: str | None = None, iteration: int = 0, extra: dict | None = None
                   ) -> argparse.Namespace:
    """The model hyper-parameters Megatron-LM checks/reads from common.pt['args'] (load_args_from_checkpoint)."""
    a = dict(
        num_layers=arch.num_layers, hidden_size=arch.hidden_size, ffn_hidden_size=arch.ffn_hidden_size,
        num_attention_heads=arch.num_heads, group_query_attention=arch.num_kv_heads != arch.num_heads,
        num_query_groups=arch.num_kv_heads, kv_channels=arch.head_dim,
        max_position_embeddings=arch.max_position_embeddings, position_embedding_type="rope",
        # as Megatron-LM's own rope runs save them (arguments.py): `--no-position-embedding` is a store_false
        # into add_position_embedding (default True) that `--position-embedding-type rope` leaves True, and the
        # deprecated `--use-rotary-position-embeddings` stays False. check_checkpoint_args compares
        # add_position_embedding (default True) whenever --finetune is absent: False here stopped the load.
        add_position_embedding=True, use_rotary_position_embeddings=False, rotary_base=int(arch.rope_theta)
        if float(arch.rope_theta).is_integer() else arch.rope_theta, rotary_percent=1.0, rotary_interleaved=False,
        use_rope_scaling=arch.rope_scaling is not None,
        rope_scaling_factor=float(arch.rope_scaling["factor"]) if arch.rope_scaling else 8.0,
        normalization="RMSNorm", layernorm_epsilon=arch.rms_norm_eps, apply_layernorm_1p=False, swiglu=True,
        squared_relu=False, add_bias_linear=False, add_qkv_bias=arch.qkv_bias, qk_layernorm=False,
        untie_embeddings_and_output_weights=not arch.tie_word_embeddings, attention_dropout=0.0, hidden_dropout=0.0,
        make_vocab_size_divisible_by=divisor, padded_vocab_size=padded_vocab,
        tokenizer_type="HuggingFaceTokenizer", tokenizer_model=tokenizer_model,
        bf16=dtype == "bfloat16", fp16=dtype == "float16", params_dtype=None,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, virtual_pipeline_model_parallel_size=None,
        expert_model_parallel_size=1, num_experts=None, ckpt_format="torch_dist", iteration=iteration,
        seq_length=None, data_parallel_random_init=False, no_save_optim=None, no_save_rng=None,
        consumed_train_samples=0, consumed_valid_samples=0,
    )
    a.pop("params_dtype")
    a.update(extra or {})
    return argparse.Namespace(**a)


def _get(args, name, default=None):
    return getattr(args, name, default)


def check_supported(args, source: str) -> None:
    """Refuse, by name, Megatron-LM models that are not Llama-family decoders."""
    bad = []
    if _get(args, "num_experts"):
        bad.append(f"mixture-of-experts (num_experts={args.num_experts}, e.g. Mixtral/DeepSeek-MoE)")
    if _get(args, "multi_latent_attention"):
        bad.append("multi-latent attention (DeepSeek-V2/V3)")
    if _get(args, "is_hybrid_model") or _get(args, "hybrid_override_pattern"):
        bad.append("a hybrid Mamba model")
    if _get(args, "normalization", "LayerNorm") != "RMSNorm":
        bad.append(f"normalization={_get(args, 'normalization', 'LayerNorm')} (GPT-2/Falcon-style; Llama uses RMSNorm)")
    if not _get(args, "swiglu", False):
        bad.append("a non-SwiGLU MLP (swiglu=False: GPT/BERT-style gelu)")
    pe = _get(args, "position_embedding_type", "learned_absolute")
    if pe != "rope" and not _get(args, "use_rotary_position_embeddings", False):
        bad.append(f"position_embedding_type={pe} (Llama uses rope)")
    if _get(args, "add_bias_linear", True) and not _get(args, "disable_bias_linear", False):
        bad.append("bias on every linear layer (add_bias_linear=True)")
    if _get(args, "qk_layernorm"):
        bad.append("qk_layernorm (Qwen3/OLMo-2-style)")
    if _get(args, "apply_layernorm_1p"):
        bad.append("apply_layernorm_1p")
    if _get(args, "rotary_interleaved"):
        bad.append("interleaved rotary embeddings")
    if float(_get(args, "rotary_percent", 1.0)) != 1.0:
        bad.append(f"partial rotary (rotary_percent={args.rotary_percent})")
    if _get(args, "window_size"):
        bad.append(f"sliding-window attention (window_size={args.window_size})")
    if _get(args, "heterogeneous_layers_config_path") or _get(args, "heterogeneous_layers_config_encoded_json"):
        bad.append("heterogeneous layers (Nemotron-NAS)")
    if bad:
        raise CptError(f"{source}: this Megatron-LM model is not a Llama/Mistral/Qwen2-family decoder: {bad[0]}; "
                       "supported: RMSNorm + SwiGLU + RoPE, no linear bias (QKV bias = Qwen2), dense")


def hf_config_from_args(args, true_vocab: int, *, source: str, bos: int | None = None,
                        eos: int | None = None) -> dict:
    """An HF config.json (llama or qwen2) describing the model a Megatron-LM `args` Namespace builds."""
    check_supported(args, source)

    def need(name):
        v = _get(args, name)
        if v is None:
            raise CptError(f"{source}: common.pt['args'] has no {name!r}; cannot tell the model's shape")
        return v

    H, heads = int(need("hidden_size")), int(need("num_attention_heads"))
    kv = int(_get(args, "num_query_groups") or heads) if _get(args, "group_query_attention") else heads
    head_dim = int(_get(args, "kv_channels") or H // heads)
    ffn = _get(args, "ffn_hidden_size") or (int(4 * H * 2 / 3 / 64 + 1) * 64)  # Megatron-LM's swiglu default
    qwen = bool(_get(args, "add_qkv_bias", False))
    cfg = {
        "architectures": ["Qwen2ForCausalLM" if qwen else "LlamaForCausalLM"],
        "model_type": "qwen2" if qwen else "llama",
        "vocab_size": int(true_vocab), "hidden_size": H, "intermediate_size": int(ffn),
        "num_hidden_layers": int(need("num_layers")), "num_attention_heads": heads, "num_key_value_heads": kv,
        "head_dim": head_dim, "hidden_act": "silu",
        "max_position_embeddings": int(_get(args, "max_position_embeddings") or _get(args, "seq_length") or 2048),
        "rms_norm_eps": float(_get(args, "layernorm_epsilon", _get(args, "norm_epsilon", 1e-5))),
        "rope_theta": float(_get(args, "rotary_base", 10000)),
        "tie_word_embeddings": not bool(_get(args, "untie_embeddings_and_output_weights", False)),
        "attention_bias": False, "mlp_bias": False, "initializer_range": float(_get(args, "init_method_std", 0.02)),
        "torch_dtype": "bfloat16" if _get(args, "bf16") else "float16" if _get(args, "fp16") else "float32",
    }
    if qwen:
        cfg.pop("attention_bias")
        cfg.pop("mlp_bias")
        cfg.update(use_sliding_window=False, sliding_window=None)
    if _get(args, "use_rope_scaling"):
        cfg["rope_scaling"] = {"rope_type": "llama3", "factor": float(_get(args, "rope_scaling_factor", 8.0)),
                               **_LLAMA3_FIXED}
    if bos is not None:
        cfg["bos_token_id"] = bos
    if eos is not None:
        cfg["eos_token_id"] = eos
    return cfg


def pretrain_flags(arch: ModelArch, *, padded_vocab: int, divisor: int, true_vocab: int, dtype: str | None = None,
                   tokenizer_model: str | os.PathLike | None = None, load: str | os.PathLike | None = None
                   ) -> tuple[list[str], list[str]]:
    """(`pretrain_gpt.py` flags that rebuild this model exactly, caveats that do not carry over)."""
    f = ["--num-layers", str(arch.num_layers), "--hidden-size", str(arch.hidden_size),
         "--ffn-hidden-size", str(arch.ffn_hidden_size), "--num-attention-heads", str(arch.num_heads)]
    if arch.num_kv_heads != arch.num_heads:
        f += ["--group-query-attention", "--num-query-groups", str(arch.num_kv_heads)]
    f += ["--kv-channels", str(arch.head_dim), "--max-position-embeddings", str(arch.max_position_embeddings),
          "--position-embedding-type", "rope", "--rotary-base", f"{arch.rope_theta:g}" if arch.rope_theta < 1e16
          else str(int(arch.rope_theta)), "--rotary-percent", "1.0"]
    notes = []
    if arch.rope_scaling:
        f += ["--use-rope-scaling", "--rope-scaling-factor", f"{arch.rope_scaling['factor']:g}"]
        fixed = {k: arch.rope_scaling[k] for k in _LLAMA3_FIXED}
        if fixed != _LLAMA3_FIXED:
            notes.append(f"rope scaling {fixed} differs from megatron-core's fixed llama3 values {_LLAMA3_FIXED}: "
                         "logits will not match")
    f += ["--normalization", "RMSNorm", "--norm-epsilon", f"{arch.rms_norm_eps:g}", "--swiglu",
          "--disable-bias-linear"]
    if arch.qkv_bias:
        f += ["--add-qkv-bias"]
    if not arch.tie_word_embeddings:
        f += ["--untie-embeddings-and-output-weights"]
    f += ["--attention-dropout", "0.0", "--hidden-dropout", "0.0",
          "--make-vocab-size-divisible-by", str(divisor), "--tokenizer-type", "HuggingFaceTokenizer"]
    if tokenizer_model:
        f += ["--tokenizer-model", str(tokenizer_model)]
    if dtype == "bfloat16":
        f += ["--bf16"]
    elif dtype == "float16":
        f += ["--fp16"]
    f += ["--ckpt-format", "torch_dist", "--exit-on-missing-checkpoint"]
    if load:
        f += ["--load", str(load)]
    if padded_vocab != _padded(true_vocab, divisor):
        notes.append(f"the checkpoint's {padded_vocab} embedding rows are not the tokenizer's {true_vocab} padded to "
                     f"{divisor}; Megatron-LM will refuse the shapes")
    if arch.sliding_window is not None:
        notes.append(f"sliding_window={arch.sliding_window} is not passed (full attention, as cpt-megatron trains)")
    notes.append("loads with --finetune (weights only, iteration 0) or without it with --no-load-optim "
                 "--no-load-rng (a trained iter_* folder then keeps its iteration and consumed samples); tp/pp may "
                 "differ from the save (torch_dist reshards)")
    return f, notes


def _padded(v: int, divisor: int) -> int:
    from cpt_megatron.model.arch import padded_vocab_size

    return padded_vocab_size(v, 1, divisor)


ARGS_FILE = "megatron_args.txt"


def flags_for_meta(meta: dict, load: str | os.PathLike | None = None, tokenizer_model: str | os.PathLike | None = None,
                   release: bool = False) -> tuple[list[str], list[str]]:
    """pretrain_flags() of a checkpoint described by its cpt_meta.json fields."""
    cfg = dict(meta["hf_config"], vocab_size=int(meta.get("vocab_size") or meta["hf_config"]["vocab_size"]))
    arch = ModelArch.from_hf_config(cfg)
    divisor = int(meta.get("make_vocab_size_divisible_by") or 128)
    padded = int(meta.get("padded_vocab_size") or _padded(arch.vocab_size, divisor))
    flags, notes = pretrain_flags(arch, padded_vocab=padded, divisor=divisor, true_vocab=arch.vocab_size,
                                  dtype=meta.get("dtype"), tokenizer_model=tokenizer_model, load=load)
    return flags + (["--finetune"] if release else []), notes


def format_flags(flags: list[str], notes: list[str]) -> str:
    """One flag (with its value) per line, shell-continued; caveats as # comments."""
    lines, i = [], 0
    while i < len(flags):
        if i + 1 < len(flags) and not flags[i + 1].startswith("--"):
            lines.append(f"{flags[i]} {flags[i + 1]}")
            i += 2
        else:
            lines.append(flags[i])
            i += 1
    body = " \\\n".join(lines)
    return "".join(f"# {n}\n" for n in notes) + body + "\n"


def write_args_file(folder: str | os.PathLike, meta: dict, final_folder: str | os.PathLike) -> str:
    """megatron_args.txt beside the tensors: the pretrain_gpt.py flags (and --load) that rebuild this model.

    `final_folder` is where `folder` will live once renamed into place (its parent is the --load root)."""
    from pathlib import Path

    from cpt_megatron.utils import atomic_file

    final = Path(final_folder).resolve()
    tok = final / "tokenizer" if (Path(folder) / "tokenizer").is_dir() else None
    flags, notes = flags_for_meta(meta, load=final.parent, tokenizer_model=tok, release=final.name == "release")
    text = format_flags(flags, notes)
    with atomic_file(Path(folder) / ARGS_FILE) as f:
        f.write(text)
    return text


def common_entries(meta: dict, *, iteration: int, tp: int = 1, pp: int = 1, extra: dict | None = None,
                   tokenizer_model: str | os.PathLike | None = None) -> dict:
    """What Megatron-LM's load_checkpoint reads from common.pt: checkpoint_version, iteration, args."""
    cfg = dict(meta["hf_config"], vocab_size=int(meta.get("vocab_size") or meta["hf_config"]["vocab_size"]))
    arch = ModelArch.from_hf_config(cfg)
    divisor = int(meta.get("make_vocab_size_divisible_by") or 128)
    args = args_namespace(arch, padded_vocab=int(meta.get("padded_vocab_size") or _padded(arch.vocab_size, divisor)),
                          divisor=divisor, dtype=meta.get("dtype") or "float32", tp=tp, pp=pp,
                          tokenizer_model=str(tokenizer_model) if tokenizer_model else None, iteration=iteration,
                          extra=extra)
    return {"checkpoint_version": 3.0, "iteration": int(iteration), "args": args}
