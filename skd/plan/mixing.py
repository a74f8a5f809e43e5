"""Consistent mixing: MixUp and CutMix drawn into the plan, so teacher and student see the same
mixed image.

Positions pair up (the partner of position p is p XOR 1, timm's 'pair' mode with fixed pairs): one
draw per pair, and both rows of a pair share the same lambda and the same box, each row keeping its
own image outside the box (or with weight lambda) and taking the partner's inside it. The draws come
from skd.plan.draws keyed by (seed, view, pair index), so the plan does not depend on batch size;
the build stores the arrays and replay reads them back. Boxes are stored as fractions of the view,
so any output size pastes the same region; lambda is corrected to the pixels actually pasted at the
plan's image size.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from skd.errors import OptionError
from skd.plan import draws


@dataclass(frozen=True)
class MixParams:
    """MixUp / CutMix options, timm's names: Beta(alpha, alpha) lambdas, 0 turns that kind off.

    `prob` is the chance a pair is mixed at all, `switch_prob` the chance of CutMix rather than
    MixUp when both are on.
    """

    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    prob: float = 1.0
    switch_prob: float = 0.5

    @property
    def enabled(self) -> bool:
        """True when some pair can be mixed: an alpha above 0 and a mixing chance above 0."""
        return (self.mixup_alpha > 0 or self.cutmix_alpha > 0) and self.prob > 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "MixParams":
        return cls(
            mixup_alpha=float(d["mixup_alpha"]),
            cutmix_alpha=float(d["cutmix_alpha"]),
            prob=float(d["prob"]),
            switch_prob=float(d["switch_prob"]),
        )

    def check(self) -> None:
        """OptionError naming the command-line option of the first unusable value."""
        for option, value in (("--mixup", self.mixup_alpha), ("--cutmix", self.cutmix_alpha)):
            if not math.isfinite(value) or value < 0:
                raise OptionError(
                    f"{option} {value}: a finite Beta alpha, at least 0 (0 turns it off)"
                )
        for option, value in (
            ("--mixup-prob", self.prob),
            ("--mixup-switch-prob", self.switch_prob),
        ):
            if not math.isfinite(value) or not 0 <= value <= 1:
                raise OptionError(f"{option} {value}: a probability between 0 and 1")


def _beta(seed: int, view: int, pair_ids: np.ndarray, stream: int, alpha: float) -> np.ndarray:
    """Beta(alpha, alpha) per pair (all ones when alpha is 0: that kind is off and never chosen)."""
    if alpha <= 0:
        return np.ones(len(pair_ids))
    return draws.beta(seed, view, stream, pair_ids, alpha)


def box_pixels(mix_box: np.ndarray | torch.Tensor, size: int) -> np.ndarray | torch.Tensor:
    """Pixel edges (y0, x0, y1, x1) of fractional boxes at `size`: floor(f * size + 0.5), int64.

    The arithmetic runs in float64 (exact for float32 fractions), so NumPy and torch on any device
    give the same pixels, and the plan's lambda correction matches what `mix_batch` pastes.
    """
    if isinstance(mix_box, torch.Tensor):
        return torch.floor(mix_box.double() * size + 0.5).long()
    return np.floor(np.asarray(mix_box, dtype=np.float64) * size + 0.5).astype(np.int64)


def _cut_boxes(lam: np.ndarray, cy: np.ndarray, cx: np.ndarray) -> np.ndarray:
    """timm's rand_bbox in fractions: side sqrt(1 - lam), centred at (cy, cx), clipped to the
    view."""
    half = np.sqrt(1.0 - lam) / 2
    return np.clip(np.stack([cy - half, cx - half, cy + half, cx + half], axis=1), 0.0, 1.0)


def _pair_draws(
    seed: int, view: int, pair_ids: np.ndarray, params: MixParams
) -> tuple[np.ndarray, np.ndarray]:
    """Per pair: whether it is CutMix, and the drawn (uncorrected) lambda, 1 for pairs left
    unmixed."""
    mixed_u, cut_u = draws.uniform(seed, view, draws.MIX_CHOICE, pair_ids, count=2).T
    mixed = mixed_u < params.prob
    if params.mixup_alpha > 0 and params.cutmix_alpha > 0:
        cut = cut_u < params.switch_prob
    else:
        cut = np.full(len(pair_ids), params.cutmix_alpha > 0)
    lam = np.where(
        cut,
        _beta(seed, view, pair_ids, draws.CUTMIX_LAMBDA, params.cutmix_alpha),
        _beta(seed, view, pair_ids, draws.MIXUP_LAMBDA, params.mixup_alpha),
    )
    return cut & mixed, np.where(mixed, lam, 1.0)


def plan_mixing(
    seed: int, view: int, n: int, params: MixParams, image_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """The mixing of one view of n positions: `mix_lambda` (n,) float32 and `mix_box` (n, 4)
    float32.

    `mix_lambda[p]` is the weight of position p's own image (1 = unmixed); `mix_box[p]` the CutMix
    region (y0, x0, y1, x1) as fractions of the view, all zero for MixUp and unmixed positions.
    Position p pairs with p XOR 1 and both share one draw; an odd view's last position is unmixed. A
    CutMix lambda is corrected to the pixel area pasted at `image_size`, and a pair whose lambda
    rounds to 1 is unmixed.
    """
    lam = np.ones(n, dtype=np.float32)
    box = np.zeros((n, 4), dtype=np.float32)
    pairs = n // 2
    if not params.enabled or pairs == 0:
        return lam, box
    pair_ids = np.arange(pairs)
    cut, pair_lam = _pair_draws(seed, view, pair_ids, params)
    centre_y, centre_x = draws.uniform(seed, view, draws.CUTMIX_CENTRE, pair_ids, count=2).T
    pair_box = np.where(cut[:, None], _cut_boxes(pair_lam, centre_y, centre_x), 0.0).astype(
        np.float32
    )
    y0, x0, y1, x1 = box_pixels(pair_box, image_size).T
    area = (y1 - y0) * (x1 - x0) / float(image_size * image_size)
    pair_lam = np.where(cut, 1.0 - area, pair_lam).astype(np.float32)
    pair_box[pair_lam == 1] = 0
    lam[: 2 * pairs] = np.repeat(pair_lam, 2)
    box[: 2 * pairs] = np.repeat(pair_box, 2, axis=0)
    return lam, box


def _partners(batch: int, device: torch.device) -> torch.Tensor:
    """Row i's partner i XOR 1 (a batch starting at an even position); an unpaired last row is its
    own."""
    return (torch.arange(batch, device=device) ^ 1).clamp_(max=batch - 1)


def mix_batch(
    images: torch.Tensor, lam: torch.Tensor, boxes: torch.Tensor, first_position: int
) -> torch.Tensor:
    """The mixed images of a batch of consecutive positions from `first_position` (even), as a new
    tensor.

    MixUp rows (zero box, lambda below 1) become lam * own + (1 - lam) * partner; CutMix rows
    (non-zero box) take the partner's pixels inside `box_pixels(box, S)`; the rest stay as they are.
    Every output element depends on its own row and the partner's only, so any split into
    even-started batches gives bit-identical images, on the CPU or an accelerator.
    """
    if first_position % 2:
        raise ValueError(
            f"mix_batch: the batch starts at odd position {first_position}; pairs need an even start"
        )
    batch, size = images.shape[0], images.shape[-1]
    # checked before the move: lambdas usually come from the host
    if batch % 2 and float(lam[-1]) != 1.0:
        raise ValueError(
            f"mix_batch: the unpaired last row has lambda {float(lam[-1])}; its partner is in "
            "another batch, so batches must hold whole pairs"
        )
    lam = lam.to(images.device)
    boxes = boxes.to(images.device)
    partner = images[_partners(batch, images.device)]
    y0, x0, y1, x1 = box_pixels(boxes, size).unbind(1)
    pixels = torch.arange(size, device=images.device)
    inside_y = (pixels >= y0[:, None]) & (pixels < y1[:, None])
    inside_x = (pixels >= x0[:, None]) & (pixels < x1[:, None])
    region = (inside_y[:, :, None] & inside_x[:, None, :])[:, None]
    out = torch.where(region, partner, images)
    weight = lam.to(images.dtype)[:, None, None, None]
    blend = weight * images + (1 - weight) * partner
    mixup = ((boxes == 0).all(dim=1) & (lam < 1))[:, None, None, None]
    return torch.where(mixup, blend, out)


def soft_labels(labels: torch.Tensor, lam: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The class probabilities (B, C) float32 of a mixed batch of consecutive positions from an even
    one: lam of the row's own label plus 1 - lam of its partner's (row i XOR 1; an unpaired last row
    has lam 1), as timm's mixup makes targets. Cross-entropy with them is the lam-weighted CE of the
    two labels."""
    lam = lam.to(device=labels.device, dtype=torch.float32)[:, None]
    own = F.one_hot(labels, num_classes).float()
    partner = own[_partners(len(labels), labels.device)]
    return lam * own + (1 - lam) * partner


def mix_summary(lam: np.ndarray, box: np.ndarray) -> dict:
    """Shares of MixUp, CutMix and unmixed rows of recorded mixing, and the mean own-image
    weight."""
    n = max(1, len(lam))
    cut = np.asarray(box).any(axis=1)
    mixup = (np.asarray(lam) < 1) & ~cut
    return {
        "mixup": float(mixup.sum() / n),
        "cutmix": float(cut.sum() / n),
        "unmixed": float(1 - (mixup.sum() + cut.sum()) / n),
        "mean_lambda": float(np.mean(lam)) if len(lam) else 1.0,
    }


def summary_line(summary: dict) -> str:
    return (
        f"{summary['mixup']:.0%} MixUp, {summary['cutmix']:.0%} CutMix, {summary['unmixed']:.0%} unmixed, "
        f"mean lambda {summary['mean_lambda']:.3f}"
    )
