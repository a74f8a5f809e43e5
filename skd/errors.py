"""The one error family the command lines catch, and fault injection for the crash tests.

Every user-facing error is an `SkdError`: str(e) is one line naming the file, folder or option and
what to do. Each module raises its own subclass, so a caller can tell a bad cache from a bad dataset.
"""

from __future__ import annotations

import os
import signal


class SkdError(ValueError):
    """A user mistake or unusable input: one line saying what is wrong and what to do."""


class SkdWarning(UserWarning):
    """A likely mistake that does not stop the run (the commands print it as one `warning:` line)."""


def fault(point: str, count: int) -> None:
    """Fault injection for the crash tests: SKD_FAULT=<point>:<count> kills this process with SIGKILL,
    SKD_INTERRUPT=<point>:<count> sends it SIGINT (a Ctrl-C).

    Points: after-batch (batches fed to the writer), mid-shard (rows written, completion not yet
    recorded), after-shard (completion recorded), val-batch (batches of the validation pass);
    in skd-train: train-step (steps since the process started), after-epoch (checkpoint written).
    """
    here = f"{point}:{count}"
    if os.environ.get("SKD_FAULT") == here:
        os.kill(os.getpid(), signal.SIGKILL)
    if os.environ.get("SKD_INTERRUPT") == here:
        os.kill(os.getpid(), signal.SIGINT)
