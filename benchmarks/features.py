"""What mixing, recorded augmentation and ensembles cost: build and stage-two images/s with and without them.

Side by side in rounds (the machine is shared: ratios within a round are what counts):
  build    the teacher loop of `skd-cache build` (teacher_loop_timer) over one view, plain vs --mixup/--cutmix
           vs --aa rand-m9-n2-mstd0.5-inc1 --reprob 0.25
  train    stage-two images/s (train_rate, loader start-up left out): one cache; the same with mixing; with
           the recorded augmentation; an ensemble of two caches on one plan (--plan-from)
  ops      the recorded RandAugment ops alone on 224-px 8-bit views, one thread: images/s per core
Targets: build and train with mixing / without >= 0.95; two caches / one >= 0.95; augmentation: measured.

Usage: python benchmarks/features.py [--images 512] [--size 32] [--batch 32] [--steps 12] [--rounds 3]
       [--teacher resnet18] [--student resnet18] [--workers 2] [--device cpu]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

import torch
import torchvision
from bench_common import (
    git_state,
    machine,
    steps_in_epoch,
    synthetic_jpeg_folder,
    table,
    teacher_loop_timer,
    train_rate,
)

from skd.build.teacher_pass import BuildConfig, build_cache
from skd.train.loop import TrainConfig

MIX = dict(mixup=0.8, cutmix=1.0)
AUGMENT = dict(aa="rand-m9-n2-mstd0.5-inc1", reprob=0.25)


def ops_rate(images: int = 300, side: int = 224) -> float:
    """Images/s of `skd.plan.augment.apply_ops` with recorded RandAugment draws on random 8-bit views, one thread."""
    import time

    import numpy as np

    from skd.plan.augment import AugmentParams, apply_ops, plan_augment

    params = AugmentParams(aa=AUGMENT["aa"])
    drawn = plan_augment(0, 0, np.arange(images), params)
    views = torch.randint(0, 256, (images, 3, side, side), dtype=torch.uint8)
    began = time.perf_counter()
    for i in range(images):
        apply_ops(views[i], drawn.op[i], drawn.magnitude[i], params.ops)
    return images / (time.perf_counter() - began)


def build_rate(cfg: BuildConfig) -> float:
    """Images/s of the build's teacher loop (indexing, planning and model loading left out)."""
    with teacher_loop_timer() as spent:
        build_cache(cfg)
    return spent[1] / spent[0]


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    for name, value in (
        ("images", 512),
        ("size", 32),
        ("batch", 32),
        ("steps", 12),
        ("warmup", 2),
        ("rounds", 3),
        ("workers", 2),
        ("threads", 1),
    ):
        ap.add_argument(f"--{name}", type=int, default=value)
    ap.add_argument("--teacher", default="resnet18")
    ap.add_argument("--student", default="resnet18")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    classes = 1000
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        root = synthetic_jpeg_folder(work / "data", args.images, int(args.size * 1.5), classes=10)
        torch.manual_seed(0)
        weights = work / "teacher.pth"
        torch.save(
            torchvision.models.get_model(args.teacher, num_classes=classes).state_dict(), weights
        )
        build = dict(
            teacher=args.teacher,
            weights=str(weights),
            data=root,
            views=1,
            image_size=args.size,
            batch_size=args.batch * 2,
            codec="int8",
            amp="none",
            device=args.device,
            loader="torchvision",
            workers=args.workers,
            val=False,
            overwrite=True,
        )
        builds = {
            "plain": BuildConfig(out=work / "plain", **build),
            "mixed": BuildConfig(out=work / "mixed", **build, **MIX),
            "augmented": BuildConfig(out=work / "augmented", **build, **AUGMENT),
            "second": BuildConfig(
                out=work / "second", **{**build, "weights": str(weights)}, plan_from=work / "plain"
            ),
        }
        common = dict(
            arch=args.student,
            epochs=1,
            batch_size=args.batch,
            lr=0.1,
            device=args.device,
            amp="none",
            loader="torchvision",
            workers=args.workers,
            val=False,
            overwrite=True,
            steps_per_epoch=args.steps,
            multiplier="2",
            alpha="0.9",
            kd="skd",
        )
        runs = {
            "one cache": TrainConfig(cache=work / "plain", out=work / "r1", **common),
            "mixed cache": TrainConfig(cache=work / "mixed", out=work / "r2", **common),
            "augmented cache": TrainConfig(cache=work / "augmented", out=work / "r4", **common),
            "two caches": TrainConfig(
                cache=[work / "plain", work / "second"], out=work / "r3", **common
            ),
        }
        rates: dict[str, list[float]] = {f"build {n}": [] for n in ("plain", "mixed", "augmented")}
        rates |= {n: [] for n in runs} | {"ops per core (224 px)": []}
        steps = min(args.steps, steps_in_epoch(args.images, args.batch))
        load = [os.getloadavg()[0]]
        for r in range(args.rounds):
            for name, cfg in builds.items():
                rate = build_rate(cfg)
                if name != "second":
                    rates[f"build {name}"].append(rate)
            for name, cfg in runs.items():
                rates[name].append(train_rate(cfg, args.warmup, steps))
            rates["ops per core (224 px)"].append(ops_rate())
            load.append(os.getloadavg()[0])
            print(
                f"round {r}: " + ", ".join(f"{n} {v[-1]:.1f}" for n, v in rates.items()), flush=True
            )

    def ratio(a: str, b: str) -> float:
        return statistics.median([x / y for x, y in zip(rates[a], rates[b])])

    print(
        f"\n{machine()}; git {git_state()}; device {args.device}; {args.student} from {args.teacher}, "
        f"{args.size} px, batch {args.batch}, {args.images} images, {args.rounds} rounds, {args.threads} torch "
        f"threads, loader torchvision with {args.workers} workers; load average {min(load):.1f}-{max(load):.1f}"
    )
    print(
        table(
            ["run", "images/s (median)"],
            [[n, f"{statistics.median(v):,.1f}"] for n, v in rates.items()],
        )
    )
    print()
    print(
        table(
            ["measure", "value", "target"],
            [
                [
                    "build with mixing / without",
                    f"{ratio('build mixed', 'build plain'):.3f}",
                    ">= 0.95",
                ],
                [
                    "train with mixing / without",
                    f"{ratio('mixed cache', 'one cache'):.3f}",
                    ">= 0.95",
                ],
                [
                    "train from two caches / one",
                    f"{ratio('two caches', 'one cache'):.3f}",
                    ">= 0.95",
                ],
                [
                    "build with augmentation / without",
                    f"{ratio('build augmented', 'build plain'):.3f}",
                    "measured",
                ],
                [
                    "train with augmentation / without",
                    f"{ratio('augmented cache', 'one cache'):.3f}",
                    "measured",
                ],
            ],
        )
    )


if __name__ == "__main__":
    main()
