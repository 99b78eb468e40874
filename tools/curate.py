#!/usr/bin/env python
"""Thin entry: `python tools/curate.py ARGS` == `cpt curate ARGS`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cpt_megatron.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["curate", *sys.argv[1:]]))
