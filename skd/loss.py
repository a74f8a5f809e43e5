"""Knowledge-distillation losses: spherical KD (layer-normalised logits) and Hinton KD, as functions
and as modules (`SphericalKD`, `HintonKD`, `LabelCE`) for any training loop.

The losses run in float32 whatever the input dtype, so they are the same under AMP. Labels are class
indices (B,) or class probabilities (B, C): a mixed batch's soft targets
(`skd.plan.mixing.soft_labels`, as timm's mixup makes them). The SKD target and the KL between the
targets of two logits (`skd_log_target`, `skd_kl`) are also what `skd-cache verify` and the teacher
comparison of `skd-cache stats` report, in the dtype their caller picks.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

LAYER_NORM_EPS = 1e-7


class KDLoss(NamedTuple):
    """The training loss and its two parts, for logging."""

    loss: torch.Tensor
    kd: torch.Tensor
    ce: torch.Tensor


def spherical_normalize(
    logits: torch.Tensor, multiplier: float, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Layer-normalise logits over the classes (no affine, eps 1e-7), then scale by `multiplier`; in
    `dtype` (float32 for the loss under AMP, float64 where a damaged stored value must still
    normalise)."""
    logits = logits.to(dtype)
    return F.layer_norm(logits, logits.shape[-1:], eps=LAYER_NORM_EPS) * multiplier


def skd_log_target(
    logits: torch.Tensor, multiplier: float, temperature: float, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """log softmax(layer_norm(logits) * m / T): the distribution the SKD loss matches, per row, in
    `dtype`."""
    return F.log_softmax(spherical_normalize(logits, multiplier, dtype) / temperature, dim=-1)


def kl_per_row(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) of each row, from the log-probabilities of p and q over the last dimension."""
    return F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)


def skd_kl(
    p_logits: torch.Tensor,
    q_logits: torch.Tensor,
    *,
    multiplier: float,
    temperature: float,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Per-row KL between the SKD targets of two logits of the same rows (no T^2 factor), in
    `dtype`.

    Rounding makes the KL of two equal rows a hair negative: it is clamped at zero, as a reported
    figure.
    """
    log_p = skd_log_target(p_logits, multiplier, temperature, dtype)
    log_q = skd_log_target(q_logits, multiplier, temperature, dtype)
    return kl_per_row(log_p, log_q).clamp_min(0.0)


def _kd_term(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(teacher/T) || softmax(student/T)), batch mean, times T^2."""
    log_p_student = F.log_softmax(student / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher / temperature, dim=-1)
    return kl_per_row(log_p_teacher, log_p_student).mean() * temperature**2


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Batch mean cross-entropy with class indices (B,) or class probabilities (B, C), in
    float32."""
    return F.cross_entropy(logits, labels.float() if labels.is_floating_point() else labels)


def spherical_kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    target: torch.Tensor,
    *,
    temperature: float,
    multiplier: float,
    alpha: float,
    teacher_normalized: bool = False,
) -> KDLoss:
    """SKD loss (arXiv 2010.07485): a * KD on normalised logits + (1 - a) * CE on normalised
    student.

    The teacher never receives gradients. `target`: class indices, or a mixed batch's class
    probabilities. `teacher_normalized`: the teacher logits are already layer-normalised (an
    ensemble's mean, `ensemble_target`) and are only scaled by the multiplier.
    """
    z_student = spherical_normalize(student_logits, multiplier)
    teacher = teacher_logits.detach().float()
    z_teacher = (
        teacher * multiplier if teacher_normalized else spherical_normalize(teacher, multiplier)
    )
    kd = _kd_term(z_student, z_teacher, temperature)
    ce = cross_entropy(z_student, target)
    return KDLoss(alpha * kd + (1.0 - alpha) * ce, kd.detach(), ce.detach())


