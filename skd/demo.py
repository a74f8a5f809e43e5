"""The whole product in a few minutes on a CPU: `python -m skd.demo` (what `make demo` runs).

Real images that ship with an installed package: scikit-learn's 1,797 bundled 8x8 handwritten
digits, upscaled and written out as an ImageFolder of JPEGs (demo/digits/{train,val}/<digit>/).
Then, exactly as on ImageNet:

1. train a small CNN teacher for a few epochs (plain torch, in memory) -> demo/teacher.pth;
2. `skd-cache build` runs that teacher over recorded augmented views -> demo/cache;
3. `skd-cache stats` and `skd-cache verify` look at the cache (skipped where absent);
4. `skd-train` trains a smaller student on the same views three times, no teacher loaded: hard
   labels only (`--kd none`), spherical KD (`--kd skd`) and Hinton KD (`--kd hinton`), both KD
   runs from the cached logits;
5. a table: teacher and students' validation top-1, and the cache's bytes per row.

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
CANVAS = 32  # side of the written JPEGs
IMAGE_SIZE = 16  # side of the training views (--image-size): the digits themselves are 8x8
VAL_FRACTION = 0.2
DATASET_VERSION = 2  # bump when the written images change


# ---------------------------------------------------------------------------------------------
# Models


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class Teacher(nn.Module):
    """A small VGG-style CNN (0.29 M parameters): the demo's stand-in for ResNet-152."""

    def __init__(self, num_classes: int = NUM_CLASSES, width: int = 32):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            _conv(3, w),
            _conv(w, w),
            _conv(w, 2 * w, 2),
            _conv(2 * w, 2 * w),
            _conv(2 * w, 4 * w, 2),
            _conv(4 * w, 4 * w),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.fc = nn.Linear(4 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


class Student(nn.Module):
    """A much smaller CNN (24 k parameters, 1/12 of the teacher): the demo's stand-in for ResNet-18.

    The classifier starts with logits of spread ~1 (normal init, std 0.3) instead of PyTorch's
    ~0.25. SKD's layer norm divides the student's gradient by the spread of its logits: from a
    small spread the first steps blow the classifier's weights up about tenfold, and SKD runs
    with PyTorch's init ended anywhere between 76% and 90% depending on the seed (87-88% with this
    init). Hard-label and Hinton training do not mind; every student here uses the same init.
    """

    def __init__(self, num_classes: int = NUM_CLASSES, width: int = 16):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            _conv(3, w), _conv(w, 2 * w, 2), _conv(2 * w, 4 * w, 2), nn.AdaptiveAvgPool2d(1), nn.Flatten()
        )
        self.fc = nn.Linear(4 * w, num_classes)
        nn.init.normal_(self.fc.weight, std=0.3)
        nn.init.zeros_(self.fc.bias)

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

    The digit is upscaled to 55-80% of the canvas and placed inside the part that the validation
    centre crop keeps (224/256 of the side), in a random ink colour on a dark background.
    """
    from PIL import Image

    gray = Image.fromarray((np.asarray(pixels, np.float64).reshape(8, 8) * (255 / 16)).astype(np.uint8), "L")
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
            raise SystemExit(f"demo: {root} exists and was not written by the demo: choose another --dir")
        shutil.rmtree(root)  # an earlier demo's images, written with other settings
    root.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"source": manifest["source"]}) + "\n")  # ours even if stopped part-way
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


# ---------------------------------------------------------------------------------------------
# Teacher training: in memory, the same kind of views the cache records


def crop_batch(images: torch.Tensor, boxes: np.ndarray, flips: np.ndarray, size: int) -> torch.Tensor:
    """Crop windows (y, x, h, w), resize to size x size (bilinear), mirror, normalise like the pipelines."""
    from torchvision.ops import roi_align

    from .pipelines import IMAGENET_MEAN, IMAGENET_STD

    b = torch.as_tensor(boxes, dtype=torch.float32)
    rois = torch.stack(
        [torch.arange(len(b), dtype=torch.float32), b[:, 1], b[:, 0], b[:, 1] + b[:, 3], b[:, 0] + b[:, 2]], dim=1
    )
    out = roi_align(images.float() / 255, rois, output_size=size, spatial_scale=1.0, sampling_ratio=2, aligned=True)
    mirror = torch.as_tensor(flips, dtype=torch.bool)
    out[mirror] = out[mirror].flip(-1)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (out - mean) / std


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, size: int) -> float:
    """Top-1 on the validation windows the product uses (centre square, 224/256 of the shorter side)."""
    from .plan import VAL_CROP_FRACTION, center_boxes

    sizes = np.tile(images.shape[2:], (len(images), 1))
    boxes = center_boxes(sizes, VAL_CROP_FRACTION)
    model.eval()
    with torch.no_grad():
        logits = torch.cat(
            [
                model(crop_batch(images[i : i + 512], boxes[i : i + 512], np.zeros(len(boxes[i : i + 512])), size))
                for i in range(0, len(images), 512)
            ]
        )
    model.train()
    return float((logits.argmax(1) == labels).float().mean())


def train_teacher(
    root: Path, out: Path, *, epochs: int, batch_size: int = 64, lr: float = 3e-3, size: int = IMAGE_SIZE, seed: int = 0
) -> float:
    """Train the teacher on RandomResizedCrop + flip views (drawn like the cache's plan); returns val top-1."""
    from .plan import crop_windows, flips

    torch.manual_seed(seed)
    images, labels = load_split(root, "train")
    val_images, val_labels = load_split(root, "val")
    model = Teacher()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    steps = epochs * -(-len(images) // batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.2)
    sizes = np.tile(images.shape[2:], (len(images), 1))
    for epoch in range(epochs):
        start = time.perf_counter()
        # plan seed 1000 + seed: fresh views, never those of the cache's plan (seed 0)
        order = np.random.default_rng([seed, epoch]).permutation(len(images))
        boxes = crop_windows(1000 + seed, epoch, order, sizes[order])
        mirror = flips(1000 + seed, epoch, order)
        total = 0.0
        for i in range(0, len(order), batch_size):
            ids = order[i : i + batch_size]
            x = crop_batch(images[ids], boxes[i : i + batch_size], mirror[i : i + batch_size], size)
            loss = nn.functional.cross_entropy(model(x), labels[ids])  # no label smoothing: it flattens KD targets
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += float(loss.detach()) * len(ids)
        top1 = accuracy(model, val_images, val_labels, size)
        print(
            f"  teacher epoch {epoch}: train_loss {total / len(order):.4f}, val_top1 {top1:.4f} "
            f"({time.perf_counter() - start:.1f} s)",
            flush=True,
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), out)
    return top1


# ---------------------------------------------------------------------------------------------
# Running the product's commands

# The demo's models are tiny: one intra-op thread runs them as fast as two, and on a busy 2-core
# machine two OpenMP threads made the teacher's training step 20 times slower (spinning threads
# waiting for each other). DALI's decoding threads (--workers) use the other core.
THREADS = "1"


def command(name: str) -> list[str]:
    """The console script `name` next to this Python (the venv's bin), or the same entry point via -c."""
    script = Path(sys.executable).parent / name
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    entry = {"skd-cache": "main_cache", "skd-train": "main_train"}[name]
    return [sys.executable, "-c", f"import sys; sys.argv[0] = {name!r}; from skd.cli import {entry}; {entry}()"]


def run(name: str, *args: str) -> None:
    """Run a product command as a user would, echoing it; stop the demo if it fails."""
    print(f"\n$ {name} {' '.join(args)}", flush=True)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", THREADS)
    proc = subprocess.run(command(name) + list(args), env=env)
    if proc.returncode != 0:
        sys.exit(f"demo: `{name} {args[0]}` failed with exit status {proc.returncode} (its message is above)")


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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m skd.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, default=Path("demo"), help="where everything goes (default: demo)")
    parser.add_argument("--loader", default="dali", choices=["dali", "torchvision"])
    parser.add_argument("--teacher-epochs", type=positive, default=30)
    parser.add_argument("--epochs", type=positive, default=40, help="student epochs; the cache holds as many views")
    parser.add_argument("--batch-size", type=positive, default=64)
    parser.add_argument("--lr", type=float, default=0.8, help="student learning rate per 256 images")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--kd", default="none,skd,hinton", help="students to train (default: none,skd,hinton)")
    args = parser.parse_args(argv)
    chosen = [kd for kd in args.kd.split(",") if kd]
    unknown = set(chosen) - {kd for kd, _ in STUDENTS}
    if unknown:
        parser.error(f"--kd: unknown {', '.join(sorted(unknown))}; choose from none, skd, hinton")

    clock = time.perf_counter()
    base = args.dir
    data, weights, cache, runs = base / "digits", base / "teacher.pth", base / "cache", base / "runs"
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", THREADS)))

    print(f"[1/5] scikit-learn's digits as JPEGs in {data}/{{train,val}}/<digit>/", flush=True)
    counts = write_digits(data)
    print(
        f"  {counts['train']} train and {counts['val']} val images, {CANVAS}x{CANVAS} RGB, "
        f"trained at {IMAGE_SIZE}x{IMAGE_SIZE}",
        flush=True,
    )

    print(
        f"\n[2/5] teacher py:skd.demo:teacher ({sum(p.numel() for p in Teacher().parameters()):,} parameters): "
        f"{args.teacher_epochs} epochs in memory -> {weights}",
        flush=True,
    )
    train_teacher(data, weights, epochs=args.teacher_epochs)

    print(
        f"\n[3/5] stage one: the teacher's logits on {args.epochs} recorded augmented views, then a look at them",
        flush=True,
    )
    common = ["--device", "cpu", "--loader", args.loader, "--workers", str(args.workers)]
    run(
        "skd-cache",
        "build",
        "--teacher",
        "py:skd.demo:teacher",
        "--weights",
        str(weights),
        "--data",
        str(data),
        "--out",
        str(cache),
        "--views",
        str(args.epochs),
        "--image-size",
        str(IMAGE_SIZE),
        "--codec",
        "int8",
        "--batch-size",
        "256",
        "--shard-size",
        "1024",
        "--chunk-size",
        "256",
        "--overwrite",
        *common,
    )
    for sub, extra in (("stats", []), ("verify", ["--samples", "64", "--workers", str(args.workers)])):
        if has_subcommand(sub):
            run("skd-cache", sub, str(cache), *extra)
        else:
            print(f"\n(skd-cache {sub} is not in this version: skipped)", flush=True)

    print(
        f"\n[4/5] stage two: student py:skd.demo:student ({sum(p.numel() for p in Student().parameters()):,} "
        f"parameters), {args.epochs} epochs on the cached views, no teacher loaded",
        flush=True,
    )
    results = {}
    for kd in chosen:
        out = runs / kd  # --overwrite: a rerun of the demo starts its runs again
        run(
            "skd-train",
            "--cache",
            str(cache),
            "--arch",
            "py:skd.demo:student",
            "--kd",
            kd,
            "--epochs",
            str(args.epochs),
            "--batch-size",
            str(args.batch_size),
            "--lr",
            str(args.lr),
            "--schedule",
            "cosine",
            "--warmup-epochs",
            "1",
            "--weight-decay",
            "5e-4",
            "--alpha",
            "0.9",
            "--temperature",
            "4",
            "--multiplier",
            "auto",
            "--out",
            str(out),
            "--overwrite",
            *common,
        )
        results[kd] = read_metrics(out)

    figures = cache_figures(cache)
    print(
        f"\n[5/5] top-1 on the {counts['val']} validation images (centre crop, {IMAGE_SIZE}x{IMAGE_SIZE}); "
        "students: last epoch, best epoch in brackets\n"
    )
    print(f"  {'teacher (from the cache val/logits)':<50} {figures.get('teacher_val_top1', float('nan')):>6.1%}")
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
    speeds = ", ".join(f"{kd} {np.mean([m['images_per_sec'] for m in r]):,.0f}" for kd, r in results.items())
    print(f"  student training, images/s (mean over epochs): {speeds}")
    where = " (`make clean` removes it)" if base == Path("demo") else ""
    print(f"  demo time {time.perf_counter() - clock:.0f} s; all of it is in {base}/{where}")


if __name__ == "__main__":
    main()
