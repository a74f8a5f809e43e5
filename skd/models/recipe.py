"""A teacher's input recipe: the size, resampling and normalisation its weights were trained with.

Teachers are published with their own recipe (timm's ViTs: 0.5 mean/std, bicubic, often 384 px;
FKD's teacher at 475 px), and a teacher fed another normalisation gives silently worse logits. Each
field is resolved from the first source that states it: an explicit option, the model's timm-style
`pretrained_cfg`, the torchvision weights' own transforms, then ImageNet's statistics, bilinear, at
the student's size. The resolved recipe and where each field came from are recorded in the cache.
"""

from __future__ import annotations

import math

from skd.errors import OptionError
from skd.pipelines import IMAGENET_MEAN, IMAGENET_STD, INTERPOLATIONS, Recipe

FIELDS = ("size", "interpolation", "mean", "std")
MIN_SIZE = 8


def check_recipe(
    size=None, interpolation=None, mean=None, std=None, *, where: str = "--teacher"
) -> None:
    """OptionError for a field that no loader can use; None fields are not checked."""
    if size is not None and (not isinstance(size, int) or size < MIN_SIZE):
        raise OptionError(f"{where}-size {size}: a whole number of pixels, at least {MIN_SIZE}")
    if interpolation is not None and interpolation not in INTERPOLATIONS:
        raise OptionError(
            f"{where}-interpolation {interpolation}: choose {' or '.join(INTERPOLATIONS)}"
        )
    for name, values in (("mean", mean), ("std", std)):
        if values is None:
            continue
        if len(values) != 3 or not all(math.isfinite(v) for v in values):
            raise OptionError(
                f"{where}-{name} {','.join(map(str, values))}: three finite numbers R,G,B"
            )
        if name == "std" and min(values) <= 0:
            raise OptionError(
                f"{where}-std {','.join(map(str, values))}: every value must be above 0"
            )


def from_pretrained_cfg(cfg: dict | None) -> dict:
    """The recipe fields a timm-style `pretrained_cfg` states (input_size, interpolation, mean,
    std)."""
    if not cfg:
        return {}
    out = {}
    size = cfg.get("input_size")
    if size is not None:
        height, width = int(size[-2]), int(size[-1])
        if height != width:
            raise OptionError(
                f"the teacher's pretrained_cfg input_size is {height}x{width}: square inputs only, pass --teacher-size"
            )
        out["size"] = height
    if cfg.get("interpolation") in INTERPOLATIONS:
        out["interpolation"] = cfg["interpolation"]
    for name in ("mean", "std"):
        if cfg.get(name) is not None:
            out[name] = tuple(float(v) for v in cfg[name])
    return out


def resolve(
    options: dict, pretrained_cfg: dict | None, published: dict | None, default_size: int
) -> tuple[Recipe, dict[str, str]]:
    """The recipe, field by field from the first source that states it, and {field: source}."""
    check_recipe(**options)
    check_recipe(**from_pretrained_cfg(pretrained_cfg), where="pretrained_cfg")
    sources = [
        ("option", {k: v for k, v in options.items() if v is not None}),
        ("pretrained_cfg", from_pretrained_cfg(pretrained_cfg)),
        ("torchvision weights", published or {}),
        (
            "default",
            {
                "size": default_size,
                "interpolation": "bilinear",
                "mean": IMAGENET_MEAN,
                "std": IMAGENET_STD,
            },
        ),
    ]
    values, origin = {}, {}
    for field in FIELDS:
        origin[field], values[field] = next(
            (name, found[field]) for name, found in sources if field in found
        )
    values["mean"], values["std"] = tuple(values["mean"]), tuple(values["std"])
    return Recipe(**values), origin


def to_meta(recipe: Recipe, origin: dict[str, str]) -> dict:
    """The recipe as the cache records it (JSON)."""
    return {
        "size": recipe.size,
        "interpolation": recipe.interpolation,
        "mean": list(recipe.mean),
        "std": list(recipe.std),
        "source": dict(origin),
    }


def from_meta(recorded: dict) -> Recipe:
    """The recipe a cache recorded."""
    return Recipe(
        size=int(recorded["size"]),
        interpolation=recorded["interpolation"],
        mean=tuple(recorded["mean"]),
        std=tuple(recorded["std"]),
    )
