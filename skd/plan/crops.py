"""The recorded augmentation plan: sample order, RandomResizedCrop windows and flips of each view.

Everything here is a pure function of (seed, view, sample id, image height, width). Random numbers
come from skd.plan.draws, counter-based by (seed, view, stream, sample id), so a sample's window
does not depend on how many samples are planned at once, on batch size, or on any library's global
RNG. The build stores the resulting integers; replay reads them back and never re-derives them.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass

import numpy as np

from skd.plan import draws

# validation: resize to 256, centre crop 224 (scaled with the image size)
VAL_CROP_FRACTION = 224 / 256
TRIES = 10  # torchvision RandomResizedCrop's number of attempts before the centre fallback


@dataclass(frozen=True)
class CropParams:
    """RandomResizedCrop and flip parameters (torchvision defaults)."""

    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_prob: float = 0.5

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "CropParams":
        return cls(scale=tuple(d["scale"]), ratio=tuple(d["ratio"]), flip_prob=d["flip_prob"])


@dataclass(frozen=True)
class ViewPlan:
    """One view, indexed by position: `order[p]` is the sample id, `box[p]` its (y, x, h, w),
    `flip[p]`."""

    order: np.ndarray  # (N,) int32
    box: np.ndarray  # (N, 4) int32
    flip: np.ndarray  # (N,) uint8
    # (mix_lambda, mix_box) by position when mixed (skd.plan.mixing)
    mix: tuple[np.ndarray, np.ndarray] | None = None
    # aug_op, aug_magnitude, erase_box, erase_value by position
    augment: dict[str, np.ndarray] | None = None


def _randint(u: np.ndarray, high: np.ndarray) -> np.ndarray:
    """Integers in [0, high) from uniforms u (high >= 1)."""
    return np.minimum((u * high).astype(np.int64), high - 1)


def crop_windows(
    seed: int,
    view: int,
    sample_ids: np.ndarray,
    sizes: np.ndarray,
    params: CropParams = CropParams(),
) -> np.ndarray:
    """RandomResizedCrop windows (y, x, h, w) in pixels for the given samples, torchvision
    semantics.

    `sizes` is (n, 2) (height, width) of those samples. Ten tries of (area, log-uniform aspect),
    the first window that fits wins; otherwise the centre crop clamped to the ratio range.
    """
    ids = np.asarray(sample_ids, dtype=np.int64)
    height = np.asarray(sizes[:, 0], dtype=np.int64)
    width = np.asarray(sizes[:, 1], dtype=np.int64)
    n = len(ids)
    area = (height * width).astype(np.float64)
    log_lo, log_hi = math.log(params.ratio[0]), math.log(params.ratio[1])

    box = np.zeros((n, 4), dtype=np.int64)
    found = np.zeros(n, dtype=bool)
    for t in range(TRIES):
        pending = np.flatnonzero(~found)
        area_u, ratio_u, y_u, x_u = draws.uniform(
            seed, view, draws.CROP + t, ids[pending], count=4
        ).T
        target = area[pending] * (params.scale[0] + (params.scale[1] - params.scale[0]) * area_u)
        aspect = np.exp(log_lo + (log_hi - log_lo) * ratio_u)
        cw = np.round(np.sqrt(target * aspect)).astype(np.int64)
        ch = np.round(np.sqrt(target / aspect)).astype(np.int64)
        fits = (cw > 0) & (ch > 0) & (cw <= width[pending]) & (ch <= height[pending])
        hit = pending[fits]
        y = _randint(y_u[fits], height[hit] - ch[fits] + 1)
        x = _randint(x_u[fits], width[hit] - cw[fits] + 1)
        box[hit] = np.stack([y, x, ch[fits], cw[fits]], axis=1)
        found[hit] = True
    rest = ~found
    if rest.any():
        box[rest] = center_fallback(height[rest], width[rest], params.ratio)
    return box.astype(np.int32)


def center_fallback(
    height: np.ndarray, width: np.ndarray, ratio: tuple[float, float]
) -> np.ndarray:
    """torchvision's fallback window: the whole image, clamped to the ratio range, centred."""
    in_ratio = width / height
    w = width.copy()
    h = height.copy()
    narrow = in_ratio < min(ratio)
    wide = in_ratio > max(ratio)
    h[narrow] = np.round(w[narrow] / min(ratio)).astype(np.int64)
    w[wide] = np.round(h[wide] * max(ratio)).astype(np.int64)
    y = (height - h) // 2
    x = (width - w) // 2
    return np.stack([y, x, h, w], axis=1)


