"""Shared fixtures: small ImageFolders of real JPEG files, written on the fly."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from jpegs import CLASSES, make_image_folder, photo_like, write_jpeg  # noqa: F401  (re-exported to tests)

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


@pytest.fixture
def in_process(monkeypatch, capsys):
    """Run `skd-cache ARGS` (tool "cache") or `skd-train ARGS` in this process through the real entry points;
    returns (exit status, stderr). For error paths: a subprocess would spend seconds importing torch."""
    import sys

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
