"""`python -m cpt_megatron.runtime.torchrun ARGS`: torchrun, quiet about failures; exits with the rank's code.

torchrun turns any failed rank into a ChildFailedError traceback and exit 1. Here the first failed rank's
exit code is returned instead (75 = saved on preemption, 2 = user error, 128+N = killed by signal N); the
ranks already printed (or handed to `cpt`, see runtime.launch) what went wrong.
"""

from __future__ import annotations

import logging
import sys


def main(argv: list[str]) -> int:
    from cpt_megatron.runtime.procs import install

    install()
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    for name, logger in list(logging.Logger.manager.loggerDict.items()):  # each sets its own level at import
        if name.startswith("torch.distributed") and isinstance(logger, logging.Logger):
            logger.setLevel(logging.CRITICAL)
    try:
        run(parse_args(argv))
    except ChildFailedError as e:
        code = e.get_first_failure()[1].exitcode
        return 128 - code if code < 0 else code
    except SignalException as e:
        return 128 + int(e.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
