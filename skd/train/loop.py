"""Stage two: train a student on the recorded views with the SKD loss, teacher logits from the
cache.

The same loop runs online (`--teacher`, no cache): the teacher then runs in the loop on exactly
the views a cache built with the same plan options holds. That is the comparison the product's
central claim rests on: same views, same losses, the teacher's forward pass gone.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from skd import pipelines
from skd.config import TrainConfig
from skd.errors import DatasetError, fault
from skd.loss import KDLoss
from skd.models.runtime import (
    Dist,
    amp_name,
    device_kind,
    init_distributed,
    resolve_device,
    shutdown,
)
from skd.models.teachers import forward
from skd.replay.view_loader import TrainBatch, ViewLoader, rank_range, view_of_epoch
from skd.train.checkpoint import STUDENT, save_atomic
from skd.train.evaluate import cached_val_top1, evaluate, val_range
from skd.train.run import Learner, Run, check_world, make_student, open_run
from skd.train.run_folder import check_run_folder, record_epoch, run_folder_lock, start_or_resume
from skd.train.schedule import alpha_at, kd_loss, lr_scheduler


def train(cfg: TrainConfig, *, progress: bool = False, log=None, on_step=None) -> dict:
    """Run (or resume) training; returns the last epoch's metrics.

    `on_step(epoch, step, KDLoss)`, when given, sees every step's loss (tests, notebooks).
    """
    d = init_distributed(device_kind(cfg.device))
    quiet = lambda message: None  # noqa: E731
    try:
        with run_folder_lock(Path(cfg.out), d):
            return _train(
                cfg,
                d,
                progress=progress and d.main,
                log=(log or quiet) if d.main else quiet,
                on_step=on_step,
            )
    finally:
        shutdown(d)


def _train(cfg: TrainConfig, d: Dist, *, progress: bool, log, on_step) -> dict:
    """Open the views, build the student, resume if asked, then train, validate and checkpoint each
    epoch."""
    device = resolve_device(cfg.device, d)
    cfg = replace(cfg, amp=amp_name(cfg.amp, device))
    out = Path(cfg.out)
    writer_class = check_run_folder(cfg, out)
    run = open_run(cfg, device)
    check_world(len(run.source.train.paths), cfg.batch_size, d, run.source.mix is not None)
    share = rank_share(cfg, run, d)
    torch.manual_seed(cfg.seed)
    learner, first_epoch, history = start_learner(cfg, out, run, share.steps, d, device, log)
    board = writer_class(str(out / "tensorboard")) if writer_class is not None and d.main else None
    if cfg.epochs > run.source.num_views:
        log(
            f"{cfg.epochs} epochs over {run.source.num_views} cached views: views are reused from epoch "
            f"{run.source.num_views} on (epoch e uses view e mod {run.source.num_views})"
        )
    validating = cfg.val and run.source.val is not None
    val_start, val_stop = val_range(len(run.source.val.paths), d) if validating else (0, 0)
    val_top1 = (
        cached_val_top1(run.stores, run.weights, cfg.kd, val_start, val_stop, device)
        if validating
        else None
    )
    metrics: dict = history[-1] if history else {}
    for epoch in range(first_epoch, cfg.epochs):
        metrics = train_epoch(cfg, run, learner, share, epoch, d, device, progress, on_step)
        if validating:
            metrics.update(evaluate(learner.student, run.source, val_top1, cfg, d, device))
        history.append(metrics)
        if d.main:
            record_epoch(cfg, out, run.identity, learner, history, board)
            log(
                " ".join(
                    f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                    for k, v in metrics.items()
                )
            )
        d.barrier()
        fault("after-epoch", epoch)
    if d.main:
        save_atomic(learner.student.state_dict(), out / STUDENT)
        if board is not None:
            board.close()
    return metrics


def start_learner(
    cfg: TrainConfig, out: Path, run: Run, steps_per_epoch: int, d: Dist, device: torch.device, log
) -> tuple[Learner, int, list[dict]]:
    """(the student and its updaters, first epoch, metrics so far): new, or as the checkpoint left
    them with --resume; the lr scheduler starts at the first epoch's first step."""
    student = make_student(cfg.arch, run.source, device)
    base_lr = cfg.lr * cfg.batch_size / 256
    optimizer = torch.optim.SGD(
        student.parameters(), lr=base_lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
    first_epoch, history = start_or_resume(
        cfg, out, run.identity, student, optimizer, scaler, d, log
    )
    scheduler = lr_scheduler(
        optimizer,
        steps_per_epoch=steps_per_epoch,
        epochs=cfg.epochs,
        schedule=cfg.schedule,
        milestones=cfg.milestones,
        warmup_epochs=cfg.warmup_epochs,
        first_step=first_epoch * steps_per_epoch,
    )
    model = nn.parallel.DistributedDataParallel(student) if d.world > 1 else student
    return Learner(student, model, optimizer, scheduler, scaler), first_epoch, history


# ---------------------------------------------------------------------------------------------
# One epoch


@dataclass(frozen=True)
class RankShare:
    """This rank's share of every epoch: view positions [start, stop) in batches of `batch_size`,
    `steps` of them."""

    start: int
    stop: int
    batch_size: int
    steps: int  # the same on every rank and in every epoch: the lr scheduler counts them


def rank_share(cfg: TrainConfig, run: Run, d: Dist) -> RankShare:
    """This rank's positions and steps per epoch: its part of a view in batches, capped by
    --steps-per-epoch."""
    local_batch = max(1, cfg.batch_size // d.world)
    start, stop = rank_range(
        len(run.source.train.paths), d.rank, d.world, local_batch, run.source.mix is not None
    )
    batches = -(-(stop - start) // local_batch)
    steps = batches if cfg.steps_per_epoch is None else min(batches, cfg.steps_per_epoch)
    return RankShare(start, stop, local_batch, steps)


@dataclass
class EpochInputs:
    """What one rank reads in an epoch: the student's batches (with the cached teacher logits of a
    cache) and, online, the same windows at the teacher's own recipe where it differs."""

    batches: ViewLoader
    teacher_batches: Iterator | None

    def teacher_logits(
        self, run: Run, batch: TrainBatch, device: torch.device, amp: str
    ) -> torch.Tensor | None:
        """The teacher's float32 logits of a batch: the cached rows, or the teacher run online on
        the same windows (at its own recipe when `teacher_batches` decodes them so)."""
        if batch.logits is not None or run.teacher is None:
            return batch.logits
        own = (
            next(self.teacher_batches).images if self.teacher_batches is not None else batch.images
        )
        # a normal tensor, usable beside autograd
        return forward(run.teacher, own, device, amp).clone()

    def close(self, batches: Iterator) -> None:
        """Stop the readers and decoding workers of the epoch's batches."""
        for each in (batches, self.teacher_batches):
            if hasattr(each, "close"):
                each.close()


def epoch_inputs(
    cfg: TrainConfig, run: Run, epoch: int, share: RankShare, d: Dist, device
) -> EpochInputs:
    """The batches of this rank's part of view `epoch mod K` and, online, the teacher's own view of
    them."""
    kd = cfg.kd != "none"
    view = view_of_epoch(epoch, run.source.num_views)
    if run.cache is not None:
        batches = run.cache.loader(
            epoch,
            batch_size=share.batch_size,
            image_size=run.source.recipe.size,
            mean=cfg.mean,
            std=cfg.std,
            device=device,
            rank=d.rank,
            world_size=d.world,
            loader=run.source.loader_kind,
            workers=cfg.workers,
            steps=share.steps,
            with_logits=kd,
        )
        return EpochInputs(batches, None)
    batches = ViewLoader(
        run.source,
        view,
        share.start,
        share.stop,
        batch_size=share.batch_size,
        device=device,
        workers=cfg.workers,
        steps=share.steps,
    )
    teacher_batches = None
    if run.teacher is not None and kd and run.teacher_recipe != run.source.recipe:
        teacher_batches = iter(
            run.source.loader(
                view,
                np.arange(share.start, share.stop),
                batch_size=share.batch_size,
                workers=cfg.workers,
                device=device,
                recipe=run.teacher_recipe,
            )
        )
    return EpochInputs(batches, teacher_batches)


def weighted_sums(parts: KDLoss, images: int, device: torch.device) -> torch.Tensor:
    """A batch's (loss, kd, ce) times its image count, and that count: summed over an epoch, then
    divided."""
    count = torch.tensor(images, dtype=torch.float64, device=device)
    return torch.stack(
        [
            parts.loss.detach().double() * count,
            parts.kd.double() * count,
            parts.ce.double() * count,
            count,
        ]
    )


def train_epoch(
    cfg: TrainConfig,
    run: Run,
    learner: Learner,
    share: RankShare,
    epoch: int,
    d: Dist,
    device: torch.device,
    progress: bool,
    on_step,
) -> dict:
    """One pass over this rank's part of view `epoch mod K`; returns the epoch's metrics (all
    ranks)."""
    alpha = alpha_at(cfg.alpha, epoch, cfg.epochs)
    loss_fn = kd_loss(
        cfg.kd,
        temperature=cfg.temperature,
        multiplier=run.multiplier,
        alpha=alpha,
        teacher_normalized=len(run.stores) > 1,
    )
    inputs = epoch_inputs(cfg, run, epoch, share, d, device)
    # loss, kd, ce (sample-weighted), samples
    sums = torch.zeros(4, dtype=torch.float64, device=device)
    learner.model.train()
    began = time.perf_counter()
    images_seen = min(share.steps * share.batch_size, share.stop - share.start) * d.world
    batches = iter(inputs.batches)
    bar = tqdm(
        total=images_seen,
        desc=f"epoch {epoch}",
        unit="img",
        disable=not progress,
        dynamic_ncols=True,
    )
    try:
        for step, batch in enumerate(batches):
            teacher = inputs.teacher_logits(run, batch, device, cfg.amp)
            parts, lr = learner.step(batch.images, batch.labels, teacher, loss_fn, device, cfg.amp)
            if on_step is not None:
                on_step(epoch, step, parts)
            run.steps_run += 1
            fault("train-step", run.steps_run)
            sums += weighted_sums(parts, len(batch.labels), device)
            bar.update(len(batch.labels) * d.world)
            if progress and step % 10 == 0:
                bar.set_postfix(loss=f"{parts.loss.item():.4f}", lr=f"{lr:.4g}")
    except OSError as exc:  # an image that went missing or unreadable after the start of the run
        raise DatasetError(
            f"reading the images of epoch {epoch} failed ({pipelines.read_error(exc)}): "
            f"check {run.source.root}, then rerun with --resume to continue from the last epoch"
        ) from None
    finally:  # also on an exception, so no reader thread or decoding worker outlives the epoch
        bar.close()
        inputs.close(batches)
    seconds = time.perf_counter() - began
    totals = d.all_reduce(sums)
    metrics = {
        "epoch": epoch,
        "view": inputs.batches.view,
        "train_loss": float(totals[0] / totals[3]),
        "kd_loss": float(totals[1] / totals[3]),
        "ce_loss": float(totals[2] / totals[3]),
        "images_per_sec": float(totals[3]) / seconds,
        "lr": lr,
    }
    used = {"skd": {"alpha": alpha, "multiplier": run.multiplier}, "hinton": {"alpha": alpha}}.get(
        cfg.kd, {}
    )
    return {**metrics, **used}
