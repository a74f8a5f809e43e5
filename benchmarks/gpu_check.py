"""The GPU check's measurements (run by benchmarks/gpu_check.sh, which prepares the environment).

On one GPU, in this order, printing one table at the end (and writing it as JSON with --json):
  1. a few thousand photo-like JPEGs (ROOT/train/cNNN/*.JPEG)
  2. teacher images/s on synthetic in-memory tensors (bf16 autocast, channels_last, inference)
  3. `skd-cache build` (the CLI) with the same teacher, --loader torchvision, --amp bf16, --weights none:
     images/s inside its decode -> teacher -> write loop, and for the whole command
  4. the loader alone over the same views (images/s to the device)
  5. `skd.train.loop.train` of the student from the cache with --kd skd, with --kd none, and online SKD with
     the teacher in the loop (same views), images/s of the steady part of each epoch
  6. the compute ratio (student step + teacher forward) / student step on in-memory tensors
  7. what else a GPU build uses: a build with --amp fp16 --compile, and the build as two processes under
     torchrun where there are two GPUs; the table says what was not run (DALI: not installed, 424 MB)
--device cpu with tiny sizes runs the same steps on a CPU (to test the script, not to measure).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import (
    machine,
    steps_in_epoch,
    synthetic_jpeg_folder,
    table,
    teacher_loop_timer,
    train_rate,
)  # noqa: E402
from build_pipelining import loader_rate  # noqa: E402
from train_overhead import compute_rates  # noqa: E402

from skd.build.teacher_pass import BuildConfig  # noqa: E402
from skd.models.runtime import AMP_DTYPES  # noqa: E402
from skd.train.loop import TrainConfig  # noqa: E402

STARTED = time.perf_counter()


def say(message: str) -> None:
    print(f"[{time.perf_counter() - STARTED:6.1f} s] {message}", flush=True)


def teacher_synthetic_rate(
    name: str, batch: int, size: int, device: torch.device, amp: str, steps: int
) -> float:
    model = torchvision.models.get_model(name, num_classes=1000).eval().to(device)
    x = torch.randn(batch, 3, size, size, device=device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    dtype = AMP_DTYPES[amp]
    with (
        torch.inference_mode(),
        torch.autocast(device.type, dtype=dtype, enabled=dtype is not None),
    ):
        for _ in range(3):
            model(x).float().cpu()
        t = time.perf_counter()
        for _ in range(steps):
            out = model(x).float()
        out.cpu()  # waits for the device
    return steps * batch / (time.perf_counter() - t)


def build_argv(
    args, root: Path, cache: Path, amp: str | None = None, compile: bool = False
) -> list[str]:
    """The `skd-cache build` arguments of the check (AMP `amp` instead of --amp's where given)."""
    return [
        "build",
        "--teacher",
        args.teacher,
        "--weights",
        "none",
        "--data",
        str(root),
        "--out",
        str(cache),
        "--views",
        str(args.views),
        "--image-size",
        str(args.size),
        "--batch-size",
        str(args.teacher_batch),
        "--codec",
        "int8",
        "--amp",
        amp or args.amp,
        "--device",
        args.device,
        "--loader",
        "torchvision",
        "--workers",
        str(args.workers),
        "--no-val",
        "--overwrite",
    ] + (["--compile"] if compile else [])


def cli_build(
    args, root: Path, cache: Path, amp: str | None = None, compile: bool = False
) -> tuple[float, float]:
    """Run `skd-cache build ...` in this process; (images/s inside its teacher loop, for the whole command)."""
    from skd.cli.main import cache as cache_group

    argv = build_argv(args, root, cache, amp, compile)
    say("skd-cache " + " ".join(argv))
    with teacher_loop_timer() as spent:
        t = time.perf_counter()
        try:
            cache_group.main(args=argv, prog_name="skd-cache", standalone_mode=False)
        except SystemExit as exc:
            if exc.code:
                raise SystemExit(f"skd-cache build failed (exit {exc.code})") from None
        whole = time.perf_counter() - t
    return spent[1] / spent[0], spent[1] / whole


def other_builds(args, root: Path) -> list[list[str]]:
    """What a GPU build also uses, as table rows: fp16 with --compile, and two processes under torchrun where two
    GPUs are (on the CPU rehearsal: --amp none without --compile, and two gloo processes); what could not run
    says so."""
    rows = []
    cuda = args.device != "cpu"
    amp, compile = ("fp16", True) if cuda else ("none", False)
    try:
        loop, whole = cli_build(args, root, args.work / "cache-other", amp, compile)
        what = f"build --amp {amp}" + (
            " --compile" if compile else " (CPU rehearsal: no --compile)"
        )
        rows.append(
            [what, f"{loop:,.0f}", f"{whole:,.0f} for the whole command, compiling included"]
        )
    # a failure here is a finding, not the end of the check
    except (Exception, SystemExit) as error:
        rows.append(
            [
                f"build --amp {amp}{' --compile' if compile else ''}",
                "FAILED",
                str(error).splitlines()[0],
            ]
        )
    if cuda and torch.cuda.device_count() < 2:
        rows.append(
            ["two processes under torchrun", "not run", f"{torch.cuda.device_count()} GPU here"]
        )
        return rows
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
    ]
    script = Path(sys.executable).parent / "skd-cache"
    script = script if script.exists() else Path(shutil.which("skd-cache") or "skd-cache")
    command += [str(script), *build_argv(args, root, args.work / "cache-2")]
    say(" ".join(command[2:]))
    t = time.perf_counter()
    run = subprocess.run(command, capture_output=True, text=True, timeout=300)
    seconds = time.perf_counter() - t
    if run.returncode:
        tail = [line for line in run.stderr.splitlines() if line.strip()][-1:] or ["no output"]
        rows.append(
            ["two processes under torchrun", "FAILED", f"exit {run.returncode}: {tail[0][:150]}"]
        )
    else:
        rate = args.images * args.views / seconds
        rows.append(
            ["two processes under torchrun (whole command)", f"{rate:,.0f}", f"{seconds:.1f} s"]
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--images", type=int, default=4096)
    ap.add_argument("--jpeg-size", type=int, default=320)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--views", type=int, default=2)
    ap.add_argument("--teacher", default="resnet50")
    ap.add_argument("--student", default="resnet18")
    ap.add_argument("--teacher-batch", type=int, default=256)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument(
        "--steps", type=int, default=256, help="student steps per run (over several epochs)"
    )
    ap.add_argument(
        "--warmup", type=int, default=4, help="steps of each epoch left out of the rate"
    )
    ap.add_argument("--workers", type=int, default=max(1, min(16, (os.cpu_count() or 2) - 2)))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--amp", default="bf16")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit(
                "no CUDA device: pass --device cpu (with tiny sizes) to test the script"
            )
        torch.backends.cudnn.benchmark = True
    else:
        torch.set_num_threads(1)
    say(f"{machine()}; workers {args.workers}")
    root = args.work / "data"
    if not (root / "train").is_dir():
        synthetic_jpeg_folder(
            root, args.images, args.jpeg_size, classes=100, processes=max(1, os.cpu_count() or 1)
        )
    say(f"{args.images} JPEGs of ~{args.jpeg_size} px in {root}")

    teacher_mem = teacher_synthetic_rate(
        args.teacher, args.teacher_batch, args.size, device, args.amp, steps=20
    )
    say(f"teacher on in-memory tensors: {teacher_mem:,.0f} images/s")
    cache = args.work / "cache"
    teacher_pipe, build_whole = cli_build(args, root, cache)
    say(
        f"build: {teacher_pipe:,.0f} images/s in the loop, {build_whole:,.0f} for the whole command"
    )
    cfg = BuildConfig(
        teacher=args.teacher,
        data=root,
        out=cache,
        image_size=args.size,
        batch_size=args.teacher_batch,
        loader="torchvision",
        workers=args.workers,
        device=args.device,
    )
    loader_alone = loader_rate(cfg, cache, device)
    say(f"loader alone: {loader_alone:,.0f} images/s")

    steps_per_epoch = steps_in_epoch(args.images, args.batch)  # one process: the whole view
    epochs = max(1, math.ceil(args.steps / steps_per_epoch))
    common = dict(
        arch=args.student,
        epochs=epochs,
        batch_size=args.batch,
        lr=0.1,
        device=args.device,
        amp=args.amp,
        loader="torchvision",
        workers=args.workers,
        val=False,
        overwrite=True,
        multiplier="2",
        alpha="0.9",
    )
    runs = {
        "cached SKD": TrainConfig(cache=cache, kd="skd", out=args.work / "run-skd", **common),
        "hard labels (--kd none)": TrainConfig(
            cache=cache, kd="none", out=args.work / "run-none", **common
        ),
        "online SKD": TrainConfig(
            teacher=args.teacher,
            weights="none",
            data=root,
            kd="skd",
            image_size=args.size,
            views=args.views,
            out=args.work / "run-online",
            **common,
        ),
    }
    student = {}
    for name, tc in runs.items():
        student[name] = train_rate(tc, min(args.warmup, steps_per_epoch - 2), steps_per_epoch)
        say(
            f"student {name}: {student[name]:,.0f} images/s ({epochs} epochs x {steps_per_epoch} steps)"
        )
    s_rate, t_rate = compute_rates(
        args.student,
        args.teacher,
        1000,
        args.batch,
        args.size,
        device,
        args.amp,
        steps=20,
        rounds=1,
    )
    compute = 1 + s_rate / t_rate
    say(f"in memory: student step {s_rate:,.0f} images/s, teacher forward {t_rate:,.0f} images/s")
    others = other_builds(args, root)

    cached, none, online = (
        student["cached SKD"],
        student["hard labels (--kd none)"],
        student["online SKD"],
    )
    rows = [
        [
            f"teacher {args.teacher}, synthetic in-memory tensors (batch {args.teacher_batch})",
            f"{teacher_mem:,.0f}",
            "",
        ],
        [
            "teacher through the pipeline (skd-cache build loop)",
            f"{teacher_pipe:,.0f}",
            f"{teacher_pipe / teacher_mem:.2f} of in-memory; {teacher_pipe / min(teacher_mem, loader_alone):.2f} of "
            "min(loader, teacher)",
        ],
        [
            "  whole skd-cache build command",
            f"{build_whole:,.0f}",
            "start-up, indexing and store creation included",
        ],
        [f"loader alone (torchvision, {args.workers} workers)", f"{loader_alone:,.0f}", ""],
        [
            f"student {args.student}, cached SKD",
            f"{cached:,.0f}",
            f"{cached / none:.3f} of hard labels (target >= 0.95)",
        ],
        ["student, hard labels (--kd none)", f"{none:,.0f}", ""],
        [
            "student, online SKD (teacher in the loop)",
            f"{online:,.0f}",
            f"cached / online = {cached / online:.2f}; compute ratio {compute:.2f}",
        ],
        *others,
        [
            "DALI loader",
            "not run",
            "DALI is not installed here (424 MB wheel); the loader was torchvision",
        ],
    ]
    print()
    print(
        f"{machine()}; {args.images} JPEGs ~{args.jpeg_size} px -> {args.size} px, AMP {args.amp}, "
        f"{args.views} views, student batch {args.batch}, {epochs} x {steps_per_epoch} steps"
    )
    print(table(["what", "images/s", "ratio"], rows))
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "machine": machine(),
                    "args": {k: str(v) for k, v in vars(args).items()},
                    "teacher_memory": teacher_mem,
                    "teacher_pipeline": teacher_pipe,
                    "build_whole": build_whole,
                    "loader_alone": loader_alone,
                    "student": student,
                    "student_step_memory": s_rate,
                    "teacher_forward_memory": t_rate,
                    "compute_ratio": compute,
                    "other_builds": others,
                    "seconds": time.perf_counter() - STARTED,
                },
                indent=1,
            )
        )
    say("done")


if __name__ == "__main__":
    main()
