"""The one error family the command lines catch, and fault injection for the crash tests.

Every user-facing error is an `SkdError`: str(e) is one line naming the file, folder or option and
what to do. Each module raises its own subclass, so a caller can tell a bad cache from a bad
dataset.
"""

from __future__ import annotations

import os
import signal


class SkdError(ValueError):
    """A user mistake or unusable input: one line saying what is wrong and what to do."""


class SkdWarning(UserWarning):
    """A likely mistake that does not stop the run (the commands print it as one `warning:`
    line)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's preemption signal), raised in the main thread so that it unwinds as
    Ctrl-C does: shards already written stay complete, the lock is released, and the command says
    how to continue."""


def raise_on_sigterm() -> None:
    """From now on SIGTERM raises `Terminated` in the main thread (call it from the main thread)."""

    def terminate(signum, frame):
        raise Terminated()

    signal.signal(signal.SIGTERM, terminate)


def fault(point: str, count: int) -> None:
    """Fault injection for the crash tests: SKD_FAULT=<point>:<count> kills this process with
    SIGKILL, SKD_INTERRUPT=<point>:<count> sends it SIGINT (a Ctrl-C), SKD_TERMINATE=<point>:<count>
    SIGTERM.

    Points: after-batch (batches fed to the writer), mid-shard (rows written, completion not yet
    recorded), after-shard (completion recorded; recode too), val-batch (batches of the validation
    pass), grow-view (views appended to a growing cache's plan); in skd-train: train-step (steps
    since the process started), after-epoch (checkpoint written).
    """
    here = f"{point}:{count}"
    if os.environ.get("SKD_FAULT") == here:
        os.kill(os.getpid(), signal.SIGKILL)
    if os.environ.get("SKD_INTERRUPT") == here:
        os.kill(os.getpid(), signal.SIGINT)
    if os.environ.get("SKD_TERMINATE") == here:
        os.kill(os.getpid(), signal.SIGTERM)
