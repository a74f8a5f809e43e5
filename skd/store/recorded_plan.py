"""The recorded plan of an open cache: each view's order, windows, flips, mixing and augmentation,
read from its arrays and checked (a cache is untrusted input), and the validation windows.
`skd.store.cache_store.Store` has these."""

from __future__ import annotations

import numpy as np

from skd.plan.augment import AugmentParams
from skd.plan.crops import ViewPlan
from skd.storage.objectstore import StoreError
from skd.store.schema import augment_arrays, recorded_augment


class RecordedPlan:
    """The plan-reading part of `skd.store.cache_store.Store`: it reads arrays with `_read(name,
    view)` and knows its `meta`, `path`, `num_samples` and samples (`split`)."""

    def view_plan(self, view: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(order, box, flip) of one view as recorded, checked: the order a permutation of the
        samples, every window inside its image, flips 0 or 1 (a cache is untrusted input)."""
        order, box, flip = (self._read(f"views/{name}", view) for name in ("order", "box", "flip"))
        n = self.num_samples
        if (
            order.min(initial=0) < 0
            or order.max(initial=0) >= n
            or np.bincount(order, minlength=n).max() > 1
        ):
            raise self._bad_plan(
                f"views/order of view {view} is not a permutation of the {n} samples"
            )
        sizes = self.split("samples").sizes[order]
        y, x, h, w = box.T.astype(np.int64)
        if (
            (y < 0) | (x < 0) | (h <= 0) | (w <= 0) | (y + h > sizes[:, 0]) | (x + w > sizes[:, 1])
        ).any():
            raise self._bad_plan(f"views/box of view {view} holds windows outside their images")
        if flip.max(initial=0) > 1:
            raise self._bad_plan(f"views/flip of view {view} holds values other than 0 and 1")
        return order, box, flip

    def view_mix(self, view: int) -> tuple[np.ndarray, np.ndarray]:
        """(mix_lambda, mix_box) of one view as recorded: own-image weights (1: unmixed), CutMix
        regions as fractions; both checked to lie in [0, 1]."""
        lam, box = self._read("views/mix_lambda", view), self._read("views/mix_box", view)
        if not (
            np.isfinite(lam).all()
            and np.isfinite(box).all()
            and 0 <= lam.min(initial=1)
            and lam.max(initial=1) <= 1
            and 0 <= box.min(initial=0)
            and box.max(initial=0) <= 1
        ):
            raise self._bad_plan(
                f"views/mix_lambda or views/mix_box of view {view} hold values outside [0, 1]"
            )
        return lam, box

    def recorded_view(self, view: int) -> ViewPlan:
        """The whole recorded plan of one view (order, windows, flips, mixing, augmentation), as
        another cache on this plan records it (`--plan-from`, recode)."""
        return ViewPlan(
            *self.view_plan(view), mix=self.view_mix(view), augment=self.view_augment(view)
        )

    def view_augment(self, view: int) -> dict[str, np.ndarray] | None:
        """The recorded RandAugment ops and erasing of one view by position (skd.plan.augment's
        arrays: aug_op, aug_magnitude, erase_box, erase_value, those the plan has), or None when it
        records none."""
        names = [name for name, _, _ in augment_arrays(self.meta["plan"])]
        if not names:
            return None
        arrays = {name: self._read(f"views/{name}", view) for name in names}
        if "aug_op" in arrays and arrays["aug_op"].max(initial=0) >= len(self.augment_params.ops):
            raise self._bad_plan(
                f"views/aug_op of view {view} names ops beyond plan.augment's {self.augment_params.ops}"
            )
        boxes = arrays.get("erase_box")
        if boxes is not None and not (
            np.isfinite(boxes).all() and 0 <= boxes.min(initial=0) and boxes.max(initial=0) <= 1
        ):
            raise self._bad_plan(f"views/erase_box of view {view} holds values outside [0, 1]")
        return arrays

    @property
    def augment_params(self) -> AugmentParams:
        """The plan's recorded RandAugment and erasing options (off for a plan that records
        none)."""
        return recorded_augment(self.meta["plan"])

    def _bad_plan(self, what: str) -> StoreError:
        return StoreError(f"cache {self.path}: {what}: rebuild or re-download it")

    def val_boxes(self) -> np.ndarray:
        return self._read("val/box")
