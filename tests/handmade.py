"""The attributes of a cache written by hand (tests, benchmarks): everything the store's schema asks for.

No pytest here, so benchmark scripts can import it on machines without the test extra.
"""

from __future__ import annotations

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
