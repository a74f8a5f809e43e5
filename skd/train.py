"""Stage two: train a student on the recorded views with the SKD loss, teacher logits from the cache.

The same loop runs online (`--teacher`, no cache): the teacher then runs in the loop on exactly
the views a cache built with the same plan options holds. That is the comparison the product's
central claim rests on: same views, same losses, the teacher's forward pass gone.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from . import pipelines
from .checkpoint import CHECKPOINT, STUDENT, append_line, check_free_space, load_for_resume, save_atomic
from .config import TrainConfig
from .errors import SkdError, fault
from .loss import ensemble_target
from .pipelines import Recipe
from .recipe import resolve
from .replay import (
    ReplaySource,
    auto_multiplier,
    cached_logits,
    cached_source,
    check_ensemble,
    check_replayable,
    online_source,
    student_recipe,
    warn_other_loader,
)
from .runtime import Dist, amp_name, autocast, device_kind, images_to, init_distributed, place, resolve_device, shutdown
from .schedule import alpha_at, kd_loss, learning_rate
from .store import Store, open_store
from .teachers import create_model, forward, load_teacher, output_classes

ONLINE_IMAGE_SIZE = 224  # the student's size in online mode unless --image-size says


class TrainError(SkdError):
    """Training cannot go ahead as asked: one line saying what to change."""


@dataclass
class Run:
    """What the loop needs besides the student: the views, where teacher logits come from, and the run's identity."""

    source: ReplaySource
    stores: list[Store]  # cached teacher logits: one cache, or an ensemble's (empty online)
    weights: list[float]  # of the ensemble's teachers, summing to 1
    teacher: nn.Module | None  # online mode: the teacher in the loop
    teacher_recipe: Recipe | None  # online mode: how the teacher sees each window (may differ from the student)
    multiplier: float
    identity: dict  # recorded in the checkpoint: a resume must replay the same views and teacher
    steps_run: int = 0  # steps this process has run (the train-step fault point counts them)


def train(cfg: TrainConfig, *, progress: bool = False, log=None, on_step=None) -> dict:
    """Run (or resume) training; returns the last epoch's metrics.

    `on_step(epoch, step, KDLoss)`, when given, sees every step's loss (tests, notebooks).
    """
    d = init_distributed(device_kind(cfg.device))
    quiet = lambda message: None  # noqa: E731
    try:
        return _train(cfg, d, progress=progress and d.main, log=(log or quiet) if d.main else quiet, on_step=on_step)
    finally:
        shutdown(d)


def _train(cfg: TrainConfig, d: Dist, *, progress: bool, log, on_step) -> dict:
    """Open the views, build the student, resume if asked, then train, validate and checkpoint each epoch."""
    device = resolve_device(cfg.device, d)
    cfg = replace(cfg, amp=amp_name(cfg.amp, device))
    out = Path(cfg.out)
    writer_class = check_run_folder(cfg, out)
    run = open_run(cfg, device)
    check_world(len(run.source.train.paths), cfg.batch_size, d, run.source.mix is not None)
    torch.manual_seed(cfg.seed)
    student = make_student(cfg.arch, run.source, device)
    base_lr = cfg.lr * cfg.batch_size / 256
    optimizer = torch.optim.SGD(student.parameters(), lr=base_lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
    first_epoch, history = start_or_resume(cfg, out, run, student, optimizer, scaler, d, log)
    model = nn.parallel.DistributedDataParallel(student) if d.world > 1 else student
    board = writer_class(str(out / "tensorboard")) if writer_class is not None and d.main else None
    if cfg.epochs > run.source.num_views:
        log(
            f"{cfg.epochs} epochs over {run.source.num_views} cached views: views are reused from epoch "
            f"{run.source.num_views} on (epoch e uses view e mod {run.source.num_views})"
        )
    val_top1 = (
        cached_val_top1(run, cfg.kd, *val_range(len(run.source.val.paths), d), device)
        if cfg.val and run.source.val is not None
        else None
    )
    metrics: dict = history[-1] if history else {}
    for epoch in range(first_epoch, cfg.epochs):
        metrics = train_epoch(cfg, run, model, optimizer, scaler, epoch, base_lr, d, device, progress, on_step)
        if cfg.val and run.source.val is not None:
            metrics.update(evaluate(student, run.source, val_top1, cfg, d, device))
        history.append(metrics)
        if d.main:
            record_epoch(cfg, out, run, student, optimizer, scaler, history, board)
            log(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()))
        d.barrier()
        fault("after-epoch", epoch)
    if d.main:
        save_atomic(student.state_dict(), out / STUDENT)
        if board is not None:
            board.close()
    return metrics


