"""The training recipe over time: learning rate, KD weight and the loss of each epoch. Pure functions."""

from __future__ import annotations

import math
from typing import Callable

from .loss import KDLoss, hard_label_loss, hinton_kd_loss, seed_alpha, seed_epoch, spherical_kd_loss


def default_milestones(epochs: int) -> list[int]:
    """The seed recipe's 30/60/80/90 of 100 epochs, scaled to `epochs`."""
    return sorted({seed_epoch(f, epochs) for f in (0.3, 0.6, 0.8, 0.9)})


def learning_rate(
    base_lr: float,
    epoch_float: float,
    *,
    epochs: int,
    schedule: str = "step",
    milestones: list[int] | None = None,
    warmup_epochs: float = 0.0,
) -> float:
    """Learning rate at a fractional epoch: linear warm-up from 0, then step (/10 at milestones) or cosine."""
    if warmup_epochs > 0 and epoch_float < warmup_epochs:
        return base_lr * epoch_float / warmup_epochs
    if schedule == "cosine":
        span = max(1e-9, epochs - warmup_epochs)
        return 0.5 * base_lr * (1 + math.cos(math.pi * (epoch_float - warmup_epochs) / span))
    milestones = milestones or default_milestones(epochs)
    return base_lr * 0.1 ** sum(epoch_float >= m for m in milestones)


def alpha_at(alpha: str, epoch: int, epochs: int) -> float:
    """The KD weight of an epoch: a fixed number, or "seed" (0.9/0.5/0.1 at 0%/60%/80% of training)."""
    return seed_alpha(epoch, epochs) if alpha == "seed" else float(alpha)


def kd_loss(
    kd: str, *, temperature: float, multiplier: float, alpha: float, teacher_normalized: bool = False
) -> Callable[..., KDLoss]:
    """The loss function (student logits, teacher logits, target, mix lambda or None) -> KDLoss of
    `--kd skd|hinton|none`; `teacher_normalized`: SKD teacher logits are an ensemble's normalised mean."""
    if kd == "skd":
        return lambda s, t, y, lam=None: spherical_kd_loss(
            s,
            t,
            y,
            temperature=temperature,
            multiplier=multiplier,
            alpha=alpha,
            mix_lambda=lam,
            teacher_normalized=teacher_normalized,
        )
    if kd == "hinton":
        return lambda s, t, y, lam=None: hinton_kd_loss(s, t, y, temperature=temperature, alpha=alpha, mix_lambda=lam)
    return lambda s, t, y, lam=None: hard_label_loss(s, y, lam)
