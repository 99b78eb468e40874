#!/usr/bin/env python
"""Megatron-style entry: `torchrun --nproc-per-node 8 tools/train.py --recipe R key=value ...` == `cpt train`."""

import sys

from cpt_megatron.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
