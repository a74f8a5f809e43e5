"""What a training run is made of: the views and where the teacher's logits come from (a cache, an
ensemble of caches, or the teacher online), the student, and what updates it at each step."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from skd.cache import Cache, open_cache
from skd.config import TrainConfig
from skd.errors import ModelError, OptionError, SkdWarning
from skd.loss import KDLoss
from skd.models.recipe import resolve
from skd.models.runtime import Dist, autocast, place
from skd.models.teachers import create_model, load_teacher, output_classes
from skd.pipelines import Recipe
from skd.replay.checks import warn_other_loader
from skd.replay.sources import ReplaySource, online_source, student_recipe
from skd.replay.view_loader import check_shares
from skd.store.cache_store import Store

SKD_KL_WARNING = 1e-3  # a cache's recorded SKD KL above this is worth a warning: int8 loses ~1e-5
ONLINE_IMAGE_SIZE = 224  # the student's size in online mode unless --image-size says


@dataclass
class Run:
    """What the loop needs besides the student: the views, where teacher logits come from, and the
    run's identity."""

    source: ReplaySource
    cache: Cache | None  # cached teacher logits: one cache, or an ensemble's (None online)
    stores: list[Store]  # the cache's stores (empty online)
    weights: list[float]  # of the ensemble's teachers, summing to 1
    teacher: nn.Module | None  # online mode: the teacher in the loop
    # online mode: how the teacher sees each window (may differ from the student)
    teacher_recipe: Recipe | None
    multiplier: float
    identity: dict  # recorded in the checkpoint: a resume must replay the same views and teacher
    steps_run: int = 0  # steps this process has run (the train-step fault point counts them)


@dataclass
class Learner:
    """The student and what updates it: SGD, torch's lr scheduler (stepped once per batch), AMP's
    grad scaler."""

    student: nn.Module  # the weights that are saved
    model: nn.Module  # what runs the batches: the student, wrapped by DDP over several processes
    optimizer: torch.optim.Optimizer
    scheduler: LambdaLR
    scaler: torch.amp.GradScaler

    def step(
        self, images, labels, teacher, loss_fn, device: torch.device, amp: str
    ) -> tuple[KDLoss, float]:
        """One optimizer step on a batch, then one scheduler step: (its losses, the learning rate it
        used). `loss_fn`: a loss module of skd.loss (its `parts` give the KD and CE terms)."""
        lr = self.scheduler.get_last_lr()[0]
        with autocast(device, amp):
            student_logits = self.model(images)
        parts = loss_fn.parts(student_logits, teacher, labels)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(parts.loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.step_scheduler()
        return parts, lr

    def step_scheduler(self) -> None:
        """The lr of the next batch. Under fp16 the grad scaler skips the optimizer step of a batch
        whose gradients overflowed; that batch still counts in the schedule (the lr stays a function
        of the step), so torch's warning that the scheduler stepped before the optimizer ever did
        does not apply and is not shown."""
        if not self.scaler.is_enabled():
            self.scheduler.step()
            return
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", message=r"Detected call of `lr_scheduler\.step\(\)`", category=UserWarning
            )
            self.scheduler.step()


def open_run(cfg: TrainConfig, device: torch.device) -> Run:
    """The views and teacher logits of this run: a cache's, or an online plan's with the teacher in
    the loop."""
    if cfg.caches():
        return cached_run(cfg)
    if cfg.teacher is None or cfg.data is None:
        raise OptionError(
            "pass --cache DIR, or --teacher NAME with --data ROOT for online distillation"
        )
    return online_run(cfg, device)