# ---------------------------------------------------------------------------------------------
# Setting up


def check_run_folder(cfg: TrainConfig, out: Path):
    """Refuse to replace a run by accident; the SummaryWriter class when --tensorboard asks for one."""
    if cfg.resume and cfg.overwrite:
        raise TrainError("--resume and --overwrite exclude each other: continue the run or start it again")
    if (out / CHECKPOINT).is_file() and not (cfg.resume or cfg.overwrite):
        raise TrainError(
            f"{out} holds a run ({CHECKPOINT}): pass --resume to continue it, --overwrite to start "
            "it again, or another --out"
        )
    if not cfg.tensorboard:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise TrainError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
    return SummaryWriter


def open_run(cfg: TrainConfig, device: torch.device) -> Run:
    """The views and teacher logits of this run: a cache's, or an online plan's with the teacher in the loop."""
    if cfg.caches():
        stores = [open_store(path) for path in cfg.caches()]
        check_ensemble(stores)
        weights = ensemble_weights(cfg.teacher_weights, len(stores))
        store = stores[0]
        root = Path(cfg.data or store.meta["dataset"]["root"])
        for each in stores:
            check_replayable(each, root, cfg.val)
        recipe = student_recipe(cfg.image_size or int(store.meta["plan"]["image_size"]), cfg.mean, cfg.std)
        warn_other_loader(cfg.loader, store)
        source = cached_source(store, recipe=recipe, root=root, loader=cfg.loader, val=cfg.val)
        multiplier = auto_multiplier(stores, weights) if cfg.multiplier == "auto" else float(cfg.multiplier)
        # what the caches hold, not where: a moved cache resumes, one rebuilt with another plan does not
        identity = {
            "caches": [
                {
                    "plan": s.meta["plan"],
                    "codec": s.meta["codec"],
                    "views": s.num_views,
                    "teacher": s.meta["teacher"]["weights_sha256"],
                }
                for s in stores
            ],
            "weights": weights,
            "fingerprint": source.fingerprint,
        }
        return Run(source, stores, weights, None, None, multiplier, identity)
    if cfg.teacher is None or cfg.data is None:
        raise TrainError("pass --cache DIR, or --teacher NAME with --data ROOT for online distillation")
    if cfg.multiplier == "auto":
        raise TrainError("--multiplier auto reads the cache's logits: pass a number in online mode")
    cfg.mix_params().check()
    teacher = load_teacher(cfg.teacher, cfg.weights)
    size = cfg.image_size or ONLINE_IMAGE_SIZE
    recipe, _ = resolve(cfg.teacher_recipe_options(), teacher.pretrained_cfg, teacher.published, size)
    model = place(teacher.model, device)
    num_classes = output_classes(model, recipe.size, device, f"teacher {cfg.teacher}")
    source = online_source(
        cfg.data,
        views=cfg.views,
        recipe=student_recipe(size, cfg.mean, cfg.std),
        seed=cfg.plan_seed,
        crop=cfg.crop,
        mix=cfg.mix_params(),
        plan_size=size,
        loader=cfg.loader or "dali",
        val=cfg.val,
        workers=cfg.workers,
        num_classes=num_classes,
    )
    identity = {
        "online": cfg.teacher,
        "fingerprint": source.fingerprint,
        "teacher": teacher.weights_sha256,
        "views": cfg.views,
        "teacher input": list(recipe.options().values()),
        "mixing": cfg.mix_params().to_dict(),
    }
    return Run(source, [], [], model, recipe, float(cfg.multiplier), identity)


