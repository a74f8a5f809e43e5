"""Helpers shared by the benchmark scripts: synthetic caches, timing, machine description, tables."""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from skd.store.codecs import get_codec

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from handmade import cache_meta, write_shard  # noqa: E402  (a handmade cache's attributes, a shard written)
from jpegs import photo_like  # noqa: E402  (the tests' JPEG content, one definition)

from skd.data.index import Split
from skd.plan.crops import ViewPlan
from skd.store.cache_store import Store
from skd.store.creation import create_store


def teacher_like_rows(rng: np.random.Generator, n: int, classes: int) -> np.ndarray:
    """Rows shaped like a classifier's logits: a Gaussian bulk, a per-row offset and one peak of 0-8 std."""
    x = rng.normal(0, 1.2, (n, classes)).astype(np.float32)
    x += rng.normal(0, 1, (n, 1)).astype(np.float32)
    x[np.arange(n), rng.integers(0, classes, n)] += rng.uniform(0, 10, n).astype(np.float32)
    return x


def synthetic_store(
    path: Path,
    rows: int,
    classes: int = 1000,
    codec: str = "int8",
    shard_rows: int = 16384,
    chunk_rows: int = 1024,
    seed: int = 0,
) -> Store:
    """A one-view cache of teacher-like rows written shard by shard (handmade.write_shard)."""
    rng = np.random.default_rng(seed)
    meta = cache_meta(
        codec=codec,
        views=1,
        num_samples=rows,
        classes=[f"c{i}" for i in range(classes)],
        shard_rows=shard_rows,
        chunk_rows=chunk_rows,
    )
    # every image 64 x 64 pixels; each window is the whole image (the store checks windows lie
    # inside)
    side = 64
    train = Split(
        [f"train/c/{i}.JPEG" for i in range(rows)],
        rng.integers(0, classes, rows),
        np.full((rows, 2), side),
    )
    whole_image = np.tile(np.array([0, 0, side, side], np.int32), (rows, 1))
    plan = ViewPlan(order=rng.permutation(rows), box=whole_image, flip=np.zeros(rows))
    store = create_store(
        path, meta, train=train, plans=[plan], val=None, val_boxes=None, num_classes=classes
    )
    enc = get_codec(codec)
    for shard in range(store.num_shards(rows)):
        a, b = store.shard_bounds(shard, rows)
        write_shard(store, 0, shard, enc.encode(teacher_like_rows(rng, b - a, classes)))
    return store


def timed(fn, repeat: int = 3) -> list[float]:
    """Wall seconds of `repeat` calls of fn()."""
    out = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def machine() -> str:
    """One line: CPU model, cores, Python, torch, zarr."""
    import torch
    import zarr

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{cpu}, {os.cpu_count()} cores, {gpu}; Python {platform.python_version()}, torch {torch.__version__}, "
        f"zarr {zarr.__version__}"
    )


def git_state() -> str:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
        ).stdout.strip()
        return head + ("+changes" if dirty else "")
    except OSError:
        return "unknown"


def table(header: list[str], rows: list[list]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


PHOTOS = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "motorcycle_left",
    "motorcycle_right",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "camera",
    "coins",
    "grass",
    "gravel",
    "brick",
    "clock",
    "moon",
    "page",
    "horse",
    "text",
    "colorwheel",
)


def skimage_photos() -> dict[str, np.ndarray]:
    """The photos scikit-image ships (no download), as HxWx3 uint8; grey ones replicated to RGB."""
    import skimage.data

    out = {}
    for name in PHOTOS:
        try:
            if name.startswith("motorcycle"):
                img = skimage.data.stereo_motorcycle()[0 if name.endswith("left") else 1]
            else:
                img = getattr(skimage.data, name)()
        except Exception:  # a photo that needs a download: skip it
            continue
        img = np.asarray(img)
        if img.dtype == bool:
            img = img.astype(np.uint8) * 255
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, axis=2)
        out[name] = np.ascontiguousarray(img[..., :3].astype(np.uint8))
    return out


