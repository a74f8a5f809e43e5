"""What `skd-cache build` and `skd-train` take: plain dataclasses, separate from the code that runs
them.

The command lines take their option defaults from here, so each default is declared once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from skd.pipelines import IMAGENET_MEAN, IMAGENET_STD
from skd.plan.augment import AugmentParams
from skd.plan.crops import CropParams
from skd.plan.mixing import MixParams


@dataclass(kw_only=True)
class TeacherInput:
    """Explicit options of the teacher's input recipe; None: from its pretrained_cfg, torchvision's
    weights, else ImageNet's statistics, bilinear, at the student's size (see skd/models/recipe.py)."""

    teacher_size: int | None = None
    teacher_interpolation: str | None = None
    teacher_mean: tuple[float, float, float] | None = None
    teacher_std: tuple[float, float, float] | None = None

    def teacher_recipe_options(self) -> dict:
        """The options given, by recipe field name."""
        return {
            "size": self.teacher_size,
            "interpolation": self.teacher_interpolation,
            "mean": self.teacher_mean,
            "std": self.teacher_std,
        }


@dataclass(kw_only=True)
class MixOptions:
    """MixUp / CutMix recorded in the plan, timm's option names and meanings (skd/plan/mixing.py)."""

    mixup: float = 0.0  # Beta(alpha, alpha) of MixUp; 0: off
    cutmix: float = 0.0  # Beta(alpha, alpha) of CutMix; 0: off
    mixup_prob: float = 1.0  # chance that a pair is mixed at all
    mixup_switch_prob: float = 0.5  # chance of CutMix instead of MixUp when both are on

    def mix_params(self) -> MixParams:
        return MixParams(
            mixup_alpha=self.mixup,
            cutmix_alpha=self.cutmix,
            prob=self.mixup_prob,
            switch_prob=self.mixup_switch_prob,
        )


@dataclass(kw_only=True)
class AugmentOptions:
    """RandAugment and random erasing recorded in the plan, timm's option names and meanings
    (skd/plan/augment.py)."""

    aa: str | None = None  # RandAugment, e.g. rand-m9-n2-mstd0.5-inc1; None: off
    reprob: float = 0.0  # random erasing probability; 0: off
    remode: str = "const"  # const (0 in the normalised image) or rand (recorded per-channel values)
    recount: int = 1  # at most this many erased boxes per image

    def augment_params(self) -> AugmentParams:
        return AugmentParams(
            aa=self.aa, reprob=self.reprob, remode=self.remode, recount=self.recount
        )


@dataclass
class BuildConfig(TeacherInput, MixOptions, AugmentOptions):
    """Everything `skd-cache build` takes; the plan-, teacher- and data-defining fields are
    recorded."""

    teacher: str
    data: Path
    out: Path
    weights: str | None = None
    views: int = 10
    image_size: int = 224
    batch_size: int = 256
    # or "auto": the smallest codec within max_kl on the first rows (skd.store.codec_table)
    codec: str = "int8"
    # with codec "auto": the SKD KL the chosen codec may lose (default 1e-4)
    max_kl: float | None = None
    amp: str = "auto"
    device: str = "auto"
    loader: str = "dali"
    seed: int = 0
    workers: int = 8
    shard_rows: int = 16384
    chunk_rows: int = 1024
    compile: bool = False
    overwrite: bool = False
    val: bool = True
    on_bad_image: str = "error"
    crop: CropParams = field(default_factory=CropParams)
    # copy the samples and the whole plan of this cache (a second teacher)
    plan_from: Path | None = None


ONLINE_VIEWS = 10


@dataclass
class TrainConfig(TeacherInput, MixOptions, AugmentOptions):
    """Everything `skd-train` takes (the teacher-input and mixing options: online mode only)."""

    cache: Path | list[Path] | None = None  # one cache, or several built on one plan (an ensemble)
    teacher_weights: list[float] | None = None  # of an ensemble's caches; default: equal
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
    # the student's input: default the cache's image size (online mode: 224), ImageNet mean/std
    image_size: int | None = None
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    # with --cache: read the first `views` views (default all); online mode: the plan's views
    # (default 10)
    views: int | None = None
    # plan options of online mode (a cache carries its own)
    plan_seed: int = 0
    crop: CropParams = field(default_factory=CropParams)

    def online_views(self) -> int:
        """The number of views an online run plans."""
        return self.views or ONLINE_VIEWS

    def caches(self) -> list[Path]:
        """The caches to read, in order (none in online mode)."""
        if self.cache is None:
            return []
        return (
            [Path(c) for c in self.cache]
            if isinstance(self.cache, (list, tuple))
            else [Path(self.cache)]
        )

    def settings(self) -> dict:
        """What a resumed run must repeat: the weights' and scaler's shape, the schedule and loss of
        every epoch."""
        return {
            "arch": self.arch,
            "amp": self.amp,
            "epochs": self.epochs,
            "batch-size": self.batch_size,
            "lr": self.lr,
            "momentum": self.momentum,
            "weight-decay": self.weight_decay,
            "schedule": self.schedule,
            "milestones": self.milestones,
            "warmup-epochs": self.warmup_epochs,
            "kd": self.kd,
            "temperature": self.temperature,
            "multiplier": self.multiplier,
            "alpha": self.alpha,
            "image-size": self.image_size,
            "mean": list(self.mean),
            "std": list(self.std),
        }
