"""Stage two: train a student on the recorded views with the SKD loss, teacher logits from the cache.

The same loop runs online (`--teacher`, no cache): the teacher then runs in the loop on exactly
the views a cache built with the same plan options holds. That is the comparison the product's
central claim rests on: same views, same losses, the teacher's forward pass gone.
"""
from __future__ import annotations

import json
import math
import os
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

import pipelines

from .build import AMP_DTYPES, VAL_CROP_FRACTION, fault, quick_fingerprints
from .codecs import Codec
from .distributed import Dist, init_distributed, resolve_device, shutdown
from .index import index_dataset
from .loss import KDLoss, hard_label_loss, hinton_kd_loss, seed_alpha, seed_epoch, spherical_kd_loss
from .plan import CropParams, center_boxes, plan_view
from .reader import RowReader
from .store import Store, open_store
from .teachers import create_model, load_teacher, output_classes

CHECKPOINT = "checkpoint.pth"
STUDENT = "student.pth"
AUTO_MULTIPLIER_ROWS = 65536


class TrainError(ValueError):
    """Training cannot go ahead as asked: one line saying what to change."""


@dataclass
class TrainConfig:
    """Everything `skd-train` takes."""

    cache: Path | None = None
    teacher: str | None = None  # online mode: run this teacher in the loop
    weights: str | None = None
    data: Path | None = None
    arch: str = "resnet18"
    epochs: int = 100
    batch_size: int = 256  # global, over all ranks
    lr: float = 0.1  # per 256 images
    momentum: float = 0.9
    weight_decay: float = 1e-4
    schedule: str = "step"
    milestones: list[int] | None = None  # default: 30%, 60%, 80%, 90% of the epochs
    warmup_epochs: float = 0.0
    kd: str = "skd"
    temperature: float = 4.0
    multiplier: str = "2"  # a number or "auto"
    alpha: str = "seed"  # a number or "seed"
    amp: str = "auto"
    device: str = "auto"
    loader: str | None = None  # default: the cache's own loader (online mode: dali)
    workers: int = 8
    out: Path | None = None
    resume: bool = False
    overwrite: bool = False  # start again in an --out that holds a run
    seed: int = 0
    tensorboard: bool = False
    val: bool = True
    steps_per_epoch: int | None = None  # cap on steps per epoch (benchmarks, smoke runs)
    # plan options of online mode (a cache carries its own)
    image_size: int = 224
    views: int = 10
    plan_seed: int = 0
    crop: CropParams = field(default_factory=CropParams)


# ---------------------------------------------------------------------------------------------
# Where views and teacher logits come from


@dataclass
class Views:
    """The recorded views a run replays, and the validation split, in one form for both modes."""

    root: Path
    paths: list[str]
    labels: np.ndarray
    num_views: int
    num_classes: int
    image_size: int
    plan: Callable[[int], tuple]  # view -> (order, box, flip), as recorded
    val_paths: list[str] | None
    val_labels: np.ndarray | None
    val_boxes: np.ndarray | None
    fingerprint: str
    loader: str  # the loader that decodes them: the one the cache was built with unless --loader says


