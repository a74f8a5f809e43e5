"""Crashes, full disks and concurrent builds cost minutes, never data: kill -9 at every stage, then resume."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
from conftest import build_args, run_skd, small_build_config, train_args
from handmade import cache_arrays

from skd.build.teacher_pass import build_cache
from skd.storage.locks import FolderLock
from skd.store.cache_store import open_store


def build(root, out, teacher, **options):
    """`skd-cache build` arguments of the small cache in batches of 4: a shard of 8 rows takes two batches."""
    return build_args(weights=teacher, data=root, out=out, batch_size=4, **options)


@pytest.fixture(scope="module")
def int8_cache(image_root, teacher_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("int8") / "cache"
    build_cache(small_build_config(image_root, out, teacher_file, codec="int8"))
    return out


def complete_shards_hold_final_rows(partial: Path, reference: Path) -> list[str]:
    """Names of shards marked complete whose rows differ from the finished reference (must be none)."""
    store, ref = open_store(partial), open_store(reference)
    wrong = []
    for view, done in enumerate(store.complete()):
        for shard in np.flatnonzero(done):
            a, b = store.shard_bounds(shard, store.num_samples)
            if not np.array_equal(store.read_rows(view, a, b).logits, ref.read_rows(view, a, b).logits):
                wrong.append(f"view {view} shard {shard}")
    return wrong


@pytest.mark.parametrize(
    "fault,codec",
    [("after-batch:1", "fp32"), ("mid-shard:1", "int8"), ("after-shard:2", "fp32"), ("val-batch:1", "int8")],
)
def test_kill_9_then_rerun_gives_the_uninterrupted_cache(
    fault, codec, image_root, teacher_file, fp32_cache, int8_cache, tmp_path
):
    reference = fp32_cache if codec == "fp32" else int8_cache
    out = tmp_path / "cache"
    args = build(image_root, out, teacher_file, codec=codec)
    killed = run_skd(*args, env={"SKD_FAULT": fault})
    assert killed.returncode == -9, f"{fault}: the build was not killed ({killed.returncode}) {killed.stderr[-300:]}"
    wrong = complete_shards_hold_final_rows(out, reference)
    assert not wrong, f"{fault}: shards counted complete with wrong rows: {wrong}"
    counted = int(open_store(out).complete().sum())
    if fault in ("after-batch:1", "mid-shard:1"):
        assert counted == 0, f"{fault}: {counted} shards counted complete before any shard was finished"
    rerun = run_skd(*args)
    assert rerun.returncode == 0, rerun.stderr[-800:]
    want, got = cache_arrays(reference), cache_arrays(out)
    for name in want:
        assert np.array_equal(want[name], got[name]), f"{fault} ({codec}): {name} differs from the uninterrupted build"
    assert not Path(f"{out}.lock").exists(), "the build lock was left behind"


@pytest.mark.parametrize("tool", ["cache", "train"])
@pytest.mark.parametrize(
    "signal_name, variable, status, word",
    [("SIGINT", "SKD_INTERRUPT", 130, "interrupted"), ("SIGTERM", "SKD_TERMINATE", 143, "terminated")],
)
def test_ctrl_c_is_one_line_saying_how_to_continue(
    tool, signal_name, variable, status, word, image_root, teacher_file, fp32_cache, tmp_path
):
    """A real SIGINT (Ctrl-C) or SIGTERM (a scheduler's preemption) mid-build or mid-training: one line (no
    traceback from zarr's or torch's threads), exit 130 or 143, and the command it names continues the work."""
    if tool == "cache":
        args = build(image_root, tmp_path / "cache", teacher_file)
        point, again, hint = "after-batch:2", args, "rerun the same command to resume"
    else:
        args = train_args(cache=fp32_cache, epochs=2, steps_per_epoch=2, no_val=True, out=tmp_path / "run")
        point, again, hint = "after-epoch:0", [*args, "--resume"], "with --resume to continue"
    # A child inherits an ignored SIGINT (Python then never raises KeyboardInterrupt): as from a terminal, not so
    stopped = run_skd(
        *args, env={variable: point}, tool=tool, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)
    )
    lines = [line for line in stopped.stderr.splitlines() if line.strip() and "\r" not in line]
    assert stopped.returncode == status and lines[-1].startswith(word) and hint in lines[-1], (
        f"{signal_name}: exit {stopped.returncode}: {stopped.stderr[-800:]}"
    )
    assert "Traceback" not in stopped.stderr and "Task was destroyed" not in stopped.stderr, stopped.stderr[-1500:]
    resumed = run_skd(*again, tool=tool)
    assert resumed.returncode == 0, f"the command the hint names failed: {resumed.stderr[-800:]}"
    if tool == "cache":
        assert "written now" in resumed.stdout and not Path(f"{tmp_path / 'cache'}.lock").exists(), resumed.stdout
    else:
        assert "resuming" in resumed.stderr, resumed.stderr[-500:]


def test_second_build_on_the_same_cache_is_refused_naming_the_holder(image_root, teacher_file, tmp_path):
    out = tmp_path / "cache"
    lock = FolderLock(out)
    try:
        result = run_skd(*build(image_root, out, teacher_file))
    finally:
        lock.release()
    assert result.returncode == 2, f"exit {result.returncode}: {result.stderr[-300:]}"
    assert f"pid {os.getpid()}" in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert not (out / "zarr.json").exists(), "the refused build wrote into the cache"


def test_training_killed_mid_epoch_resumes_from_its_last_checkpoint(fp32_cache, tmp_path):
    args = train_args(cache=fp32_cache, epochs=3, steps_per_epoch=3, alpha="0.9", no_val=True)
    straight = run_skd(*args, "--out", tmp_path / "straight", tool="train")
    assert straight.returncode == 0, straight.stderr[-800:]
    run = tmp_path / "run"
    killed = run_skd(*args, "--out", run, env={"SKD_FAULT": "train-step:5"}, tool="train")  # epoch 1, step 2
    assert killed.returncode == -9, f"not killed ({killed.returncode})"
    import torch

    ckpt = torch.load(run / "checkpoint.pth", weights_only=True)
    assert ckpt["epoch"] == 0, f"last checkpoint is from epoch {ckpt['epoch']}, expected 0"
    resumed = run_skd(*args, "--out", run, "--resume", tool="train")
    assert resumed.returncode == 0, resumed.stderr[-800:]
    want = [json.loads(x) for x in (tmp_path / "straight/metrics.jsonl").read_text().splitlines()]
    got = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in got] == [0, 1, 2], f"epochs in metrics after resume: {[m['epoch'] for m in got]}"
    worst = max(abs(a["train_loss"] - b["train_loss"]) for a, b in zip(want, got))
    assert worst < 1e-6, f"resumed run's train loss differs from the straight run by {worst:.2e}"
    assert not list(run.glob("*.tmp")), "a half-written checkpoint was left behind"
