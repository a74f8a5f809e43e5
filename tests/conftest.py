"""Shared fixtures and helpers of every folder of tests/: small ImageFolders of real JPEG files written on the fly, the
small build and training settings as configs and as command lines, and the commands run as a user runs them.

pytest puts tests/ on sys.path for this file, so a test file in any folder imports `from conftest import ...` and
the helper modules beside it (handmade, jpegs, s3server, fresh_env)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from jpegs import CLASSES, make_image_folder, photo_like, write_jpeg  # noqa: F401  (re-exported to tests)

REPO = Path(__file__).resolve().parents[1]

# pytest-xdist workers share the cores: one thread each, else two OpenMP threads per worker fight over them
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // WORKERS)))


@pytest.fixture(scope="session")
def image_root(tmp_path_factory) -> Path:
    """A small read-only ImageFolder shared by the session: 3 classes, 6 train and 2 val images each."""
    return make_image_folder(tmp_path_factory.mktemp("imagenet"))


@pytest.fixture(scope="session")
def teacher_file(tmp_path_factory) -> Path:
    """A ResNet-18 teacher with 3 classes and fixed random weights, saved as a state_dict."""
    import torchvision

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "teacher.pth"
    torch.save(torchvision.models.resnet18(num_classes=3).state_dict(), path)
    return path


def small_build_config(root, out, teacher_file, **overrides):
    """The build options the tests share: 2 views at 32 px, fp32, shards of 8 rows, CPU, no AMP."""
    from skd.build.teacher_pass import BuildConfig

    base = dict(
        teacher="resnet18",
        weights=str(teacher_file),
        data=root,
        out=out,
        views=2,
        image_size=32,
        batch_size=8,
        codec="fp32",
        loader="torchvision",
        workers=0,
        shard_rows=8,
        chunk_rows=4,
        amp="none",
        device="cpu",
    )
    return BuildConfig(**{**base, **overrides})


def small_train_config(out: Path, **overrides):
    """The training settings the tests share: 2 epochs of 3 steps in batches of 4, SKD with alpha 0.9, 32 px on the
    CPU, no validation; `overrides` name the cache (or the online teacher) and whatever else a test changes."""
    from dataclasses import replace

    from skd.train.loop import TrainConfig

    cfg = TrainConfig(
        epochs=2,
        batch_size=4,
        lr=0.4,
        kd="skd",
        alpha="0.9",
        multiplier="2",
        amp="none",
        device="cpu",
        loader="torchvision",
        workers=0,
        out=out,
        steps_per_epoch=3,
        val=False,
        image_size=32,
        views=2,
        seed=1,
    )
    return replace(cfg, **overrides)


def run_training(cfg):
    """Train with `cfg`: (per-step (loss, kd, ce) as an array, the student's saved weights, the metrics)."""
    import numpy as np

    from skd.train.loop import train

    losses = []
    metrics = train(
        cfg, on_step=lambda epoch, step, parts: losses.append((parts.loss.item(), parts.kd.item(), parts.ce.item()))
    )
    weights = torch.load(Path(cfg.out) / "student.pth", weights_only=True)
    return np.array(losses), weights, metrics


# The command-line twins of small_build_config (skd-cache build) and of the small training runs (skd-train): the
# options every test passes unless it says otherwise. --weights, --data, --out and --cache are each test's own.
BUILD_DEFAULTS = dict(
    teacher="resnet18",
    views=2,
    image_size=32,
    batch_size=8,
    codec="fp32",
    loader="torchvision",
    workers=0,
    shard_size=8,
    chunk_size=4,
    amp="none",
    device="cpu",
)
TRAIN_DEFAULTS = dict(epochs=1, batch_size=4, loader="torchvision", workers=0, device="cpu")
REPEATED = {"cache"}  # options given once per value (skd-train --cache A --cache B); other lists are comma-joined


def command_args(options: dict) -> list[str]:
    """Keyword options as a command's arguments, in the order given: batch_size=8 is `--batch-size 8`, True the
    flag alone (no_val=True: `--no-val`), False or None leaves the option out, a list is joined by commas
    (teacher_mean=[0.5, 0.5]: `--teacher-mean 0.5,0.5`) except --cache, given once per cache."""
    args = []
    for name, value in options.items():
        option = "--" + name.replace("_", "-")
        if value is None or value is False:
            continue
        if value is True:
            args.append(option)
        elif isinstance(value, (list, tuple)) and name in REPEATED:
            args += [part for item in value for part in (option, str(item))]
        elif isinstance(value, (list, tuple)):
            args += [option, ",".join(map(str, value))]
        else:
            args += [option, str(value)]
    return args


def build_args(**options) -> list[str]:
    """`skd-cache build` with BUILD_DEFAULTS (small_build_config's settings as options) and `options` on top."""
    return ["build", *command_args({**BUILD_DEFAULTS, **options})]


def train_args(**options) -> list[str]:
    """`skd-train` arguments: TRAIN_DEFAULTS (one epoch, batches of 4, torchvision on the CPU), `options` on
    top."""
    return command_args({**TRAIN_DEFAULTS, **options})


@pytest.fixture(scope="session")
def fp32_cache(image_root, teacher_file, tmp_path_factory) -> Path:
    """A finished fp32 cache of `image_root` built with `small_build_config`."""
    from skd.build.teacher_pass import build_cache

    out = tmp_path_factory.mktemp("fp32") / "cache"
    build_cache(small_build_config(image_root, out, teacher_file))
    return out


def free_port() -> int:
    """A TCP port nobody listens on now, for a torchrun rendezvous."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_skd(*args, tool: str = "cache", env: dict | None = None, preexec_fn=None) -> subprocess.CompletedProcess:
    """`skd-cache ARGS` (tool "cache") or `skd-train ARGS` in a fresh process from the repository, as a user runs
    it: its exit status, stdout and stderr (text)."""
    main = "main_cache" if tool == "cache" else "main_train"
    return subprocess.run(
        [sys.executable, "-c", f"from skd.cli.main import {main}; {main}()", *map(str, args)],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        cwd=REPO,
        preexec_fn=preexec_fn,
    )


def torchrun(*args, processes: int = 2) -> list[str]:
    """The command line of `torchrun --nproc-per-node PROCESSES ARGS` on a free port, as strings."""
    run = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes)]
    return [*run, "--master-port", str(free_port()), *map(str, args)]


@pytest.fixture
def in_process(monkeypatch, capsys):
    """Run `skd-cache ARGS` (tool "cache") or `skd-train ARGS` in this process through the real entry points;
    returns (exit status, stderr). For error paths: a subprocess would spend seconds importing torch."""
    from skd.cli import main as cli

    def run(tool: str, *args, env: dict | None = None) -> tuple[int, str]:
        monkeypatch.setattr(sys, "argv", [f"skd-{tool}", *map(str, args)])
        for key, value in (env or {}).items():
            monkeypatch.setenv(key, value)
        capsys.readouterr()
        try:
            (cli.main_cache if tool == "cache" else cli.main_train)()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        return code, capsys.readouterr().err

    return run
