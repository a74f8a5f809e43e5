"""The whole product in a few minutes on a CPU: `python -m skd.demo` (what `make demo` runs).

Real images that ship with an installed package: scikit-learn's 1,797 bundled 8x8 handwritten
digits, upscaled and written out as an ImageFolder of JPEGs (demo/digits/{train,val}/<digit>/).
Then, exactly as on ImageNet:

1. train a small CNN teacher for a few epochs (plain torch, in memory) -> demo/teacher.pth;
2. `skd-cache build` runs that teacher over recorded augmented views -> demo/cache;
3. `skd-cache stats` describes the cache (when that command exists);
4. `skd-train` trains a smaller student twice from the same views: hard labels only
   (`--kd none`) and spherical KD from the cached logits (`--kd skd`);
5. a table: teacher, student without KD, student with SKD, and the cache's bytes per row.

The models are importable as `py:skd.demo:teacher` and `py:skd.demo:student`, the form in which
`--teacher` and `--arch` accept any model. Importing this module is cheap and has no side effects.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

NUM_CLASSES = 10
CANVAS = 40  # side of the written JPEGs
IMAGE_SIZE = 32  # side of the training views (--image-size)
VAL_FRACTION = 0.2
DATASET_VERSION = 1  # bump when the written images change


# ---------------------------------------------------------------------------------------------
# Models


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class Teacher(nn.Module):
    """A small VGG-style CNN (about 0.3 M parameters): the demo's stand-in for ResNet-152."""

    def __init__(self, num_classes: int = NUM_CLASSES, width: int = 32):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            _conv(3, w), _conv(w, w),
            _conv(w, 2 * w, 2), _conv(2 * w, 2 * w),
            _conv(2 * w, 4 * w, 2), _conv(4 * w, 4 * w),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(4 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


class Student(nn.Module):
    """A much smaller CNN (a few thousand parameters): the demo's stand-in for ResNet-18."""

    def __init__(self, num_classes: int = NUM_CLASSES, width: int = 8):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            _conv(3, w, 2), _conv(w, 2 * w, 2), _conv(2 * w, 4 * w, 2),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(4 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def teacher(num_classes: int = NUM_CLASSES) -> Teacher:
    """`--teacher py:skd.demo:teacher`."""
    return Teacher(num_classes)


def student(num_classes: int = NUM_CLASSES) -> Student:
    """`--arch py:skd.demo:student`."""
    return Student(num_classes)


# ---------------------------------------------------------------------------------------------
# The dataset: scikit-learn's digits as an ImageFolder of JPEGs


def split_ids(labels: np.ndarray, val_fraction: float = VAL_FRACTION, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
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
    """One 8x8 digit (values 0..16) as a canvas x canvas RGB uint8 image: random size, place and ink.

    The digit is upscaled to 22-32 px and placed inside the central part of the canvas (the
    validation centre crop keeps 35 of 40 px), in a random ink colour on a dark background.
    """
    from PIL import Image

    gray = Image.fromarray((np.asarray(pixels, np.float64).reshape(8, 8) * (255 / 16)).astype(np.uint8), "L")
    side = int(rng.integers(22, 33))
    gray = gray.resize((side, side), Image.BICUBIC)
    margin = (canvas - 35) // 2 + 1
    y, x = (int(v) for v in rng.integers(margin, canvas - margin - side + 1, 2))
    ink = np.asarray(gray, np.float32)[..., None] / 255 * rng.uniform(150, 255, 3)
    image = np.full((canvas, canvas, 3), rng.uniform(0, 40), np.float32)
    image[y:y + side, x:x + side] = np.maximum(image[y:y + side, x:x + side], ink)
    image += rng.normal(0, 4, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def write_digits(root: Path, *, seed: int = 0, canvas: int = CANVAS, quality: int = 92) -> dict:
    """Write root/{train,val}/<digit>/<id>.JPEG once (deterministic); returns the counts per split.

    A `manifest.json` records what was written; a root with the same manifest is left as it is.
    """
    from PIL import Image
    from sklearn.datasets import load_digits

    root = Path(root)
    manifest = {"source": "sklearn.datasets.load_digits", "version": DATASET_VERSION, "seed": seed,
                "canvas": canvas, "quality": quality, "val_fraction": VAL_FRACTION}
    marker = root / "manifest.json"
    if marker.is_file():
        old = json.loads(marker.read_text())
        if {k: old.get(k) for k in manifest} == manifest:
            return old["counts"]
    if root.exists():
        shutil.rmtree(root)
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
                folder / f"{int(i):04d}.JPEG", "JPEG", quality=quality)
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


# ---------------------------------------------------------------------------------------------
# Teacher training: in memory, the same kind of views the cache records


def crop_batch(images: torch.Tensor, boxes: np.ndarray, flips: np.ndarray, size: int) -> torch.Tensor:
    """Crop windows (y, x, h, w), resize to size x size (bilinear), mirror, normalise like the pipelines."""
    from torchvision.ops import roi_align

    from pipelines import IMAGENET_MEAN, IMAGENET_STD

    b = torch.as_tensor(boxes, dtype=torch.float32)
    rois = torch.stack([torch.arange(len(b), dtype=torch.float32), b[:, 1], b[:, 0], b[:, 1] + b[:, 3],
                        b[:, 0] + b[:, 2]], dim=1)
    out = roi_align(images.float() / 255, rois, output_size=size, spatial_scale=1.0, sampling_ratio=2, aligned=True)
    mirror = torch.as_tensor(flips, dtype=torch.bool)
    out[mirror] = out[mirror].flip(-1)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (out - mean) / std


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, size: int) -> float:
    """Top-1 on the validation windows the product uses (centre square, 224/256 of the shorter side)."""
    from .build import VAL_CROP_FRACTION
    from .plan import center_boxes

    sizes = np.tile(images.shape[2:], (len(images), 1))
    boxes = center_boxes(sizes, VAL_CROP_FRACTION)
    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(crop_batch(images[i:i + 512], boxes[i:i + 512], np.zeros(len(boxes[i:i + 512])), size))
                            for i in range(0, len(images), 512)])
    model.train()
    return float((logits.argmax(1) == labels).float().mean())