def cached_views(store: Store, data: Path | None, loader: str | None = None, val: bool = True) -> Views:
    """Views recorded in a cache; `data` overrides the recorded dataset root (a moved dataset), `loader` the
    recorded loader (the other one decodes the same windows to within resampling noise). Without `val` the
    validation split is neither checked nor loaded (a training machine may hold only train/)."""
    meta = store.meta
    if not store.is_complete():
        done, total = int(store.complete().sum()), store.complete().size
        raise TrainError(f"cache {store.path} is unfinished ({done} of {total} shards): "
                         "rerun its `skd-cache build` command to complete it")
    root = Path(data or meta["dataset"]["root"])
    if not (root / "train").is_dir():
        raise TrainError(f"dataset {root} has no train/ folder: pass --data ROOT where the cache's images live")
    use_val = val and store.has_val
    if use_val and not (root / "val").is_dir():
        raise TrainError(f"dataset {root} has no val/ folder, and cache {store.path} has validation logits: "
                         "pass --no-val, or --data ROOT where its val/ lives")
    train_fp, val_fp = quick_fingerprints(root, use_val, meta["dataset"].get("skipped", []))
    if train_fp != meta["dataset"]["fingerprint"]:
        raise TrainError(f"the images under {root}/train differ from those cache {store.path} was built on "
                         "(file list or sizes): pass the right --data or rebuild the cache")
    if use_val and val_fp != meta["dataset"]["val_fingerprint"]:
        raise TrainError(f"the images under {root}/val differ from those cache {store.path} was built on")
    samples = store.split("samples")
    val = store.split("val") if use_val else None
    return Views(root=root, paths=samples.paths, labels=samples.labels, num_views=store.num_views,
                 num_classes=store.num_classes, image_size=int(meta["plan"]["image_size"]),
                 plan=store.view_plan, val_paths=val.paths if val else None,
                 val_labels=val.labels if val else None, val_boxes=store.val_boxes() if val else None,
                 fingerprint=meta["dataset"]["fingerprint"], loader=loader or meta["plan"]["loader"])


def online_views(cfg: TrainConfig, num_classes: int) -> Views:
    """Views planned exactly as `skd-cache build` plans them, for the teacher-in-the-loop run."""
    index = index_dataset(cfg.data, with_val=cfg.val, workers=max(4, cfg.workers))
    sizes = index.train.sizes
    val = index.val
    return Views(root=index.root, paths=index.train.paths, labels=index.train.labels, num_views=cfg.views,
                 num_classes=num_classes, image_size=cfg.image_size,
                 plan=lambda k: _plan_arrays(plan_view(cfg.plan_seed, k, sizes, cfg.crop)),
                 val_paths=val.paths if val else None, val_labels=val.labels if val else None,
                 val_boxes=center_boxes(val.sizes, VAL_CROP_FRACTION) if val else None,
                 fingerprint=index.train.fingerprint, loader=cfg.loader or "dali")


def _plan_arrays(plan) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return plan.order, plan.box, plan.flip


def cached_teacher_batches(store: Store, view: int | None, start: int, stop: int, batch_size: int,
                           device: torch.device) -> Iterator[tuple[int, torch.Tensor]]:
    """(first position, float32 logits on `device`) per batch, read ahead and decoded on the device."""
    codec: Codec = store.codec
    pin = device.type == "cuda"
    for first, enc in RowReader(store, view, start, stop).batches(batch_size):
        parts = [None if a is None else torch.from_numpy(np.ascontiguousarray(a)) for a in enc]
        if pin:
            parts = [None if t is None else t.pin_memory() for t in parts]
        parts = [None if t is None else t.to(device, non_blocking=True) for t in parts]
        yield first, codec.decode_torch(*parts)


def auto_multiplier(store: Store) -> float:
    """Mean per-sample standard deviation of the cached teacher logits (SKD's advice for m)."""
    rows = min(store.num_samples, AUTO_MULTIPLIER_ROWS)
    logits = torch.from_numpy(store.read_logits(0, 0, rows))
    return float(logits.std(dim=1).mean())


# ---------------------------------------------------------------------------------------------
# Schedules


def default_milestones(epochs: int) -> list[int]:
    """The seed recipe's 30/60/80/90 of 100 epochs, scaled to `epochs`."""
    return sorted({seed_epoch(f, epochs) for f in (0.3, 0.6, 0.8, 0.9)})


def learning_rate(cfg: TrainConfig, base_lr: float, epoch_float: float) -> float:
    """Learning rate at a fractional epoch: linear warm-up, then step (/10 at milestones) or cosine."""
    if cfg.warmup_epochs > 0 and epoch_float < cfg.warmup_epochs:
        return base_lr * epoch_float / cfg.warmup_epochs
    if cfg.schedule == "cosine":
        span = max(1e-9, cfg.epochs - cfg.warmup_epochs)
        return 0.5 * base_lr * (1 + math.cos(math.pi * (epoch_float - cfg.warmup_epochs) / span))
    milestones = cfg.milestones or default_milestones(cfg.epochs)
    return base_lr * 0.1 ** sum(epoch_float >= m for m in milestones)


