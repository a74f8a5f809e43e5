"""Small ImageFolders of real JPEG files, written on the fly: shared by the tests and the benchmarks.

No pytest here, so benchmark scripts can import it on machines without the test extra.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("ant", "bee", "cat")


def photo_like(height: int, width: int, seed) -> np.ndarray:
    """An RGB uint8 image with smooth gradients, blobs and texture: JPEG-realistic content."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.zeros((height, width, 3), np.float32)
    for c in range(3):
        fy, fx = rng.uniform(0.5, 3.0, 2)
        img[..., c] = 128 + 80 * np.sin(fy * yy / height * np.pi + c) * np.cos(fx * xx / width * np.pi)
    for _ in range(4):
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        r = rng.uniform(0.1, 0.4) * min(height, width)
        blob = ((yy - cy) ** 2 + (xx - cx) ** 2) < r**2
        img[blob] = 0.5 * img[blob] + 0.5 * rng.uniform(0, 255, 3)
    img += rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def write_jpeg(
    path: Path, array: np.ndarray, *, mode: str = "RGB", exif_orientation: int | None = None, quality: int = 90
) -> Path:
    """Save an HxWx3 uint8 array as a JPEG in `mode` (RGB, L or CMYK), optionally with an EXIF rotation."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array, "RGB")
    if mode != "RGB":
        image = image.convert(mode)
    kwargs = {"quality": quality}
    if exif_orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        kwargs["exif"] = exif.tobytes()
    image.save(path, "JPEG", **kwargs)
    return path


def make_image_folder(
    root: Path,
    *,
    per_class: int = 6,
    val_per_class: int = 2,
    classes=CLASSES,
    min_side: int = 40,
    max_side: int = 96,
    seed: int = 0,
) -> Path:
    """ROOT/train/<class>/*.JPEG and ROOT/val/<class>/*.JPEG with varied sizes and aspect ratios."""
    rng = np.random.default_rng(seed)
    for split_id, (split, count) in enumerate((("train", per_class), ("val", val_per_class))):
        if count == 0:
            continue
        for label, name in enumerate(classes):
            for i in range(count):
                h, w = (int(v) for v in rng.integers(min_side, max_side + 1, 2))
                write_jpeg(
                    root / split / name / f"{name}_{i:03d}.JPEG", photo_like(h, w, seed=[seed, split_id, label, i])
                )
    return root