def ensemble_weights(given: list[float] | None, count: int) -> list[float]:
    """The teachers' weights, normalised to sum 1 (equal by default)."""
    if given is None:
        return [1.0 / count] * count
    if len(given) != count or min(given) < 0 or sum(given) <= 0:
        raise TrainError(
            f"--teacher-weights {','.join(map(str, given))}: {count} numbers >= 0, one per --cache, not all 0"
        )
    return [w / sum(given) for w in given]


def check_world(samples: int, batch_size: int, d: Dist, mixed: bool) -> None:
    if samples < d.world:
        raise TrainError(f"{samples} training samples cannot be shared by {d.world} processes: use at most {samples}")
    if batch_size < d.world:
        raise TrainError(
            f"--batch-size {batch_size} is the global batch: give each of the {d.world} processes at least one image"
        )
    if mixed and (batch_size // d.world) % 2:
        raise TrainError(
            f"--batch-size {batch_size} gives each of {d.world} processes {batch_size // d.world} "
            "images: mixed views pair positions 2i and 2i + 1 in one batch, so each process needs an "
            "even number"
        )


def make_student(arch: str, source: ReplaySource, device: torch.device) -> nn.Module:
    """The untrained student on `device`, checked to have as many outputs as the teacher."""
    student = create_model(arch, num_classes=source.num_classes).to(device)
    got = output_classes(student.eval(), source.recipe.size, device, f"student {arch}")
    if got != source.num_classes:
        raise TrainError(
            f"student {arch} has {got} outputs, the teacher {source.num_classes}: use a student with as many classes"
        )
    return place(student, device)


def start_or_resume(cfg: TrainConfig, out: Path, run: Run, student, optimizer, scaler, d: Dist, log):
    """(first epoch, metrics so far): from the checkpoint with --resume, else a fresh run folder."""
    first_epoch, history = 0, []
    if cfg.resume and (out / CHECKPOINT).is_file():
        ckpt = load_for_resume(out / CHECKPOINT, run.identity, cfg.settings())
        student.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        first_epoch = int(ckpt["epoch"]) + 1
        history = [json.loads(line) for line in ckpt["metrics"]]
        log(f"resuming {out} at epoch {first_epoch}")
    elif cfg.resume:
        log(f"no checkpoint in {out}: starting a new run")
    if d.main:
        # a checkpoint holds the weights and SGD's momentum, the student file the weights again (x2 to be safe)
        check_free_space(out, 2 * 3 * sum(t.numel() * t.element_size() for t in student.state_dict().values()))
        out.mkdir(parents=True, exist_ok=True)
        if first_epoch == 0:  # a new run: nothing of an earlier one may be resumed or mistaken for it
            for name in (CHECKPOINT, STUDENT):
                (out / name).unlink(missing_ok=True)
        (out / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in history))
    return first_epoch, history


