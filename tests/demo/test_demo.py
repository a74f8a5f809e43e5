"""The demo's dataset writer and models (`python -m skd.demo` itself runs in `make demo`, not here)."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("sklearn")

from skd.data.index import index_dataset  # noqa: E402
from skd.demo import digits as demo_digits  # noqa: E402
from skd.demo import walkthrough as demo  # noqa: E402
from skd.demo.models import IMAGE_SIZE  # noqa: E402
from skd.models.teachers import create_model  # noqa: E402


def _digest(root) -> str:
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.JPEG")):
        h.update(str(f.relative_to(root)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo") / "digits"
    return root, demo_digits.write_digits(root)


def test_writes_an_imagefolder_of_all_digits(digits):
    root, counts = digits
    assert counts == {"train": 1438, "val": 359}, f"images written: {counts}"
    index = index_dataset(root, workers=2)
    assert index.classes == [str(d) for d in range(10)], f"classes {index.classes}"
    indexed = (len(index.train.paths), len(index.val.paths))
    assert indexed == (1438, 359), f"indexed {indexed[0]} train and {indexed[1]} val images"
    in_val = set(np.unique(index.val.labels).tolist())
    assert in_val == set(range(10)), f"val holds the digits {sorted(in_val)}"
    sizes = set(np.unique(np.concatenate([index.train.sizes, index.val.sizes])).tolist())
    assert sizes == {demo_digits.CANVAS}, f"image sides {sorted(sizes)}, not all {demo_digits.CANVAS}"
    # the folder name is the digit, and each scikit-learn image is in exactly one split
    ids = [p.split("/")[-1] for p in index.train.paths + index.val.paths]
    assert len(set(ids)) == 1797, f"{len(set(ids))} distinct images of scikit-learn's 1797"
    with Image.open(root / index.train.paths[0]) as image:
        assert image.mode == "RGB" and image.format == "JPEG", f"{image.format} in {image.mode}"
    # stratified: every class has about 20% of its images in val
    for c in range(10):
        n_val = int((index.val.labels == c).sum())
        n_all = n_val + int((index.train.labels == c).sum())
        assert abs(n_val - 0.2 * n_all) <= 1, f"digit {c}: {n_val} of {n_all} images in val, not 20%"


def test_deterministic_and_left_alone_when_present(digits, tmp_path):
    root, counts = digits
    again = tmp_path / "digits"
    written = demo_digits.write_digits(again)
    assert written == counts, f"a second folder got {written} images, the first {counts}"
    assert _digest(again) == _digest(root), "two writes of the digits differ in their files"
    stamp = {f: f.stat().st_mtime_ns for f in again.rglob("*.JPEG")}
    demo_digits.write_digits(again)  # same manifest: nothing rewritten
    after = {f: f.stat().st_mtime_ns for f in again.rglob("*.JPEG")}
    rewritten = sorted(f.name for f in set(after) | set(stamp) if after.get(f) != stamp.get(f))
    assert not rewritten, f"{len(rewritten)} images rewritten, added or gone though present, e.g. {rewritten[:3]}"


def test_the_digit_is_inside_the_validation_crop():
    rng = np.random.default_rng(0)
    pixels = np.full(64, 16.0)  # a full white 8x8 square shows where the digit lands
    margin = (demo_digits.CANVAS - round(demo_digits.CANVAS * 224 / 256)) // 2
    for _ in range(50):
        image = demo_digits.render_digit(pixels, rng)
        assert image.shape == (demo_digits.CANVAS, demo_digits.CANVAS, 3) and image.dtype == np.uint8, (
            f"a rendered digit is {image.shape} {image.dtype}"
        )
        ink = image.max(axis=2) > 120
        ys, xs = np.nonzero(ink)
        assert ys.min() >= margin and xs.min() >= margin, f"ink at ({ys.min()}, {xs.min()}), margin {margin}"
        assert ys.max() < demo_digits.CANVAS - margin and xs.max() < demo_digits.CANVAS - margin, (
            f"ink at ({ys.max()}, {xs.max()}), past {demo_digits.CANVAS - margin}"
        )


def test_models_load_by_the_py_form():
    teacher = create_model("py:skd.demo:teacher")
    student = create_model("py:skd.demo:student", num_classes=10)
    x = torch.zeros(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    shapes = tuple(teacher.eval()(x).shape), tuple(student.eval()(x).shape)
    assert shapes == ((2, 10), (2, 10)), f"teacher and student outputs for 2 images: {shapes}"
    sizes = sum(p.numel() for p in student.parameters()), sum(p.numel() for p in teacher.parameters())
    assert sizes[0] * 10 < sizes[1], f"student of {sizes[0]:,} parameters, teacher of {sizes[1]:,}: not 10x"


def test_a_folder_the_demo_did_not_write_is_never_deleted(tmp_path):
    (tmp_path / "digits").mkdir()
    (tmp_path / "digits" / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match="not written by the demo"):
        demo_digits.write_digits(tmp_path / "digits")
    assert (tmp_path / "digits" / "notes.txt").read_text() == "mine", "the demo deleted a user's file"
    with pytest.raises(SystemExit):
        demo.main(["--dir", str(tmp_path), "--epochs", "0"])


def test_a_demo_stopped_while_writing_images_reruns(tmp_path, digits):
    root = tmp_path / "digits"
    demo_digits.write_digits(root)
    manifest = (root / "manifest.json").read_text()
    (root / "manifest.json").write_text('{"source": "sklearn.datasets.load_digits"}\n')  # what a stop leaves
    next(root.rglob("*.JPEG")).unlink()
    assert demo_digits.write_digits(root) == digits[1], "the rerun should write the digits again"
    assert (root / "manifest.json").read_text() == manifest, "the rerun's manifest differs from the first write's"
