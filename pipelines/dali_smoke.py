"""A smoke test of DALI's decoders on a few plain and EXIF-rotated JPEGs, run in a child process.

`python -m skd.pipelines.dali_smoke --decode roi --reference cpu [--device-id N]` writes a handful
of photo-like JPEGs (orientations 1, 3, 6 and 8, odd sizes, windows touching the edges), decodes
their windows with the two decode modes and prints one JSON line: the mean and max grey-level
difference per image. `check_roi_decoder` runs it once per process before a GPU loader's first batch
with --dali-decode roi: GPU ROI decoding has crashed whole processes (nvImageCodec 0.9:
INTERNAL_ERROR on A100, SIGSEGV on H100), which no exception handler can catch, so the crash happens
in the child and the run stops with one line naming the way out. benchmarks/dali_gpu_smoke.py prints
the same comparison as a table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from skd.errors import DeviceError

from . import IMAGENET_MEAN, IMAGENET_STD, DaliOptions, make_loader

ORIENTATIONS = (1, 3, 6, 8)
SMOKE_IMAGES = 8
TOLERANCE = 3.0  # mean grey levels per image: the pipelines' contract between decoders
_checked: dict[int, str] = {}


def smoke_images(
    folder: Path, count: int = SMOKE_IMAGES, seed: int = 0
) -> tuple[list[str], np.ndarray]:
    """`count` photo-like JPEGs of odd sizes, each EXIF orientation of ORIENTATIONS in turn, and one
    window per image in the displayed (rotated) frame, alternately touching its bottom-right
    corner."""
    rng = np.random.default_rng(seed)
    files, boxes = [], []
    for i in range(count):
        h, w = (int(v) for v in rng.integers(61, 203, 2))
        yy, xx = np.mgrid[0:h, 0:w]
        pixels = np.stack([(yy * 3 + xx) % 256, (xx * 5) % 256, (yy * 7 + i * 40) % 256], axis=-1)
        pixels = np.clip(pixels + rng.normal(0, 8, pixels.shape), 0, 255).astype(np.uint8)
        orientation = ORIENTATIONS[i % len(ORIENTATIONS)]
        exif = Image.Exif()
        exif[0x0112] = orientation
        path = folder / f"smoke_{i}_o{orientation}.jpg"
        Image.fromarray(pixels).save(path, "JPEG", quality=90, exif=exif.tobytes())
        shown_h, shown_w = (w, h) if orientation >= 5 else (h, w)
        wh, ww = int(rng.integers(16, shown_h)), int(rng.integers(16, shown_w))
        y, x = (
            (shown_h - wh, shown_w - ww) if i % 2 else (int(rng.integers(0, shown_h - wh + 1)), 0)
        )
        files.append(str(path))
        boxes.append((y, x, wh, ww))
    return files, np.array(boxes)


def decode_windows(
    files, boxes, decode: str, device: torch.device, size: int = 64, hw_decoder_load: float = 0.0
):
    """The windows as (N, 3, size, size) on the 0-255 scale, through the DALI loader with
    `decode`."""
    n = len(files)
    loader = make_loader(
        "dali",
        files=files,
        boxes=boxes,
        flips=np.zeros(n, np.uint8),
        labels=np.zeros(n),
        positions=np.arange(n),
        image_size=size,
        batch_size=4,
        workers=2,
        device=device,
        dali=DaliOptions(decode=decode, hw_decoder_load=hw_decoder_load),
    )
    images = torch.cat([batch.images.cpu() for batch in loader])
    std, mean = (
        torch.tensor(IMAGENET_STD).view(1, 3, 1, 1),
        torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1),
    )
    return (images * std + mean) * 255


def compare(
    files, boxes, decode: str, reference: str, device: torch.device, hw_decoder_load: float = 0.0
) -> dict:
    """Mean and max absolute grey-level difference per image between two decode modes."""
    a = decode_windows(files, boxes, decode, device, hw_decoder_load=hw_decoder_load)
    b = decode_windows(files, boxes, reference, device, hw_decoder_load=hw_decoder_load)
    apart = (a - b).abs()
    return {
        "images": len(files),
        "mean": apart.mean(dim=(1, 2, 3)).tolist(),
        "max": apart.amax(dim=(1, 2, 3)).tolist(),
        "shape": list(a.shape),
    }


def check_roi_decoder(device_index: int) -> None:
    """Once per process and GPU: the ROI smoke test in a child process; DeviceError (one line
    naming --dali-decode) when the child crashes, fails or decodes windows more than TOLERANCE
    levels off the CPU's."""
    if device_index in _checked:
        return
    command = [
        sys.executable,
        "-m",
        "skd.pipelines.dali_smoke",
        "--decode",
        "roi",
        "--reference",
        "cpu",
    ]
    command += ["--device-id", str(device_index)]
    try:
        run = subprocess.run(command, capture_output=True, text=True, timeout=300)
        problem = _problem(run)
    except subprocess.TimeoutExpired:
        problem = "it did not finish in 300 s"
    if problem:
        raise DeviceError(
            f"DALI's GPU ROI decoder failed a smoke test on {SMOKE_IMAGES} plain and EXIF-rotated "
            f"JPEGs ({problem}): pass --dali-decode full (decode whole images on the GPU, then slice) or "
            "--dali-decode cpu"
        )
    _checked[device_index] = "ok"


def _problem(run: subprocess.CompletedProcess) -> str | None:
    if run.returncode < 0:
        return f"the decoding process was killed by signal {-run.returncode}"
    lines = [line for line in run.stdout.splitlines() if line.startswith("{")]
    if run.returncode or not lines:
        tail = [line.strip() for line in (run.stderr or run.stdout).splitlines() if line.strip()]
        return f"exit {run.returncode}: {tail[-1][:200] if tail else 'no output'}"
    worst = max(json.loads(lines[-1])["mean"])
    return f"windows {worst:.1f} grey levels off the CPU decoder's" if worst > TOLERANCE else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--decode", default="roi", choices=["roi", "full", "cpu"])
    ap.add_argument("--reference", default="cpu", choices=["roi", "full", "cpu"])
    ap.add_argument("--device-id", type=int, help="GPU index; default: the CPU")
    ap.add_argument("--images", type=int, default=SMOKE_IMAGES)
    ap.add_argument("--hw-decoder-load", type=float, default=0.0)
    args = ap.parse_args()
    device = torch.device("cpu") if args.device_id is None else torch.device("cuda", args.device_id)
    with tempfile.TemporaryDirectory(prefix="skd-dali-smoke-") as folder:
        files, boxes = smoke_images(Path(folder), args.images)
        print(
            json.dumps(
                compare(files, boxes, args.decode, args.reference, device, args.hw_decoder_load)
            )
        )


if __name__ == "__main__":
    main()
