"""Stage-one pipelining: build images/s against the slower of its two parts run alone.

Three measurements alternate in rounds on the same views (the machine is shared: compare within a round):
  build    skd.build.teacher_pass.build_cache over fresh caches; images/s inside its decode -> teacher -> encode/write
           loop (time spent in skd.build.teacher_pass.write_teacher_logits, the writer's last flush included)
  loader   the same loader (pipelines.make_loader, torchvision, same views, batch and workers), no teacher
  teacher  the teacher's forward on in-memory tensors of the same shape, no loader
Target (issue 6): build / min(loader, teacher) >= 0.85. On a CPU-only machine the loader's workers and the
teacher share the same cores, so the serial bound 1 / (1/loader + 1/teacher) is printed beside it.

--loaders names the loaders measured in the same rounds: torchvision, dali (its reader reads each batch's files
on threads up to READ_AHEAD batches ahead) and dali-no-read-ahead (the same with READ_AHEAD = 0: the files of a
batch are read when DALI asks for it), so the read-ahead's cost or gain is a same-run ratio.

Usage: python benchmarks/build_pipelining.py [--images 1024] [--size 64] [--batch 64] [--teacher resnet18]
       [--threads 1] [--workers 1] [--jpeg-size 320] [--rounds 3] [--device cpu] [--amp none]
       [--loaders torchvision,dali,dali-no-read-ahead]
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
from skd.build.teacher_pass import BuildConfig, build_cache
from skd.models.runtime import AMP_DTYPES
from skd.store.cache_store import open_store

CLASSES = 1000  # an ImageNet head: the writer encodes and compresses rows of 1000 logits


def timed_build(cfg: BuildConfig) -> tuple[float, float, float]:
    """(images/s inside the teacher loop, whole build seconds, cores busy on average) of one fresh build.

    Cores busy = CPU seconds of this process and its loader workers / wall seconds: about 1 where the
    machine gave the build one core, which leaves nothing to overlap on a CPU-only machine."""
    with teacher_loop_timer() as spent:
        if Path(cfg.out).exists():
            shutil.rmtree(cfg.out)
        t, cpu = time.perf_counter(), os.times()
        build_cache(cfg)
        total = time.perf_counter() - t
        cpu_end = os.times()
    busy = sum(
        getattr(cpu_end, f) - getattr(cpu, f)
        for f in ("user", "system", "children_user", "children_system")
    )
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
            files=[str(Path(cfg.data) / split.paths[i]) for i in order],
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
    with (
        torch.inference_mode(),
        torch.autocast(device.type, dtype=dtype, enabled=dtype is not None),
    ):
        model(x).float().cpu()
        t = time.perf_counter()
        for _ in range(steps):
            model(x).float().cpu()
    return steps * cfg.batch_size / (time.perf_counter() - t)


# name: (loader, batches of files the DALI reader reads ahead: None for its default)
LOADERS = {
    "torchvision": ("torchvision", None),
    "dali": ("dali", None),
    "dali-no-read-ahead": ("dali", 0),
}


def measure_round(cfgs: dict[str, BuildConfig], model, device, steps: int, rates: dict) -> None:
    """One round: build and loader alone for each loader variant, then the teacher alone; appended to `rates`."""
    for name, cfg in cfgs.items():
        # imported here: the GPU check uses this module on a machine without DALI
        if cfg.loader == "dali":
            from skd.pipelines import dali_pipeline

            ahead = LOADERS[name][1]
            dali_pipeline.READ_AHEAD = dali_pipeline.DEFAULT_READ_AHEAD if ahead is None else ahead
        b, total, busy = timed_build(cfg)
        rates[name]["build"].append(b)
        rates[name]["whole"].append(total)
        rates[name]["cores"].append(busy)
        rates[name]["loader"].append(loader_rate(cfg, cfg.out, device))
    rates["teacher"].append(teacher_rate(model, next(iter(cfgs.values())), device, steps))


def report(args, rates: dict, load: list[float]) -> None:
    teacher = statistics.median(rates["teacher"])
    print(
        f"\n{machine()}; git {git_state()}; device {args.device}, AMP {args.amp}; teacher {args.teacher} "
        f"({CLASSES} classes, {args.threads} torch threads, {teacher:,.1f} images/s alone), {args.images} JPEGs of "
        f"~{args.jpeg_size} px x {args.views} views at {args.size} px, batch {args.batch}, {args.workers} loader "
        f"workers, shards of 256 rows; {args.rounds} rounds, medians; load average {min(load):.1f}-{max(load):.1f}"
    )
    rows = []
    for name in args.loaders:
        r = rates[name]
        ratios = [b / min(lo, te) for b, lo, te in zip(r["build"], r["loader"], rates["teacher"])]
        serial = [
            1 / (1 / lo + 1 / te) / min(lo, te) for lo, te in zip(r["loader"], rates["teacher"])
        ]
        rows.append(
            [name]
            + [f"{statistics.median(r[k]):,.1f}" for k in ("build", "loader")]
            + [
                f"{statistics.median(ratios):.2f}",
                f"{statistics.median(serial):.2f}",
                f"{statistics.median(r['cores']):.2f}",
            ]
        )
    print(
        table(
            [
                "loader",
                "build images/s",
                "loader alone",
                "build / min(loader, teacher)",
                "serial bound / min",
                "cores busy in the build",
            ],
            rows,
        )
    )
    if "dali" in rates and "dali-no-read-ahead" in rates:
        per_round = [
            a / b for a, b in zip(rates["dali"]["build"], rates["dali-no-read-ahead"]["build"])
        ]
        print(
            f"\nDALI build with / without read-ahead: {statistics.median(per_round):.2f} (per round "
            f"{', '.join(f'{x:.2f}' for x in per_round)})"
        )


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
    ap.add_argument(
        "--threads", type=int, default=1, help="torch threads of the teacher (build and alone)"
    )
    ap.add_argument(
        "--jpeg-size", type=int, default=320, help="side of the source JPEGs (decode cost)"
    )
    ap.add_argument(
        "--loaders", default="torchvision", type=lambda v: v.split(","), help=", ".join(LOADERS)
    )
    ap.add_argument("--dir", type=Path)
    args = ap.parse_args()
    unknown = [name for name in args.loaders if name not in LOADERS]
    if unknown:
        ap.error(f"--loaders {','.join(unknown)}: choose from {', '.join(LOADERS)}")
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
        cfgs = {
            name: BuildConfig(
                teacher=args.teacher,
                weights=str(weights),
                data=root,
                out=work / f"cache-{name}",
                views=args.views,
                image_size=args.size,
                batch_size=args.batch,
                codec="int8",
                amp=args.amp,
                device=args.device,
                loader=LOADERS[name][0],
                workers=args.workers,
                val=False,
                shard_rows=256,
                chunk_rows=64,
            )
            for name in args.loaders
        }
        steps = max(4, args.images * args.views // args.batch // 2)
        rates: dict = {
            name: {"build": [], "whole": [], "cores": [], "loader": []} for name in args.loaders
        }
        rates["teacher"] = []
        load = [os.getloadavg()[0]]
        for r in range(args.rounds):
            measure_round(cfgs, model, device, steps, rates)
            load.append(os.getloadavg()[0])
            print(
                f"round {r}: "
                + ", ".join(
                    f"{n} build {rates[n]['build'][-1]:,.1f} loader {rates[n]['loader'][-1]:,.1f}"
                    for n in args.loaders
                )
                + f", teacher {rates['teacher'][-1]:,.1f}",
                flush=True,
            )
    report(args, rates, load)


if __name__ == "__main__":
    main()
