"""The whole product in a few minutes on a CPU: `python -m skd.demo` (what `make demo` runs).

Real images that ship with an installed package: scikit-learn's 1,797 bundled 8x8 handwritten
digits, upscaled and written out as an ImageFolder of JPEGs (demo/digits/{train,val}/<digit>/,
skd/demo/digits.py). Then, exactly as on ImageNet:

1. train a small CNN teacher for a few epochs (plain torch, in memory) -> demo/teacher.pth;
2. `skd-cache build` runs that teacher over recorded augmented views -> demo/cache;
3. `skd-cache stats` and `skd-cache verify` look at the cache;
4. `skd-train` trains a smaller student on the same views three times, no teacher loaded: hard
   labels only (`--kd none`), spherical KD (`--kd skd`) and Hinton KD (`--kd hinton`), both KD
   runs from the cached logits;
5. a table: teacher and students' validation top-1, and the cache's bytes per row.

The models (skd/demo/models.py) are importable as `py:skd.demo:teacher` and `py:skd.demo:student`,
the form in which `--teacher` and `--arch` accept any model. Importing this module is cheap and has
no side effects.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from skd.demo.digits import CANVAS, write_digits
from skd.demo.models import IMAGE_SIZE, student, teacher, train_teacher

# ---------------------------------------------------------------------------------------------
# Running the product's commands

# The demo's models are tiny: one intra-op thread runs them as fast as two, and on a busy 2-core
# machine two OpenMP threads made the teacher's training step 20 times slower (spinning threads
# waiting for each other). DALI's decoding threads (--workers) use the other core.
THREADS = "1"


def command(name: str) -> list[str]:
    """The console script `name` next to this Python (the venv's bin), or the same entry point via
    -c."""
    script = Path(sys.executable).parent / name
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    entry = {"skd-cache": "main_cache", "skd-train": "main_train"}[name]
    return [
        sys.executable,
        "-c",
        f"import sys; sys.argv[0] = {name!r}; from skd.cli.main import {entry}; {entry}()",
    ]


def options(**values) -> list[str]:
    """Command-line options from keywords, in order: image_size=16 -> --image-size 16;
    overwrite=True -> --overwrite."""
    argv = []
    for name, value in values.items():
        argv.append(f"--{name.replace('_', '-')}")
        if value is not True:
            argv.append(str(value))
    return argv


def run(name: str, *args: str) -> None:
    """Run a product command as a user would, echoing it; stop the demo if it fails."""
    print(f"\n$ {name} {' '.join(args)}", flush=True)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", THREADS)
    proc = subprocess.run(command(name) + list(args), env=env)
    if proc.returncode != 0:
        sys.exit(
            f"demo: `{name} {args[0]}` failed with exit status {proc.returncode} (its message is above)"
        )


def read_metrics(run_dir: Path) -> list[dict]:
    """A run's metrics.jsonl: one dict per finished epoch."""
    return [
        json.loads(line)
        for line in (run_dir / "metrics.jsonl").read_text().splitlines()
        if line.strip()
    ]


def cache_figures(cache: Path) -> dict:
    """Teacher top-1 on val from the cache's own val logits, and bytes per row, with plain zarr."""
    import zarr

    group = zarr.open_group(str(cache), mode="r")
    out = {}
    if "val" in group and "logits" in group["val"]:
        logits = group["val/logits"][:].astype(np.float32)
        if "scale" in group["val"]:  # int8 codec: per-row affine
            logits = logits * group["val/scale"][:][:, None] + group["val/offset"][:][:, None]
        out["teacher_val_top1"] = float((logits.argmax(1) == group["val/label"][:]).mean())
    files = [
        f
        for name in ("logits", "scale", "offset")
        if (cache / "views" / name).exists()
        for f in (cache / "views" / name).rglob("*")
        if f.is_file()
    ]
    k, n, c = group["views/logits"].shape
    out["bytes_per_row"] = sum(f.stat().st_size for f in files) / (k * n)
    out["views"], out["rows"], out["classes"] = k, n, c
    return out


# ---------------------------------------------------------------------------------------------
# The demo

STUDENTS = (
    ("none", "student, hard labels only (--kd none)"),
    ("skd", "student, spherical KD from the cache (--kd skd)"),
    ("hinton", "student, Hinton KD from the cache (--kd hinton)"),
)


def positive(text: str) -> int:
    """An argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not >= 1")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The demo's options; args.kd becomes the list of students to train."""
    parser = argparse.ArgumentParser(
        prog="python -m skd.demo", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--dir", type=Path, default=Path("demo"), help="where everything goes (default: demo)"
    )
    parser.add_argument("--loader", default="dali", choices=["dali", "torchvision"])
    parser.add_argument("--teacher-epochs", type=positive, default=30)
    parser.add_argument(
        "--epochs", type=positive, default=40, help="student epochs; the cache holds as many views"
    )
    parser.add_argument("--batch-size", type=positive, default=64)
    parser.add_argument(
        "--lr", type=float, default=0.8, help="student learning rate per 256 images"
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--kd", default="none,skd,hinton", help="students to train (default: none,skd,hinton)"
    )
    args = parser.parse_args(argv)
    args.kd = [kd for kd in args.kd.split(",") if kd]
    unknown = set(args.kd) - {kd for kd, _ in STUDENTS}
    if unknown:
        parser.error(f"--kd: unknown {', '.join(sorted(unknown))}; choose from none, skd, hinton")
    return args


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def write_dataset(data: Path) -> dict:
    """Step 1: the digits as JPEGs; returns the image count per split."""
    print(f"[1/5] scikit-learn's digits as JPEGs in {data}/{{train,val}}/<digit>/", flush=True)
    counts = write_digits(data)
    print(
        f"  {counts['train']} train and {counts['val']} val images, {CANVAS}x{CANVAS} RGB, "
        f"trained at {IMAGE_SIZE}x{IMAGE_SIZE}",
        flush=True,
    )
    return counts


def train_the_teacher(data: Path, weights: Path, epochs: int) -> None:
    """Step 2: the teacher, trained in memory before the product sees it."""
    print(
        f"\n[2/5] teacher py:skd.demo:teacher ({count_parameters(teacher()):,} parameters): "
        f"{epochs} epochs in memory -> {weights}",
        flush=True,
    )
    train_teacher(data, weights, epochs=epochs)


def build_and_inspect_cache(
    args: argparse.Namespace, data: Path, weights: Path, cache: Path
) -> None:
    """Step 3, stage one: `skd-cache build` with the teacher, then `skd-cache stats` and `verify` on
    its cache."""
    print(
        f"\n[3/5] stage one: the teacher's logits on {args.epochs} recorded augmented views, then a look at them",
        flush=True,
    )
    build = options(
        teacher="py:skd.demo:teacher",
        weights=weights,
        data=data,
        out=cache,
        views=args.epochs,
        image_size=IMAGE_SIZE,
        codec="int8",
        batch_size=256,
        shard_size=1024,
        chunk_size=256,
        overwrite=True,
        device="cpu",
        loader=args.loader,
        workers=args.workers,
    )
    run("skd-cache", "build", *build)
    run("skd-cache", "stats", str(cache))
    run("skd-cache", "verify", str(cache), *options(samples=64, workers=args.workers))


def train_students(args: argparse.Namespace, cache: Path, runs: Path) -> dict[str, list[dict]]:
    """Step 4, stage two: one `skd-train` per chosen --kd on the cached views; returns each run's
    metrics."""
    print(
        f"\n[4/5] stage two: student py:skd.demo:student ({count_parameters(student()):,} "
        f"parameters), {args.epochs} epochs on the cached views, no teacher loaded",
        flush=True,
    )
    results = {}
    for kd in args.kd:
        out = runs / kd
        train = options(
            cache=cache,
            arch="py:skd.demo:student",
            kd=kd,
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            schedule="cosine",
            warmup_epochs=1,
            weight_decay="5e-4",
            alpha=0.9,
            temperature=4,
            multiplier="auto",
            out=out,
            overwrite=True,  # a rerun of the demo starts its runs again
            device="cpu",
            loader=args.loader,
            workers=args.workers,
        )
        run("skd-train", *train)
        results[kd] = read_metrics(out)
    return results


def print_results(counts: dict, cache: Path, results: dict[str, list[dict]]) -> None:
    """Step 5: validation top-1 of the teacher (from the cache) and of each student, and what the
    cache costs."""
    figures = cache_figures(cache)
    print(
        f"\n[5/5] top-1 on the {counts['val']} validation images (centre crop, {IMAGE_SIZE}x{IMAGE_SIZE}); "
        "students: last epoch, best epoch in brackets\n"
    )
    print(
        f"  {'teacher (from the cache val/logits)':<50} {figures.get('teacher_val_top1', float('nan')):>6.1%}"
    )
    for kd, label in STUDENTS:
        if kd in results:
            last = results[kd][-1]
            best = max(m["val_top1"] for m in results[kd])
            agree = last.get("val_teacher_agreement")
            print(
                f"  {label:<50} {last['val_top1']:>6.1%}  ({best:.1%})"
                + (f"  agrees with the teacher on {agree:.1%}" if agree is not None else "")
            )
    print(
        f"\n  cache: {figures['views']} views x {figures['rows']:,} rows x {figures['classes']} classes, int8 codec, "
        f"{figures['bytes_per_row']:.1f} B per row of logits on disk"
    )
    speeds = ", ".join(
        f"{kd} {np.mean([m['images_per_sec'] for m in r]):,.0f}" for kd, r in results.items()
    )
    print(f"  student training, images/s (mean over epochs): {speeds}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    clock = time.perf_counter()
    base = args.dir
    data, weights, cache = base / "digits", base / "teacher.pth", base / "cache"
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", THREADS)))

    counts = write_dataset(data)
    train_the_teacher(data, weights, args.teacher_epochs)
    build_and_inspect_cache(args, data, weights, cache)
    results = train_students(args, cache, base / "runs")
    print_results(counts, cache, results)

    where = " (`make clean` removes it)" if base == Path("demo") else ""
    print(f"  demo time {time.perf_counter() - clock:.0f} s; all of it is in {base}/{where}")


if __name__ == "__main__":
    main()