def ensemble_target(kd: str, teachers: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """Several teachers' logits of one batch as one target: for SKD the weighted mean of their
    layer-normalised logits (each teacher on the sphere first, so none dominates by its logit scale;
    pass it with `teacher_normalized=True`), otherwise the weighted mean of the logits. `weights`
    sum to 1."""
    if kd == "skd":
        return sum(w * spherical_normalize(t, 1.0) for w, t in zip(weights, teachers))
    return sum(w * t.float() for w, t in zip(weights, teachers))


def hinton_kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    target: torch.Tensor,
    *,
    temperature: float,
    alpha: float,
) -> KDLoss:
    """Hinton KD: a * KD on raw logits + (1 - a) * CE on raw student logits."""
    student = student_logits.float()
    kd = _kd_term(student, teacher_logits.detach().float(), temperature)
    ce = cross_entropy(student, target)
    return KDLoss(alpha * kd + (1.0 - alpha) * ce, kd.detach(), ce.detach())


def hard_label_loss(student_logits: torch.Tensor, target: torch.Tensor) -> KDLoss:
    """Plain cross-entropy (`--kd none`; of a mixed batch, the mixed labels), in the same shape as
    the KD losses."""
    ce = cross_entropy(student_logits.float(), target)
    return KDLoss(ce, torch.zeros((), device=ce.device), ce.detach())


class SphericalKD(nn.Module):
    """The SKD loss as a module: `SphericalKD(temperature=4.0, multiplier=2.0, alpha=0.9)(student,
    teacher, labels)`.

    `alpha` (and the other settings) are plain attributes a schedule may change between steps. For a
    cache of several teachers pass `teacher_normalized=cache.teacher_normalized`: its SKD target is
    already on the sphere.
    """

    def __init__(
        self,
        temperature: float = 4.0,
        multiplier: float = 2.0,
        alpha: float = 0.9,
        teacher_normalized: bool = False,
    ):
        super().__init__()
        self.temperature, self.multiplier, self.alpha = temperature, multiplier, alpha
        self.teacher_normalized = teacher_normalized

    def parts(
        self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor
    ) -> KDLoss:
        """The loss and its KD and CE terms (for logging)."""
        return spherical_kd_loss(
            student_logits,
            teacher_logits,
            labels,
            temperature=self.temperature,
            multiplier=self.multiplier,
            alpha=self.alpha,
            teacher_normalized=self.teacher_normalized,
        )

    def forward(
        self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor
    ):
        return self.parts(student_logits, teacher_logits, labels).loss


class HintonKD(nn.Module):
    """Hinton KD as a module: `HintonKD(temperature=4.0, alpha=0.9)(student, teacher, labels)`;
    `alpha` may change."""

    def __init__(self, temperature: float = 4.0, alpha: float = 0.9):
        super().__init__()
        self.temperature, self.alpha = temperature, alpha

    def parts(
        self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor
    ) -> KDLoss:
        """The loss and its KD and CE terms (for logging)."""
        return hinton_kd_loss(
            student_logits, teacher_logits, labels, temperature=self.temperature, alpha=self.alpha
        )

    def forward(
        self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor
    ):
        return self.parts(student_logits, teacher_logits, labels).loss


class LabelCE(nn.Module):
    """Cross-entropy with the labels only, in the KD modules' shape (the teacher's logits are
    ignored)."""

    alpha = 0.0

    def parts(self, student_logits: torch.Tensor, teacher_logits, labels: torch.Tensor) -> KDLoss:
        """The loss, a zero KD term and the CE term."""
        return hard_label_loss(student_logits, labels)

    def forward(self, student_logits: torch.Tensor, teacher_logits, labels: torch.Tensor):
        return self.parts(student_logits, teacher_logits, labels).loss


def seed_epoch(fraction: float, epochs: int) -> int:
    """The epoch at `fraction` of training in the seed recipe (60 of 100 for 0.6), rounded half up,
    so the alpha switches and the lr drops of a shorter run land on the same epochs."""
    return max(1, math.floor(epochs * fraction + 0.5))


def seed_alpha(epoch: int, epochs: int) -> float:
    """The seed repository's alpha schedule: 0.9 before 60% of training, 0.5 before 80%, then
    0.1."""
    if epoch < seed_epoch(0.6, epochs):
        return 0.9
    if epoch < seed_epoch(0.8, epochs):
        return 0.5
    return 0.1