def flips(seed: int, view: int, sample_ids: np.ndarray, prob: float = 0.5) -> np.ndarray:
    """1 where the sample is mirrored in this view."""
    return (draws.uniform(seed, view, draws.FLIP, sample_ids) < prob).astype(np.uint8)


def sample_order(seed: int, view: int, n: int) -> np.ndarray:
    """The order in which view `view` visits the n samples: a permutation of range(n)."""
    keys = draws.uniform(seed, view, draws.ORDER, np.arange(n))
    return np.argsort(keys, kind="stable").astype(np.int32)


def plan_view(
    seed: int, view: int, sizes: np.ndarray, params: CropParams = CropParams()
) -> ViewPlan:
    """Plan one view over all samples; `sizes[i]` is (height, width) of sample i.

    Windows and flips are drawn in sample-id order, where the draws read memory in sequence, then
    put in the view's order: a sample's draws do not depend on its position.
    """
    sizes = np.asarray(sizes)
    ids = np.arange(len(sizes))
    order = sample_order(seed, view, len(sizes))
    box = crop_windows(seed, view, ids, sizes, params)[order]
    flip = flips(seed, view, ids, params.flip_prob)[order]
    return ViewPlan(order=order, box=box, flip=flip)


def center_boxes(sizes: np.ndarray, crop_fraction: float = VAL_CROP_FRACTION) -> np.ndarray:
    """Validation windows: the centred square that 'resize shorter side to S/f, centre crop S'
    keeps.

    Resizing the shorter side to size/f and cropping size pixels keeps a centred square of side
    f * min(h, w) of the original image; cropping that square and resizing it to size is the
    same view up to resampling, through the same window chain as training.
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    h, w = sizes[:, 0], sizes[:, 1]
    side = np.maximum(1, np.round(np.minimum(h, w) * crop_fraction)).astype(np.int64)
    y = (h - side) // 2
    x = (w - side) // 2
    return np.stack([y, x, side, side], axis=1).astype(np.int32)


class PlanId:
    """sha256 naming a recorded plan, extended view by view: the head hashes the samples' and val's
    hashes, the plan's parameters and the validation windows; each view then makes the id
    `sha256(previous id, that view's plan arrays: dtype, shape and bytes of each)`. The id of K
    views is therefore the id of K - 1 views extended by view K - 1, so a cache grows
    (skd.store.creation.grow_store) from its recorded id alone, holding one view's plan.

    Caches built from one plan (`skd-cache build --plan-from`) share it, so their rows line up and
    several teachers can be read together.
    """

    def __init__(
        self,
        samples_sha256: str,
        val_sha256: str | None,
        params: dict,
        val_boxes: np.ndarray | None,
    ):
        head = hashlib.sha256(
            f"{samples_sha256}\n{val_sha256}\n{json.dumps(params, sort_keys=True)}\n".encode()
        )
        if val_boxes is not None:
            _update(head, val_boxes)
        self._id = head.hexdigest()

    @classmethod
    def extending(cls, recorded: str) -> PlanId:
        """The id of a recorded plan (`skd.plan.id`), to be extended by the views appended to it."""
        plan_id = cls.__new__(cls)
        plan_id._id = recorded
        return plan_id

    def add_view(self, arrays) -> None:
        """Extend the id by one view, given its plan arrays in the cache's order (order, box, flip,
        mix_lambda, mix_box)."""
        step = hashlib.sha256(self._id.encode())
        for array in arrays:
            _update(step, array)
        self._id = step.hexdigest()

    def hexdigest(self) -> str:
        return self._id


def _update(digest, array: np.ndarray) -> None:
    array = np.ascontiguousarray(array)
    digest.update(f"{array.dtype.str}{array.shape}".encode())
    digest.update(array.tobytes())
