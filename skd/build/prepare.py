"""What a build decides before any logits: its identity, its samples and plan, and the cache it
writes.

`prepare_store` opens the cache at --out to resume it (refusing other settings; a larger --views, or
a --plan-from cache that grew, appends views) or lays out a new one: the dataset indexed (or
--plan-from's samples and plan copied), every view planned, the arrays created.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision
import zarr

from skd import __version__
from skd.config import BuildConfig
from skd.data.index import Split, index_dataset, quick_fingerprints
from skd.errors import CacheError, DatasetError, ModelError, OptionError, SkdWarning
from skd.plan.crops import VAL_CROP_FRACTION, center_boxes
from skd.plan.mixing import MixParams
from skd.replay.sources import planned_view
from skd.storage.location import Location, parse_location
from skd.store.cache_store import Store, cache_state, open_store
from skd.store.codec_table import AUTO
from skd.store.creation import ViewPlans, create_store, grow_store
from skd.store.schema import FORMAT_VERSION, MAX_VIEWS


def check_views(views: int) -> None:
    """OptionError, before any planning, for a view count out of all proportion: each view is planned
    and written in turn (one view's plan in memory at a time), so such a count would run for days
    without a word."""
    if views > MAX_VIEWS:
        raise OptionError(
            f"--views {views:,} is more than {MAX_VIEWS:,}, far beyond any recipe: build fewer views"
        )


# The recorded settings a rerun must repeat to resume; anything else may change between runs.
IDENTITY = {
    "teacher": ("teacher", "name"),
    "weights": ("teacher", "weights_sha256"),
    "amp": ("teacher", "amp"),
    "teacher input": ("teacher", "input"),
    "data": ("dataset", "fingerprint"),
    "val data": ("dataset", "val_fingerprint"),
    "seed": ("plan", "seed"),
    "image-size": ("plan", "image_size"),
    "crop": ("plan", "crop"),
    "mixing": ("plan", "mix"),
    "augmentation": ("plan", "augment"),
    "loader": ("plan", "loader"),
    "codec": ("codec",),
    "views": ("views",),
    "shard-size": ("shard_rows",),
}


def differences(recorded: dict, wanted: dict) -> list[str]:
    """Names of the identity settings in which two cache descriptions differ."""

    def get(d, keys):
        for k in keys:
            d = d.get(k) if isinstance(d, dict) else None
        return d

    return [name for name, keys in IDENTITY.items() if get(recorded, keys) != get(wanted, keys)]


def software_versions() -> dict:
    versions = {
        "skd": __version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "zarr": zarr.__version__,
        "numpy": np.__version__,
    }
    try:
        import nvidia.dali

        versions["dali"] = nvidia.dali.__version__
    except ImportError:
        pass
    return versions


def plan_attributes(cfg: BuildConfig, source: Store | None) -> tuple[dict, int]:
    """The plan attributes and view count of the new cache: from the options, or those of `source`,
    the cache at --plan-from."""
    if source is not None:
        return {k: v for k, v in source.meta["plan"].items() if k != "id"}, source.num_views
    return {
        "seed": cfg.seed,
        "image_size": cfg.image_size,
        "crop": cfg.crop.to_dict(),
        "val_crop_fraction": VAL_CROP_FRACTION,
        "loader": cfg.loader,
        "mix": cfg.mix_params().to_dict(),
        **({"augment": cfg.augment_params().to_dict()} if cfg.augment_params().enabled else {}),
    }, cfg.views


def check_pairs(cfg: BuildConfig, plan: dict) -> None:
    """A mixed plan pairs positions 2i and 2i + 1, and a pair must share a batch: here for the
    mixing of --plan-from's recorded plan (BuildConfig refuses odd sizes beside mixing options)."""
    if MixParams.from_dict(plan["mix"]).enabled and (cfg.batch_size % 2 or cfg.shard_rows % 2):
        raise OptionError(
            f"mixing pairs positions 2i and 2i + 1 in one batch: --batch-size ({cfg.batch_size}) and "
            f"--shard-size ({cfg.shard_rows}) must be even"
        )


def cache_meta(cfg: BuildConfig, teacher, amp: str, recipe: dict, plan: dict, views: int) -> dict:
    """The cache's attributes as far as the options decide them: what decides its contents (compared
    on resume) and the software that wrote it."""
    return {
        "format": FORMAT_VERSION,
        "teacher": {
            "name": cfg.teacher,
            "weights": teacher.weights,
            "weights_sha256": teacher.weights_sha256,
            "amp": amp,
            "input": recipe,
            "pretrained_cfg": teacher.pretrained_cfg,
        },
        "dataset": {"root": str(Path(cfg.data).resolve())},
        "plan": dict(plan),
        "codec": cfg.codec,
        "views": views,
        "shard_rows": cfg.shard_rows,
        "chunk_rows": cfg.chunk_rows,
        "software": software_versions(),
    }


def check_out(where: Location, data: Path) -> None:
    """Refuse an --out that is not a cache's home, so that neither a build nor --overwrite can touch
    other files: one that overlaps the dataset or sits under a file, or that holds something other
    than an skd cache."""
    if problem := where.new_home_problem(data):
        raise OptionError(problem)
    if where.is_empty() or cache_state(where) is not None:
        return
    what = (
        "a zarr group skd did not create (or one whose zarr.json is damaged)"
        if "zarr.json" in where.listing()
        else "not an skd cache"
    )
    raise OptionError(
        f"{where} holds files and is {what}: choose another --out "
        "(--overwrite replaces only a cache; remove other files yourself)"
    )


def prepare_store(
    cfg: BuildConfig,
    meta: dict,
    num_classes,
    progress: bool,
    plan_source: Store | None,
    measure_codec,
) -> Store:
    """Open the cache at cfg.out for resuming, or lay out its samples and plan (`plan_source`'s: the
    cache at --plan-from, opened once by the build) and create it.

    Refuses a cache built with different identity settings. `num_classes()` runs the teacher once;
    it is called only after the dataset index found no bad image. `measure_codec(layout)` runs the
    teacher on the first rows of view 0: (the codec to store with, the record of its measured
    fidelity).
    """
    where = parse_location(cfg.out)
    if not where.is_empty() and not cfg.overwrite:
        return _resume(where, cfg, meta, plan_source)
    layout = (
        copied_layout(cfg, plan_source)
        if plan_source is not None
        else planned_layout(cfg, progress)
    )
    classes = num_classes()
    dataset_classes = len(layout.dataset["classes"])
    if classes < dataset_classes:
        raise ModelError(
            f"teacher {cfg.teacher} has {classes} outputs but {cfg.data}/train has "
            f"{dataset_classes} classes: use a teacher trained on these classes"
        )
    if classes > dataset_classes:
        warnings.warn(
            f"teacher {cfg.teacher} has {classes} outputs and {cfg.data}/train {dataset_classes} classes: "
            "class i of the dataset is taken to be output i (its accuracy in skd-cache stats says "
            "whether that holds)",
            SkdWarning,
            stacklevel=2,
        )
    meta["teacher"]["num_classes"] = classes
    meta["dataset"].update(layout.dataset)
    meta["codec"], meta["codec_fidelity"] = measure_codec(layout)
    if cfg.overwrite and not where.is_empty():
        where.remove_all()
    return create_store(
        where,
        meta,
        train=layout.train,
        plans=layout.plans,
        val=layout.val,
        val_boxes=layout.val_boxes,
        num_classes=classes,
    )


@dataclass
class Layout:
    """What a new cache holds besides logits: its samples, the plan of every view, the validation
    windows."""

    train: Split
    plans: ViewPlans  # each view's plan, made when creation writes it
    val: Split | None
    val_boxes: np.ndarray | None
    dataset: dict  # the dataset attributes: counts, classes, fingerprints, skipped files


def planned_layout(cfg: BuildConfig, progress: bool) -> Layout:
    """Index the dataset and plan every view."""
    check_views(cfg.views)
    index = index_dataset(
        cfg.data,
        with_val=cfg.val,
        workers=max(4, cfg.workers),
        progress=progress,
        on_bad=cfg.on_bad_image,
    )
    mix = cfg.mix_params()
    augment = cfg.augment_params()
    plans = ViewPlans(
        cfg.views,
        lambda view: planned_view(
            cfg.seed, view, index.train.sizes, cfg.crop, mix, cfg.image_size, augment
        ),
    )
    return Layout(
        train=index.train,
        plans=plans,
        val=index.val,
        val_boxes=None if index.val is None else center_boxes(index.val.sizes, VAL_CROP_FRACTION),
        dataset={
            "num_samples": len(index.train),
            "classes": index.classes,
            "num_val": len(index.val) if index.val is not None else 0,
            "fingerprint": index.train.fingerprint,
            "val_fingerprint": index.val.fingerprint if index.val is not None else None,
            "skipped": [list(item) for item in index.skipped],
        },
    )


def copied_layout(cfg: BuildConfig, source: Store) -> Layout:
    """The samples and the whole recorded plan of `source`, the cache at --plan-from, byte for byte,
    once the images under --data are checked to be the ones it was built on."""
    recorded = source.meta["dataset"]
    found = quick_fingerprints(Path(cfg.data), source.has_val, recorded.get("skipped", []))
    if found != (recorded["fingerprint"], recorded["val_fingerprint"]):
        raise DatasetError(
            f"the images under {cfg.data} differ from those --plan-from {cfg.plan_from} was built on "
            "(file list or sizes): pass its --data"
        )
    plans = ViewPlans(source.num_views, source.recorded_view)
    keys = ("num_samples", "classes", "num_val", "fingerprint", "val_fingerprint", "skipped")
    return Layout(
        train=source.split("samples"),
        plans=plans,
        val=source.split("val") if source.has_val else None,
        val_boxes=source.val_boxes() if source.has_val else None,
        dataset={k: recorded.get(k) for k in keys},
    )


def _resume(out: Location, cfg: BuildConfig, meta: dict, plan_source: Store | None) -> Store:
    """The cache at `out`, opened to continue writing, if it was built with the same identity
    settings; grown first where more views are asked for than it holds."""
    if cache_state(out) == "creating":
        raise CacheError(
            f"{out} holds an unfinished cache creation: pass --overwrite to start it again"
        )
    store = open_store(out, mode="r+")
    if cfg.val and not store.has_val and (Path(cfg.data) / "val").is_dir():
        raise OptionError(
            f"{out} was built with --no-val: pass --no-val to resume, or --overwrite to rebuild "
            "it with the validation logits"
        )
    if meta["codec"] == AUTO:  # the codec a first run chose is the one to resume with
        meta = {**meta, "codec": store.meta["codec"]}
    skipped = store.meta["dataset"].get("skipped", [])
    train_fp, val_fp = quick_fingerprints(Path(cfg.data), store.has_val, skipped)
    changed = differences(
        store.meta, {**meta, "dataset": {"fingerprint": train_fp, "val_fingerprint": val_fp}}
    )
    changed = [name for name in changed if name != "views"]  # more views grow the cache (`grow`)
    if changed:
        raise OptionError(
            f"{out} was built with other settings ({', '.join(changed)}): pass the same "
            "arguments to resume, another --out, or --overwrite to rebuild"
        )
    out.discard_partial_writes()  # temporary files a killed write left
    grow(store, cfg, int(meta["views"]), plan_source)
    return store


def grow(store: Store, cfg: BuildConfig, views: int, source: Store | None) -> None:
    """Append views to the cache up to `views` (those of --plan-from's cache `source`, copied, or
    planned as a fresh build plans them), or finish a growth a kill interrupted; OptionError for
    fewer views than it holds."""
    held = store.num_views
    if views < held:
        asked = (
            f"--plan-from {cfg.plan_from} holds {views} views"
            if source is not None
            else f"--views {views}"
        )
        raise OptionError(
            f"{asked}, fewer than the {held} of {store.path}: a cache never shrinks: pass --views {held} "
            "or more to resume or grow it, or another --out"
        )
    if views == held and not store.meta.get("growing"):
        return
    check_views(views)
    if source is None:
        sizes, mix = store.split("samples").sizes, cfg.mix_params()
        augment = cfg.augment_params()
        plans = ViewPlans(
            views,
            lambda view: planned_view(
                cfg.seed, view, sizes, cfg.crop, mix, cfg.image_size, augment
            ),
        )
        grow_store(store, views, plans)
        return

    def same_plan(grown_id: str) -> None:
        if grown_id != source.meta["plan"]["id"]:
            raise OptionError(
                f"--plan-from {cfg.plan_from} holds another plan than the one {store.path} was built on "
                "(its views differ): pass the cache it was built from"
            )

    plans = ViewPlans(views, source.recorded_view)
    grow_store(store, views, plans, same_plan)
