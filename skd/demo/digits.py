"""The demo's dataset: scikit-learn's 1,797 bundled 8x8 handwritten digits as an ImageFolder of
JPEGs.

Real images that ship with an installed package, upscaled and written once, deterministically, to
<root>/{train,val}/<digit>/<id>.JPEG; the product reads them exactly as it reads ImageNet.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch

NUM_CLASSES = 10
CANVAS = 32  # side of the written JPEGs
VAL_FRACTION = 0.2
DATASET_VERSION = 2  # bump when the written images change


def split_ids(
    labels: np.ndarray, val_fraction: float = VAL_FRACTION, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """A fixed stratified split: (train ids, val ids), each sorted."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(labels):
        ids = rng.permutation(np.flatnonzero(labels == c))
        k = int(round(len(ids) * val_fraction))
        val.append(ids[:k])
        train.append(ids[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def render_digit(pixels: np.ndarray, rng: np.random.Generator, canvas: int = CANVAS) -> np.ndarray:
    """One 8x8 digit (values 0..16) as a canvas x canvas RGB uint8 image: random size, place and
    ink.

    The digit is upscaled to 55-80% of the canvas and placed inside the part that the validation
    centre crop keeps (224/256 of the side), in a random ink colour on a dark background.
    """
    from PIL import Image

    gray = Image.fromarray(
        (np.asarray(pixels, np.float64).reshape(8, 8) * (255 / 16)).astype(np.uint8), "L"
    )
    side = int(rng.integers(round(0.55 * canvas), round(0.8 * canvas) + 1))
    gray = gray.resize((side, side), Image.BICUBIC)
    margin = (canvas - round(canvas * 224 / 256)) // 2
    y, x = (int(v) for v in rng.integers(margin, canvas - margin - side + 1, 2))
    ink = np.asarray(gray, np.float32)[..., None] / 255 * rng.uniform(150, 255, 3)
    image = np.full((canvas, canvas, 3), rng.uniform(0, 40), np.float32)
    image[y : y + side, x : x + side] = np.maximum(image[y : y + side, x : x + side], ink)
    image += rng.normal(0, 4, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def write_digits(root: Path, *, seed: int = 0, canvas: int = CANVAS, quality: int = 92) -> dict:
    """Write root/{train,val}/<digit>/<id>.JPEG once (deterministic); returns the counts per split.

    A `manifest.json` records what was written; a root with the same manifest is left as it is.
    """
    from PIL import Image
    from sklearn.datasets import load_digits

    root = Path(root)
    manifest = {
        "source": "sklearn.datasets.load_digits",
        "version": DATASET_VERSION,
        "seed": seed,
        "canvas": canvas,
        "quality": quality,
        "val_fraction": VAL_FRACTION,
    }
    marker = root / "manifest.json"
    old = json.loads(marker.read_text()) if marker.is_file() else {}
    if {k: old.get(k) for k in manifest} == manifest:
        return old["counts"]
    if root.exists() and any(root.iterdir()):
        if old.get("source") != manifest["source"]:  # never delete what the demo did not write
            raise SystemExit(
                f"demo: {root} exists and was not written by the demo: choose another --dir"
            )
        shutil.rmtree(root)  # an earlier demo's images, written with other settings
    root.mkdir(parents=True, exist_ok=True)
    # ours even if stopped part-way
    marker.write_text(json.dumps({"source": manifest["source"]}) + "\n")
    digits = load_digits()
    labels = digits.target.astype(np.int64)
    train, val = split_ids(labels, seed=seed)
    counts = {}
    for split, ids in (("train", train), ("val", val)):
        for i in ids:
            rng = np.random.default_rng([seed, int(i)])
            folder = root / split / str(labels[i])
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(render_digit(digits.data[i], rng, canvas), "RGB").save(
                folder / f"{int(i):04d}.JPEG", "JPEG", quality=quality
            )
        counts[split] = int(len(ids))
    manifest["counts"] = counts
    marker.write_text(json.dumps(manifest, indent=1) + "\n")
    return counts


def load_split(root: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """All images of a split as (N, 3, H, W) uint8 and their labels, in sorted ImageFolder order."""
    from PIL import Image

    files = sorted((root / split).glob("*/*.JPEG"), key=lambda p: (int(p.parent.name), p.name))
    images = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
    labels = np.array([int(f.parent.name) for f in files])
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels)
