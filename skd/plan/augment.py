"""Recorded strong augmentation: timm's RandAugment and RandomErasing drawn into the plan, as arrays
a reader replays.

The draws come from skd.plan.draws keyed by (seed, view, sample id), so the record of a sample does
not depend on batch size, process count or which other samples are planned with it. Each layer of
RandAugment is recorded as an op index into `AugmentParams.ops` (0: Identity, the layer was not
applied) and the exact signed argument the op is applied with; erasing as boxes in fractions of the
view and per-channel fills. Every model (teacher, student) applies the same record at its own input
side: the ops on the 8-bit image after crop, resize and flip (torchvision.transforms.v2.functional,
nearest, fill 0), erasing on the normalised image, mixing after that.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torchvision.transforms.v2.functional as F
from torchvision.transforms import InterpolationMode

from skd.errors import CacheError, OptionError
from skd.plan import draws

LEVEL_DENOM = 10.0  # timm's _LEVEL_DENOM: magnitude m maps to level m / 10 of each op's range
# timm's _RAND_TRANSFORMS (inc0) and _RAND_INCREASING_TRANSFORMS (inc1), in timm's order: a layer
# picks one uniformly
RAND_TRANSFORMS = (
    "AutoContrast Equalize Invert Rotate Posterize Solarize SolarizeAdd Color Contrast Brightness Sharpness "
    "ShearX ShearY TranslateXRel TranslateYRel"
).split()
RAND_INCREASING_TRANSFORMS = (
    "AutoContrast Equalize Invert Rotate PosterizeIncreasing SolarizeIncreasing SolarizeAdd ColorIncreasing "
    "ContrastIncreasing BrightnessIncreasing SharpnessIncreasing ShearX ShearY TranslateXRel TranslateYRel"
).split()
# Recorded names: torchvision's RandAugment names plus timm's Invert and SolarizeAdd; the magnitude
# carries
# the variant (an increasing Posterize is just Posterize with its bits), so inc0 and inc1 share one
# list.
OPS = ("Identity", *(re.sub("Increasing$|Rel$", "", name) for name in RAND_TRANSFORMS))
# torchvision's TrivialAugmentWide (`--aa trivial`): one op per image, uniform, at one of 31
# magnitude bins of
# (largest magnitude, signed); Translate in pixels of a 224-px view, recorded as a fraction of the
# side
TRIVIAL_BINS = 31
TRIVIAL_SPACE = {
    "Identity": (0.0, False),
    "ShearX": (0.99, True),
    "ShearY": (0.99, True),
    "TranslateX": (32.0 / 224, True),
    "TranslateY": (32.0 / 224, True),
    "Rotate": (135.0, True),
    "Brightness": (0.99, True),
    "Color": (0.99, True),
    "Contrast": (0.99, True),
    "Sharpness": (0.99, True),
    "Posterize": (None, False),  # 8 - round(bin / 5) bits
    "Solarize": (None, False),  # 255 down to 0
    "AutoContrast": (0.0, False),
    "Equalize": (0.0, False),
}
ERASE_TRIES = 10  # timm's RandomErasing tries per box
# timm's min_area, max_area: fractions of the view, divided by the box count
ERASE_AREA = (0.02, 1 / 3)
ERASE_LOG_RATIO = (math.log(0.3), math.log(1 / 0.3))  # timm's min_aspect 0.3 and its inverse
_RAND_KEYS = {"m": int, "n": int, "p": float, "mstd": float, "mmax": int, "inc": int}


@dataclass(frozen=True)
class _RandSpec:
    """A parsed timm RandAugment spec: magnitude, layers, per-op probability, noise std, level cap,
    variant."""

    m: int = 10
    n: int = 2
    p: float = 0.5
    mstd: float = 0.0
    mmax: int = 0  # 0: timm's default cap, 10
    inc: int = 0


@functools.lru_cache(maxsize=64)
def _parse(aa: str) -> _RandSpec:
    """timm's rand_augment_transform parsing of `rand-m9-n2-mstd0.5-inc1` (mstd above 100: uniform
    in [0, m]).

    Stricter than timm: a section without a number, an unknown key or a transform set (`t...`) is
    refused rather than ignored, so a typo cannot silently turn the augmentation into something
    else.
    """
    hint = "timm's RandAugment spec such as rand-m9-n2-mstd0.5-inc1 (keys m, n, p, mstd, mmax, inc), or trivial"
    # TrivialAugmentWide: one layer, always applied (its Identity is one of the ops)
    if aa == "trivial":
        return _RandSpec(n=1, p=1.0)
    sections = aa.split("-")
    if sections[0] != "rand":
        raise OptionError(
            f"--aa {aa}: only RandAugment and TrivialAugmentWide are recorded; give {hint}"
        )
    values = {}
    for section in sections[1:]:
        # timm's split: the key, then the value from the first digit
        match = re.fullmatch(r"(\D*)(\d.*)", section)
        if match is None or match[1] not in _RAND_KEYS:
            raise OptionError(f"--aa {aa}: section {section!r} is not one of {hint}")
        key, value = match.groups()
        try:
            values[key] = _RAND_KEYS[key](value)
        except ValueError:
            kind = "a whole number" if _RAND_KEYS[key] is int else "a number"
            raise OptionError(f"--aa {aa}: {key} {value!r} is not {kind}; give {hint}") from None
    spec = _RandSpec(**values)
    if spec.mstd > 100:
        spec = _RandSpec(**{**values, "mstd": math.inf})
    if spec.n < 1 or not 0 <= spec.p <= 1 or not math.isfinite(spec.p):
        raise OptionError(f"--aa {aa}: n must be at least 1 and p a probability between 0 and 1")
    return spec


@dataclass(frozen=True)
class AugmentParams:
    """Strong augmentation options, timm's names and meanings.

    `aa`: a RandAugment spec (None: off); `reprob`: the chance an image is erased; `remode`: `const`
    (fill 0 in the normalised image) or `rand` (per-box, per-channel N(0, 1)); `recount`: the most
    boxes an erased image gets (the count is drawn in [1, recount], each box's area divided by it,
    as timm does).
    """

    aa: str | None = None
    reprob: float = 0.0
    remode: str = "const"
    recount: int = 1

    @property
    def enabled(self) -> bool:
        """True when some sample can be changed: RandAugment on, or erasing with a chance above
        0."""
        return self.aa is not None or self.reprob > 0

    @property
    def ops(self) -> tuple[str, ...]:
        """The op names a recorded op index refers to; index 0 is Identity (the layer was not
        applied)."""
        return OPS

    @property
    def layers(self) -> int:
        """L, the ops recorded per sample: RandAugment's n, 0 when it is off."""
        return 0 if self.aa is None else _parse(self.aa).n

    def to_dict(self) -> dict:
        """The options and the op list, so a reader of the cache's attributes can name the recorded
        indices."""
        return {**asdict(self), "ops": list(self.ops)}

    @classmethod
    def from_dict(cls, d: dict) -> "AugmentParams":
        params = cls(
            aa=d["aa"],
            reprob=float(d["reprob"]),
            remode=str(d["remode"]),
            recount=int(d["recount"]),
        )
        if "ops" in d and tuple(d["ops"]) != params.ops:
            raise CacheError(
                f"recorded augmentation ops {list(d['ops'])} differ from this version's {list(params.ops)}: "
                "replay the cache with the skd version that built it"
            )
        return params

    def check(self) -> None:
        """OptionError naming the command-line option of the first unusable value."""
        if self.aa is not None:
            _parse(self.aa)
        if not math.isfinite(self.reprob) or not 0 <= self.reprob <= 1:
            raise OptionError(
                f"--reprob {self.reprob}: a probability between 0 and 1 (0 turns erasing off)"
            )
        if self.remode == "pixel":
            raise OptionError(
                "--remode pixel: per-pixel noise cannot be the same image at the teacher's and the student's "
                "input size; use const or rand (one recorded value per box and channel)"
            )
        if self.remode not in ("const", "rand"):
            raise OptionError(f"--remode {self.remode}: one of const, rand")
        if (
            isinstance(self.recount, bool)
            or not isinstance(self.recount, (int, np.integer))
            or self.recount < 1
        ):
            raise OptionError(f"--recount {self.recount}: a whole number of boxes, at least 1")


