"""Stage-two overhead: student images/s with cached SKD vs hard labels (`--kd none`) vs online SKD.

Same student, same loader (torchvision), same views, same batches; the three runs alternate in rounds
(the machine is shared: ratios within a round are what counts). Images/s is taken from the training
loop itself (skd.train.loop.train, one epoch capped by steps_per_epoch) between the `warmup`-th and the last
step, so loader start-up is left out. Beside it, the compute ratio (student step + teacher forward) /
student step measured on in-memory tensors of the same shape: online SKD should cost about that much more.
Targets (issue 6): cached SKD / --kd none >= 0.95; none / online within 10% of the compute ratio.

Usage: python benchmarks/train_overhead.py [--images 512] [--size 32] [--batch 32] [--steps 12]
       [--teacher resnet50] [--student resnet18] [--rounds 3] [--workers 2] [--device cpu]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torchvision
from bench_common import (
    git_state,
    machine,
    steps_in_epoch,
    synthetic_jpeg_folder,
    table,
    train_rate,
)

from skd.build.teacher_pass import BuildConfig, build_cache
from skd.train.loop import TrainConfig


def compute_rates(
    student_name: str,
    teacher_name: str,
    classes: int,
    batch: int,
    size: int,
    device: torch.device,
    amp: str,
    steps: int,
    rounds: int,
) -> tuple[float, float]:
    """(student step images/s, teacher forward images/s) on in-memory tensors: the compute-only reference."""
    from skd.loss import spherical_kd_loss
    from skd.models.runtime import AMP_DTYPES

    student = torchvision.models.get_model(student_name, num_classes=classes).to(device).train()
    teacher = torchvision.models.get_model(teacher_name, num_classes=classes).to(device).eval()
    if device.type == "cuda":
        student = student.to(memory_format=torch.channels_last)
        teacher = teacher.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    x = torch.randn(batch, 3, size, size, device=device)
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, classes, (batch,), device=device)
    t_logits = torch.randn(batch, classes, device=device)
    dtype = AMP_DTYPES[amp]

    def autocast():
        return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)

    def student_step():
        with autocast():
            s = student(x)
        loss = spherical_kd_loss(s, t_logits, y, temperature=4.0, multiplier=2.0, alpha=0.9).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def teacher_forward():
        with torch.inference_mode(), autocast():
            teacher(x).float()

    def rate(fn):
        for _ in range(2):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(steps):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return steps * batch / (time.perf_counter() - t)

    s_rates, t_rates = [], []
    for _ in range(rounds):
        s_rates.append(rate(student_step))
        t_rates.append(rate(teacher_forward))
    return statistics.median(s_rates), statistics.median(t_rates)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--size", type=int, default=32, help="training image size (pixels)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=12, help="steps per run")
    ap.add_argument("--warmup", type=int, default=2, help="steps left out of the rate")
    ap.add_argument("--teacher", default="resnet50")
    ap.add_argument("--student", default="resnet18")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--amp", default="none")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1: on a shared 2-core machine more threads spin against other jobs)",
    )
    ap.add_argument("--dir", type=Path, help="work folder (default: a temporary one)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    classes = 1000  # an ImageNet head: the cached rows and the KD loss have 1000 classes
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        work = Path(tmp)
        t = time.perf_counter()
        root = synthetic_jpeg_folder(work / "data", args.images, int(args.size * 1.5), classes=10)
        torch.manual_seed(0)
        weights = work / "teacher.pth"
        torch.save(
            torchvision.models.get_model(args.teacher, num_classes=classes).state_dict(), weights
        )
        cache = work / "cache"
        summary = build_cache(
            BuildConfig(
                teacher=args.teacher,
                weights=str(weights),
                data=root,
                out=cache,
                views=1,
                image_size=args.size,
                batch_size=args.batch * 2,
                codec="int8",
                amp=args.amp,
                device=args.device,
                loader="torchvision",
                workers=args.workers,
                val=False,
            )
        )
        print(
            f"setup: {args.images} JPEGs and a {args.teacher} cache in {time.perf_counter() - t:.0f} s "
            f"({summary.images_per_sec:.0f} images/s build)",
            flush=True,
        )
        common = dict(
            arch=args.student,
            epochs=1,
            batch_size=args.batch,
            lr=0.1,
            device=args.device,
            amp=args.amp,
            loader="torchvision",
            workers=args.workers,
            val=False,
            overwrite=True,
            steps_per_epoch=args.steps,
            multiplier="2",
            alpha="0.9",
        )
        runs = {
            "cached SKD": TrainConfig(cache=cache, kd="skd", out=work / "run-skd", **common),
            "--kd none": TrainConfig(cache=cache, kd="none", out=work / "run-none", **common),
            "online SKD": TrainConfig(
                teacher=args.teacher,
                weights=str(weights),
                data=root,
                kd="skd",
                image_size=args.size,
                views=1,
                out=work / "run-online",
                **common,
            ),
        }
        rates: dict[str, list[float]] = {name: [] for name in runs}
        load = [os.getloadavg()[0]]
        for r in range(args.rounds):
            for name, cfg in runs.items():
                rates[name].append(
                    train_rate(
                        cfg, args.warmup, min(args.steps, steps_in_epoch(args.images, args.batch))
                    )
                )
            load.append(os.getloadavg()[0])
            print(
                f"round {r}: " + ", ".join(f"{n} {v[-1]:.1f}" for n, v in rates.items()), flush=True
            )
        student_rate, teacher_rate = compute_rates(
            args.student,
            args.teacher,
            classes,
            args.batch,
            args.size,
            device,
            args.amp,
            max(6, args.steps // 2),
            args.rounds,
        )
    med = {n: statistics.median(v) for n, v in rates.items()}
    overhead = statistics.median([s / n for s, n in zip(rates["cached SKD"], rates["--kd none"])])
    online = statistics.median([s / o for s, o in zip(rates["cached SKD"], rates["online SKD"])])
    compute = (1 / student_rate + 1 / teacher_rate) / (1 / student_rate)
    print(
        f"\n{machine()}; git {git_state()}; device {args.device}, AMP {args.amp}; {args.student} from "
        f"{args.teacher}, {args.size} px, batch {args.batch}, {args.steps} steps x {args.rounds} rounds, "
        f"{args.threads} torch threads, "
        f"loader torchvision with {args.workers} workers; load average {min(load):.1f}-{max(load):.1f}"
    )
    print(table(["run", "images/s (median)"], [[n, f"{v:,.1f}"] for n, v in med.items()]))
    print()
    print(
        table(
            ["measure", "value", "target"],
            [
                ["cached SKD / --kd none", f"{overhead:.3f}", ">= 0.95"],
                ["cached SKD / online SKD", f"{online:.2f}", "within 10% of the compute ratio"],
                [
                    "compute ratio (student step + teacher forward) / student step",
                    f"{compute:.2f}",
                    f"student step {student_rate:,.0f} images/s, "
                    f"teacher forward {teacher_rate:,.0f} images/s (in memory)",
                ],
                ["(cached / online) / compute ratio", f"{online / compute:.2f}", "0.90-1.10"],
            ],
        )
    )


if __name__ == "__main__":
    main()
