"""Stage two: training from the cache is training online with the teacher, minus the teacher."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
import zarr
from conftest import (
    REPO,
    build_args,
    run_skd,
    run_training,
    small_build_config,
    small_train_config,
    torchrun,
    train_args,
)

from skd.build.teacher_pass import build_cache
from skd.train.loop import train


def cli(*args, env=None):
    return run_skd(*args, tool="train", env=env)


def test_int8_cache_trains_like_fp32(image_root, tmp_path):
    """A teacher with ImageNet-like logit spread (std ~1.7): int8 logits give the fp32 losses.

    lr 0 keeps the student fixed, so every step measures the codec alone: with a moving student,
    the layer norm of a freshly initialised student's near-equal logits amplifies any difference
    chaotically within a few steps (seen: 15% apart after 2 steps from 0.01 logit differences).
    """
    torch.manual_seed(0)
    teacher = torchvision.models.resnet18(num_classes=3)
    with torch.no_grad():
        teacher.fc.weight.mul_(40)
    torch.save(teacher.state_dict(), tmp_path / "teacher.pth")
    runs = {}
    for codec in ("fp32", "int8"):
        build_cache(small_build_config(image_root, tmp_path / codec, tmp_path / "teacher.pth", codec=codec))
        runs[codec] = run_training(small_train_config(tmp_path / f"run-{codec}", cache=tmp_path / codec, lr=0.0))[0]
    fp32, int8 = runs["fp32"], runs["int8"]
    worst = float((np.abs(int8[:, 1] - fp32[:, 1]) / fp32[:, 1]).max())
    assert worst < 2e-3, f"int8 KD loss is up to {worst:.2e} (relative) from fp32 over 6 steps (tolerance 2e-3)"


def test_no_kd_differs_from_skd(fp32_cache, tmp_path):
    none_losses, _, _ = run_training(small_train_config(tmp_path / "none", cache=fp32_cache, kd="none"))
    skd_losses, _, _ = run_training(small_train_config(tmp_path / "skd", cache=fp32_cache))
    assert (none_losses[:, 1] == 0).all(), "--kd none must not use the teacher"
    assert abs(none_losses[0, 0] - skd_losses[0, 0]) > 1e-3, "SKD and hard-label losses coincide"


def test_metrics_checkpoint_and_student_file(fp32_cache, tmp_path):
    out = tmp_path / "run"
    result = cli(*train_args(cache=fp32_cache, epochs=3, steps_per_epoch=2, out=out))
    assert result.returncode == 0, result.stderr[-1500:]
    assert "views are reused" in result.stderr, "3 epochs over 2 views must say that views are reused"
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    epochs, views = [m["epoch"] for m in lines], [m["view"] for m in lines]
    assert epochs == [0, 1, 2] and views == [0, 1, 0], f"metrics of epochs {epochs} on views {views}"
    required = {"epoch", "train_loss", "kd_loss", "ce_loss", "val_top1", "val_top5", "images_per_sec", "lr"}
    assert required <= set(lines[-1]), f"metrics lack {required - set(lines[-1])}"
    assert 0 <= lines[-1]["val_top1"] <= lines[-1]["val_top5"] <= 1, (
        f"val top-1 {lines[-1]['val_top1']}, top-5 {lines[-1]['val_top5']}"
    )
    assert "val_teacher_agreement" in lines[-1], "the cache has val logits: agreement must be reported"
    student = torchvision.models.resnet18(num_classes=3)
    student.load_state_dict(torch.load(out / "student.pth", weights_only=True))
    assert not list(out.glob("*.tmp")), "a temporary checkpoint was left behind"
    other = shutil.copytree(fp32_cache, tmp_path / "other")
    g = zarr.open_group(str(other), mode="r+")  # as if rebuilt in place with another --seed
    g.attrs["skd"] = {**g.attrs["skd"], "plan": {**g.attrs["skd"]["plan"], "seed": 7}}
    refused = cli(*train_args(cache=other, epochs=3, out=out, resume=True))
    assert refused.returncode == 2 and "same cache" in refused.stderr and "Traceback" not in refused.stderr, (
        refused.stderr[-500:]
    )
    other_arch = cli(*train_args(cache=fp32_cache, arch="resnet34", epochs=3, out=out, resume=True))
    assert (
        other_arch.returncode == 2 and "--arch resnet18" in other_arch.stderr and "Traceback" not in other_arch.stderr
    ), other_arch.stderr[-500:]
    longer = cli(*train_args(cache=fp32_cache, epochs=10, out=out, resume=True))
    assert longer.returncode == 2 and "--epochs 3, not 10" in longer.stderr, (
        f"a resume that reshapes the lr and alpha schedule must be refused: {longer.stderr[-500:]}"
    )


def test_a_run_is_replaced_only_on_overwrite_and_a_moved_cache_resumes(fp32_cache, tmp_path):
    """Rerunning without --resume (as after a Ctrl-C) keeps the run; --overwrite starts it again; a copy of the
    cache elsewhere is the same cache for --resume."""
    from skd.errors import OptionError

    out = tmp_path / "run"
    run_training(small_train_config(out, cache=fp32_cache, epochs=1))
    assert not (tmp_path / "run.lock").exists(), "a finished run left its lock file beside --out"
    with pytest.raises(OptionError, match="holds a run .*pass --resume to continue it, --overwrite"):
        run_training(small_train_config(out, cache=fp32_cache, epochs=1))
    kept = (out / "metrics.jsonl").read_text().count("\n")
    assert kept == 1, f"a refused rerun left {kept} of 1 metrics lines"
    run_training(small_train_config(out, cache=fp32_cache, epochs=2, overwrite=True))
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [0, 1], f"--overwrite: epochs {[m['epoch'] for m in lines]}"
    moved = shutil.copytree(fp32_cache, tmp_path / "moved")
    said = []
    train(small_train_config(out, cache=moved, epochs=2, resume=True), log=said.append)
    assert any("resuming" in m for m in said), f"resuming on the moved cache: {said}"


def test_killed_run_resumes_with_the_same_metrics(fp32_cache, tmp_path):
    args = train_args(cache=fp32_cache, epochs=3, steps_per_epoch=2, alpha="0.9")
    straight = cli(*args, "--out", tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr[-1500:]
    killed = cli(*args, "--out", tmp_path / "resumed", env={"SKD_FAULT": "after-epoch:1"})
    assert killed.returncode == -9, f"fault injection did not kill the run ({killed.returncode})"
    resumed = cli(*args, "--out", tmp_path / "resumed", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-1500:]
    assert "resuming" in resumed.stderr, f"the resumed run does not say so: {resumed.stderr[-500:]}"
    want = [json.loads(x) for x in (tmp_path / "straight/metrics.jsonl").read_text().splitlines()]
    got = [json.loads(x) for x in (tmp_path / "resumed/metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in got] == [0, 1, 2], f"epochs in metrics after resume: {[m['epoch'] for m in got]}"
    for a, b in zip(want, got):
        for key in ("train_loss", "kd_loss", "ce_loss", "val_top1", "lr"):
            assert abs(a[key] - b[key]) < 1e-6, f"epoch {a['epoch']} {key}: {a[key]} straight, {b[key]} resumed"


def test_failed_step_leaves_no_reader_threads(fp32_cache, tmp_path):
    """An exception inside an epoch (kept alive, as a notebook keeps it) must not leave logit readers running."""
    import threading

    def fail(epoch, step, parts):
        raise ArithmeticError("stop here")

    with pytest.raises(ArithmeticError) as kept:
        train(small_train_config(tmp_path / "run", cache=fp32_cache), on_step=fail)
    alive = [t.name for t in threading.enumerate() if t.name.startswith("skd-")]
    assert kept.value is not None and not alive, f"threads still running after the failed epoch: {alive}"


DELETING_STUDENT = """
import os, pathlib, torch
class Deleter(torch.nn.Module):
    def __init__(self, num_classes):
        super().__init__()
        self.fc = torch.nn.Linear(3, num_classes)
    def forward(self, x):  # the first call (the class count, before training) deletes one class's images
        for path in pathlib.Path(os.environ["DELETE_DIR"]).glob("*.JPEG"):
            path.unlink()
        return self.fc(x.mean((2, 3)))