def alpha_at(cfg: TrainConfig, epoch: int) -> float:
    return seed_alpha(epoch, cfg.epochs) if cfg.alpha == "seed" else float(cfg.alpha)


def kd_loss(cfg: TrainConfig, multiplier: float, epoch: int):
    """The loss function of this epoch: (student, teacher, target) -> KDLoss."""
    alpha = alpha_at(cfg, epoch)
    if cfg.kd == "skd":
        return lambda s, t, y: spherical_kd_loss(s, t, y, temperature=cfg.temperature, multiplier=multiplier,
                                                 alpha=alpha)
    if cfg.kd == "hinton":
        return lambda s, t, y: hinton_kd_loss(s, t, y, temperature=cfg.temperature, alpha=alpha)
    return lambda s, t, y: hard_label_loss(s, y)


# ---------------------------------------------------------------------------------------------
# The run


def _save_atomic(obj, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _cli_value(value) -> str:
    if value is None:
        return "(default)"
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def rank_range(n: int, d: Dist, local_batch: int) -> tuple[int, int]:
    """This rank's contiguous part of a view's positions; equal parts so all ranks take equal steps.

    A part that would end in a batch of one image leaves that image out (BatchNorm cannot train on
    one); each view's order differs, so it is a different sample in each view.
    """
    per = n // d.world
    used = per - 1 if per > 1 and per % local_batch == 1 else per
    return d.rank * per, d.rank * per + used


def train(cfg: TrainConfig, *, progress: bool = False, log=None, on_step=None) -> dict:
    """Run (or resume) training; returns the last epoch's metrics.

    `on_step(epoch, step, KDLoss)`, when given, sees every step's loss (tests, notebooks).
    """
    kind = "cuda" if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()) else "cpu"
    d = init_distributed(kind)
    try:
        return _train(cfg, d, progress=progress and d.main, log=(log or (lambda m: None)) if d.main else (lambda m: None),
                      on_step=on_step)
    finally:
        shutdown(d)


def _setup(cfg: TrainConfig, device: torch.device):
    """(views, store or None, teacher model or None, multiplier, identities) for this run: the identity a
    checkpoint records, then any older form of it a checkpoint may hold."""
    if cfg.cache is not None:
        store = open_store(cfg.cache)
        views = cached_views(store, cfg.data, cfg.loader, cfg.val)
        multiplier = auto_multiplier(store) if cfg.multiplier == "auto" else float(cfg.multiplier)
        # what the cache holds, not where: a moved cache resumes, one rebuilt with another plan does not
        identity = {"cache": {"plan": store.meta["plan"], "codec": store.meta["codec"]},
                    "fingerprint": views.fingerprint, "teacher": store.meta["teacher"]["weights_sha256"],
                    "views": store.num_views}
        by_path = {**identity, "cache": str(Path(cfg.cache).resolve())}  # what older checkpoints recorded
        return views, store, None, multiplier, [identity, by_path]
    if cfg.teacher is None or cfg.data is None:
        raise TrainError("pass --cache DIR, or --teacher NAME with --data ROOT for online distillation")
    if cfg.multiplier == "auto":
        raise TrainError("--multiplier auto reads the cache's logits: pass a number in online mode")
    teacher = load_teacher(cfg.teacher, cfg.weights)
    model = teacher.model.to(device)
    if device.type == "cuda":  # as in the build: the images arrive channels_last
        model = model.to(memory_format=torch.channels_last)
    num_classes = output_classes(model, cfg.image_size, device, f"teacher {cfg.teacher}")
    views = online_views(cfg, num_classes)
    identity = {"online": cfg.teacher, "fingerprint": views.fingerprint, "teacher": teacher.weights_sha256,
                "views": cfg.views}
    before_tensor_hashes = {**identity, "teacher": teacher.file_sha256}
    return views, None, model, float(cfg.multiplier), [identity, before_tensor_hashes]


