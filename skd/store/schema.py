"""What a cache must look like before any of it is trusted: its attributes and arrays.

A cache may come from elsewhere (a shared folder, a download, an object store), so it is untrusted
input. Before anything is allocated or read, `check_meta` checks the `skd` attributes against a
schema (types, ranges, required keys, known codec) and `check_arrays` every array's shape, dtype and
chunking against the attributes; every file was checked before zarr opened it
(`skd.storage.files`). `samples_sha256` ties the sample arrays to the attributes, so swapped or
edited sample paths and labels are found.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from skd.errors import CacheError
from skd.pipelines import INTERPOLATIONS
from skd.plan.augment import AugmentParams
from skd.storage.files import rebuild
from skd.store.codecs import get_codec

FORMAT_VERSION = 3
MAX_SAMPLES = 10**8  # ImageNet-21k has 1.4e7
# far beyond use (FKD records 500 crops an image, function matching runs thousands of epochs)
MAX_VIEWS = 10**5
MAX_CLASSES = 10**6
MAX_SIDE = 8192

Count = Annotated[int, Field(ge=0, strict=True)]
Hex64 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class _Model(BaseModel):
    model_config = ConfigDict(extra="allow")


class Crop(_Model):
    scale: tuple[float, float]
    ratio: tuple[float, float]
    flip_prob: Annotated[float, Field(ge=0, le=1)]


class Mix(_Model):
    mixup_alpha: Annotated[float, Field(ge=0, allow_inf_nan=False)]
    cutmix_alpha: Annotated[float, Field(ge=0, allow_inf_nan=False)]
    prob: Annotated[float, Field(ge=0, le=1)]
    switch_prob: Annotated[float, Field(ge=0, le=1)]


class InputRecipe(_Model):
    size: Annotated[int, Field(ge=8, le=MAX_SIDE, strict=True)]
    interpolation: Literal[INTERPOLATIONS]  # type: ignore[valid-type]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    source: dict[str, str]

    @field_validator("mean", "std")
    @classmethod
    def finite(cls, values):
        if not all(math.isfinite(v) for v in values):
            raise ValueError("must be finite")
        return values

    @field_validator("std")
    @classmethod
    def positive(cls, values):
        if min(values) <= 0:
            raise ValueError("must be above 0")
        return values


class Teacher(_Model):
    name: str
    weights: str
    weights_sha256: Hex64 | None
    amp: Literal["bf16", "fp16", "none"]
    num_classes: Annotated[int, Field(ge=1, le=MAX_CLASSES, strict=True)]
    input: InputRecipe
    pretrained_cfg: dict | None = None


class Dataset(_Model):
    root: str
    num_samples: Annotated[int, Field(ge=1, le=MAX_SAMPLES, strict=True)]
    num_val: Annotated[int, Field(ge=0, le=MAX_SAMPLES, strict=True)]
    classes: Annotated[list[str], Field(min_length=1, max_length=MAX_CLASSES)]
    fingerprint: Hex64
    val_fingerprint: Hex64 | None
    samples_sha256: Hex64
    val_sha256: Hex64 | None
    skipped: list[tuple[str, str]] = []


class Plan(_Model):
    seed: Count
    image_size: Annotated[int, Field(ge=8, le=MAX_SIDE, strict=True)]
    crop: Crop
    val_crop_fraction: Annotated[float, Field(gt=0, le=1)]
    loader: Literal["dali", "torchvision"]
    mix: Mix


class Meta(_Model):
    """The `skd` group attribute of a cache (cache/README.md)."""

    format: Literal[FORMAT_VERSION]
    teacher: Teacher
    dataset: Dataset
    plan: Plan
    codec: str  # a name get_codec knows: fp32, fp16, int8, compact, topk:K
    views: Annotated[int, Field(ge=1, le=MAX_VIEWS, strict=True)]
    shard_rows: Annotated[int, Field(ge=1, le=2**24, strict=True)]
    chunk_rows: Annotated[int, Field(ge=1, le=2**24, strict=True)]
    software: dict[str, str] = {}
    complete: bool = False
    # skd.store.creation.grow_store
    growing: Annotated[int, Field(ge=1, le=MAX_VIEWS, strict=True)] | None = None

    @field_validator("codec")
    @classmethod
    def known_codec(cls, name: str) -> str:
        if get_codec(name).name != name:  # ValueError naming the choices for an unknown one
            raise ValueError(f"codec {name!r} is written {get_codec(name).name!r}")
        return name

    @model_validator(mode="after")
    def chunks_divide_shards(self):
        if self.shard_rows % self.chunk_rows:
            raise ValueError(
                f"shard_rows {self.shard_rows} is not a multiple of chunk_rows {self.chunk_rows}"
            )
        return self

    @model_validator(mode="after")
    def outputs_cover_classes(self):
        """Class i of the dataset is the teacher's output i (skd-cache build refuses fewer
        outputs)."""
        if len(self.dataset.classes) > self.teacher.num_classes:
            raise ValueError(
                f"dataset.classes has {len(self.dataset.classes)} classes, more than the teacher's "
                f"num_classes {self.teacher.num_classes}"
            )
        return self


def check_meta(path: Path, raw) -> dict:
    """The `skd` attribute checked against the schema; CacheError naming the first wrong field."""
    if not isinstance(raw, dict):
        raise CacheError(
            rebuild(f"cache {path}: the 'skd' attribute is a {type(raw).__name__}, not a mapping")
        )
    if raw.get("format") != FORMAT_VERSION:
        raise CacheError(
            f"{path} has cache format {raw.get('format')!r}, this skd reads format {FORMAT_VERSION}: "
            "rebuild the cache with this skd (`skd-cache build ... --overwrite`), or use the skd "
            "that wrote it"
        )
    try:
        Meta.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        raise CacheError(
            rebuild(
                f"cache {path}: attribute skd.{field or '(top)'} is invalid "
                f"({first['msg']}, got {_short(first.get('input'))})"
            )
        ) from None
    return raw


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def recorded_augment(plan: dict) -> AugmentParams:
    """A plan's recorded RandAugment and erasing options; off for a plan that records none."""
    return AugmentParams.from_dict(plan["augment"]) if plan.get("augment") else AugmentParams()