@dataclass(frozen=True)
class Augment:
    """One view's augmentation record for n samples, in the order of the ids planned.

    `op` (n, L) uint8: indices into `AugmentParams.ops`; `magnitude` (n, L) float32: the signed
    argument applied (0 for Identity); `erase_box` (n, R, 4) float32: y0, x0, y1, x1 as fractions of
    the view, all zero where no box was placed; `erase_value` (n, R, 3) float32: the fill per box
    and channel.
    """

    op: np.ndarray
    magnitude: np.ndarray
    erase_box: np.ndarray
    erase_value: np.ndarray


def _argument(name: str, level: np.ndarray, negate: np.ndarray) -> np.ndarray:
    """timm's level-to-argument mapping of op `name`, as the recorded argument (factors minus 1).

    The arithmetic follows timm's order of operations in float64, so a level gives timm's exact
    value.
    """
    sign = np.where(negate, -1.0, 1.0)
    fraction = level / LEVEL_DENOM
    if name in ("AutoContrast", "Equalize", "Invert"):
        return np.zeros_like(level)
    if name == "Rotate":
        return sign * (fraction * 30.0)
    if name.startswith("Posterize"):  # bits kept; PIL's posterize of fewer than 0 bits is that of 0
        bits = np.trunc(fraction * 4)
        return np.clip(4 - bits if name.endswith("Increasing") else bits, 0, 8)
    if name.startswith("Solarize") and name != "SolarizeAdd":
        threshold = np.minimum(256, np.trunc(fraction * 256))
        return 256 - threshold if name.endswith("Increasing") else threshold
    if name == "SolarizeAdd":
        return np.minimum(128, np.trunc(fraction * 110))
    # Color, Contrast, Brightness, Sharpness: 1 +- 0.9 level, at least 0.1
    if name.endswith("Increasing"):
        return np.maximum(0.1, 1.0 + sign * (fraction * 0.9)) - 1.0
    if name in ("Color", "Contrast", "Brightness", "Sharpness"):
        return (fraction * 1.8 + 0.1) - 1.0
    if name in ("ShearX", "ShearY"):
        return sign * (fraction * 0.3)
    return sign * (fraction * 0.45)  # TranslateXRel, TranslateYRel: timm's default translate_pct