def student(num_classes=3):
    return Deleter(num_classes)
"""


def test_images_vanishing_during_training_are_one_line(fp32_cache, image_root, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(image_root, data)
    (tmp_path / "deleting.py").write_text(DELETING_STUDENT)
    args = train_args(cache=fp32_cache, data=data, arch="py:deleting:student", no_val=True, out=tmp_path / "run")
    result = cli(*args, env={"PYTHONPATH": str(tmp_path), "DELETE_DIR": str(data / "train/cat")})
    assert result.returncode == 2, f"exit {result.returncode}: {result.stderr[-800:]}"
    assert (
        "reading the images of epoch 0 failed" in result.stderr
        and "--resume" in result.stderr
        and "Traceback" not in result.stderr
    ), result.stderr[-800:]


def test_a_training_copy_without_val_trains_with_no_val(fp32_cache, image_root, tmp_path):
    """A machine may hold only train/: --no-val neither checks nor needs val/; validation asks for it by name."""
    from skd.errors import SkdError

    data = tmp_path / "data"
    shutil.copytree(image_root / "train", data / "train")
    losses, _, _ = run_training(small_train_config(tmp_path / "run", cache=fp32_cache, data=data, val=False, epochs=1))
    assert len(losses) == 3 and np.isfinite(losses).all(), f"{len(losses)} steps, losses {losses.tolist()}"
    with pytest.raises(SkdError, match="has no val/ folder.*pass --no-val"):
        run_training(small_train_config(tmp_path / "with-val", cache=fp32_cache, data=data, val=True, epochs=1))


@pytest.mark.parametrize(
    "option,value",
    [
        ("--multiplier", "nan"),
        ("--multiplier", "0"),
        ("--multiplier", "inf"),
        ("--lr", "-1"),
        ("--momentum", "-0.5"),
        ("--weight-decay", "nan"),
        ("--temperature", "inf"),
        ("--warmup-epochs", "-1"),
    ],
)
def test_bad_numbers_are_refused_before_any_work(option, value, fp32_cache, tmp_path):
    """NaN or negative settings would train to NaN weights (exit 0) or fail deep in torch: refuse them up front."""
    from click.testing import CliRunner

    from skd.cli.main import train as train_command

    result = CliRunner().invoke(
        train_command, ["--cache", str(fp32_cache), option, value, "--out", str(tmp_path / "r")]
    )
    assert result.exit_code == 2 and option in result.output, (
        f"{option} {value}: exit {result.exit_code}: {result.output}"
    )
    assert not (tmp_path / "r").exists(), f"{option} {value}: a run folder was created"


TINY_STUDENT = """
import torch
def student(num_classes=3):
    # no batch norm: per-process batch statistics would make 1 and 2 processes differ by design
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                               torch.nn.Flatten(), torch.nn.Linear(8, num_classes))
"""


def test_two_processes_match_one_with_the_same_global_batch(fp32_cache, tmp_path):
    """One epoch over all 18 samples; the 2-process run averages gradients over the same global batch."""
    (tmp_path / "tiny.py").write_text(TINY_STUDENT)
    env = {"PYTHONPATH": str(tmp_path), "OMP_NUM_THREADS": "1"}
    common = train_args(cache=fp32_cache, arch="py:tiny:student", batch_size=6, lr=0.1, alpha="0.9")
    one = cli(*common, "--out", tmp_path / "one", env=env)
    assert one.returncode == 0, one.stderr[-1500:]
    cmd = torchrun(Path(sys.executable).parent / "skd-train", *common, "--out", tmp_path / "two")
    two = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env={**os.environ, **env})
    assert two.returncode == 0, two.stderr[-2000:]
    a = json.loads((tmp_path / "one/metrics.jsonl").read_text())
    b = json.loads((tmp_path / "two/metrics.jsonl").read_text())
    # Same samples, same number of steps, but each step's global batch groups different samples
    # (each rank walks its own contiguous half of the view): close, not bit-equal.
    rel = abs(a["train_loss"] - b["train_loss"]) / a["train_loss"]
    assert rel < 0.02, f"2-process loss {b['train_loss']:.5f} vs 1-process {a['train_loss']:.5f} ({rel:.2%})"
    assert abs(a["val_top1"] - b["val_top1"]) <= 1 / 6 + 1e-9, f"val top-1 {b['val_top1']} vs {a['val_top1']}"


@pytest.mark.parametrize("case", ["missing", "unfinished", "wrong data", "wrong classes", "no source"])
def test_user_errors_are_one_line(case, fp32_cache, image_root, teacher_file, tmp_path, in_process, monkeypatch):
    args = train_args(out=tmp_path / "run")
    if case == "missing":
        args += ["--cache", tmp_path / "no-cache"]
        needle = "does not exist"
    elif case == "unfinished":
        build = build_args(weights=teacher_file, data=image_root, out=tmp_path / "part")
        killed = subprocess.run(
            [sys.executable, "-m", "skd.cli.main", *build],
            capture_output=True,
            env={**os.environ, "SKD_FAULT": "after-shard:1"},
            cwd=REPO,
        )
        assert killed.returncode == -9, f"the build was not killed after its first shard: exit {killed.returncode}"
        args += ["--cache", tmp_path / "part"]
        needle = "unfinished"
    elif case == "wrong data":
        from conftest import make_image_folder

        other = make_image_folder(tmp_path / "other", per_class=5)
        args += ["--cache", fp32_cache, "--data", other]
        needle = "differ"
    elif case == "wrong classes":
        (tmp_path / "tenway.py").write_text(
            "import torch\ndef student(num_classes=10):\n"
            "    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(10))\n"
        )
        args += ["--cache", fp32_cache, "--arch", "py:tenway:student"]
        monkeypatch.syspath_prepend(str(tmp_path))
        needle = "outputs"
    else:
        needle = "--cache"
    code, err = in_process("train", *args)
    assert code == 2 and needle in err and err.count("\n") == 1, f"{case}: exit {code}: {err[-800:]}"


def test_metrics_name_only_what_the_loss_uses_and_another_loader_is_warned(fp32_cache, tmp_path):
    from skd.errors import SkdWarning

    fields = {
        kd: set(train(small_train_config(tmp_path / kd, cache=fp32_cache, kd=kd, epochs=1)))
        for kd in ("none", "hinton")
    }
    assert not {"alpha", "multiplier"} & fields["none"], f"--kd none logs {sorted(fields['none'])}"
    assert "alpha" in fields["hinton"] and "multiplier" not in fields["hinton"], (
        f"hinton logs {sorted(fields['hinton'])}"
    )
    with pytest.warns(SkdWarning, match="built with torchvision.*grey levels"):
        train(small_train_config(tmp_path / "dali", cache=fp32_cache, loader="dali", epochs=1))


FILLING_STUDENT = """
import os, shutil, torch
calls = [0]
class Filler(torch.nn.Module):
    \"\"\"A tiny student whose 4th forward (epoch 1's first step) fills the run's disk, as another job would.\"\"\"
    def __init__(self, num_classes=3):
        super().__init__()
        self.fc = torch.nn.Linear(3, num_classes)
    def forward(self, x):
        calls[0] += 1
        if calls[0] == 4:
            folder = os.environ["FILL_DIR"]
            with open(os.path.join(folder, "filler"), "wb") as f:
                f.write(b"x" * shutil.disk_usage(folder).free)
        return self.fc(x.mean((2, 3)))