def augment_arrays(plan: dict) -> tuple[tuple[str, str, tuple], ...]:
    """(name, dtype, shape of a row) of the plan arrays a plan's recorded augmentation adds
    (skd.plan.augment): the RandAugment ops and their arguments when `aa` is set, the erased boxes
    and fill values when `reprob` is."""
    params = recorded_augment(plan)
    arrays = ()
    if params.aa:
        arrays += (
            ("aug_op", "uint8", (params.layers,)),
            ("aug_magnitude", "float32", (params.layers,)),
        )
    if params.reprob > 0:
        arrays += (
            ("erase_box", "float32", (params.recount, 4)),
            ("erase_value", "float32", (params.recount, 3)),
        )
    return arrays


def expected_arrays(meta: dict, has_val: bool) -> dict[str, tuple[tuple, str, tuple | None]]:
    """{name: (shape, dtype, shard shape or None)} of every array a cache with these attributes
    holds; dtype "str" for the path arrays."""
    n, k, c = meta["dataset"]["num_samples"], meta["views"], meta["teacher"]["num_classes"]
    rows, specs = meta["shard_rows"], get_codec(meta["codec"]).array_specs(c)
    arrays = {
        "samples/path": ((n,), "str", None),
        "samples/label": ((n,), "int32", None),
        "samples/size": ((n, 2), "int32", None),
        "views/order": ((k, n), "int32", None),
        "views/box": ((k, n, 4), "int32", None),
        "views/flip": ((k, n), "uint8", None),
        "views/mix_lambda": ((k, n), "float32", None),
        "views/mix_box": ((k, n, 4), "float32", None),
        "views/complete": ((k, -(-n // rows)), "uint8", None),
        **({"samples/tail": ((n,), "uint64", None)} if meta["dataset"].get("tails") else {}),
        **{
            f"views/{name}": ((k, n, *row), dtype, None)
            for name, dtype, row in augment_arrays(meta["plan"])
        },
    }
    arrays.update(
        {
            f"views/{name}": ((k, n, *row), dtype, (1, rows, *row))
            for name, (row, dtype) in specs.items()
        }
    )
    if has_val:
        v = meta["dataset"]["num_val"]
        arrays.update(
            {
                "val/path": ((v,), "str", None),
                "val/label": ((v,), "int32", None),
                "val/size": ((v, 2), "int32", None),
                "val/box": ((v, 4), "int32", None),
                **({"val/tail": ((v,), "uint64", None)} if meta["dataset"].get("tails") else {}),
                "val/complete": ((-(-v // rows),), "uint8", None),
            }
        )
        arrays.update(
            {
                f"val/{name}": ((v, *row), dtype, (rows, *row))
                for name, (row, dtype) in specs.items()
            }
        )
    return arrays


def check_arrays(path: Path, group, meta: dict) -> None:
    """Every array the attributes promise, with the shape, dtype and chunking they imply, and labels
    inside the classes: CacheError naming the first that is missing or differs (a shape or chunk
    edited to 10^10 rows is refused here, never allocated). The files themselves were checked before
    zarr read them (skd.storage.files.check_files)."""
    has_val = meta["dataset"]["num_val"] > 0
    arrays = expected_arrays(meta, has_val)
    # a growth a kill interrupted (skd.store.creation.grow_store) left arrays of either count along
    # the view axis
    growing = (
        expected_arrays({**meta, "views": meta["growing"]}, has_val) if meta.get("growing") else {}
    )
    for name, (shape, dtype, shards) in arrays.items():
        node = _node(path, group, name)
        if name in growing and tuple(node.shape) == growing[name][0]:
            shape = growing[name][0]
        _check_array(path, node, name, shape, dtype, shards)
    if not has_val and _has_node(path, group, "val"):
        raise CacheError(
            rebuild(f"cache {path}: group val is present but attribute skd.dataset.num_val is 0")
        )
    for split in ("samples", "val") if has_val else ("samples",):
        _check_labels(path, group, f"{split}/label", len(meta["dataset"]["classes"]))


def _node(path: Path, group, name: str):
    try:
        return group[name]
    except KeyError:
        raise CacheError(rebuild(f"cache {path}: array {name} is missing")) from None
    except Exception as exc:  # an unreadable zarr.json: zarr raises many kinds
        raise CacheError(
            rebuild(f"cache {path}: array {name} has unreadable metadata ({type(exc).__name__})")
        ) from None


def _has_node(path: Path, group, name: str) -> bool:
    try:
        return name in group
    except Exception as exc:
        raise CacheError(
            rebuild(f"cache {path}: {name} has unreadable metadata ({type(exc).__name__})")
        ) from None


def _check_array(
    path: Path, array, name: str, shape: tuple, dtype: str, shards: tuple | None
) -> None:
    found = "str" if np.dtype(array.dtype).kind in "TUO" else str(np.dtype(array.dtype))
    problems = []
    if tuple(array.shape) != shape:
        problems.append(f"shape {tuple(array.shape)}, not {shape}")
    if found != dtype:
        problems.append(f"dtype {found}, not {dtype}")
    if shards is not None and tuple(array.shards or ()) != shards:
        problems.append(f"shards {array.shards}, not {shards}")
    if shards is None and not problems and any(c > max(1, s) for c, s in zip(array.chunks, shape)):
        # zarr allocates whole chunks
        problems.append(f"chunks {array.chunks} larger than its shape {shape}")
    if problems:
        raise CacheError(
            rebuild(
                f"cache {path}: array {name} has {' and '.join(problems)} (the attributes say so)"
            )
        )


def _check_labels(path: Path, group, name: str, classes: int) -> None:
    """Labels index skd.dataset.classes: one outside would fail deep in the loss (or a CUDA
    assert)."""
    try:
        labels = np.asarray(group[name][:])
    except Exception as exc:  # a damaged chunk: zarr, zarrs and numcodecs raise many kinds
        raise CacheError(
            rebuild(f"cache {path}: array {name} cannot be read ({type(exc).__name__})")
        ) from None
    bad = np.flatnonzero((labels < 0) | (labels >= classes))
    if bad.size:
        raise CacheError(
            rebuild(
                f"cache {path}: array {name} holds label {int(labels[bad[0]])} at row "
                f"{int(bad[0])} ({bad.size} such rows), outside the {classes} classes of "
                "attribute skd.dataset.classes"
            )
        )


def samples_sha256(paths, labels, sizes, block: int = 1 << 16) -> str:
    """sha256 of one `path<TAB>label<TAB>height<TAB>width` line per sample, in sample-id order; the
    lines of `block` samples joined and hashed at once (1.28M samples: 0.4 s, was 1.7 s a line at a
    time)."""
    h = hashlib.sha256()
    labels, sizes, line = np.asarray(labels), np.asarray(sizes), "{}\t{}\t{}\t{}\n".format
    for a in range(0, len(labels), block):
        b = a + block
        text = "".join(
            map(
                line,
                paths[a:b],
                labels[a:b].tolist(),
                sizes[a:b, 0].tolist(),
                sizes[a:b, 1].tolist(),
            )
        )
        h.update(text.encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def check_relative_path(path: str, cache) -> None:
    """Refuse absolute paths and `..` in a recorded sample path (a cache is data, not trusted).

    Plain string tests rather than PurePosixPath: this runs once per sample, 1.28 M times.
    """
    if (
        path.startswith("/")
        or "\\" in path
        or path == ".."
        or path.startswith("../")
        or path.endswith("/..")
        or "/../" in path
    ):
        raise CacheError(
            f"{cache}: sample path {path!r} is absolute or leaves the dataset root; "
            "refusing to open files from this cache: rebuild or re-download it"
        )


def check_relative_paths(paths: list[str], cache) -> None:
    """`check_relative_path` for every path at once: one search of the paths joined by newlines for
    what any of the tests looks for (a path with a newline of its own may be tested one by one for
    nothing; none is missed); the paths are then tested one by one only where it finds something, to
    name the first offender."""
    text = "\n" + "\n".join(paths) + "\n"
    if any(mark in text for mark in ("\n/", "\\", "\n..\n", "\n../", "/..\n", "/../")):
        for path in paths:
            check_relative_path(path, cache)
