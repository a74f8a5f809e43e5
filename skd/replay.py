"""The recorded views a run replays: one source for the build, training and verify.

A source is the samples, the plan of every view and the validation windows, either as a cache
recorded them or as an online run plans them (exactly as `skd-cache build` would). `loader` turns
any positions of any view into batches through the input pipeline, so the teacher and the student
see the same windows and flips, each at its own input recipe (size, resampling, normalisation);
`cached_logits` streams the matching stored rows.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from . import pipelines
from .errors import SkdError, SkdWarning
from .index import index_dataset, quick_fingerprints
from .mixing import MixParams, mix_batch, plan_mixing
from .pipelines import Recipe
from .plan import CropParams, ViewPlan, center_boxes, plan_view
from .reader import RowReader
from .recipe import from_meta
from .store import Store

AUTO_MULTIPLIER_ROWS = 65536  # rows of view 0 whose mean logit std is `--multiplier auto`


class ReplayError(SkdError):
    """The views cannot be replayed as asked (unfinished cache, other images): one line saying what to do."""


@dataclass(frozen=True)
class Samples:
    """One split's samples in sample-id order: paths relative to the dataset root, labels."""

    paths: list[str]
    labels: np.ndarray


@dataclass
class ReplaySource:
    """The recorded views of a cache or of an online plan, and the validation split."""

    root: Path
    train: Samples
    val: Samples | None
    val_boxes: np.ndarray | None
    num_views: int
    num_classes: int
    recipe: Recipe  # how this stage's model sees each window
    plan: Callable[[int], tuple[np.ndarray, np.ndarray, np.ndarray]]  # view -> (order, box, flip)
    fingerprint: str
    loader_kind: str  # dali or torchvision
    mix: Callable[[int], tuple[np.ndarray, np.ndarray]] | None = None  # view -> (mix_lambda, mix_box); None: unmixed

    def items(self, view: int | None, positions: np.ndarray) -> dict:
        """files, boxes, flips, labels and positions of the given positions of `view` (None: val)."""
        if view is None:
            ids, split = positions, self.val
            boxes, flips = self.val_boxes[positions], np.zeros(len(positions), np.uint8)
        else:
            order, box, flip = self.plan(view)
            ids, boxes, flips, split = order[positions], box[positions], flip[positions], self.train
        return dict(
            files=[str(self.root / split.paths[i]) for i in ids],
            boxes=boxes,
            flips=flips,
            labels=split.labels[ids],
            positions=positions,
        )

    def loader(
        self,
        view: int | None,
        positions: np.ndarray,
        *,
        batch_size: int,
        workers: int,
        device: torch.device,
        recipe: Recipe | None = None,
    ):
        """Batches of the views at `positions` of `view` (None: val), in position order, at `recipe`
        (default: the source's own)."""
        loader = pipelines.make_loader(
            self.loader_kind,
            **self.items(view, positions),
            **(recipe or self.recipe).options(),
            batch_size=batch_size,
            workers=workers,
            device=device,
        )
        if view is None or self.mix is None:
            return loader
        lam, box = self.mix(view)
        return MixedLoader(loader, lam[positions], box[positions], batch_size)


class MixedLoader:
    """A loader's batches with each pair of rows mixed as the plan recorded (on the batches' device).

    Rows pair up by their index in the loader (2i with 2i + 1), so the positions must come in whole pairs
    and `batch_size` must be even: the caller's positions are consecutive from an even one, or pairs.
    """

    def __init__(self, loader, lam: np.ndarray, box: np.ndarray, batch_size: int):
        if batch_size % 2:
            raise ValueError(f"mixing needs an even batch size (pairs share a batch), got {batch_size}")
        self.loader, self.batch_size = loader, batch_size
        self.lam, self.box = torch.from_numpy(np.ascontiguousarray(lam)), torch.from_numpy(np.ascontiguousarray(box))

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for index, batch in enumerate(self.loader):
            first = index * self.batch_size
            rows = slice(first, first + len(batch.positions))
            images = mix_batch(batch.images, self.lam[rows], self.box[rows], first)
            yield replace(batch, images=images, mix_lambda=self.lam[rows].to(images.device))