def _train(cfg: TrainConfig, d: Dist, *, progress: bool, log, on_step) -> dict:
    device = resolve_device(cfg.device, d)
    amp = ("bf16" if device.type == "cuda" else "none") if cfg.amp == "auto" else cfg.amp
    amp_dtype = AMP_DTYPES[amp]
    out = Path(cfg.out)
    if cfg.resume and cfg.overwrite:
        raise TrainError("--resume and --overwrite exclude each other: continue the run or start it again")
    if (out / CHECKPOINT).is_file() and not (cfg.resume or cfg.overwrite):
        raise TrainError(f"{out} holds a run ({CHECKPOINT}): pass --resume to continue it, --overwrite to start "
                         "it again, or another --out")
    if cfg.tensorboard:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise TrainError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
    views, store, teacher, multiplier, identities = _setup(cfg, device)
    identity = identities[0]
    if len(views.paths) < d.world:
        raise TrainError(f"{len(views.paths)} training samples cannot be shared by {d.world} processes: "
                         f"use at most {len(views.paths)}")
    if cfg.batch_size < d.world:
        raise TrainError(f"--batch-size {cfg.batch_size} is the global batch: give each of the {d.world} "
                         "processes at least one image")

    torch.manual_seed(cfg.seed)
    student = create_model(cfg.arch, num_classes=views.num_classes).to(device)
    got = output_classes(student.eval(), views.image_size, device, f"student {cfg.arch}")
    if got != views.num_classes:
        raise TrainError(f"student {cfg.arch} has {got} outputs, the teacher {views.num_classes}: "
                         "use a student with as many classes")
    if device.type == "cuda":
        student = student.to(memory_format=torch.channels_last)
    base_lr = cfg.lr * cfg.batch_size / 256
    optimizer = torch.optim.SGD(student.parameters(), lr=base_lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")

    # what a resumed run must repeat: the weights' and scaler's shape, and the schedule and loss of every epoch
    settings = {"arch": cfg.arch, "amp": amp, "epochs": cfg.epochs, "batch-size": cfg.batch_size, "lr": cfg.lr,
                "momentum": cfg.momentum, "weight-decay": cfg.weight_decay, "schedule": cfg.schedule,
                "milestones": cfg.milestones, "warmup-epochs": cfg.warmup_epochs, "kd": cfg.kd,
                "temperature": cfg.temperature, "multiplier": cfg.multiplier, "alpha": cfg.alpha}
    first_epoch = 0
    history: list[dict] = []
    if cfg.resume and (out / CHECKPOINT).is_file():
        ckpt = torch.load(out / CHECKPOINT, map_location="cpu", weights_only=True)
        if ckpt["identity"] not in identities:
            source = ckpt.get("source") or ckpt["identity"].get("cache") or ckpt["identity"].get("online")
            raise TrainError(f"{out / CHECKPOINT} belongs to a run on {source} (other views, teacher or images): "
                             "resume with the same cache or choose another --out")
        for key, value in settings.items():
            saved = ckpt.get("settings", {}).get(key, value)
            if saved != value:
                raise TrainError(f"{out / CHECKPOINT} was saved with --{key} {_cli_value(saved)}, not "
                                 f"{_cli_value(value)}: resume with the same options or choose another --out")
        student.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        first_epoch = int(ckpt["epoch"]) + 1
        history = [json.loads(line) for line in ckpt["metrics"]]
        log(f"resuming {out} at epoch {first_epoch}")
    elif cfg.resume:
        log(f"no checkpoint in {out}: starting a new run")
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        if first_epoch == 0:  # a new run: nothing of an earlier one may be resumed or mistaken for it
            for name in (CHECKPOINT, STUDENT):
                (out / name).unlink(missing_ok=True)
        (out / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in history))
    model = nn.parallel.DistributedDataParallel(student) if d.world > 1 else student

    writer = SummaryWriter(str(out / "tensorboard")) if cfg.tensorboard and d.main else None

    if cfg.epochs > views.num_views:
        log(f"{cfg.epochs} epochs over {views.num_views} cached views: views are reused from epoch "
            f"{views.num_views} on (epoch e uses view e mod {views.num_views})")
    local_batch = max(1, cfg.batch_size // d.world)
    n = len(views.paths)
    start, stop = rank_range(n, d, local_batch)
    metrics: dict = history[-1] if history else {}
    val_teacher_top1 = None
    if cfg.val and views.val_paths is not None:
        val_teacher_top1 = cached_val_top1(store, *val_range(len(views.val_paths), d), device)
    steps_run = 0
    for epoch in range(first_epoch, cfg.epochs):
        view = epoch % views.num_views
        order, box, flip = views.plan(view)
        positions = np.arange(start, stop)
        ids = order[positions]
        loader = pipelines.make_loader(
            views.loader, files=[str(views.root / views.paths[i]) for i in ids], boxes=box[positions],
            flips=flip[positions], labels=views.labels[ids], positions=positions, image_size=views.image_size,
            batch_size=local_batch, workers=cfg.workers, device=device)
        teacher_batches = (cached_teacher_batches(store, view, start, stop, local_batch, device)
                           if store is not None and cfg.kd != "none" else None)
        loss_fn = kd_loss(cfg, multiplier, epoch)
        steps_total = len(loader) if cfg.steps_per_epoch is None else min(len(loader), cfg.steps_per_epoch)
        sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss, kd, ce (sample-weighted)
        seen = 0
        model.train()
        autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()
        epoch_start = time.perf_counter()
        bar = tqdm(total=min(steps_total * local_batch, stop - start) * d.world, desc=f"epoch {epoch}", unit="img",
                   disable=not progress, dynamic_ncols=True)
        try:
            for step, batch in enumerate(loader):
                if step >= steps_total:
                    break
                lr = learning_rate(cfg, base_lr, epoch + step / steps_total)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                images = batch.images.to(device, non_blocking=True)
                if device.type == "cuda":
                    images = images.contiguous(memory_format=torch.channels_last)
                target = batch.labels.to(device, non_blocking=True)
                if teacher_batches is not None:
                    first, teacher_logits = next(teacher_batches)
                    if first != int(batch.positions[0]) or len(teacher_logits) != len(target):
                        raise RuntimeError(f"logits at position {first} do not match images at "
                                           f"{int(batch.positions[0])}")
                elif teacher is not None and cfg.kd != "none":
                    with torch.inference_mode(), autocast:
                        teacher_logits = teacher(images).float()
                    teacher_logits = teacher_logits.clone()
                else:
                    teacher_logits = None
                with autocast:
                    student_logits = model(images)
                parts: KDLoss = loss_fn(student_logits, teacher_logits, target)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(parts.loss).backward()
                scaler.step(optimizer)
                scaler.update()
                if on_step is not None:
                    on_step(epoch, step, parts)
                steps_run += 1
                fault("train-step", steps_run)
                b = len(target)
                sums += torch.stack([parts.loss.detach(), parts.kd, parts.ce]).double() * b
                seen += b
                bar.update(b * d.world)
                if progress and step % 10 == 0:
                    bar.set_postfix(loss=f"{parts.loss.item():.4f}", lr=f"{lr:.4g}")
        except OSError as exc:  # an image that went missing or unreadable after the start of the run
            raise TrainError(f"reading the images of epoch {epoch} failed ({pipelines.read_error(exc)}): "
                             f"check {views.root}, then rerun with --resume to continue from the last epoch") from None
        finally:  # also on an exception, so no reader thread outlives the epoch
            bar.close()
            if teacher_batches is not None:
                teacher_batches.close()
        train_seconds = time.perf_counter() - epoch_start
        totals = torch.cat([sums, torch.tensor([seen], dtype=torch.float64, device=device)])
        if d.world > 1:
            dist.all_reduce(totals)
        metrics = {"epoch": epoch, "view": view, "train_loss": float(totals[0] / totals[3]),
                   "kd_loss": float(totals[1] / totals[3]), "ce_loss": float(totals[2] / totals[3]),
                   "images_per_sec": float(totals[3]) / train_seconds, "lr": lr, "alpha": alpha_at(cfg, epoch),
                   "multiplier": multiplier}
        if cfg.val and views.val_paths is not None:
            metrics.update(evaluate(student, views, val_teacher_top1, cfg, d, device, autocast))
        history.append(metrics)
        if d.main:
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(metrics) + "\n")
            if writer is not None:
                for key, value in metrics.items():
                    writer.add_scalar(key, value, epoch)
            _save_atomic({"model": student.state_dict(), "optimizer": optimizer.state_dict(),
                          "scaler": scaler.state_dict(), "epoch": epoch, "identity": identity, "settings": settings,
                          "source": str(cfg.cache or cfg.teacher),
                          "args": {k: str(v) for k, v in asdict(cfg).items()},
                          "metrics": [json.dumps(m) for m in history]}, out / CHECKPOINT)
            log(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()))
        d.barrier()
        fault("after-epoch", epoch)
    if d.main:
        _save_atomic(student.state_dict(), out / STUDENT)
        if writer is not None:
            writer.close()
    return metrics


