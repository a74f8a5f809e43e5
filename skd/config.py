"""What `skd-cache build` and `skd-train` take: plain dataclasses, separate from the code that runs them.

The command lines take their option defaults from here, so each default is declared once.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .plan import CropParams


@dataclass
class BuildConfig:
    """Everything `skd-cache build` takes; the plan-, teacher- and data-defining fields are recorded."""

    teacher: str
    data: Path
    out: Path
    weights: str | None = None
    views: int = 10
    image_size: int = 224
    batch_size: int = 256
    codec: str = "int8"
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

    def settings(self) -> dict:
        """What a resumed run must repeat: the weights' and scaler's shape, the schedule and loss of every epoch."""
        return {"arch": self.arch, "amp": self.amp, "epochs": self.epochs, "batch-size": self.batch_size,
                "lr": self.lr, "momentum": self.momentum, "weight-decay": self.weight_decay,
                "schedule": self.schedule, "milestones": self.milestones, "warmup-epochs": self.warmup_epochs,
                "kd": self.kd, "temperature": self.temperature, "multiplier": self.multiplier, "alpha": self.alpha}