def planned_view(
    seed: int, view: int, sizes: np.ndarray, crop: CropParams, mix: MixParams, image_size: int
) -> ViewPlan:
    """One view as `skd-cache build` plans it: order, windows, flips and, when mixing is on, its mixing."""
    p = plan_view(seed, view, sizes, crop)
    return replace(p, mix=plan_mixing(seed, view, len(sizes), mix, image_size) if mix.enabled else None)


def teacher_recipe(store: Store) -> Recipe:
    """The input recipe the cache's teacher saw its windows at."""
    return from_meta(store.meta["teacher"]["input"])


def student_recipe(size: int, mean=pipelines.IMAGENET_MEAN, std=pipelines.IMAGENET_STD) -> Recipe:
    """The student's input: the same windows, bilinear, at its own size and normalisation."""
    return Recipe(size=size, interpolation="bilinear", mean=tuple(mean), std=tuple(std))


def cached_source(
    store: Store, *, recipe: Recipe, root: Path | None = None, loader: str | None = None, val: bool = True
) -> ReplaySource:
    """The views a cache recorded, seen at `recipe`; `root` overrides the recorded dataset root (a moved
    dataset), `loader` the recorded loader (the other one decodes the same windows to within resampling noise)."""
    meta = store.meta
    samples = store.split("samples")
    use_val = val and store.has_val
    val_split = store.split("val") if use_val else None
    return ReplaySource(
        root=Path(root or meta["dataset"]["root"]),
        train=Samples(samples.paths, samples.labels),
        val=Samples(val_split.paths, val_split.labels) if use_val else None,
        val_boxes=store.val_boxes() if use_val else None,
        num_views=store.num_views,
        num_classes=store.num_classes,
        recipe=recipe,
        plan=store.view_plan,
        fingerprint=meta["dataset"]["fingerprint"],
        loader_kind=loader or meta["plan"]["loader"],
        mix=store.view_mix if MixParams.from_dict(meta["plan"]["mix"]).enabled else None,
    )


def check_replayable(store: Store, root: Path, val: bool) -> None:
    """ReplayError unless the cache is complete and `root` holds the images it was built on (file list and
    sizes). Without `val` the validation split is not checked (a training machine may hold only train/)."""
    meta = store.meta
    if not store.is_complete():
        done, total = int(store.complete().sum()), store.complete().size
        raise ReplayError(
            f"cache {store.path} is unfinished ({done} of {total} shards): "
            "rerun its `skd-cache build` command to complete it"
        )
    if not (root / "train").is_dir():
        raise ReplayError(f"dataset {root} has no train/ folder: pass --data ROOT where the cache's images live")
    use_val = val and store.has_val
    if use_val and not (root / "val").is_dir():
        raise ReplayError(
            f"dataset {root} has no val/ folder, and cache {store.path} has validation logits: "
            "pass --no-val, or --data ROOT where its val/ lives"
        )
    train_fp, val_fp = quick_fingerprints(root, use_val, meta["dataset"].get("skipped", []))
    if train_fp != meta["dataset"]["fingerprint"]:
        raise ReplayError(
            f"the images under {root}/train differ from those cache {store.path} was built on "
            "(file list or sizes): pass the right --data or rebuild the cache"
        )
    if use_val and val_fp != meta["dataset"]["val_fingerprint"]:
        raise ReplayError(f"the images under {root}/val differ from those cache {store.path} was built on")


