"""Bad images are found by the index pass, before any teacher work; unusual ones build; untrusted caches are refused."""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from conftest import build_args, make_image_folder, photo_like, run_skd, train_args, write_jpeg

from skd.errors import ModelError
from skd.models.teachers import read_state_dict


def build(root, out, teacher, **options):
    """`skd-cache build` of one view through DALI, in a fresh process."""
    return run_skd(*build_args(weights=teacher, data=root, out=out, views=1, loader="dali", workers=1, **options))


def unusual_images(cls: Path) -> list[str]:
    """Images that are odd but valid: all must build."""
    from PIL import Image

    write_jpeg(cls / "cmyk.JPEG", photo_like(50, 70, 1), mode="CMYK")
    write_jpeg(cls / "gray.JPEG", photo_like(60, 40, 2), mode="L")
    write_jpeg(cls / "rotated.JPEG", photo_like(40, 80, 3), exif_orientation=6)
    Image.fromarray(photo_like(45, 45, 4)).save(cls / "png_inside.JPEG", "PNG")
    return ["cmyk.JPEG", "gray.JPEG", "rotated.JPEG", "png_inside.JPEG"]


@pytest.fixture(scope="module")
def bad_root(tmp_path_factory) -> tuple[Path, dict]:
    root = make_image_folder(tmp_path_factory.mktemp("bad") / "data", per_class=3, val_per_class=1)
    cls = root / "train" / "ant"
    unusual_images(cls)
    good = (cls / "ant_000.JPEG").read_bytes()
    (cls / "truncated.JPEG").write_bytes(good[: len(good) // 2])
    (cls / "empty.JPEG").write_bytes(b"")
    (cls / "notes.JPEG").write_text("this is not an image\n")
    (cls / "unreadable.JPEG").symlink_to(cls / "gone.JPEG")  # root reads any mode bits: a dangling link instead
    (root / "train" / "dog").mkdir()  # an empty class folder
    bad = {
        "train/ant/truncated.JPEG": "truncated",
        "train/ant/empty.JPEG": "cannot identify",
        "train/ant/notes.JPEG": "cannot identify",
        "train/ant/unreadable.JPEG": "No such file",
    }
    return root, bad


def test_bad_images_stop_the_build_before_teacher_work_listing_each(bad_root, teacher_file, tmp_path):
    root, bad = bad_root
    result = build(root, tmp_path / "cache", teacher_file)
    assert result.returncode == 2, f"exit {result.returncode}: {result.stderr[-500:]}"
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-1000:]
    message = errors[0]
    for path, reason in bad.items():
        assert path in message, f"{path} is not named in: {message}"
    assert "4 of" in message, f"expected 4 bad files counted: {message}"
    assert not (tmp_path / "cache" / "zarr.json").exists(), "a cache was created despite bad images"


def test_empty_class_folder_is_an_error_by_default(tmp_path, teacher_file):
    root = make_image_folder(tmp_path / "data", per_class=2, val_per_class=0)
    (root / "train" / "zebra").mkdir()
    result = build(root, tmp_path / "cache", teacher_file)
    assert result.returncode == 2 and "zebra" in result.stderr and "no images" in result.stderr, result.stderr


def test_skip_leaves_bad_files_out_and_records_them(bad_root, tmp_path):
    root, bad = bad_root
    torch.manual_seed(0)
    teacher_file = tmp_path / "four.pth"  # the empty class "dog" keeps its label: 4 classes
    torch.save(__import__("torchvision").models.resnet18(num_classes=4).state_dict(), teacher_file)
    out = tmp_path / "cache"
    result = build(root, out, teacher_file, on_bad_image="skip")
    assert result.returncode == 0, result.stderr[-800:]
    g = zarr.open_group(str(out), mode="r")
    skipped = {path: reason for path, reason in g.attrs["skd"]["dataset"]["skipped"]}
    assert set(bad) | {"train/dog"} == set(skipped), f"recorded as skipped: {sorted(skipped)}"
    paths = set(g["samples/path"][...].tolist())
    assert not paths & set(bad), f"bad files in the index: {paths & set(bad)}"
    assert g.attrs["skd"]["dataset"]["classes"][-1] == "dog", "the empty class must keep its label"
    logits = g["views/logits"][...]
    assert np.isfinite(logits).all() and np.abs(logits).sum(axis=-1).min() > 0, "some rows were never written"
    rerun = build(root, out, teacher_file, on_bad_image="skip")
    assert rerun.returncode == 0 and "0 written now" in rerun.stdout, "a finished skip build must resume as complete"
    info = run_skd("info", out)
    assert info.returncode == 0, info.stderr[-500:]
    assert "truncated.JPEG" in info.stdout and "train/dog" in info.stdout, (
        f"info does not show the skipped files: {info.stdout}"
    )


def test_unusual_images_build_normally(tmp_path, teacher_file):
    root = make_image_folder(tmp_path / "data", per_class=2, val_per_class=0)
    names = unusual_images(root / "train" / "bee")
    result = build(root, tmp_path / "cache", teacher_file)
    assert result.returncode == 0, result.stderr[-800:]
    g = zarr.open_group(str(tmp_path / "cache"), mode="r")
    paths = g["samples/path"][...].tolist()
    sizes = dict(zip(paths, g["samples/size"][...].tolist()))
    assert all(f"train/bee/{n}" in paths for n in names), f"indexed: {paths}"
    assert sizes["train/bee/rotated.JPEG"] == [80, 40], f"EXIF-rotated size {sizes['train/bee/rotated.JPEG']}"


DELETER = """
import os, pathlib, torch
class Deleter(torch.nn.Module):
    \"\"\"A teacher whose first forward (the class count, after the index pass) deletes one class's images.\"\"\"
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(3, 3)
    def forward(self, x):
        for path in pathlib.Path(os.environ["DELETE_DIR"]).glob("*.JPEG"):
            path.unlink()
        return self.fc(x.mean((2, 3)))
def teacher(num_classes=3):
    return Deleter()
"""


def test_images_vanishing_during_the_build_are_one_line_and_resumable(image_root, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(image_root, data)
    (tmp_path / "deleter.py").write_text(DELETER)
    gone = data / "train" / "cat"
    backup = tmp_path / "backup"
    shutil.copytree(gone, backup)
    args = build_args(
        teacher="py:deleter:teacher",
        weights="none",
        data=data,
        out=tmp_path / "cache",
        views=1,
        image_size=16,
        batch_size=4,
        shard_size=4,
        chunk_size=4,
        no_val=True,
    )
    env = {"PYTHONPATH": str(tmp_path), "DELETE_DIR": str(gone)}
    failed = run_skd(*args, env=env)
    assert failed.returncode == 2, f"exit {failed.returncode}: {failed.stderr[-800:]}"
    assert (
        "reading the images of view 0/1 failed" in failed.stderr
        and "cat" in failed.stderr
        and "Traceback" not in failed.stderr
    ), failed.stderr[-800:]
    shutil.copytree(backup, gone, dirs_exist_ok=True)
    resumed = run_skd(*args, env={**env, "DELETE_DIR": str(tmp_path / "nothing-here")})
    assert resumed.returncode == 0, resumed.stderr[-800:]
    g = zarr.open_group(str(tmp_path / "cache"), mode="r")
    assert g["views/complete"][...].all(), "the resumed build should have completed every shard"


BROKEN_TEACHER = """
import torch
class Broken(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(3, 3)
    def forward(self, x):  # what an overflowing fp16 teacher or damaged weights give
        return {EXPRESSION}
def teacher(num_classes=3):
    return Broken()
"""


@pytest.mark.parametrize(
    "expression, codec, says",
    [
        ("self.fc(x.mean((2, 3))) / 0.0", "int8", "inf or nan logits"),
        ("self.fc(x.mean((2, 3))) * 0.0 + 1e5", "fp16", "beyond what --codec fp16 stores (65504)"),
        (
            "self.fc(x.mean((2, 3))) * 1e20",
            "compact",
            "beyond what --codec compact stores (1e+18)",
        ),  # its std overflows
    ],
)
def test_teacher_logits_the_cache_cannot_hold_are_never_stored(image_root, tmp_path, expression, codec, says):
    (tmp_path / "broken.py").write_text(BROKEN_TEACHER.replace("{EXPRESSION}", expression))
    args = build_args(
        teacher="py:broken:teacher",
        weights="none",
        data=image_root,
        out=tmp_path / "cache",
        views=1,
        image_size=16,
        batch_size=4,
        codec=codec,
        shard_size=4,
        chunk_size=4,
    )
    result = run_skd(*args, env={"PYTHONPATH": str(tmp_path)})
    assert result.returncode == 2 and says in result.stderr and "Traceback" not in result.stderr, (
        f"exit {result.returncode}: {result.stderr[-800:]}"
    )
    complete = zarr.open_group(str(tmp_path / "cache"), mode="r")["views/complete"][...]
    assert not complete.any(), f"shards holding unstorable logits were recorded complete: {complete}"


@pytest.fixture
def cache_copy(fp32_cache, tmp_path) -> Path:
    copy = tmp_path / "cache"
    shutil.copytree(fp32_cache, copy)
    return copy


def train(cache, out):
    """One step of `skd-train` on `cache`, without validation, in a fresh process."""
    return run_skd(*train_args(cache=cache, out=out, steps_per_epoch=1, no_val=True), tool="train")


@pytest.mark.parametrize("evil", ["/etc/passwd", "../../outside.JPEG"])
def test_cache_with_paths_outside_the_dataset_is_refused(cache_copy, tmp_path, evil):
    paths = zarr.open_group(str(cache_copy), mode="r+")["samples/path"]
    values = paths[...].astype(object)
    values[3] = evil
    paths[...] = values
    result = train(cache_copy, tmp_path / "run")
    assert result.returncode == 2, f"exit {result.returncode}: {result.stderr[-300:]}"
    assert evil in result.stderr and "refusing" in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_other_formats_and_missing_arrays_are_one_line_errors(cache_copy, tmp_path):
    from skd.store.schema import FORMAT_VERSION

    g = zarr.open_group(str(cache_copy), mode="r+")
    for other in (FORMAT_VERSION - 1, FORMAT_VERSION + 1):
        g.attrs["skd"] = {**g.attrs["skd"], "format": other}
        refused = train(cache_copy, tmp_path / "a")
        assert (
            refused.returncode == 2
            and f"format {other}" in refused.stderr
            and "rebuild" in refused.stderr
            and "Traceback" not in refused.stderr
        ), refused.stderr
    g.attrs["skd"] = {**g.attrs["skd"], "format": FORMAT_VERSION}
    shutil.rmtree(cache_copy / "views" / "order")
    missing = train(cache_copy, tmp_path / "b")
    assert missing.returncode == 2 and "views/order" in missing.stderr and "Traceback" not in missing.stderr, (
        missing.stderr
    )


def test_damaged_shard_stops_train_and_stats_with_one_line(cache_copy, tmp_path):
    """A flipped byte in a shard's index: both readers of the logits name the damage and the way out
    (a missing shard file is the same StoreError: tests/store/test_reader.py)."""
    shard = cache_copy / "views" / "logits" / "c" / "0" / "0" / "0"
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF
    shard.write_bytes(bytes(data))
    results = {
        "skd-train": train(cache_copy, tmp_path / "run"),
        "skd-cache stats": run_skd("stats", cache_copy),
    }
    for name, result in results.items():
        assert result.returncode == 2, f"{name}: exit {result.returncode}: {result.stderr[-500:]}"
        assert "damaged" in result.stderr and "verify --integrity" in result.stderr, f"{name}: {result.stderr}"
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert "Traceback" not in result.stderr and len(errors) == 1, f"{name}: not one line: {result.stderr[-800:]}"


class Payload:
    """A pickle that runs code when loaded: what a hostile weights file looks like."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_weights_with_code_are_refused_and_never_run(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    with open(evil, "wb") as f:
        pickle.dump({"state_dict": Payload(marker)}, f, protocol=2)
    with pytest.raises(ModelError, match="refusing to load"):
        read_state_dict(evil)
    assert not marker.exists(), "loading the weights file ran its code"
    torch.save({"model": {"module.fc.weight": torch.ones(2, 2)}}, tmp_path / "ok.pth")
    assert list(read_state_dict(tmp_path / "ok.pth")) == ["fc.weight"], "module. prefix not stripped"


@pytest.mark.parametrize(
    "tool,args,names",
    [
        ("cache", ["build", "--teacher", "resnet18", "--views", "0"], "--views 0:"),
        ("cache", ["build", "--teacher", "resnet18", "--teacher-mean", "0.5,0.5"], "--teacher-mean 0.5,0.5:"),
        ("cache", ["build", "--teacher", "resnet18", "--teacher-std", "0.5,0,0.5"], "--teacher-std 0.5,0,0.5:"),
        ("cache", ["build", "--teacher", "resnet18", "--teacher-size", "4"], "--teacher-size 4:"),
        ("cache", ["build", "--teacher", "resnet18", "--mixup", "-0.2"], "--mixup -0.2:"),
        ("cache", ["build", "--teacher", "resnet18", "--mixup-prob", "1.5"], "--mixup-prob 1.5:"),
        ("train", ["--cache", "somewhere", "--cutmix", "1.0"], "--cutmix 1.0: online mode"),
        (
            "cache",
            ["build", "--teacher", "resnet18", "--teacher-interpolation", "lanczos"],
            "--teacher-interpolation lanczos:",
        ),
        ("cache", ["info"], "'DIR|URL'"),
        ("cache", ["bulid"], "'bulid'"),
        ("train", ["--cache", "somewhere", "--bogus"], "'--bogus'"),
        (
            "train",
            ["--cache", "somewhere", "--teacher-size", "64", "--plan-seed", "3"],
            "--plan-seed 3, --teacher-size 64: online mode",
        ),
        ("train", ["--cache", "somewhere", "--resume", "--overwrite"], "--resume and --overwrite"),
    ],
)
def test_usage_mistakes_are_one_line_naming_the_option(tool, args, names, in_process):
    """A mistyped option is one `error:` line naming it and where help is, exit 2, as every other user mistake."""
    code, err = in_process(tool, *args)
    lines = err.strip().splitlines()
    assert code == 2, f"{args}: exit {code}: {lines}"
    assert len(lines) == 1 and lines[0].startswith("error:") and names in lines[0] and "--help" in lines[0], (
        f"{args}: not one line naming {names}: {lines}"
    )
