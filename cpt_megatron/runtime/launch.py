"""`--nproc N`: re-run the current `cpt` command under torchrun on this machine.

The launching `cpt` stays in charge of its children:
- torchrun runs in its own session and dies with us (runtime.procs); its ranks die with torchrun.
- SIGTERM / SIGUSR1 / SIGINT sent to `cpt` are forwarded to the ranks themselves (not to the torchrun
  agent, which would SIGTERM them a second time and abort the save); we then wait for them. Ranks that
  saved on preemption exit 75 and so does `cpt`, so `slurm/common.sh` requeues.
- A rank's user error is written to a file in CPT_LAUNCH_DIR instead of stderr; `cpt` prints each distinct
  message once (no per-rank copies, no torchrun ChildFailedError traceback) and, with --json, a JSON line
  last.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

__all__ = ["PREEMPT_EXIT_CODE", "under_launcher", "relaunch", "strip_nproc", "relaunched", "report_error", "FORWARDED_SIGNALS",
           "startup_preemption_exit"]

PREEMPT_EXIT_CODE = 75  # EX_TEMPFAIL: saved on preemption; the sbatch scripts requeue on it
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
_LAUNCH_DIR_ENV = "CPT_LAUNCH_DIR"


def under_launcher() -> bool:
    return "RANK" in os.environ or "SLURM_PROCID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1


def report_error(message: str) -> None:
    """Print a user error (one line) on stderr; under our own --nproc relaunch, hand it to the launching
    `cpt` instead, which prints every distinct message once."""
    folder = os.environ.get(_LAUNCH_DIR_ENV)
    if folder and Path(folder).is_dir():
        try:
            Path(folder, f"error.{int(os.environ.get('RANK', '0')):05d}").write_text(message + "\n")
            return
        except OSError:
            pass
    print(message, file=sys.stderr, flush=True)


def _rank_pids(agent: int) -> list[int]:
    from cpt_megatron.runtime.procs import children

    out = []
    for pid in children(agent):
        try:
            if b"cpt_megatron" in Path(f"/proc/{pid}/cmdline").read_bytes():
                out.append(pid)
        except OSError:
            continue
    return out


def relaunch(nproc: int, argv: list[str]) -> int:
    """Run `python -m cpt_megatron <argv>` under torchrun with `nproc` local processes; returns its exit code
    (75 when the ranks saved on a forwarded preemption signal).

    `argv` must not contain --nproc (the children would relaunch again).
    """
    from cpt_megatron.runtime.procs import popen_kwargs

    cmd = [sys.executable, "-m", "cpt_megatron.runtime.torchrun", "--standalone", f"--nproc-per-node={nproc}",
           "--module", "cpt_megatron", *argv]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    with tempfile.TemporaryDirectory(prefix="cpt-launch-") as folder:
        env[_LAUNCH_DIR_ENV] = folder
        proc = subprocess.Popen(cmd, env=env, **popen_kwargs())

        forwarded: list[int] = []

        def forward(signum, frame):
            forwarded.append(signum)
            ranks = _rank_pids(proc.pid)
            for pid in ranks or [proc.pid]:  # no ranks yet: let torchrun shut down
                try:
                    os.kill(pid, signum if ranks else signal.SIGTERM)
                except ProcessLookupError:
                    pass

        previous = {s: signal.signal(s, forward) for s in FORWARDED_SIGNALS}
        try:
            while True:
                try:
                    code = proc.wait()
                    break
                except InterruptedError:
                    continue
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
        errors = [p.read_text().strip() for p in sorted(Path(folder).glob("error.*"))]
    seen = []
    for e in errors:
        if e and e not in seen:
            seen.append(e)
            print(e, file=sys.stderr, flush=True)
    code = _explain_exit(code, proc.pid, forwarded, bool(seen), argv)
    if code and code != PREEMPT_EXIT_CODE and "--json" in argv:  # preempted ranks printed their own line
        print(json.dumps({"exit_code": code, "error": seen[0] if seen else None}), flush=True)
    return code


def _explain_exit(code: int, agent: int, forwarded: list[int], rank_errors: bool, argv: list[str]) -> int:
    """No silent exit: the agent killed by a signal is named; a preemption signal that ended the ranks before
    they could save (start-up: no handler yet) becomes one line and exit 75, so Slurm still requeues."""
    command = f"cpt {argv[0]}" if argv else "cpt"
    preempt = [s for s in forwarded if s in (signal.SIGTERM, signal.SIGUSR1)]
    if code in (0, PREEMPT_EXIT_CODE) or rank_errors:
        return code
    if preempt:
        print(_startup_line(command, preempt[0], "the ranks"), file=sys.stderr, flush=True)
        return PREEMPT_EXIT_CODE
    if code < 0:
        name = signal.Signals(-code).name
        print(f"{command}: the torchrun agent (pid {agent}) was killed by {name}; its ranks died with it, and "
              "nothing was saved since the last checkpoint (a rerun resumes from it)", file=sys.stderr, flush=True)
        return 128 - code
    return code


def _startup_line(command: str, signum: int, who: str) -> str:
    return (f"{command}: {signal.Signals(signum).name} arrived during start-up, before {who} could save: nothing was "
            f"saved by this launch (a rerun resumes from the last checkpoint); exit {PREEMPT_EXIT_CODE} so the job is "
            "requeued")


@contextlib.contextmanager
def startup_preemption_exit(command: str):
    """From the first moment a training process can act until its trainer installs its own handler
    (train/signals.PreemptionHandler replaces this one): SIGTERM/SIGUSR1 (Slurm's preemption) end the process
    with one line and exit 75, so the job is requeued, instead of the default action's silent exit 143.
    Nothing can be saved yet; `finally` blocks still run (run lock, process group). Not in the ranks of a
    launcher: torchrun also SIGTERMs the other ranks when one fails, which is no preemption (under `--nproc`
    the launching `cpt`, which knows what it forwarded, explains a start-up signal)."""
    if under_launcher():
        yield
        return

    def handler(signum, frame):
        report_error(_startup_line(command, signum, "training"))
        raise SystemExit(PREEMPT_EXIT_CODE)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


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
