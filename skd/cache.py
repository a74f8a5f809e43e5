"""A cache opened for your own training loop: its logits by view and position, and its views as
batches.

    cache = skd.open_cache("cache/r152")               # a folder or s3://bucket/prefix
    for images, labels, logits in cache.loader(epoch, batch_size=256, device="cuda"):
        loss = kd_loss(student(images), logits, labels)

The cache is checked as `skd-train` checks it (format, plan, dataset images); errors are one-line
`SkdError`s.
"""

from __future__ import annotations

import os
from dataclasses import replace
from functools import cached_property
from pathlib import Path
from typing import Annotated, Literal, Sequence

import torch
from pydantic import Field, NonNegativeInt, PositiveFloat, PositiveInt

from skd import pipelines
from skd.config.fields import checked_call
from skd.errors import CacheError, DeviceError, OptionError
from skd.loss import ensemble_target
from skd.plan.mixing import MixParams
from skd.replay.cached_logits import auto_multiplier
from skd.replay.checks import check_ensemble, check_replayable
from skd.replay.sources import ReplaySource, cached_source, student_recipe
from skd.replay.view_loader import ViewLoader, check_shares, rank_range, view_of_epoch
from skd.store.cache_store import Store, open_store


@checked_call
def open_cache(
    path: str | Path | Sequence[str | Path],
    *,
    weights: Sequence[float] | None = None,
    kd: Literal["skd", "hinton", "none"] = "skd",
    data: str | Path | None = None,
    views: PositiveInt | None = None,
    val: bool = True,
) -> Cache:
    """Open a cache (a folder or an object-store URL), or several built on one plan (an ensemble).

    `weights`: an ensemble's teacher weights (default equal); `kd`: how an ensemble's teachers
    combine ("skd": the weighted mean of their layer-normalised logits, else of their logits);
    `data`: the dataset root when it moved since the build; `views`: read only the first `views`
    views; `val`: check the validation images too.
    """
    paths = [path] if isinstance(path, (str, Path)) else list(path)
    if not paths:
        raise OptionError("open_cache: pass at least one cache")
    stores = [open_store(p) for p in paths]
    check_ensemble(stores)
    root = Path(data or stores[0].meta["dataset"]["root"])
    for store in stores:
        check_replayable(store, root, val)
    return Cache(
        stores, ensemble_weights(weights, len(stores)), kd=kd, root=root, views=views, val=val
    )


def ensemble_weights(given: Sequence[float] | None, count: int) -> list[float]:
    """The teachers' weights, normalised to sum 1 (equal by default)."""
    if given is None:
        return [1.0 / count] * count
    if len(given) != count or min(given) < 0 or sum(given) <= 0:
        raise OptionError(
            f"teacher weights {','.join(map(str, given))}: give {count} numbers >= 0, one per cache, not all 0"
        )
    return [w / sum(given) for w in given]


