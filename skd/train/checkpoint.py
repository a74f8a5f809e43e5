"""A training run's files: the checkpoint a run resumes from and the student it ends with.

Writes are atomic (a temporary file, fsync, rename), so a crash never leaves half a checkpoint, and
a failed write (a full disk, a folder turned read-only) leaves the previous checkpoint as it was.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from pathlib import Path

import torch

from skd.errors import DeviceError, OptionError

CHECKPOINT = "checkpoint.pth"
STUDENT = "student.pth"


def save_atomic(obj, path: Path) -> None:
    """torch.save `obj` to `path` through `path`.tmp, fsync and rename: `path` is the old file or
    the new one.

    A failed write removes the temporary file, leaves `path` untouched and is a DeviceError
    saying what went wrong: the run can resume from the previous checkpoint once that is fixed.
    """
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    try:
        # a Python file: the OS's error reaches us, not only torch's RuntimeError
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:  # a Ctrl-C too: no half-written file is left behind
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        cause = _os_error(exc) if isinstance(exc, Exception) else None
        if cause is not None:
            raise DeviceError(_write_failure(path, cause)) from None
        raise


def append_line(path: Path, line: str) -> None:
    """Append one line to a run's text file (metrics.jsonl); a failed write is a DeviceError
    saying what to do."""
    try:
        with open(path, "a") as f:
            f.write(line + "\n")
    except OSError as exc:
        raise DeviceError(_write_failure(Path(path), exc)) from None


def _os_error(exc: BaseException | None) -> OSError | None:
    """The OSError behind `exc`: torch's zip writer may wrap a failed write in a RuntimeError."""
    while exc is not None and not isinstance(exc, OSError):
        exc = exc.__cause__ or exc.__context__
    return exc


def _write_failure(path: Path, exc: OSError) -> str:
    """One line: what the OS said about writing `path` and what to do about it."""
    reason = (exc.strerror or str(exc) or type(exc).__name__).lower()
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        action = "free space, then rerun with --resume"
    elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        action = f"make {path.parent} writable, then rerun with --resume (or choose another --out)"
    else:
        action = "fix that, then rerun with --resume"
    return f"{reason} writing {path}: {action}"


def check_free_space(folder: Path, needed_bytes: int) -> None:
    """DeviceError unless the file system of `folder` (or of its nearest existing parent, for a
    new --out) has `needed_bytes` free: a run learns of a full disk before its first epoch, not
    after it."""
    folder = Path(folder)
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed_bytes:
        raise DeviceError(
            f"{folder} has {free / 1e6:,.1f} MB free, a checkpoint needs about "
            f"{needed_bytes / 1e6:,.1f} MB: free space or choose another --out"
        )


def same_setting(saved, value) -> bool:
    """Whether a recorded setting is this run's: equal, or the same number (--multiplier and --alpha
    are recorded as numbers, 2.0, and were recorded as typed, "2")."""
    if saved == value:
        return True
    try:
        return float(saved) == float(value)
    except (TypeError, ValueError):
        return False


def cli_value(value) -> str:
    """A recorded setting as it is typed on the command line."""
    if value is None:
        return "(default)"
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def load_for_resume(path: Path, identity: dict, settings: dict) -> dict:
    """The checkpoint at `path`, if it was saved by a run on the same views and teacher with the
    same schedule and loss settings (a resume with others would reshape the run midway)."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if ckpt["identity"] != identity:
        source = ckpt.get("source") or ckpt["identity"].get("online")
        raise OptionError(
            f"{path} belongs to a run on {source} (other views, teacher or images): "
            "resume with the same cache or choose another --out"
        )
    for key, value in settings.items():
        saved = ckpt.get("settings", {}).get(key, value)
        if not same_setting(saved, value):
            raise OptionError(
                f"{path} was saved with --{key} {cli_value(saved)}, not {cli_value(value)}: "
                "resume with the same options or choose another --out"
            )
    return ckpt
