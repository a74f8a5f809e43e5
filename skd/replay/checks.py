"""Whether a cache can be replayed as asked: complete, on the same images, read with its loader,
and, for an ensemble, on one plan. Each check fails with one line saying what to do."""

from __future__ import annotations

import warnings
from pathlib import Path

from skd.data.index import quick_fingerprints
from skd.errors import CacheError, DatasetError, OptionError, SkdWarning
from skd.store.cache_store import Store


def check_replayable(store: Store, root: Path, val: bool) -> None:
    """CacheError unless the cache is complete, DatasetError unless `root` holds the images it was built on (file
    list and sizes). Without `val` the validation split is not checked (a training machine may hold
    only train/)."""
    meta = store.meta
    if not store.is_complete():
        done, total = int(store.complete().sum()), store.complete().size
        raise CacheError(
            f"cache {store.path} is unfinished ({done} of {total} shards): "
            "rerun its `skd-cache build` command to complete it"
        )
    if not (root / "train").is_dir():
        raise DatasetError(
            f"dataset {root} has no train/ folder: pass --data ROOT where the cache's images live"
        )
    use_val = val and store.has_val
    if use_val and not (root / "val").is_dir():
        raise DatasetError(
            f"dataset {root} has no val/ folder, and cache {store.path} has validation logits: "
            "pass --no-val, or --data ROOT where its val/ lives"
        )
    train_fp, val_fp = quick_fingerprints(root, use_val, meta["dataset"].get("skipped", []))
    if train_fp != meta["dataset"]["fingerprint"]:
        raise DatasetError(
            f"the images under {root}/train differ from those cache {store.path} was built on "
            "(file list or sizes): pass the right --data or rebuild the cache"
        )
    if use_val and val_fp != meta["dataset"]["val_fingerprint"]:
        raise DatasetError(
            f"the images under {root}/val differ from those cache {store.path} was built on"
        )


def warn_other_loader(loader: str | None, store: Store) -> None:
    """A warning when a replay decodes with another loader than the teacher did: resampling
    noise."""
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
                raise OptionError(
                    f"caches {first.path} and {other.path} differ in {what}: {get(first)} vs "
                    f"{get(other)}; caches read together must be built on one plan (skd-cache build "
                    "--plan-from)"
                )
