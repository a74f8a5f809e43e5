"""The recorded views a run replays: one source for the build, training and verify.

A source is the samples, the plan of every view and the validation windows, either as a cache
recorded them or as an online run plans them (exactly as `skd-cache build` would). `loader` turns
any positions of any view into batches through the input pipeline, so the teacher and the student
see the same windows and flips, each at its own input recipe (size, resampling, normalisation).
`skd.replay.checks` says whether a cache can be replayed as asked; `cached_logits` reads its stored
logits.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from skd import pipelines
from skd.data.index import Split, index_dataset
from skd.models.recipe import from_meta
from skd.pipelines import Recipe
from skd.plan.augment import AugmentParams, plan_augment
from skd.plan.crops import CropParams, ViewPlan, center_boxes, plan_view
from skd.plan.mixing import MixParams, plan_mixing
from skd.replay.recorded_ops import RecordedBatchOps, RecordedOps
from skd.store.cache_store import VAL, Store, View


@dataclass
class ReplaySource:
    """The recorded views of a cache or of an online plan, and the validation split."""

    root: Path
    train: Split
    val: Split | None
    val_boxes: np.ndarray | None
    num_views: int
    num_classes: int
    recipe: Recipe  # how this stage's model sees each window
    plan: Callable[[int], tuple[np.ndarray, np.ndarray, np.ndarray]]  # view -> (order, box, flip)
    fingerprint: str
    loader_kind: str  # dali or torchvision
    # view -> (mix_lambda, mix_box); None: unmixed
    mix: Callable[[int], tuple[np.ndarray, np.ndarray]] | None = None
    # view -> recorded ops and erasing by position
    augment: Callable[[int], dict[str, np.ndarray] | None] | None = None
    augment_ops: tuple[str, ...] = ()  # the op names aug_op indexes (plan.augment's ops)
    # absolute paths by part (`files`)
    _files: dict = field(default_factory=dict, repr=False, compare=False)

    def files(self, part: str = "train") -> np.ndarray:
        """The absolute image paths of the train (or VAL) samples by sample id, made once per
        source: joining 1.28M paths takes seconds, indexing them per epoch a tenth of one."""
        if part not in self._files:
            split = self.val if part == VAL else self.train
            self._files[part] = np.array(
                [f"{self.root}/{path}" for path in split.paths], dtype=object
            )
        return self._files[part]

    def with_loader(self, loader_kind: str) -> ReplaySource:
        """The same views decoded by another loader (dali or torchvision)."""
        return replace(self, loader_kind=loader_kind)

    def items(self, view: View, positions: np.ndarray) -> dict:
        """files, boxes, flips, labels and positions of the given positions of `view` (a view, or
        VAL)."""
        if view == VAL:
            ids, split, files = positions, self.val, self.files(VAL)
            boxes, flips = self.val_boxes[positions], np.zeros(len(positions), np.uint8)
        else:
            order, box, flip = self.plan(view)
            ids, boxes, flips, split, files = (
                order[positions],
                box[positions],
                flip[positions],
                self.train,
                self.files(),
            )
        return dict(
            files=files[ids].tolist(),
            boxes=boxes,
            flips=flips,
            labels=split.labels[ids],
            positions=positions,
        )

    def loader(
        self,
        view: View,
        positions: np.ndarray,
        *,
        batch_size: int,
        workers: int,
        device: torch.device,
        recipe: Recipe | None = None,
    ):
        """Batches of the windows at `positions` of `view` (a view, or VAL), in position order, at
        `recipe` (default: the source's own)."""
        recorded = self.augment(view) if self.augment is not None and view != VAL else None
        pixel_ops = None
        if recorded is not None and "aug_op" in recorded:
            op, magnitude = recorded["aug_op"][positions], recorded["aug_magnitude"][positions]
            pixel_ops = RecordedOps(op, magnitude, self.augment_ops)
        loader = pipelines.make_loader(
            self.loader_kind,
            **self.items(view, positions),
            **(recipe or self.recipe).options(),
            batch_size=batch_size,
            workers=workers,
            device=device,
            pixel_ops=pixel_ops,
        )
        erasing = None
        if recorded is not None and "erase_box" in recorded:
            erasing = recorded["erase_box"][positions], recorded["erase_value"][positions]
        mixing = None
        if view != VAL and self.mix is not None:
            lam, box = self.mix(view)
            mixing = lam[positions], box[positions]
        if erasing is None and mixing is None:
            return loader
        return RecordedBatchOps(loader, batch_size, erase=erasing, mix=mixing)


def planned_view(
    seed: int,
    view: int,
    sizes: np.ndarray,
    crop: CropParams,
    mix: MixParams,
    image_size: int,
    augment: AugmentParams = AugmentParams(),
) -> ViewPlan:
    """One view as `skd-cache build` plans it: order, windows, flips and, when on, its mixing and
    its recorded RandAugment ops and erasing."""
    p = plan_view(seed, view, sizes, crop)
    return replace(
        p,
        mix=plan_mixing(seed, view, len(sizes), mix, image_size) if mix.enabled else None,
        augment=augment_by_position(seed, view, p.order, augment),
    )


def augment_by_position(
    seed: int, view: int, order: np.ndarray, params: AugmentParams
) -> dict | None:
    """The arrays of a view's recorded augmentation by position (drawn per sample id, so a sample's
    ops do not depend on where the view puts it): those `skd.store.schema.augment_arrays` names for
    these options."""
    if not params.enabled:
        return None
    drawn = plan_augment(seed, view, order, params)
    arrays = {}
    if params.aa:
        arrays.update(aug_op=drawn.op, aug_magnitude=drawn.magnitude)
    if params.reprob > 0:
        arrays.update(erase_box=drawn.erase_box, erase_value=drawn.erase_value)
    return arrays


def planned_source(
    root: Path,
    train: Split,
    plan: ViewPlan,
    *,
    recipe: Recipe,
    loader: str,
    num_classes: int,
    augment_ops: tuple[str, ...],
) -> ReplaySource:
    """A view planned but not yet stored, as the one view of a source: the images the build's teacher
    will see for it, mixing and recorded augmentation included (the build measures its codec on
    them before the cache exists)."""
    return ReplaySource(
        root=root,
        train=train,
        val=None,
        val_boxes=None,
        num_views=1,
        num_classes=num_classes,
        recipe=recipe,
        plan=lambda view: (plan.order, plan.box, plan.flip),
        fingerprint=train.fingerprint,
        loader_kind=loader,
        mix=None if plan.mix is None else lambda view: plan.mix,
        augment=None if plan.augment is None else lambda view: plan.augment,
        augment_ops=augment_ops,
    )


def teacher_recipe(store: Store) -> Recipe:
    """The input recipe the cache's teacher saw its windows at."""
    return from_meta(store.meta["teacher"]["input"])


def student_recipe(size: int, mean=pipelines.IMAGENET_MEAN, std=pipelines.IMAGENET_STD) -> Recipe:
    """The student's input: the same windows, bilinear, at its own size and normalisation."""
    return Recipe(size=size, interpolation="bilinear", mean=tuple(mean), std=tuple(std))


def cached_source(
    store: Store,
    *,
    recipe: Recipe,
    root: Path | None = None,
    loader: str | None = None,
    val: bool = True,
) -> ReplaySource:
    """The views a cache recorded, seen at `recipe`; `root` overrides the recorded dataset root (a
    moved dataset), `loader` the recorded loader (the other one decodes the same windows to within
    resampling noise)."""
    meta = store.meta
    use_val = val and store.has_val
    return ReplaySource(
        root=Path(root or meta["dataset"]["root"]),
        train=store.split("samples"),
        val=store.split("val") if use_val else None,
        val_boxes=store.val_boxes() if use_val else None,
        num_views=store.num_views,
        num_classes=store.num_classes,
        recipe=recipe,
        plan=store.view_plan,
        fingerprint=meta["dataset"]["fingerprint"],
        loader_kind=loader or meta["plan"]["loader"],
        mix=store.view_mix if MixParams.from_dict(meta["plan"]["mix"]).enabled else None,
        augment=store.view_augment if store.augment_params.enabled else None,
        augment_ops=store.augment_params.ops,
    )


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
    augment: AugmentParams = AugmentParams(),
) -> ReplaySource:
    """Views planned exactly as `skd-cache build` plans them (`plan_size`: its --image-size, which
    sets the CutMix area correction), for a run with the teacher in the loop."""
    index = index_dataset(data, with_val=val, workers=max(4, workers))
    sizes = index.train.sizes

    # an epoch asks for its view's plan for the windows and for the augmentation
    @functools.lru_cache(maxsize=1)
    def plan(view: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        p = plan_view(seed, view, sizes, crop)
        return p.order, p.box, p.flip

    def mixing(view: int) -> tuple[np.ndarray, np.ndarray]:
        return plan_mixing(seed, view, len(sizes), mix, plan_size)

    def augmenting(view: int) -> dict | None:
        return augment_by_position(seed, view, plan(view)[0], augment)

    return ReplaySource(
        root=index.root,
        train=index.train,
        val=index.val,
        val_boxes=None if index.val is None else center_boxes(index.val.sizes),
        num_views=views,
        num_classes=num_classes,
        recipe=recipe,
        plan=plan,
        fingerprint=index.train.fingerprint,
        loader_kind=loader,
        mix=mixing if mix.enabled else None,
        augment=augmenting if augment.enabled else None,
        augment_ops=augment.ops,
    )