def cached_run(cfg: TrainConfig) -> Run:
    """The views of one cache (or an ensemble's, built on one plan), their images checked against
    the data."""
    cache = open_cache(
        cfg.caches(),
        weights=cfg.teacher_weights,
        kd=cfg.kd,
        data=cfg.data,
        views=cfg.views,
        val=cfg.val,
    )
    warn_other_loader(cfg.loader, cache.stores[0])
    if cfg.kd == "skd":
        warn_lossy_codec(cache.stores)
    recipe = student_recipe(cfg.image_size or cache.image_size, cfg.mean, cfg.std)
    source = replace(
        cache.source, recipe=recipe, loader_kind=cfg.loader or cache.source.loader_kind
    )
    multiplier = cache.multiplier() if cfg.multiplier == "auto" else float(cfg.multiplier)
    # what the caches hold, not where: a moved cache resumes, one rebuilt with another plan does not
    identity = {
        "caches": [
            {
                "plan": s.meta["plan"],
                "codec": s.meta["codec"],
                "views": s.num_views,
                "teacher": s.meta["teacher"]["weights_sha256"],
            }
            for s in cache.stores
        ],
        "weights": cache.weights,
        "fingerprint": source.fingerprint,
    }
    if cache.num_views < cache.stores[0].num_views:
        identity["views read"] = cache.num_views
    return Run(source, cache, cache.stores, cache.weights, None, None, multiplier, identity)


def warn_lossy_codec(stores: list[Store]) -> None:
    """One warning per cache whose codec loses more of the SKD target than SKD_KL_WARNING (its
    recorded figure)."""
    for store in stores:
        kl = (store.meta.get("codec_fidelity") or {}).get("kl_skd", 0.0)
        if kl > SKD_KL_WARNING:
            warnings.warn(
                f"cache {store.path} stores {store.codec.name} rows whose SKD target is off by KL {kl:.2g} "
                f"(int8: ~1e-5): the layer norm needs whole rows; use --kd hinton with it, or a cache built "
                "with --codec int8 for SKD",
                SkdWarning,
                stacklevel=2,
            )


def online_run(cfg: TrainConfig, device: torch.device) -> Run:
    """The views of a plan made here from the data, the teacher loaded to run in the loop on each of
    them."""
    teacher = load_teacher(cfg.teacher, cfg.weights)
    size = cfg.image_size or ONLINE_IMAGE_SIZE
    recipe, _ = resolve(
        cfg.teacher_recipe_options(), teacher.pretrained_cfg, teacher.published, size
    )
    model = place(teacher.model, device)
    num_classes = output_classes(model, recipe.size, device, f"teacher {cfg.teacher}")
    source = online_source(
        cfg.data,
        views=cfg.online_views(),
        recipe=student_recipe(size, cfg.mean, cfg.std),
        seed=cfg.plan_seed,
        crop=cfg.crop,
        mix=cfg.mix_params(),
        plan_size=size,
        loader=cfg.loader or "dali",
        val=cfg.val,
        workers=cfg.workers,
        num_classes=num_classes,
        augment=cfg.augment_params(),
    )
    identity = {
        "online": cfg.teacher,
        "fingerprint": source.fingerprint,
        "teacher": teacher.weights_sha256,
        "views": cfg.online_views(),
        "teacher input": list(recipe.options().values()),
        "mixing": cfg.mix_params().to_dict(),
    }
    if cfg.augment_params().enabled:  # absent when off: a run from before augmentation resumes
        identity["augment"] = cfg.augment_params().to_dict()
    return Run(source, None, [], [], model, recipe, float(cfg.multiplier), identity)


def check_world(samples: int, batch_size: int, d: Dist, mixed: bool) -> None:
    """An error unless the processes share the samples and the global --batch-size as training
    needs (`check_shares`)."""
    option = f"--batch-size {batch_size} is the global batch"
    check_shares(samples, d.world, batch_size // d.world, mixed, option)


def make_student(arch: str, source: ReplaySource, device: torch.device) -> nn.Module:
    """The untrained student on `device`, checked to have as many outputs as the teacher."""
    student = create_model(arch, num_classes=source.num_classes).to(device)
    got = output_classes(student.eval(), source.recipe.size, device, f"student {arch}")
    if got != source.num_classes:
        raise ModelError(
            f"student {arch} has {got} outputs, the teacher {source.num_classes}: use a student with as many classes"
        )
    return place(student, device)
