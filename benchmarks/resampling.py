"""How far DALI's resampling is from the torchvision (PIL) reference, per interpolation, same windows.

Both loaders cut the same recorded windows from the same JPEGs; the figure is the difference of their
outputs in grey levels (0-255), mean and 99th percentile over all pixels, for downscaling (windows larger
than the output, the usual case) and upscaling. Teachers with a bicubic recipe (timm's ViTs, ConvNeXts)
get DALI's cubic resize; this says how much further it is from PIL's bicubic than linear from bilinear.

    python benchmarks/resampling.py [--images 64] [--size 224]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from jpegs import photo_like, write_jpeg  # noqa: E402  (the tests' JPEG content)

from skd.pipelines import IMAGENET_STD, make_loader  # noqa: E402
from skd.plan.crops import crop_windows  # noqa: E402


def levels(kind: str, interpolation: str, files, boxes, size: int) -> np.ndarray:
    """All views as grey levels (0-255): the normalised output times std (the mean cancels in differences)."""
    loader = make_loader(
        kind,
        files=files,
        boxes=boxes,
        flips=np.zeros(len(files)),
        labels=np.zeros(len(files)),
        positions=np.arange(len(files)),
        image_size=size,
        batch_size=16,
        workers=1,
        interpolation=interpolation,
    )
    out = np.concatenate([b.images.numpy() for b in loader])
    return out * 255 * np.asarray(IMAGENET_STD, np.float32)[None, :, None, None]


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--size", type=int, default=224, help="output side in pixels")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        for case, (lo, hi) in {
            "downscale": (2 * args.size, 3 * args.size),
            "upscale": (args.size // 3, args.size // 2),
        }.items():
            sizes = rng.integers(lo, hi + 1, (args.images, 2))
            files = [
                str(write_jpeg(Path(tmp) / f"{case}{i}.jpg", photo_like(int(h), int(w), seed=i)))
                for i, (h, w) in enumerate(sizes)
            ]
            boxes = crop_windows(0, 0, np.arange(len(files)), sizes)
            for interpolation in ("bilinear", "bicubic"):
                diff = np.abs(
                    levels("dali", interpolation, files, boxes, args.size)
                    - levels("torchvision", interpolation, files, boxes, args.size)
                )
                rows.append((case, interpolation, diff.mean(), np.percentile(diff, 99), diff.max()))
    print(f"{args.images} JPEGs per case, RandomResizedCrop windows, {args.size} px output")
    print("| case | interpolation | mean | p99 | max |  (grey levels, DALI vs PIL)")
    print("|---|---|---|---|---|")
    for case, interpolation, mean, p99, peak in rows:
        print(f"| {case} | {interpolation} | {mean:.2f} | {p99:.1f} | {peak:.0f} |")


if __name__ == "__main__":
    main()