def _plan_ops(
    seed: int, view: int, ids: np.ndarray, params: AugmentParams
) -> tuple[np.ndarray, np.ndarray]:
    """RandAugment's op indices and arguments (n, L), as timm's RandAugment with AugmentOp draws
    them.

    Per layer: an op chosen uniformly with replacement, applied with chance p (timm skips when
    random() > p), the level gauss(m, mstd) (uniform in [0, m] for mstd above 100) clipped to
    [0, mmax or 10], and the sign of signed ops negated when random() > 0.5.
    """
    n, layers = len(ids), params.layers
    op = np.zeros((n, layers), dtype=np.uint8)
    magnitude = np.zeros((n, layers), dtype=np.float32)
    if layers == 0:
        return op, magnitude
    if params.aa == "trivial":
        return _plan_trivial(seed, view, ids)
    spec = _parse(params.aa)
    names = RAND_INCREASING_TRANSFORMS if spec.inc else RAND_TRANSFORMS
    choice_u, applied_u, negate_u, uniform_level = (
        draws.uniform(seed, view, draws.AUG_OP, ids, 4 * layers)
        .reshape(n, layers, 4)
        .transpose(2, 0, 1)
    )
    choice = np.minimum((choice_u * len(names)).astype(np.int64), len(names) - 1)
    if spec.mstd == math.inf:
        level = uniform_level * spec.m
    elif spec.mstd > 0:
        level = spec.m + spec.mstd * draws.normal(seed, view, draws.AUG_LEVEL, ids, layers)
    else:
        level = np.full((n, layers), float(spec.m))
    level = np.clip(level, 0.0, spec.mmax or LEVEL_DENOM)
    applied = applied_u <= spec.p
    for k, name in enumerate(names):
        chosen = applied & (choice == k)
        op[chosen] = k + 1
        magnitude[chosen] = _argument(name, level[chosen], negate_u[chosen] > 0.5)
    return op, magnitude


