"""What the tests and benchmarks make or read by hand, beside skd's own API: a handmade cache's attributes (everything
the store's schema asks for), a whole shard written and marked complete, one view loaded as the reference pipeline
loads it, image sizes read from headers alone.

No pytest here, so benchmark scripts can import it on machines without the test extra; torch and PIL are imported
by the functions that need them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

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