def val_range(n: int, d: Dist) -> tuple[int, int]:
    """This rank's part of the validation split (the last part may be shorter)."""
    per = -(-n // d.world)
    return min(n, d.rank * per), min(n, (d.rank + 1) * per)


def cached_val_top1(store: Store | None, start: int, stop: int, device: torch.device) -> torch.Tensor | None:
    """The cached teacher's top-1 class of validation rows [start, stop), read once per run."""
    if store is None or not store.has_val:
        return None
    tops = [store.codec.decode(enc).argmax(1) for _, enc in RowReader(store, None, start, stop).blocks()]
    return torch.from_numpy(np.concatenate(tops) if tops else np.zeros(0, np.int64)).to(device)


@torch.no_grad()
def evaluate(student: nn.Module, views: Views, teacher_top1: torch.Tensor | None, cfg: TrainConfig, d: Dist,
             device: torch.device, autocast) -> dict:
    """Top-1/top-5 on the validation split (centre windows) and top-1 agreement with the cached teacher."""
    student.eval()
    start, stop = val_range(len(views.val_paths), d)
    positions = np.arange(start, stop)
    loader = pipelines.make_loader(
        views.loader, files=[str(views.root / views.val_paths[i]) for i in positions], boxes=views.val_boxes[positions],
        flips=np.zeros(len(positions), np.uint8), labels=views.val_labels[positions], positions=positions,
        image_size=views.image_size, batch_size=max(1, cfg.batch_size // d.world), workers=cfg.workers,
        device=device)
    counts = torch.zeros(4, dtype=torch.float64, device=device)  # top1, top5, agree, n
    for batch in loader if stop > start else []:
        images = batch.images.to(device, non_blocking=True)
        target = batch.labels.to(device)
        with autocast:
            logits = student(images).float()
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        counts[0] += (top5[:, 0] == target).sum()
        counts[1] += (top5 == target[:, None]).any(dim=1).sum()
        if teacher_top1 is not None:
            rows = batch.positions.to(device) - start
            counts[2] += (teacher_top1[rows] == top5[:, 0]).sum()
        counts[3] += len(target)
    if d.world > 1:
        dist.all_reduce(counts)
    student.train()
    result = {"val_top1": float(counts[0] / counts[3]), "val_top5": float(counts[1] / counts[3])}
    if teacher_top1 is not None:
        result["val_teacher_agreement"] = float(counts[2] / counts[3])
    return result
