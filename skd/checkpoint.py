"""A training run's files: the checkpoint a run resumes from and the student it ends with.

Writes are atomic (a temporary file, fsync, rename), so a crash never leaves half a checkpoint.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from .errors import SkdError

CHECKPOINT = "checkpoint.pth"
STUDENT = "student.pth"


class CheckpointError(SkdError):
    """A checkpoint that belongs to another run: one line naming it and what to do."""


def save_atomic(obj, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def cli_value(value) -> str:
    """A recorded setting as it is typed on the command line."""
    if value is None:
        return "(default)"
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def load_for_resume(path: Path, identity: dict, settings: dict) -> dict:
    """The checkpoint at `path`, if it was saved by a run on the same views and teacher with the same
    schedule and loss settings (a resume with others would reshape the run midway)."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if ckpt["identity"] != identity:
        source = ckpt.get("source") or ckpt["identity"].get("online")
        raise CheckpointError(f"{path} belongs to a run on {source} (other views, teacher or images): "
                              "resume with the same cache or choose another --out")
    for key, value in settings.items():
        saved = ckpt.get("settings", {}).get(key, value)
        if saved != value:
            raise CheckpointError(f"{path} was saved with --{key} {cli_value(saved)}, not {cli_value(value)}: "
                                  "resume with the same options or choose another --out")
    return ckpt