class Cache:
    """An open cache (or ensemble of caches on one plan): sizes, logits and batches of its views."""

    def __init__(
        self,
        stores: list[Store],
        weights: list[float],
        *,
        kd: str,
        root: Path,
        views: int | None,
        val: bool,
    ):
        stored = min(store.num_views for store in stores)
        if views is not None and not 1 <= views <= stored:
            raise OptionError(
                f"views={views}: {stores[0].path} holds views 0 to {stored - 1}: ask for 1 to {stored}"
            )
        self.stores, self.weights, self.kd, self.root, self.val = stores, weights, kd, root, val
        self.num_views = views or stored

    @property
    def num_samples(self) -> int:
        return self.stores[0].num_samples

    @property
    def num_classes(self) -> int:
        return self.stores[0].num_classes

    @property
    def image_size(self) -> int:
        """The training image size the plan was made for (the loader's default size)."""
        return int(self.stores[0].meta["plan"]["image_size"])

    @property
    def mixed(self) -> bool:
        """True when the views are mixed (MixUp/CutMix): labels are then class probabilities (B,
        C)."""
        return MixParams.from_dict(self.stores[0].meta["plan"]["mix"]).enabled

    @property
    def teacher_normalized(self) -> bool:
        """True when the logits are an ensemble's SKD target, already layer-normalised (pass it to
        SphericalKD)."""
        return len(self.stores) > 1 and self.kd == "skd"

    def multiplier(self) -> float:
        """The SKD multiplier the SKD authors advise: the mean logit std of the first rows of view
        0."""
        return auto_multiplier(self.stores, self.weights)

    @cached_property
    def source(self) -> ReplaySource:
        """The recorded views and validation split (read once; the recipe is each loader's)."""
        source = cached_source(
            self.stores[0], recipe=student_recipe(self.image_size), root=self.root, val=self.val
        )
        return replace(source, num_views=self.num_views)

    @checked_call
    def logits(
        self, view: NonNegativeInt, start: NonNegativeInt = 0, stop: NonNegativeInt | None = None
    ) -> torch.Tensor:
        """Decoded float32 logits (stop - start, C) of positions [start, stop) of `view`, in plan
        order (of an ensemble, its combined target)."""
        self._check_view(view)
        stop = self.num_samples if stop is None else stop
        if not 0 <= start <= stop <= self.num_samples:
            raise OptionError(
                f"positions {start}:{stop}: view {view} has positions 0 to {self.num_samples}"
            )
        parts = [torch.from_numpy(store.read_logits(view, start, stop)) for store in self.stores]
        for store, rows in zip(self.stores, parts):
            bad = (~torch.isfinite(rows).all(dim=1)).nonzero()
            if len(bad):
                raise CacheError(
                    f"{store.path}: row {start + int(bad[0])} of view {view} holds non-finite logits (nan or inf): "
                    "the cache is damaged; `skd-cache verify --integrity` lists every bad shard"
                )
        return parts[0] if len(parts) == 1 else ensemble_target(self.kd, parts, self.weights)

    @checked_call
    def loader(
        self,
        epoch: NonNegativeInt,
        *,
        batch_size: PositiveInt = 256,
        image_size: Annotated[int, Field(ge=8)] | None = None,
        mean: tuple[float, float, float] = pipelines.IMAGENET_MEAN,
        std: tuple[PositiveFloat, PositiveFloat, PositiveFloat] = pipelines.IMAGENET_STD,
        device: str | torch.device | None = None,
        rank: NonNegativeInt | None = None,
        world_size: PositiveInt | None = None,
        loader: Literal["dali", "torchvision"] | None = None,
        workers: NonNegativeInt = 8,
        steps: PositiveInt | None = None,
        with_logits: bool = True,
        progress: bool = False,
    ) -> ViewLoader:
        """This process's batches of view `epoch mod num_views`: `(images, labels, logits)` in plan
        order.

        `batch_size` is per process; `image_size` (default: the plan's), `mean` and `std` are the
        student's input; `device` defaults to this process's GPU, else the CPU; `rank` and
        `world_size` default to torchrun's environment, and the ranks' parts of a view are disjoint
        and equal (`rank_range`); `loader`: dali or torchvision (default: the build's); at most
        `steps` batches; `progress`: a tqdm bar.
        """
        rank = int(os.environ.get("RANK", 0)) if rank is None else rank
        world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
        if not 0 <= rank < world_size:
            raise OptionError(
                f"rank {rank} of world size {world_size}: need 0 <= rank < world size"
            )
        check_shares(
            self.num_samples, world_size, batch_size, self.mixed, f"batch_size={batch_size}"
        )
        start, stop = rank_range(self.num_samples, rank, world_size, batch_size, self.mixed)
        source = self.source if loader is None else self.source.with_loader(loader)
        return ViewLoader(
            source,
            view_of_epoch(epoch, self.num_views),
            start,
            stop,
            batch_size=batch_size,
            device=default_device(device),
            workers=workers,
            recipe=student_recipe(image_size or self.image_size, mean, std),
            stores=self.stores if with_logits else (),
            weights=self.weights,
            kd=self.kd,
            steps=steps,
            progress=progress,
        )

    def _check_view(self, view: int) -> None:
        if not 0 <= view < self.num_views:
            raise OptionError(
                f"view {view}: {self.stores[0].path} is read with views 0 to {self.num_views - 1}"
            )


def default_device(device: str | torch.device | None) -> torch.device:
    """`device`, or this process's GPU (LOCAL_RANK under torchrun) when CUDA is available, else the
    CPU."""
    if device is None:
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    try:
        chosen = torch.device(device)
    except RuntimeError:
        raise OptionError(
            f"device={device!r}: not a device torch knows (cpu, cuda, cuda:1)"
        ) from None
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"device={device!r}: this machine has no CUDA device: pass device='cpu'")
    return chosen