def train_teacher(root: Path, out: Path, *, epochs: int, batch_size: int = 64, lr: float = 0.05,
                  size: int = IMAGE_SIZE, seed: int = 0) -> float:
    """Train the teacher on RandomResizedCrop + flip views (drawn like the cache's plan); returns val top-1."""
    from .plan import crop_windows, flips

    torch.manual_seed(seed)
    images, labels = load_split(root, "train")
    val_images, val_labels = load_split(root, "val")
    model = Teacher()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    steps = epochs * -(-len(images) // batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.2)
    sizes = np.tile(images.shape[2:], (len(images), 1))
    for epoch in range(epochs):
        start = time.perf_counter()
        # seed 1000 + epoch: fresh views, never the cache's plan (seed 0)
        order = np.random.default_rng([seed, epoch]).permutation(len(images))
        boxes = crop_windows(1000 + seed, epoch, order, sizes[order])
        mirror = flips(1000 + seed, epoch, order)
        total = 0.0
        for i in range(0, len(order), batch_size):
            ids = order[i:i + batch_size]
            x = crop_batch(images[ids], boxes[i:i + batch_size], mirror[i:i + batch_size], size)
            loss = nn.functional.cross_entropy(model(x), labels[ids], label_smoothing=0.1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += float(loss) * len(ids)
        top1 = accuracy(model, val_images, val_labels, size)
        print(f"  teacher epoch {epoch}: train_loss {total / len(order):.4f}, val_top1 {top1:.4f} "
              f"({time.perf_counter() - start:.1f} s)", flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), out)
    return top1


# ---------------------------------------------------------------------------------------------
# Running the product's commands


def command(name: str) -> list[str]:
    """The console script `name` next to this Python (the venv's bin), or the same entry point via -c."""
    script = Path(sys.executable).parent / name
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    entry = {"skd-cache": "main_cache", "skd-train": "main_train"}[name]
    return [sys.executable, "-c", f"import sys; sys.argv[0] = {name!r}; from skd.cli import {entry}; {entry}()"]


def run(name: str, *args: str, capture: bool = False) -> str:
    """Run a product command as a user would, echoing it; stop the demo if it fails."""
    print(f"\n$ {name} {' '.join(args)}", flush=True)
    proc = subprocess.run(command(name) + list(args), text=True, stdout=subprocess.PIPE if capture else None)
    if capture and proc.stdout:
        print(proc.stdout, end="", flush=True)
    if proc.returncode != 0:
        sys.exit(f"demo: `{name} {args[0]}` failed with exit status {proc.returncode} (its message is above)")
    return proc.stdout or ""


def has_subcommand(name: str) -> bool:
    """Whether `skd-cache --help` lists the subcommand `name`."""
    proc = subprocess.run(command("skd-cache") + ["--help"], text=True, capture_output=True)
    lines = proc.stdout.split("Commands:", 1)[-1].splitlines()
    return any(line.split()[:1] == [name] for line in lines)


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


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
    logit_files = [f for name in ("logits", "scale", "offset") if (cache / "views" / name).exists()
                   for f in (cache / "views" / name).rglob("*") if f.is_file()]
    k, n, c = group["views/logits"].shape
    out["bytes_per_row"] = sum(f.stat().st_size for f in logit_files) / (k * n)
    out["views"], out["rows"], out["classes"] = k, n, c
    return out


# ---------------------------------------------------------------------------------------------
# The demo


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m skd.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, default=Path("demo"), help="where everything is written (default: demo)")
    parser.add_argument("--loader", default="dali", choices=["dali", "torchvision"])
    parser.add_argument("--teacher-epochs", type=int, default=12)
    parser.add_argument("--epochs", type=int, default=8, help="student epochs (one cached view each)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.8, help="student learning rate per 256 images")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)

    clock = time.perf_counter()
    base = args.dir
    data, weights, cache, runs = base / "digits", base / "teacher.pth", base / "cache", base / "runs"
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

    print(f"[1/5] scikit-learn's digits as JPEGs in {data}/{{train,val}}/<digit>/", flush=True)
    counts = write_digits(data)
    print(f"  {counts['train']} train and {counts['val']} val images, {CANVAS}x{CANVAS} RGB", flush=True)

    print(f"\n[2/5] teacher (py:skd.demo:teacher, {sum(p.numel() for p in Teacher().parameters()):,} parameters): "
          f"{args.teacher_epochs} epochs in memory -> {weights}", flush=True)
    train_teacher(data, weights, epochs=args.teacher_epochs)

    print("\n[3/5] stage one: the teacher's logits on recorded augmented views", flush=True)
    common = ["--loader", args.loader, "--workers", str(args.workers), "--device", "cpu"]
    run("skd-cache", "build", "--teacher", "py:skd.demo:teacher", "--weights", str(weights), "--data", str(data),
        "--out", str(cache), "--views", str(args.epochs), "--image-size", str(IMAGE_SIZE), "--codec", "int8",
        "--batch-size", "256", "--shard-size", "1024", "--chunk-size", "256", "--overwrite", *common)
    if has_subcommand("stats"):
        run("skd-cache", "stats", str(cache))
    else:
        print("\n(skd-cache stats is not available in this version: skipped)", flush=True)

    print(f"\n[4/5] stage two: the student (py:skd.demo:student, "
          f"{sum(p.numel() for p in Student().parameters()):,} parameters), {args.epochs} epochs, "
          "without and with the cached teacher", flush=True)
    results = {}
    for kd in ("none", "skd"):
        out = runs / kd
        if out.exists():
            shutil.rmtree(out)
        run("skd-train", "--cache", str(cache), "--arch", "py:skd.demo:student", "--kd", kd,
            "--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--lr", str(args.lr),
            "--schedule", "cosine", "--warmup-epochs", "1", "--weight-decay", "5e-4", "--alpha", "0.9",
            "--temperature", "4", "--multiplier", "auto", "--out", str(out), *common)
        results[kd] = read_metrics(out)

    figures = cache_figures(cache)
    seconds = time.perf_counter() - clock
    none, skd = results["none"][-1], results["skd"][-1]
    best = {kd: max(m["val_top1"] for m in results[kd]) for kd in results}
    print(f"\n[5/5] results: {counts['val']} validation images, centre crop {IMAGE_SIZE}x{IMAGE_SIZE}, "
          f"top-1 after the last epoch (best epoch in brackets)\n")
    rows = [("teacher (cached val logits)", f"{figures.get('teacher_val_top1', float('nan')):.1%}", ""),
            ("student, hard labels (--kd none)", f"{none['val_top1']:.1%}", f"({best['none']:.1%})"),
            ("student, SKD from the cache (--kd skd)", f"{skd['val_top1']:.1%}", f"({best['skd']:.1%})")]
    for name, value, extra in rows:
        print(f"  {name:<40} {value:>6} {extra}")
    print(f"\n  student agreement with the teacher: {none.get('val_teacher_agreement', float('nan')):.1%} "
          f"without KD, {skd.get('val_teacher_agreement', float('nan')):.1%} with SKD")
    print(f"  cache: {figures['views']} views x {figures['rows']:,} rows x {figures['classes']} classes, int8 codec, "
          f"{figures['bytes_per_row']:.1f} B per row of logits on disk")
    print(f"  student training speed: {np.mean([m['images_per_sec'] for m in results['none']]):,.0f} images/s "
          f"without KD, {np.mean([m['images_per_sec'] for m in results['skd']]):,.0f} with SKD")
    print(f"  demo time {seconds:.0f} s; everything is in {base}/ (`make clean` removes it)")


if __name__ == "__main__":
    main()