def student(num_classes=3):
    return Filler(num_classes)
"""


def test_a_disk_filling_up_during_training_is_one_line_and_resumes(fp32_cache, tmp_path):
    """A real full disk (a small tmpfs) at the end of epoch 1: one line, exit 2, no temporary file, the epoch-0
    checkpoint kept; after space is freed, --resume finishes the run."""
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root): the disk-full test needs a real small disk")
    try:
        (tmp_path / "filling.py").write_text(FILLING_STUDENT)
        args = train_args(cache=fp32_cache, arch="py:filling:student", epochs=2, steps_per_epoch=2, no_val=True)
        args += ["--out", mount / "run"]
        env = {"PYTHONPATH": str(tmp_path), "FILL_DIR": str(mount)}
        full = cli(*args, env=env)
        assert full.returncode == 2, f"exit {full.returncode}: {full.stderr[-800:]}"
        lines = [line for line in full.stderr.splitlines() if line.startswith("error:")]
        assert (
            len(lines) == 1
            and "no space left on device" in lines[0]
            and "--resume" in lines[0]
            and "Traceback" not in full.stderr
        ), full.stderr[-800:]
        assert not list((mount / "run").glob("*.tmp")), f"temporary files left: {list((mount / 'run').iterdir())}"
        saved = torch.load(mount / "run" / "checkpoint.pth", weights_only=True)
        assert saved["epoch"] == 0, f"the kept checkpoint is of epoch {saved['epoch']}, not 0"
        (mount / "filler").unlink()
        resumed = cli(*args, "--resume", env=env)
        assert resumed.returncode == 0 and "resuming" in resumed.stderr, resumed.stderr[-800:]
        epochs = [json.loads(line)["epoch"] for line in (mount / "run" / "metrics.jsonl").read_text().splitlines()]
        assert epochs == [0, 1], f"metrics.jsonl holds epochs {epochs} after the resume"
    finally:
        subprocess.run(["umount", str(mount)])


def test_a_run_folder_in_use_or_not_a_folder_is_refused_in_one_line(fp32_cache, tmp_path, in_process):
    """A requeued job, or --resume while the first run still trains: the second run is refused naming the
    holder, and the first run's metrics are untouched; an --out that is a file is refused before any work."""
    from skd.storage.locks import FolderLock

    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"epoch": 0}\n')
    args = train_args(cache=fp32_cache)
    with FolderLock(out, activity="trained into"):
        code, err = in_process("train", *args, "--out", out, "--resume")
    assert code == 2 and f"is being trained into by pid {os.getpid()}" in err and err.count("\n") == 1, (
        f"exit {code}: {err[-500:]}"
    )
    kept = (out / "metrics.jsonl").read_text()
    assert kept == '{"epoch": 0}\n', f"the refused run touched metrics.jsonl: {kept!r}"
    assert not (tmp_path / "run.lock").exists(), "the holder's lock file stayed after it released"
    (tmp_path / "file").write_text("notes")
    code, err = in_process("train", *args, "--out", tmp_path / "file")
    assert code == 2 and "is a file" in err and err.count("\n") == 1, f"--out a file: exit {code}: {err[-500:]}"
    assert (tmp_path / "file").read_text() == "notes", "the file given as --out was changed"
