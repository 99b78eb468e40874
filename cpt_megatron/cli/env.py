"""`cpt env`: versions, devices and which kernels the model will use (and why)."""

from __future__ import annotations


def register(subparsers):
    p = subparsers.add_parser("env", parents=[subparsers.common], help="show versions, devices and kernel choices")
    p.add_argument("--spec", default="auto", choices=["auto", "te", "local"], help="layer spec to resolve")
    p.set_defaults(func=run)


def collect(spec: str = "auto") -> dict:
    import importlib.metadata as md
    import platform

    import torch

    from cpt_megatron import __version__
    from cpt_megatron.model.specs import _have, select_kernels

    def version(dist):
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            return None

    cuda = torch.cuda.is_available()
    kernels = select_kernels(spec)
    apex = _have("apex") and _have("apex.normalization")  # NVIDIA apex, not the unrelated PyPI 'apex'
    return {
        "cpt_megatron": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "megatron_core": version("megatron-core"),
        "transformers": version("transformers"),
        "transformer_engine": version("transformer-engine") or version("transformer_engine"),
        "apex": "nvidia-apex" if apex else None,
        "cuda": torch.version.cuda if cuda else None,
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "gpu_count": torch.cuda.device_count() if cuda else 0,
        "backend": "nccl" if cuda else "gloo",
        "cpu_redirects": not cuda,
        "spec": kernels.spec,
        "attention": kernels.attention,
        "norm": kernels.norm,
        "reasons": list(kernels.reasons),
    }


def run(args):
    info = collect(args.spec)
    if not args.json:
        for k, v in info.items():
            print(f"{k:20s} {v}")
        return None
    return info
