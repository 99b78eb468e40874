"""`--nproc N`: re-run the current `cpt` command under torchrun on this machine."""

from __future__ import annotations

import os
import subprocess
import sys

__all__ = ["under_launcher", "relaunch", "strip_nproc", "relaunched"]


def under_launcher() -> bool:
    return "RANK" in os.environ or "SLURM_PROCID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1


def relaunch(nproc: int, argv: list[str]) -> int:
    """Run `python -m cpt_megatron <argv>` under torchrun with `nproc` local processes; returns its exit code.

    `argv` must not contain --nproc (the children would relaunch again).
    """
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
        "--module", "cpt_megatron", *argv,
    ]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    return subprocess.call(cmd, env=env)


def strip_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--nproc":
            skip = True
            continue
        if a.startswith("--nproc="):
            continue
        out.append(a)
    return out


def relaunched(nproc: int | None, default: int = 1) -> bool:
    """For `--nproc N` commands: when not already under a launcher, re-run this command under torchrun and
    return True (the children print the results); exit with their code on failure. False = run here.
    Without --nproc, `default` processes (the layout's tp*pp) are spawned when it is above 1."""
    import sys

    nproc = nproc or (default if default > 1 else None)
    if not nproc or under_launcher():
        return False
    if nproc % default:
        from cpt_megatron.errors import CptError

        raise CptError(f"--nproc {nproc} is not a multiple of tp*pp = {default}; pass --nproc {default} (or a "
                       "multiple of it), or omit --nproc to spawn exactly tp*pp processes")
    code = relaunch(nproc, strip_nproc(sys.argv[1:]))
    if code:
        raise SystemExit(code)
    return True
