"""`cpt` command line: parses arguments and calls one library function per command.

Each module in this package that defines `register(subparsers)` adds one command (or a group).
Discovery is automatic so commands live next to nothing but their own argument parsing. A command's
handler returns a JSON-able summary dict; with `--json` it is printed as the last stdout line.
User errors (`CptError`, a missing/unreadable/existing file or directory) and other OS errors (disk full: with
the bytes free) become one line on stderr and exit 2 (under `--nproc`, printed once by the launching `cpt`);
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import sys

from cpt_megatron import __version__
from cpt_megatron.cli._types import CptArgumentParser
from cpt_megatron.errors import CptError

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    parser = CptArgumentParser(
        prog="cpt", description="Continued pretraining on megatron-core: curate -> tokenize -> train -> select -> export."
    )
    parser.add_argument("--version", action="version", version=f"cpt-megatron {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print a JSON summary as the last stdout line")
    common.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    subparsers = parser.add_subparsers(dest="command", metavar="<command>")
    subparsers.common = common  # type: ignore[attr-defined]  # command modules pass it as a parent
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        if hasattr(module, "register"):
            module.register(subparsers)
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Like parse_args, but `key=value` overrides may appear anywhere on the line of a command that takes
    them (`cpt train --recipe R a=1 --nproc 2 b=2`): argparse stops collecting a positional list at the
    first option, so the rest arrive as unrecognized arguments and are appended here."""
    args, extra = parser.parse_known_args(argv)
    if extra and isinstance(getattr(args, "overrides", None), list):
        stray = [x for x in extra if x.startswith("-") or "=" not in x]
        if not stray:
            args.overrides.extend(extra)
            return args
        extra = stray
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def emit(summary: dict | None, as_json: bool) -> None:
    """Print the command's summary: JSON as the last line, or nothing (the command printed itself)."""
    if as_json and summary is not None:
        sys.stdout.flush()
        print(json.dumps(summary, default=str), flush=True)


def _quiet_known_warnings() -> None:
    import warnings

    # megatron-core warns at import when TE/apex are absent; `cpt env` reports that properly.
    for pat in (".*Transformer Engine and Apex are not installed.*", ".*Apex is not installed.*",
                ".*Transformer Engine is not installed.*"):
        warnings.filterwarnings("ignore", message=pat)


def main(argv: list[str] | None = None) -> int:
    from cpt_megatron.runtime.launch import report_error
    from cpt_megatron.runtime.procs import install

    install()  # every child process dies with this one
    _quiet_known_warnings()
    parser = build_parser()
    args = parse_args(parser, argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        summary = args.func(args)
    except KeyboardInterrupt:
        print("cpt: interrupted", file=sys.stderr)
        return 130
    except (CptError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError) as e:
        if getattr(args, "debug", False):
            raise
        report_error(f"cpt {args.command}: error: {e}")
        return 2
    except OSError as e:  # disk full, permissions, read-only file system...: one line naming the path
        if getattr(args, "debug", False):
            raise
        from cpt_megatron.utils import os_error_line

        report_error(f"cpt {args.command}: error: {os_error_line(e)}")
        return 2
    emit(summary, getattr(args, "json", False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