def _plan_trivial(seed: int, view: int, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """torchvision's TrivialAugmentWide as (n, 1) op indices and arguments: an op of TRIVIAL_SPACE
    uniformly, a magnitude bin uniformly in [0, 30], the sign of a signed op negated with chance
    1/2."""
    names = list(TRIVIAL_SPACE)
    choice_u, bin_u, negate_u = draws.uniform(seed, view, draws.AUG_OP, ids, 3).T
    choice = np.minimum((choice_u * len(names)).astype(np.int64), len(names) - 1)
    level = np.minimum((bin_u * TRIVIAL_BINS).astype(np.int64), TRIVIAL_BINS - 1)
    op = np.zeros((len(ids), 1), dtype=np.uint8)
    magnitude = np.zeros((len(ids), 1), dtype=np.float32)
    for k, name in enumerate(names):
        chosen = choice == k
        largest, signed = TRIVIAL_SPACE[name]
        if name == "Posterize":
            value = 8 - np.round(level[chosen] / ((TRIVIAL_BINS - 1) / 6))
        elif name == "Solarize":
            value = 255.0 * (1 - level[chosen] / (TRIVIAL_BINS - 1))
        else:
            value = largest * level[chosen] / (TRIVIAL_BINS - 1)
        if signed:
            value = np.where(negate_u[chosen] > 0.5, -value, value)
        op[chosen, 0] = OPS.index(name)
        magnitude[chosen, 0] = value
    return op, magnitude


def _plan_erasing(
    seed: int, view: int, ids: np.ndarray, params: AugmentParams
) -> tuple[np.ndarray, np.ndarray]:
    """timm's RandomErasing boxes (n, R, 4) and fills (n, R, 3) in fractions of the view.

    An image is erased when random() <= reprob, with a count drawn in [1, R]; each of its boxes
    takes up to 10 tries of (area uniform in [0.02, 1/3] / count, log-ratio uniform in [log 0.3, log
    1/0.3]), kept when both sides are below the view's, at a position uniform over the free range.
    timm rounds the sides to pixels of the one image it erases; a record serves every input size, so
    the sides stay fractions and each model rounds the edges at its own size (`erase`). Try t draws
    stream ERASE_TRY + t for the samples still placing a box, so a sample's boxes depend on its id
    only.
    """
    n, boxes = len(ids), params.recount
    erase_box = np.zeros((n, boxes, 4), dtype=np.float32)
    erase_value = np.zeros((n, boxes, 3), dtype=np.float32)
    if params.reprob <= 0 or n == 0:
        return erase_box, erase_value
    erased_u, count_u = draws.uniform(seed, view, draws.ERASE, ids, 2).T
    count = np.minimum((count_u * boxes).astype(np.int64), boxes - 1) + 1
    pending = (erased_u <= params.reprob)[:, None] & (np.arange(boxes) < count[:, None])
    for attempt in range(ERASE_TRIES):
        rows = np.flatnonzero(pending.any(axis=1))
        if len(rows) == 0:
            break
        area_u, ratio_u, y_u, x_u = (
            draws.uniform(seed, view, draws.ERASE_TRY + attempt, ids[rows], 4 * boxes)
            .reshape(len(rows), boxes, 4)
            .transpose(2, 0, 1)
        )
        area = (ERASE_AREA[0] + (ERASE_AREA[1] - ERASE_AREA[0]) * area_u) / count[rows, None]
        ratio = np.exp(ERASE_LOG_RATIO[0] + (ERASE_LOG_RATIO[1] - ERASE_LOG_RATIO[0]) * ratio_u)
        height, width = np.sqrt(area * ratio), np.sqrt(area / ratio)
        placed = pending[rows] & (height < 1) & (width < 1)
        y0, x0 = y_u * (1 - height), x_u * (1 - width)
        box = np.clip(np.stack([y0, x0, y0 + height, x0 + width], axis=-1), 0.0, 1.0)
        erase_box[rows] = np.where(placed[..., None], box, erase_box[rows])
        pending[rows] &= ~placed
    if params.remode == "rand":
        fill = draws.normal(seed, view, draws.ERASE_VALUE, ids, 3 * boxes).reshape(n, boxes, 3)
        erase_value[:] = np.where(erase_box.any(axis=-1, keepdims=True), fill, 0.0)
    return erase_box, erase_value


def plan_augment(seed: int, view: int, ids: np.ndarray, params: AugmentParams) -> Augment:
    """The augmentation record of samples `ids` in view `view`: a pure function of (seed, view, id,
    params)."""
    params.check()
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    op, magnitude = _plan_ops(seed, view, ids, params)
    erase_box, erase_value = _plan_erasing(seed, view, ids, params)
    return Augment(op=op, magnitude=magnitude, erase_box=erase_box, erase_value=erase_value)


def _affine(image: torch.Tensor, **kwargs) -> torch.Tensor:
    """torchvision's RandAugment affine: no rotation or scaling, nearest, fill 0 (shear and
    translate given)."""
    kwargs = {"angle": 0.0, "translate": [0, 0], "scale": 1.0, "shear": [0.0, 0.0], **kwargs}
    return F.affine(image, interpolation=InterpolationMode.NEAREST, fill=0, **kwargs)


def _solarize(image: torch.Tensor, threshold: float) -> torch.Tensor:
    """Pixels at or above the threshold inverted; a threshold above 255 (timm's 256) inverts
    none."""
    return image if threshold > 255 else F.solarize(image, threshold)


def _solarize_add(image: torch.Tensor, added: float) -> torch.Tensor:
    """timm's SolarizeAdd: `added` added to pixels below 128, capped at 255."""
    raised = (image.to(torch.int16) + int(added)).clamp_(max=255).to(torch.uint8)
    return torch.where(image < 128, raised, image)


_APPLY = {
    "Identity": lambda image, m: image,
    "AutoContrast": lambda image, m: F.autocontrast(image),
    "Equalize": lambda image, m: F.equalize(image),
    "Invert": lambda image, m: F.invert(image),
    "Rotate": lambda image, m: F.rotate(image, m, interpolation=InterpolationMode.NEAREST, fill=0),
    "Posterize": lambda image, m: F.posterize(image, int(m)),
    "Solarize": _solarize,
    "SolarizeAdd": _solarize_add,
    "Color": lambda image, m: F.adjust_saturation(image, 1.0 + m),
    "Contrast": lambda image, m: F.adjust_contrast(image, 1.0 + m),
    "Brightness": lambda image, m: F.adjust_brightness(image, 1.0 + m),
    "Sharpness": lambda image, m: F.adjust_sharpness(image, 1.0 + m),
    "ShearX": lambda image, m: _affine(
        image, shear=[math.degrees(math.atan(m)), 0.0], center=[0, 0]
    ),
    "ShearY": lambda image, m: _affine(
        image, shear=[0.0, math.degrees(math.atan(m))], center=[0, 0]
    ),
    "TranslateX": lambda image, m: _affine(image, translate=[int(round(m * image.shape[-1])), 0]),
    "TranslateY": lambda image, m: _affine(image, translate=[0, int(round(m * image.shape[-2]))]),
}


def apply_ops(
    image: torch.Tensor, op: Sequence[int], magnitude: Sequence[float], ops: tuple[str, ...]
) -> torch.Tensor:
    """One sample's recorded ops applied in order to its uint8 (3, H, W) image (after crop, resize
    and flip).

    Translations are fractions of the image's own side, so the teacher and the student apply the
    same record at their own sizes; everything else is independent of the size.
    """
    if image.dtype != torch.uint8:
        raise ValueError(f"apply_ops: the ops act on the 8-bit image, got {image.dtype}")
    for index, argument in zip(op, magnitude):
        image = _APPLY[ops[int(index)]](image, float(argument))
    return image


def erase(images: torch.Tensor, boxes: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """The normalised images (B, 3, S, S) with each recorded box filled with its values, as a new
    tensor.

    Box r of a row covers pixels floor(f * S + 0.5) of its fractions (as skd.plan.mixing.box_pixels;
    an all-zero box covers none) and later boxes overwrite earlier ones, as timm erases them in
    turn. One masked fill per box slot over the whole batch, on the images' device.
    """
    size = images.shape[-1]
    edges = torch.floor(boxes.to(images.device, torch.float64) * size + 0.5).long()
    values = values.to(images.device, images.dtype)
    pixels = torch.arange(size, device=images.device)
    out = images.clone()
    for r in range(boxes.shape[1]):
        y0, x0, y1, x1 = edges[:, r].unbind(1)
        inside_y = (pixels >= y0[:, None]) & (pixels < y1[:, None])
        inside_x = (pixels >= x0[:, None]) & (pixels < x1[:, None])
        region = (inside_y[:, :, None] & inside_x[:, None, :])[:, None]
        out = torch.where(region, values[:, r, :, None, None], out)
    return out