def record_epoch(cfg: TrainConfig, out: Path, run: Run, student, optimizer, scaler, history: list[dict], board) -> None:
    """Replace the checkpoint, then append the epoch's metrics (rank 0): a resume rewrites metrics.jsonl from the
    checkpoint, so a failed append loses nothing."""
    metrics = history[-1]
    save_atomic(
        {
            "model": student.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(),
            "epoch": metrics["epoch"],
            "identity": run.identity,
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


# ---------------------------------------------------------------------------------------------
# One epoch


def rank_range(n: int, d: Dist, local_batch: int, mixed: bool = False) -> tuple[int, int]:
    """This rank's contiguous part of a view's positions; equal parts so all ranks take equal steps.

    A part that would end in a batch of one image leaves that image out (BatchNorm cannot train on
    one); each view's order differs, so it is a different sample in each view. With mixing, parts
    hold whole pairs (an even count from an even position).
    """
    per = n // d.world
    if mixed and d.world > 1:
        per -= per % 2
    used = per - 1 if per > 1 and per % local_batch == 1 else per
    return d.rank * per, d.rank * per + used


def teacher_logits(
    run: Run, cached, teacher_batches, batch, images: torch.Tensor, device: torch.device, amp: str, kd: str
):
    """The teacher's float32 logits of a batch: the next cached rows (of an ensemble, their `ensemble_target`),
    or the teacher run online on the same windows (at its own recipe when `teacher_batches` decodes them so)."""
    if cached is not None:
        parts = []
        for reader in cached:
            first, logits = next(reader)
            if first != int(batch.positions[0]) or len(logits) != len(batch.positions):
                raise RuntimeError(f"logits at position {first} do not match images at {int(batch.positions[0])}")
            parts.append(logits)
        return parts[0] if len(parts) == 1 else ensemble_target(kd, parts, run.weights)
    if run.teacher is not None:
        own = next(teacher_batches).images if teacher_batches is not None else images
        return forward(run.teacher, own, device, amp).clone()  # a normal tensor, usable beside autograd
    return None


def train_epoch(
    cfg: TrainConfig,
    run: Run,
    model,
    optimizer,
    scaler,
    epoch: int,
    base_lr: float,
    d: Dist,
    device: torch.device,
    progress: bool,
    on_step,
) -> dict:
    """One pass over this rank's part of view `epoch mod K`; returns the epoch's metrics (all ranks)."""
    view = epoch % run.source.num_views
    local_batch = max(1, cfg.batch_size // d.world)
    start, stop = rank_range(len(run.source.train.paths), d, local_batch, run.source.mix is not None)
    loader = run.source.loader(view, np.arange(start, stop), batch_size=local_batch, workers=cfg.workers, device=device)
    cached = (
        [cached_logits(store, view, start, stop, local_batch, device) for store in run.stores]
        if run.stores and cfg.kd != "none"
        else None
    )
    teacher_batches = (
        iter(
            run.source.loader(
                view,
                np.arange(start, stop),
                batch_size=local_batch,
                workers=cfg.workers,
                device=device,
                recipe=run.teacher_recipe,
            )
        )
        if run.teacher is not None and cfg.kd != "none" and run.teacher_recipe != run.source.recipe
        else None
    )
    alpha = alpha_at(cfg.alpha, epoch, cfg.epochs)
    loss_fn = kd_loss(
        cfg.kd,
        temperature=cfg.temperature,
        multiplier=run.multiplier,
        alpha=alpha,
        teacher_normalized=len(run.stores) > 1,
    )
    steps = len(loader) if cfg.steps_per_epoch is None else min(len(loader), cfg.steps_per_epoch)
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, kd, ce (sample-weighted), samples
    model.train()
    began = time.perf_counter()
    bar = tqdm(
        total=min(steps * local_batch, stop - start) * d.world,
        desc=f"epoch {epoch}",
        unit="img",
        disable=not progress,
        dynamic_ncols=True,
    )
    try:
        for step, batch in enumerate(loader):
            if step >= steps:
                break
            lr = learning_rate(
                base_lr,
                epoch + step / steps,
                epochs=cfg.epochs,
                schedule=cfg.schedule,
                milestones=cfg.milestones,
                warmup_epochs=cfg.warmup_epochs,
            )
            for group in optimizer.param_groups:
                group["lr"] = lr
            images, target = images_to(batch.images, device), batch.labels.to(device, non_blocking=True)
            teacher = teacher_logits(run, cached, teacher_batches, batch, images, device, cfg.amp, cfg.kd)
            with autocast(device, cfg.amp):
                student_logits = model(images)
            parts = loss_fn(student_logits, teacher, target, batch.mix_lambda)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(parts.loss).backward()
            scaler.step(optimizer)
            scaler.update()
            if on_step is not None:
                on_step(epoch, step, parts)
            run.steps_run += 1
            fault("train-step", run.steps_run)
            b = len(target)
            sums += torch.stack(
                [
                    parts.loss.detach().double() * b,
                    parts.kd.double() * b,
                    parts.ce.double() * b,
                    torch.tensor(b, dtype=torch.float64, device=device),
                ]
            )
            bar.update(b * d.world)
            if progress and step % 10 == 0:
                bar.set_postfix(loss=f"{parts.loss.item():.4f}", lr=f"{lr:.4g}")
    except OSError as exc:  # an image that went missing or unreadable after the start of the run
        raise TrainError(
            f"reading the images of epoch {epoch} failed ({pipelines.read_error(exc)}): "
            f"check {run.source.root}, then rerun with --resume to continue from the last epoch"
        ) from None
    finally:  # also on an exception, so no reader thread outlives the epoch
        bar.close()
        for reader in cached or []:
            reader.close()
    seconds = time.perf_counter() - began
    totals = d.all_reduce(sums)
    metrics = {
        "epoch": epoch,
        "view": view,
        "train_loss": float(totals[0] / totals[3]),
        "kd_loss": float(totals[1] / totals[3]),
        "ce_loss": float(totals[2] / totals[3]),
        "images_per_sec": float(totals[3]) / seconds,
        "lr": lr,
    }
    used = {"skd": {"alpha": alpha, "multiplier": run.multiplier}, "hinton": {"alpha": alpha}}.get(cfg.kd, {})
    return {**metrics, **used}


# ---------------------------------------------------------------------------------------------
# Validation


def val_range(n: int, d: Dist) -> tuple[int, int]:
    """This rank's part of the validation split (the last part may be shorter)."""
    per = -(-n // d.world)
    return min(n, d.rank * per), min(n, (d.rank + 1) * per)


def cached_val_top1(run: Run, kd: str, start: int, stop: int, device: torch.device) -> torch.Tensor | None:
    """The cached teacher's (an ensemble's) top-1 class of validation rows [start, stop), read once per run."""
    if not run.stores or not all(store.has_val for store in run.stores):
        return None
    readers = [cached_logits(store, None, start, stop, 4096, device) for store in run.stores]
    tops = [
        (parts[0][1] if len(parts) == 1 else ensemble_target(kd, [p[1] for p in parts], run.weights)).argmax(1)
        for parts in zip(*readers)
    ]
    return torch.cat(tops) if tops else torch.zeros(0, dtype=torch.int64, device=device)


@torch.no_grad()
def evaluate(
    student: nn.Module,
    source: ReplaySource,
    teacher_top1: torch.Tensor | None,
    cfg: TrainConfig,
    d: Dist,
    device: torch.device,
) -> dict:
    """Top-1/top-5 on the validation split (centre windows) and top-1 agreement with the cached teacher."""
    student.eval()
    start, stop = val_range(len(source.val.paths), d)
    loader = source.loader(
        None, np.arange(start, stop), batch_size=max(1, cfg.batch_size // d.world), workers=cfg.workers, device=device
    )
    counts = torch.zeros(4, dtype=torch.float64, device=device)  # top1, top5, agree, n
    for batch in loader if stop > start else []:
        images, target = images_to(batch.images, device), batch.labels.to(device)
        with autocast(device, cfg.amp):
            logits = student(images).float()
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        counts[0] += (top5[:, 0] == target).sum()
        counts[1] += (top5 == target[:, None]).any(dim=1).sum()
        if teacher_top1 is not None:
            counts[2] += (teacher_top1[batch.positions.to(device) - start] == top5[:, 0]).sum()
        counts[3] += len(target)
    d.all_reduce(counts)
    student.train()
    result = {"val_top1": float(counts[0] / counts[3]), "val_top5": float(counts[1] / counts[3])}
    if teacher_top1 is not None:
        result["val_teacher_agreement"] = float(counts[2] / counts[3])
    return result
