"""DALI's GPU decoding of recorded windows against its CPU decoder: grey levels apart per decode mode.

Each comparison runs in its own child process (`python -m skd.pipelines.dali_smoke`), so a decoder that crashes
(nvImageCodec 0.9's GPU ROI decode: SIGSEGV on H100) is a row of the table, not the end of the script. The images
are photo-like JPEGs of odd sizes with EXIF orientations 1, 3, 6 and 8, windows in the displayed frame, half of
them touching its bottom-right corner (DALI PR #6344: ROI bounds of rotated images were checked in raw coordinates).

On a GPU: `roi` (decoders.image_slice, "mixed") and `full` (decoders.image, "mixed", then slice) against `cpu`, with
the hardware decoder idle (--hw-decoder-load 0) and at 0.65. Without one: roi against full and cpu on DALI's CPU
decoder (the same graphs with device "cpu"; bit-identical on DALI 2.4).

Usage: python benchmarks/dali_gpu_smoke.py [--images 64] [--device-id 0]   (needs DALI; about 10 s a row)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch
from bench_common import machine, table


def row(decode: str, reference: str, images: int, device_id: int | None, load: float) -> list[str]:
    command = [
        sys.executable,
        "-m",
        "skd.pipelines.dali_smoke",
        "--decode",
        decode,
        "--reference",
        reference,
    ]
    command += ["--images", str(images), "--hw-decoder-load", str(load)]
    command += [] if device_id is None else ["--device-id", str(device_id)]
    started = time.perf_counter()
    run = subprocess.run(command, capture_output=True, text=True, timeout=600)
    seconds = f"{time.perf_counter() - started:.1f}"
    what = [decode, reference, f"{load:g}" if device_id is not None else "(CPU)"]
    lines = [line for line in run.stdout.splitlines() if line.startswith("{")]
    if run.returncode or not lines:
        why = (
            f"killed by signal {-run.returncode}"
            if run.returncode < 0
            else f"exit {run.returncode}"
        )
        tail = [line.strip() for line in run.stderr.splitlines() if line.strip()]
        return what + ["FAILED", why + (f": {tail[-1][:120]}" if tail else ""), seconds]
    report = json.loads(lines[-1])
    mean, peak = max(report["mean"]), max(report["max"])
    return what + [f"{mean:.3f}", f"{peak:.1f}", seconds]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--device-id", type=int, default=0 if torch.cuda.is_available() else None)
    args = ap.parse_args()
    if args.device_id is None:
        pairs = [("roi", "full", 0.0), ("roi", "cpu", 0.0)]
    else:
        pairs = [(d, "cpu", load) for d in ("roi", "full") for load in (0.0, 0.65)]
    rows = []
    for decode, reference, load in pairs:
        rows.append(row(decode, reference, args.images, args.device_id, load))
        print(" | ".join(rows[-1]), flush=True)
    print(
        f"\n{machine()}; {args.images} JPEGs (EXIF orientations 1, 3, 6, 8), windows resized to 64 px"
    )
    header = [
        "decode",
        "against",
        "hw decoder load",
        "worst image's mean grey levels apart",
        "max",
        "seconds",
    ]
    print(table(header, rows))


if __name__ == "__main__":
    main()
