"""The examples run as a user runs them: `examples/timm_student.py` distils a timm student from a cache."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("timm")

REPO = Path(__file__).resolve().parents[1]


def test_the_timm_example_trains_a_student_from_a_cache_and_its_loss_falls(fp32_cache, tmp_path):
    out = tmp_path / "ema.pth"
    args = ["--cache", fp32_cache, "--model", "resnet18", "--epochs", "6", "--batch-size", "6", "--kd", "hinton"]
    args += ["--alpha", "0.5", "--opt", "adamw", "--lr", "0.003", "--weight-decay", "0.05"]
    args += ["--device", "cpu", "--amp", "none", "--workers", "0", "--loader", "torchvision", "--out", out]
    result = subprocess.run(
        [sys.executable, str(REPO / "examples" / "timm_student.py"), *map(str, args)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-1500:]
    losses = [float(line.split()[3]) for line in result.stdout.splitlines() if line.startswith("epoch ")]
    assert len(losses) == 6, f"epoch lines: {result.stdout}"
    assert losses[-1] < 0.8 * losses[0], f"the loss did not fall by a fifth over 6 epochs: {losses}"
    assert out.stat().st_size > 1_000_000, f"EMA weights of {out.stat().st_size} bytes"
