"""The one error family the command lines catch, and fault injection for the crash tests.

Every user-facing error is an `SkdError`: str(e) is one line naming the file, folder or option and
what to do. The classes are named for what the user does next:

- `OptionError`: an argument or option is wrong or does not fit the others: change the command.
- `DatasetError`: the images or labels (missing, unreadable, changed since the build): fix the data
  or point --data at the right ones.
- `CacheError`: a cache that is damaged, unfinished, or not the one asked for: rebuild, resume or
  choose another.
- `BusyError`: a cache or run folder that another job holds: wait for it, or stop it.
- `DeviceError`: this machine cannot do it (device, DALI, process group, disk space): fix the
  machine or ask for less.
- `ModelError`: a teacher's or student's architecture or weights: put the file where the message
  says, or name another model.
- `skd.storage.objectstore.StoreError` (with storage): where a cache lives cannot be read or written.
"""

from __future__ import annotations

import os
import signal


class SkdError(ValueError):
    """A user mistake or unusable input: one line saying what is wrong and what to do."""


class OptionError(SkdError):
    """An argument or option that is wrong, or does not fit the others: change the command."""


class DatasetError(SkdError):
    """The images or labels: missing, unreadable, or not those the cache was built on."""


class CacheError(SkdError):
    """A cache that is damaged, unfinished, or not the one asked for: rebuild, resume or choose
    another (the message says which)."""


class BusyError(SkdError):
    """A cache or run folder that another job holds: wait for it to finish, or stop it."""


class DeviceError(SkdError):
    """This machine cannot do what was asked: the device, DALI, the process group, disk space."""


class ModelError(SkdError):
    """A teacher's or student's architecture or weights: the file, the name, or their outputs."""


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
