"""The training recipe over time: learning rate (as torch's scheduler), KD weight and the loss of
each epoch."""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR

from skd.loss import HintonKD, LabelCE, SphericalKD, seed_alpha, seed_epoch


def default_milestones(epochs: int) -> list[int]:
    """The seed recipe's 30/60/80/90 of 100 epochs, scaled to `epochs`."""
    return sorted({seed_epoch(f, epochs) for f in (0.3, 0.6, 0.8, 0.9)})


def lr_factor(
    epoch_float: float,
    *,
    epochs: int,
    schedule: str = "step",
    milestones: list[int] | None = None,
    warmup_epochs: float = 0.0,
) -> float:
    """The learning rate at a fractional epoch as a multiple of the base rate: linear warm-up from
    0, then step (/10 at each milestone) or cosine (to 0 at the last epoch)."""
    if warmup_epochs > 0 and epoch_float < warmup_epochs:
        return epoch_float / warmup_epochs
    if schedule == "cosine":
        span = max(1e-9, epochs - warmup_epochs)
        return 0.5 * (1 + math.cos(math.pi * (epoch_float - warmup_epochs) / span))
    milestones = milestones or default_milestones(epochs)
    return 0.1 ** sum(epoch_float >= m for m in milestones)


def lr_scheduler(
    optimizer: torch.optim.Optimizer,
    *,
    steps_per_epoch: int,
    epochs: int,
    schedule: str = "step",
    milestones: list[int] | None = None,
    warmup_epochs: float = 0.0,
    first_step: int = 0,
) -> LambdaLR:
    """torch's scheduler of `lr_factor`, stepped after every optimizer step: step g of the run is at
    epoch g // steps_per_epoch plus the fraction (g mod steps_per_epoch) / steps_per_epoch of it.

    `first_step` > 0 continues a resumed run there; the optimizer's loaded state then carries the
    base rate (`initial_lr`) of the run that saved it. The position is recomputed from the epoch
    rather than restored, so a resume with another number of steps per epoch (processes,
    --steps-per-epoch) follows the same epochs.
    """

    def factor(step: int) -> float:
        epoch, within = divmod(step, steps_per_epoch)
        return lr_factor(
            epoch + within / steps_per_epoch,
            epochs=epochs,
            schedule=schedule,
            milestones=milestones,
            warmup_epochs=warmup_epochs,
        )

    return LambdaLR(optimizer, factor, last_epoch=first_step - 1)


def alpha_at(alpha: float | str, epoch: int, epochs: int) -> float:
    """The KD weight of an epoch: a fixed number, or "seed" (0.9/0.5/0.1 at 0%/60%/80% of
    training)."""
    return seed_alpha(epoch, epochs) if alpha == "seed" else float(alpha)


def kd_loss(
    kd: str,
    *,
    temperature: float,
    multiplier: float,
    alpha: float,
    teacher_normalized: bool = False,
) -> SphericalKD | HintonKD | LabelCE:
    """The loss module of `--kd skd|hinton|none`; `teacher_normalized`: SKD teacher logits are an
    ensemble's normalised mean."""
    if kd == "skd":
        return SphericalKD(temperature, multiplier, alpha, teacher_normalized)
    if kd == "hinton":
        return HintonKD(temperature, alpha)
    return LabelCE()
