"""What the tests and benchmarks make or read by hand, beside skd's own API: a handmade cache's attributes (everything
the store's schema asks for), a small cache of random rows (make_store), a whole shard written and marked complete,
a cache's arrays as numpy, one view loaded as the reference pipeline loads it, image sizes read from headers alone.

No pytest here, so benchmark scripts can import it on machines without the test extra; torch and PIL are imported
by the functions that need them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import zarr

from skd.data.index import Split
from skd.plan.crops import ViewPlan
from skd.store.cache_store import VAL, open_store
from skd.store.codecs import get_codec
from skd.store.creation import create_store
from skd.store.schema import FORMAT_VERSION

IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def cache_meta(
    *,
    codec: str,
    views: int,
    num_samples: int,
    classes: list[str],
    num_val: int = 0,
    num_classes: int | None = None,
    shard_rows: int = 16384,
    chunk_rows: int = 1024,
    image_size: int = 32,
) -> dict:
    """The `skd` attribute of a handmade cache (create_store adds the sample hashes)."""
    return {
        "format": FORMAT_VERSION,
        "codec": codec,
        "views": views,
        "shard_rows": shard_rows,
        "chunk_rows": chunk_rows,
        "teacher": {
            "name": "handmade",
            "weights": "none",
            "weights_sha256": None,
            "amp": "none",
            "num_classes": num_classes or len(classes),
            "input": {
                "size": image_size,
                "interpolation": "bilinear",
                "mean": IMAGENET_MEAN,
                "std": IMAGENET_STD,
                "source": {"size": "default"},
            },
        },
        "dataset": {
            "root": "/nowhere",
            "num_samples": num_samples,
            "num_val": num_val,
            "classes": list(classes),
            "fingerprint": "f" * 64,
            "val_fingerprint": "e" * 64 if num_val else None,
        },
        "plan": {
            "seed": 0,
            "image_size": image_size,
            "loader": "torchvision",
            "val_crop_fraction": 0.875,
            "mix": {"mixup_alpha": 0.0, "cutmix_alpha": 0.0, "prob": 1.0, "switch_prob": 0.5},
            "crop": {"scale": [0.08, 1.0], "ratio": [0.75, 4 / 3], "flip_prob": 0.5},
        },
    }


def write_shard(store, view, shard: int, encoded) -> None:
    """Write one whole shard of logits (and scale/offset) of `store` and then mark it complete, as a build's
    writer does (Store.write_shard_data, then Store.mark_complete)."""
    store.write_shard_data(view, shard, encoded)
    store.mark_complete(view, shard)


def load_view(
    path: str,
    box: Sequence[int],
    flip: bool,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    interpolation: str = "bilinear",
):
    """One view as a normalised (3, S, S) float32 tensor: the torchvision pipeline's `load_window`, then its
    `normalize`, as its loader applies them."""
    from skd.pipelines.torchvision_pipeline import load_window, normalize

    return normalize(load_window(path, box, flip, image_size, interpolation), mean, std)


def read_sizes(root: Path, paths: list[str], *, workers: int = 16, progress: bool = False, desc: str = "sizes"):
    """(N, 2) int32 (height, width) of ROOT/<path> for each path, in input order, from headers only, read in
    `workers` threads by the index pass's own reader; every unreadable file is reported in one DatasetError."""
    from skd.data import index

    sizes, _, _, bad = index._read_headers(Path(root), paths, workers=workers, progress=progress, desc=desc)
    if bad:
        raise index.DatasetError(index._bad_files_message(Path(root), paths, bad, []))
    return sizes


def make_store(path, *, rows=50, classes=7, codec="int8", shard_rows=16, chunk_rows=4, views=2, val=13, skip_shards=()):
    """A finished cache at `path` (a folder or a URL) of `views` views of `rows` random rows and `val` validation
    rows, every shard written but the (view, shard) pairs in `skip_shards`; opened for reading."""
    rng = np.random.default_rng(0)
    meta = cache_meta(
        codec=codec,
        views=views,
        num_samples=rows,
        num_val=val,
        classes=[str(i) for i in range(classes)],
        shard_rows=shard_rows,
        chunk_rows=chunk_rows,
    )
    split = Split([f"train/c/{i}.JPEG" for i in range(rows)], rng.integers(0, classes, rows), np.full((rows, 2), 8))
    plans = [ViewPlan(order=rng.permutation(rows), box=np.zeros((rows, 4)), flip=np.zeros(rows)) for _ in range(views)]
    vsplit = Split([f"val/c/{i}.JPEG" for i in range(val)], rng.integers(0, classes, val), np.full((val, 2), 8))
    store = create_store(
        path, meta, train=split, plans=plans, val=vsplit, val_boxes=np.zeros((val, 4)), num_classes=classes
    )
    enc = get_codec(codec)
    for view, n in [(k, rows) for k in range(views)] + [(VAL, val)]:
        for shard in range(store.num_shards(n)):
            if (view, shard) in skip_shards:
                continue
            a, b = store.shard_bounds(shard, n)
            write_shard(store, view, shard, enc.encode(rng.normal(0, 3, (b - a, classes)).astype(np.float32)))
    return open_store(path)


def assert_same(got, want):
    """Stored arrays read two ways (e.g. RowReader and zarr's own Store.read_rows) are equal, dtype and shape too."""
    for g, w in zip(got, want):
        assert (g is None) == (w is None), f"reader gives {type(g).__name__}, zarr {type(w).__name__}"
        if g is not None:
            differ = int((g != w).sum()) if g.shape == w.shape else -1
            assert g.dtype == w.dtype and differ == 0, (
                f"reader's {g.dtype} {g.shape} differs from zarr's {w.dtype} {w.shape} in {differ} values (-1: shape)"
            )


def cache_arrays(path: Path) -> dict:
    """Every array of a cache's samples/, views/ and val/ groups as numpy, by name (`views/logits`, ...)."""
    g = zarr.open_group(str(path), mode="r")
    return {f"{grp}/{name}": np.asarray(a[...]) for grp in ("samples", "views", "val") for name, a in g[grp].arrays()}
