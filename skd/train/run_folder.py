"""A training run's folder (--out): refused when it holds another run, resumed from its checkpoint,
and written at the end of every epoch (checkpoint, metrics.jsonl, tensorboard)."""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

from skd.config import TrainConfig
from skd.errors import BusyError, DeviceError, OptionError
from skd.models.runtime import Dist
from skd.storage.locks import FolderLock
from skd.train.checkpoint import (
    CHECKPOINT,
    STUDENT,
    append_line,
    check_free_space,
    load_for_resume,
    save_atomic,
)
from skd.train.run import Learner


@contextmanager
def run_folder_lock(out: Path, d: Dist):
    """Hold the run folder for this run (rank 0 locks `OUT.lock` beside it; the kernel frees it if
    the run dies), so a second run or a concurrent --resume into the same --out is refused in one
    line on every rank."""
    lock, problem = None, None
    if d.main:
        try:
            if out.exists() and not out.is_dir():
                raise OptionError(f"--out {out} is a file: choose a folder for the run")
            lock = FolderLock(out, activity="trained into")
        except (OptionError, BusyError) as exc:
            problem = exc
        except OSError as exc:  # a read-only mount, a permission
            where = f" ({exc.filename})" if exc.filename else ""
            problem = OptionError(
                f"--out {out}: {exc.strerror or exc}{where}: choose a folder you can write"
            )
    problem = d.broadcast(problem)
    if problem is not None:
        raise problem
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def check_run_folder(cfg: TrainConfig, out: Path):
    """Refuse to replace a run by accident; the SummaryWriter class when --tensorboard asks for
    one (--resume with --overwrite is refused by TrainConfig)."""
    if (out / CHECKPOINT).is_file() and not (cfg.resume or cfg.overwrite):
        raise OptionError(
            f"{out} holds a run ({CHECKPOINT}): pass --resume to continue it, --overwrite to start "
            "it again, or another --out"
        )
    if not cfg.tensorboard:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise DeviceError(
            "--tensorboard needs the tensorboard package: pip install tensorboard"
        ) from None
    return SummaryWriter


def start_or_resume(
    cfg: TrainConfig, out: Path, identity: dict, student, optimizer, scaler, d: Dist, log
):
    """(first epoch, metrics so far): from the checkpoint with --resume, else a fresh run folder."""
    first_epoch, history = 0, []
    if cfg.resume and (out / CHECKPOINT).is_file():
        ckpt = load_for_resume(out / CHECKPOINT, identity, cfg.settings())
        student.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        first_epoch = int(ckpt["epoch"]) + 1
        history = [json.loads(line) for line in ckpt["metrics"]]
        log(f"resuming {out} at epoch {first_epoch}")
    elif cfg.resume:
        log(f"no checkpoint in {out}: starting a new run")
    if d.main:
        # a checkpoint holds the weights and SGD's momentum, the student file the weights again (x2
        # to be safe)
        check_free_space(
            out, 2 * 3 * sum(t.numel() * t.element_size() for t in student.state_dict().values())
        )
        out.mkdir(parents=True, exist_ok=True)
        # a new run: nothing of an earlier one may be resumed or mistaken for it
        if first_epoch == 0:
            for name in (CHECKPOINT, STUDENT):
                (out / name).unlink(missing_ok=True)
        (out / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in history))
    return first_epoch, history


def record_epoch(
    cfg: TrainConfig, out: Path, identity: dict, learner: Learner, history: list[dict], board
) -> None:
    """Replace the checkpoint, then append the epoch's metrics (rank 0): a resume rewrites
    metrics.jsonl from the checkpoint, so a failed append loses nothing. The lr scheduler's position
    is not saved: a resume recomputes it from the epoch."""
    metrics = history[-1]
    save_atomic(
        {
            "model": learner.student.state_dict(),
            "optimizer": learner.optimizer.state_dict(),
            "scaler": learner.scaler.state_dict(),
            "epoch": metrics["epoch"],
            "identity": identity,
            "settings": cfg.settings(),
            "source": str(cfg.cache or cfg.teacher),
            "args": {k: str(v) for k, v in asdict(cfg).items()},
            "metrics": [json.dumps(m) for m in history],
        },
        out / CHECKPOINT,
    )
    append_line(out / "metrics.jsonl", json.dumps(metrics))
    if board is not None:
        for key, value in metrics.items():
            board.add_scalar(key, value, metrics["epoch"])
