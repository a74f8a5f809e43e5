"""Stage-one pipelining: build images/s against the slower of its two parts run alone.

Three measurements alternate in rounds on the same views (the machine is shared: compare within a round):
  build    skd.build.build_cache over fresh caches; images/s inside its decode -> teacher -> encode/write
           loop (time spent in skd.build.write_teacher_logits, the writer's last flush included)
  loader   the same loader (pipelines.make_loader, torchvision, same views, batch and workers), no teacher
  teacher  the teacher's forward on in-memory tensors of the same shape, no loader
Target (issue 6): build / min(loader, teacher) >= 0.85. On a CPU-only machine the loader's workers and the
teacher share the same cores, so the serial bound 1 / (1/loader + 1/teacher) is printed beside it.

Usage: python benchmarks/build_pipelining.py [--images 1024] [--size 64] [--batch 64] [--teacher resnet18]
       [--threads 1] [--workers 1] [--jpeg-size 320] [--rounds 3] [--device cpu] [--amp none]
On 2 CPU cores the defaults give the teacher one core (1 thread) and the loader the other (1 worker), with
the two sized to similar speeds: the case where overlap matters most.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torchvision
from bench_common import git_state, machine, synthetic_jpeg_folder, table, teacher_loop_timer

from skd import pipelines
from skd.build import BuildConfig, build_cache
from skd.runtime import AMP_DTYPES
from skd.store import open_store

CLASSES = 1000  # an ImageNet head: the writer encodes and compresses rows of 1000 logits


def timed_build(cfg: BuildConfig) -> tuple[float, float, float]:
    """(images/s inside the teacher loop, whole build seconds, cores busy on average) of one fresh build.

    Cores busy = CPU seconds of this process and its loader workers / wall seconds: about 1 where the
    machine gave the build one core, which leaves nothing to overlap on a CPU-only machine."""
    with teacher_loop_timer() as spent:
        if cfg.out.exists():
            shutil.rmtree(cfg.out)
        t, cpu = time.perf_counter(), os.times()
        build_cache(cfg)
        total = time.perf_counter() - t
        cpu_end = os.times()
    busy = sum(getattr(cpu_end, f) - getattr(cpu, f) for f in ("user", "system", "children_user", "children_system"))
    return spent[1] / spent[0], total, busy / total


def loader_rate(cfg: BuildConfig, cache: Path, device: torch.device) -> float:
    store = open_store(cache)
    split = store.split("samples")
    images = 0
    t = time.perf_counter()
    for view in range(store.num_views):
        order, box, flip = store.view_plan(view)
        loader = pipelines.make_loader(
            cfg.loader,
            files=[str(cfg.data / split.paths[i]) for i in order],
            boxes=box,
            flips=flip,
            labels=split.labels[order],
            positions=np.arange(len(order)),
            image_size=cfg.image_size,
            batch_size=cfg.batch_size,
            workers=cfg.workers,
            device=device,
        )
        for batch in loader:
            images += len(batch.labels)
    return images / (time.perf_counter() - t)


def teacher_rate(model, cfg: BuildConfig, device: torch.device, steps: int) -> float:
    x = torch.randn(cfg.batch_size, 3, cfg.image_size, cfg.image_size, device=device)
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    dtype = AMP_DTYPES[cfg.amp]
    with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        model(x).float().cpu()
        t = time.perf_counter()
        for _ in range(steps):
            model(x).float().cpu()
    return steps * cfg.batch_size / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=1024)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--views", type=int, default=1)
    ap.add_argument("--teacher", default="resnet18")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--amp", default="none")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the teacher (build and alone)")
    ap.add_argument("--jpeg-size", type=int, default=320, help="side of the source JPEGs (decode cost)")
    ap.add_argument("--dir", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        work = Path(tmp)
        root = synthetic_jpeg_folder(work / "data", args.images, args.jpeg_size)
        torch.manual_seed(0)
        model = torchvision.models.get_model(args.teacher, num_classes=CLASSES)
        weights = work / "teacher.pth"
        torch.save(model.state_dict(), weights)
        model = model.eval().to(device)
        if device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        cfg = BuildConfig(
            teacher=args.teacher,
            weights=str(weights),
            data=root,
            out=work / "cache",
            views=args.views,
            image_size=args.size,
            batch_size=args.batch,
            codec="int8",
            amp=args.amp,
            device=args.device,
            loader="torchvision",
            workers=args.workers,
            val=False,
            shard_rows=256,
            chunk_rows=64,
        )
        steps = max(4, args.images * args.views // args.batch // 2)
        rates: dict[str, list[float]] = {"build": [], "loader": [], "teacher": []}
        totals, cores = [], []
        load = [os.getloadavg()[0]]
        for r in range(args.rounds):
            b, total, busy = timed_build(cfg)
            rates["build"].append(b)
            totals.append(total)
            cores.append(busy)
            rates["loader"].append(loader_rate(cfg, cfg.out, device))
            rates["teacher"].append(teacher_rate(model, cfg, device, steps))
            load.append(os.getloadavg()[0])
            print(
                f"round {r}: "
                + ", ".join(f"{n} {v[-1]:,.1f}" for n, v in rates.items())
                + f" (whole build {total:.1f} s, {busy:.2f} cores busy)",
                flush=True,
            )
    ratios = [b / min(lo, te) for b, lo, te in zip(rates["build"], rates["loader"], rates["teacher"])]
    serial = [1 / (1 / lo + 1 / te) / min(lo, te) for lo, te in zip(rates["loader"], rates["teacher"])]
    print(
        f"\n{machine()}; git {git_state()}; device {args.device}, AMP {args.amp}; teacher {args.teacher} "
        f"({CLASSES} classes, {args.threads} torch threads), {args.images} JPEGs of ~{args.jpeg_size} px "
        f"x {args.views} "
        f"views at {args.size} px, batch {args.batch}, loader torchvision with {args.workers} workers, shards of 256 "
        f"rows; load average "
        f"{min(load):.1f}-{max(load):.1f}"
    )
    print(table(["part", "images/s (median)"], [[n, f"{statistics.median(v):,.1f}"] for n, v in rates.items()]))
    print()
    print(
        table(
            ["measure", "value", "target"],
            [
                ["build / min(loader, teacher)", f"{statistics.median(ratios):.2f}", ">= 0.85"],
                [
                    "serial bound (1 / (1/loader + 1/teacher)) / min",
                    f"{statistics.median(serial):.2f}",
                    "what no overlap at all would give",
                ],
                [
                    "cores busy during the build (CPU seconds / wall seconds)",
                    f"{statistics.median(cores):.2f}",
                    "near 1: the machine gave one core, so nothing could overlap",
                ],
            ],
        )
    )


if __name__ == "__main__":
    main()