def photo_folder(root: Path, copies: int = 1, split: str = "train", max_side: int = 512) -> Path:
    """ROOT/<split>/<photo>/<photo>_<i>.JPEG: each scikit-image photo as a class (`copies` files each),
    shrunk to at most `max_side` pixels (ImageNet's typical size; it keeps JPEG decoding cheap)."""
    from PIL import Image

    for name, img in skimage_photos().items():
        folder = root / split / name
        folder.mkdir(parents=True, exist_ok=True)
        image = Image.fromarray(img)
        if max(image.size) > max_side:
            image.thumbnail((max_side, max_side), Image.BICUBIC)
        for i in range(copies):
            image.save(folder / f"{name}_{i:03d}.JPEG", quality=95)
    return root


def _write_one(job) -> None:
    from PIL import Image

    path, h, w, seed = job
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(photo_like(h, w, seed)).save(path, "JPEG", quality=90)


def synthetic_jpeg_folder(
    root: Path, count: int, size: int, classes: int = 10, seed: int = 0, processes: int = 1
) -> Path:
    """ROOT/train/c<k>/*.JPEG: `count` photo-like JPEGs of about size x size pixels (aspect 0.8-1.25)."""
    rng = np.random.default_rng(seed)
    jobs = []
    for i in range(count):
        h, w = (int(v) for v in rng.integers(int(size * 0.8), int(size * 1.25) + 1, 2))
        jobs.append((root / "train" / f"c{i % classes:03d}" / f"{i:06d}.JPEG", h, w, [seed, i]))
    if processes > 1:
        import multiprocessing

        with multiprocessing.get_context("fork").Pool(processes) as pool:
            pool.map(_write_one, jobs, chunksize=16)
    else:
        for job in jobs:
            _write_one(job)
    return root


def steps_in_epoch(images: int, batch: int) -> int:
    """Steps skd.train.loop takes over one view of `images` in one process (it leaves out a last batch of one)."""
    from skd.replay.view_loader import rank_range

    start, stop = rank_range(images, 0, 1, batch)
    return -(-(stop - start) // batch)


def train_rate(cfg, warmup: int, steps_per_epoch: int) -> float:
    """Images/s of one `skd.train.loop.train` run, steps `warmup`..last of every epoch (loader start-up left out).

    On CUDA the device is synchronised at the two ends of each measured stretch (not at every step).
    `steps_per_epoch` is the number of steps each epoch really takes.
    """
    import torch

    from skd.train.loop import train

    cuda = str(cfg.device).startswith("cuda") or (
        cfg.device == "auto" and torch.cuda.is_available()
    )
    marks: dict[int, list[float]] = {}

    def on_step(epoch, step, parts):
        if step in (warmup, steps_per_epoch - 1):
            if cuda:
                torch.cuda.synchronize()
            marks.setdefault(epoch, []).append(time.perf_counter())

    train(cfg, on_step=on_step)
    spans = [(t[1] - t[0]) for t in marks.values() if len(t) == 2]
    steps = len(spans) * (steps_per_epoch - 1 - warmup)
    return steps * cfg.batch_size / sum(spans)


@contextlib.contextmanager
def teacher_loop_timer():
    """Time the build's teacher loop (and the writer's final flush) from outside, while a build runs.

    Yields [seconds, images]: filled in as `skd.build.teacher_pass.write_teacher_logits` and `ShardWriter.close` return.
    """
    import skd.build.teacher_pass

    spent = [0.0, 0]
    original_run, original_close = (
        skd.build.teacher_pass.write_teacher_logits,
        skd.build.teacher_pass.ShardWriter.close,
    )

    def write_teacher_logits(*a, **k):
        t = time.perf_counter()
        n = original_run(*a, **k)
        spent[0] += time.perf_counter() - t
        spent[1] += n
        return n

    def close(self):
        t = time.perf_counter()
        original_close(self)
        spent[0] += time.perf_counter() - t

    skd.build.teacher_pass.write_teacher_logits, skd.build.teacher_pass.ShardWriter.close = (
        write_teacher_logits,
        close,
    )
    try:
        yield spent
    finally:
        skd.build.teacher_pass.write_teacher_logits, skd.build.teacher_pass.ShardWriter.close = (
            original_run,
            original_close,
        )
