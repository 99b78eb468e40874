"""`cpt env`: versions, devices and which kernels the model will use (and why)."""

from __future__ import annotations

from cpt_megatron.cli._types import positive_int
from cpt_megatron.errors import CptError


def register(subparsers):
    p = subparsers.add_parser("env", parents=[subparsers.common], help="show versions, devices and kernel choices")
    p.add_argument("--spec", default="auto", choices=["auto", "te", "local"], help="layer spec to resolve")
    p.add_argument("--tp", type=positive_int, default=1, help="tensor parallel size to resolve the kernels for")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="kernel option to resolve, e.g. --set fused_ce=chunked (fields of model.options)")
    p.set_defaults(func=run)


def collect(spec: str = "auto", tp: int = 1, overrides: dict | None = None) -> dict:
    import importlib.metadata as md
    import platform

    import torch

    from cpt_megatron import __version__
    from cpt_megatron.model.build import ModelOptions
    from cpt_megatron.model.kernels import resolve_kernels
    from cpt_megatron.model.specs import select_kernels
    from cpt_megatron.runtime.device import MEGATRON_CORE_VERSION, current_device
    from cpt_megatron.utils import have_module

    def version(dist):
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            return None

    cuda = torch.cuda.is_available()
    kernels = select_kernels(spec)
    plan = resolve_kernels(ModelOptions(spec=spec, **(overrides or {})), tp=tp, spec=kernels.spec)
    apex = have_module("apex") and have_module("apex.normalization")  # NVIDIA apex, not the unrelated PyPI 'apex'
    return {
        "cpt_megatron": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "megatron_core": version("megatron-core"),
        "megatron_core_required": MEGATRON_CORE_VERSION,
        "transformers": version("transformers"),
        "transformer_engine": version("transformer-engine") or version("transformer_engine"),
        "apex": "nvidia-apex" if apex else None,
        "cuda": torch.version.cuda if cuda else None,
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "device_in_use": str(current_device()),
        "gpu_count": torch.cuda.device_count() if cuda else 0,
        "backend": "nccl" if cuda else "gloo",
        "cpu_redirects": not cuda,
        "spec": kernels.spec,
        "attention": kernels.attention,
        "norm": kernels.norm,
        "reasons": list(kernels.reasons),
        "kernels": {k: {"choice": v, "reason": plan.reasons.get(k, "")}
                    for k, v in plan.to_dict().items() if k != "reasons"},
        "liger_kernel": version("liger-kernel"),
        "triton": version("triton"),
    }


def run(args):
    import dataclasses

    from cpt_megatron.model.build import ModelOptions

    # the string-valued options (kernel choices); --spec and the layout have their own flags
    fields = [f.name for f in dataclasses.fields(ModelOptions) if isinstance(f.default, str) and f.name != "spec"]
    overrides = {}
    for item in args.set:
        k, sep, v = item.partition("=")
        if not sep:
            raise CptError(f"--set expects FIELD=VALUE, got {item!r}; e.g. --set fused_ce=chunked")
        if k.strip() not in fields:
            raise CptError(f"--set {item}: unknown option {k.strip()!r}; choose from {', '.join(fields)} "
                           "(fields of model.options)")
        overrides[k.strip()] = v.strip()
    info = collect(args.spec, args.tp, overrides)
    if info["megatron_core"] != info["megatron_core_required"]:
        from cpt_megatron.runtime.device import check_megatron_core

        check_megatron_core()  # one clear line (CptError), exit 2
    if not args.json:
        for k, v in info.items():
            if k == "kernels":
                for name, c in v.items():
                    print(f"{'kernel.' + name:20s} {c['choice']:28s} {c['reason']}")
                continue
            print(f"{k:20s} {v}")
        return None
    return info