def online_source(
    data: Path,
    *,
    views: int,
    recipe: Recipe,
    seed: int,
    crop: CropParams,
    mix: MixParams,
    plan_size: int,
    loader: str,
    val: bool,
    workers: int,
    num_classes: int,
) -> ReplaySource:
    """Views planned exactly as `skd-cache build` plans them (`plan_size`: its --image-size, which sets the
    CutMix area correction), for a run with the teacher in the loop."""
    index = index_dataset(data, with_val=val, workers=max(4, workers))
    sizes = index.train.sizes

    def plan(view: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        p = plan_view(seed, view, sizes, crop)
        return p.order, p.box, p.flip

    def mixing(view: int) -> tuple[np.ndarray, np.ndarray]:
        return plan_mixing(seed, view, len(sizes), mix, plan_size)

    v = index.val
    return ReplaySource(
        root=index.root,
        train=Samples(index.train.paths, index.train.labels),
        val=Samples(v.paths, v.labels) if v else None,
        val_boxes=center_boxes(v.sizes) if v else None,
        num_views=views,
        num_classes=num_classes,
        recipe=recipe,
        plan=plan,
        fingerprint=index.train.fingerprint,
        loader_kind=loader,
        mix=mixing if mix.enabled else None,
    )


def warn_other_loader(loader: str | None, store: Store) -> None:
    """A warning when a replay decodes with another loader than the teacher did: resampling noise."""
    recorded = store.meta["plan"]["loader"]
    if loader is not None and loader != recorded:
        warnings.warn(
            f"--loader {loader}: cache {store.path} was built with {recorded}; the two resample the same "
            "windows about 0.15-0.2 grey levels apart on average (benchmarks/resampling.py), so this "
            "replay sees the teacher's views up to that noise",
            SkdWarning,
            stacklevel=2,
        )


def check_ensemble(stores: list[Store]) -> None:
    """Caches read together must share their plan (rows line up), classes and training size."""
    first = stores[0]
    for other in stores[1:]:
        for what, get in (
            ("plan (plan id)", lambda s: s.meta["plan"].get("id")),
            ("classes", lambda s: s.num_classes),
            ("training image size", lambda s: s.meta["plan"]["image_size"]),
        ):
            if get(first) != get(other):
                raise ReplayError(
                    f"caches {first.path} and {other.path} differ in {what}: {get(first)} vs "
                    f"{get(other)}; caches read together must be built on one plan (skd-cache build "
                    "--plan-from)"
                )


def cached_logits(
    store: Store, view: int | None, start: int, stop: int, batch_size: int, device: torch.device
) -> Iterator[tuple[int, torch.Tensor]]:
    """(first position, float32 logits on `device`) per batch of rows [start, stop), read ahead and decoded
    on the device (a uint8 copy crosses the bus, not float32)."""
    pin = device.type == "cuda"
    for first, enc in RowReader(store, view, start, stop).batches(batch_size):
        parts = [None if a is None else torch.from_numpy(np.ascontiguousarray(a)) for a in enc]
        if pin:
            parts = [None if t is None else t.pin_memory() for t in parts]
        parts = [None if t is None else t.to(device, non_blocking=True) for t in parts]
        yield first, store.codec.decode_torch(*parts)


def mean_row_std(row_std: np.ndarray) -> float:
    """`--multiplier auto` from the per-row logit standard deviations of view 0 (SKD's advice for m)."""
    return float(np.asarray(row_std[:AUTO_MULTIPLIER_ROWS], np.float64).mean())


def auto_multiplier(stores: list[Store], weights: list[float] | None = None) -> float:
    """`--multiplier auto`: the mean per-row std of the first rows of view 0 of a cache, or of the weighted
    mean of an ensemble's logits."""
    rows = min(stores[0].num_samples, AUTO_MULTIPLIER_ROWS)
    weights = weights or [1.0 / len(stores)] * len(stores)
    logits = sum(w * torch.from_numpy(s.read_logits(0, 0, rows)) for w, s in zip(weights, stores))
    return mean_row_std(logits.std(dim=1).numpy())
