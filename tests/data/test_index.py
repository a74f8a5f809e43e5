"""The dataset index: ImageFolder order and labels, header-only sizes, fingerprints, user errors."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import make_image_folder, photo_like, write_jpeg
from handmade import load_view, read_sizes
from PIL import Image, ImageFile, ImageOps
from torchvision.datasets import ImageFolder

from skd.data import index as index_module
from skd.data.image_probe import image_size
from skd.data.index import IMAGE_EXTENSIONS, fingerprint, index_dataset, scan_split
from skd.errors import DatasetError


def decoded_size(path) -> tuple[int, int]:
    """(height, width) after a full PIL decode with EXIF rotation applied: what a pipeline really gets."""
    with Image.open(path) as image:
        width, height = ImageOps.exif_transpose(image).convert("RGB").size
    return height, width


def write_image(path: Path, height: int, width: int, fmt: str, mode: str = "RGB", seed=0) -> Path:
    """Save a photo-like image of the given size in any PIL format."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(photo_like(height, width, seed), "RGB").convert(mode).save(path, fmt)
    return path


def assert_same_index(a, b):
    assert a.classes == b.classes, f"classes {a.classes}, then {b.classes}"
    assert (a.val is None) == (b.val is None), f"val split: {a.val is not None}, then {b.val is not None}"
    for name in ("train", "val") if a.val is not None else ("train",):
        sa, sb = getattr(a, name), getattr(b, name)
        assert sa.paths == sb.paths, f"{name} order differs between two indexings"
        for field in ("labels", "sizes", "file_bytes"):
            assert np.array_equal(getattr(sa, field), getattr(sb, field)), f"{name}.{field} differs"
        assert sa.fingerprint == sb.fingerprint, f"{name} fingerprint {sa.fingerprint}, then {sb.fingerprint}"


# --- order and labels ------------------------------------------------------------------------------


def test_order_and_labels_are_sorted_imagefolder_order_whatever_the_creation_order(tmp_path):
    classes = ["zebra", "Ant", "bee"]
    names = ["b.JPEG", "a10.jpg", "a2.jpeg", "B.png", "a.JPEG", "sub/c.JPEG", "sub/deeper/a.jpg", "sub b.JPEG"]
    rng = np.random.default_rng(3)
    jobs = [(c, n) for c in classes for n in names]
    for k in rng.permutation(len(jobs)):  # files and class folders appear in shuffled order
        cls, name = jobs[k]
        path = tmp_path / "train" / cls / name
        if name.endswith(".png"):
            write_image(path, 9, 11, "PNG", seed=int(k))
        else:
            write_jpeg(path, photo_like(9, 11, seed=int(k)))

    first = index_dataset(tmp_path, workers=2)
    second = index_dataset(tmp_path, workers=2)

    expected_names = ["B.png", "a.JPEG", "a10.jpg", "a2.jpeg", "b.JPEG", "sub b.JPEG", "sub/c.JPEG", "sub/deeper/a.jpg"]
    assert first.classes == ["Ant", "bee", "zebra"], f"classes {first.classes}"
    expected = [f"train/{c}/{n}" for c in ["Ant", "bee", "zebra"] for n in expected_names]
    assert first.train.paths == expected, f"got {first.train.paths[:8]}..., expected {expected[:8]}..."
    assert first.train.labels.dtype == np.int64, f"labels stored as {first.train.labels.dtype}"
    labels = first.train.labels.tolist()
    assert labels == [label for label in range(3) for _ in expected_names], f"labels {labels}"
    assert len(first.train) == 24, f"{len(first.train)} train samples indexed, 3 classes x 8 written"
    assert first.val is None, "no val/ folder, so no val split"
    assert_same_index(first, second)

    reference = ImageFolder(str(tmp_path / "train"))
    assert reference.classes == first.classes, f"ImageFolder's classes {reference.classes}, ours {first.classes}"
    ours = [(str(tmp_path / p), int(y)) for p, y in zip(first.train.paths, first.train.labels)]
    assert ours == [(os.path.normpath(p), y) for p, y in reference.samples], (
        "order or labels differ from torchvision ImageFolder"
    )


def test_indexing_twice_gives_identical_results(image_root):
    a = index_dataset(image_root, workers=2)
    b = index_dataset(image_root, workers=1)
    counts = (len(a.train), len(a.val))
    assert counts == (18, 6), f"fixture has 18 train and 6 val images, indexed {counts}"
    assert_same_index(a, b)


def test_root_is_absolute_and_paths_are_relative_posix(image_root, monkeypatch):
    monkeypatch.chdir(image_root.parent)
    index = index_dataset(image_root.name, workers=2)
    assert index.root == image_root and index.root.is_absolute(), f"root {index.root} is not {image_root}"
    odd = [p for p in index.train.paths if not p.startswith("train/") or "\\" in p]
    assert not odd, f"train paths not relative POSIX under train/: {odd}"
    odd = [p for p in index.val.paths if not p.startswith("val/")]
    assert not odd, f"val paths not under val/: {odd}"


def test_val_uses_train_class_labels(tmp_path):
    make_image_folder(tmp_path, per_class=1, val_per_class=0)
    write_jpeg(tmp_path / "val" / "cat" / "v.JPEG", photo_like(20, 30, seed=1))
    index = index_dataset(tmp_path, workers=2)
    assert index.classes == ["ant", "bee", "cat"], f"classes {index.classes}"
    assert index.val.paths == ["val/cat/v.JPEG"], f"val paths {index.val.paths}"
    assert index.val.labels.tolist() == [2], f"val 'cat' must get train's label 2, got {index.val.labels}"
    without = index_dataset(tmp_path, with_val=False, workers=2).val
    assert without is None, f"with_val=False indexed val: {without}"

    paths, labels = scan_split(tmp_path, "val")
    assert labels.tolist() == [0], "without a class list, val's own folders define the labels"


def test_non_image_and_hidden_files_are_ignored(tmp_path):
    make_image_folder(tmp_path, per_class=2, val_per_class=1)
    before = index_dataset(tmp_path, workers=2)
    junk = {
        "train/ant/README.txt": b"class notes",
        "train/ant/.DS_Store": b"\x00\x00\x00\x01Bud1",
        "train/ant/._ant_000.JPEG": b"\x00\x05\x16\x07AppleDouble",  # macOS tar metadata, not a JPEG
        "train/bee/.ipynb_checkpoints/x.JPEG": b"not an image",
        "train/.hidden_class/x.JPEG": b"not an image",
        "train/labels.csv": b"a,b",
        "val/ant/Thumbs.db": b"\x00",
    }
    for rel, data in junk.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(data)
    after = index_dataset(tmp_path, workers=2)
    assert after.classes == before.classes, f"classes {after.classes} != {before.classes}"
    assert after.train.paths == before.train.paths, f"non-image files were indexed: {after.train.paths}"
    assert_same_index(before, after)


def test_extension_match_is_case_insensitive_torchvision_list(tmp_path):
    want = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
    assert IMAGE_EXTENSIONS == want, f"extensions {IMAGE_EXTENSIONS}, torchvision's {want}"
    write_jpeg(tmp_path / "train" / "a" / "x.JpEg", photo_like(10, 12, 0))
    write_jpeg(tmp_path / "train" / "a" / "y.jpg.gz", photo_like(10, 12, 0))
    paths = index_dataset(tmp_path, workers=1).train.paths
    assert paths == ["train/a/x.JpEg"], f"indexed {paths}"


# --- sizes -----------------------------------------------------------------------------------------


def test_sizes_and_file_bytes_equal_full_decode(image_root):
    index = index_dataset(image_root, workers=2)
    for split in (index.train, index.val):
        assert split.sizes.shape == (len(split), 2) and split.sizes.dtype == np.int32, (
            f"sizes {split.sizes.shape} {split.sizes.dtype} for {len(split)} samples"
        )
        assert split.file_bytes.dtype == np.int64, f"file bytes stored as {split.file_bytes.dtype}"
        for path, size, nbytes in zip(split.paths, split.sizes.tolist(), split.file_bytes.tolist()):
            truth = decoded_size(image_root / path)
            assert tuple(size) == truth, f"{path}: indexed (h, w) {tuple(size)}, full decode {truth}"
            assert nbytes == os.path.getsize(image_root / path), f"{path}: file size {nbytes}"
    assert len(set(map(tuple, index.train.sizes.tolist()))) > 10, "fixture sizes should vary"


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_swaps_height_and_width_for_5_to_8(tmp_path, orientation):
    path = write_jpeg(tmp_path / "r.JPEG", photo_like(40, 80, seed=orientation), exif_orientation=orientation)
    with Image.open(path) as image:
        assert image.size == (80, 40), "stored pixels are 40 high x 80 wide"
    expected = (80, 40) if orientation >= 5 else (40, 80)
    got = image_size(path)
    assert got == expected, f"orientation {orientation}: got (h, w) {got}, expected {expected}"
    assert decoded_size(path) == expected, "PIL's exif_transpose disagrees with the index"
    read = read_sizes(tmp_path, ["r.JPEG"], workers=1).tolist()
    assert read == [list(expected)], f"orientation {orientation}: read_sizes gives {read}, expected {expected}"


@pytest.fixture(scope="module")
def mixed_root(tmp_path_factory) -> Path:
    """One class of many formats and colour modes, each a distinct size, plus one rotated JPEG."""
    root = tmp_path_factory.mktemp("mixed")
    d = root / "train" / "mixed"
    write_jpeg(d / "gray.JPEG", photo_like(31, 47, 1), mode="L")
    write_jpeg(d / "cmyk.JPEG", photo_like(33, 45, 2), mode="CMYK")
    write_jpeg(d / "rotated.JPEG", photo_like(40, 80, 3), exif_orientation=6)
    write_image(d / "rgb.png", 35, 43, "PNG")
    write_image(d / "palette.png", 36, 42, "PNG", mode="P")
    write_image(d / "png_named.JPEG", 37, 41, "PNG")  # like ImageNet's n02105855_2933.JPEG
    write_image(d / "b.bmp", 38, 39, "BMP")
    write_image(d / "w.webp", 39, 38, "WEBP")
    write_image(d / "t.tiff", 41, 37, "TIFF")
    write_image(d / "g.pgm", 42, 36, "PPM", mode="L")
    write_image(d / "c.ppm", 43, 35, "PPM")
    return root


def test_grayscale_cmyk_png_and_other_formats_have_correct_sizes(mixed_root):
    index = index_dataset(mixed_root, workers=2)
    assert len(index.train) == 11, f"expected all 11 files indexed, got {index.train.paths}"
    for path, size in zip(index.train.paths, index.train.sizes.tolist()):
        truth = decoded_size(mixed_root / path)
        assert tuple(size) == truth, f"{path}: indexed (h, w) {tuple(size)}, full decode {truth}"
    got = dict(zip(index.train.paths, map(tuple, index.train.sizes.tolist())))
    cmyk, rotated = got["train/mixed/cmyk.JPEG"], got["train/mixed/rotated.JPEG"]
    assert cmyk == (33, 45) and rotated == (80, 40), f"(h, w) of the CMYK JPEG {cmyk}, of the rotated one {rotated}"


def test_sizes_come_from_headers_without_decoding_pixels(mixed_root, monkeypatch):
    expected = index_dataset(mixed_root, workers=1).train.sizes

    def no_decode(self, *args, **kwargs):
        raise AssertionError("index decoded pixels")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decode)
    monkeypatch.setattr(Image.Image, "load", no_decode)
    index = index_dataset(mixed_root, workers=1)  # a load() anywhere would surface as a DatasetError
    differ = int((index.train.sizes != expected).any(axis=1).sum())
    assert differ == 0, f"{differ} sizes differ when no pixel may be decoded"


def test_read_sizes_keeps_input_order_across_chunks_and_worker_counts(image_root, monkeypatch, capsys):
    monkeypatch.setattr(index_module, "_CHUNK", 5)  # several chunks finishing in any order
    paths = index_dataset(image_root, workers=1).train.paths
    forward = read_sizes(image_root, paths, workers=1)
    backward = read_sizes(image_root, paths[::-1], workers=4, progress=True, desc="probe")
    assert np.array_equal(backward, forward[::-1]), "sizes not returned in input order"
    assert forward.dtype == np.int32 and forward.shape == (18, 2), f"sizes {forward.dtype} {forward.shape}"
    assert "probe" in capsys.readouterr().err, "progress=True shows a tqdm bar named by desc"
    none = read_sizes(image_root, [], workers=2).shape
    assert none == (0, 2), f"the sizes of no images have shape {none}"


# --- fingerprint -----------------------------------------------------------------------------------


def test_fingerprint_tracks_sizes_and_names_and_nothing_else(tmp_path):
    root = make_image_folder(tmp_path / "data", per_class=2, val_per_class=1)
    base = index_dataset(root, workers=2)
    target = root / base.train.paths[0]
    again = fingerprint(base.train.paths, base.train.file_bytes.tolist())
    assert base.train.fingerprint == again, f"fingerprint {base.train.fingerprint}, from paths and sizes {again}"
    assert len(base.train.fingerprint) == 64, f"fingerprint of {len(base.train.fingerprint)} hex digits"

    os.utime(target, (1, 1))  # timestamps alone do not change the data
    touched = index_dataset(root, workers=2).train.fingerprint
    assert touched == base.train.fingerprint, f"a touched file changed the fingerprint to {touched}"

    old_bytes = target.stat().st_size
    write_jpeg(target, photo_like(50, 60, seed=99), quality=50)
    assert target.stat().st_size != old_bytes, f"the re-encoded file kept its {old_bytes} bytes"
    resized = index_dataset(root, workers=2)
    assert resized.train.fingerprint != base.train.fingerprint, (
        f"file size {old_bytes} -> {target.stat().st_size} bytes left the fingerprint unchanged"
    )
    assert resized.val.fingerprint == base.val.fingerprint, "val fingerprint changed with a train file"

    renamed = target.with_name("renamed.JPEG")
    target.rename(renamed)
    after_rename = index_dataset(root, workers=2)
    assert after_rename.train.fingerprint not in (base.train.fingerprint, resized.train.fingerprint), (
        "renaming a file left the fingerprint unchanged"
    )
    renamed.rename(target)
    back = index_dataset(root, workers=2).train.fingerprint
    assert back == resized.train.fingerprint, (
        f"renamed back, the fingerprint is {back}, not {resized.train.fingerprint}"
    )


# --- user errors -----------------------------------------------------------------------------------


def _missing_root(tmp):
    return tmp / "nope", tmp / "nope"


def _missing_train(tmp):
    write_jpeg(tmp / "val" / "ant" / "a.JPEG", photo_like(10, 10, 0))
    return tmp, tmp / "train"


def _train_without_class_folders(tmp):
    (tmp / "train").mkdir()
    (tmp / "train" / "notes.txt").write_text("x")
    return tmp, tmp / "train"


def _train_with_loose_images(tmp):
    write_jpeg(tmp / "train" / "a.JPEG", photo_like(10, 10, 0))
    return tmp, tmp / "train"


def _class_folder_without_images(tmp):
    make_image_folder(tmp, per_class=1, val_per_class=0)
    (tmp / "train" / "dog").mkdir()
    (tmp / "train" / "dog" / "README.txt").write_text("x")
    return tmp, tmp / "train" / "dog"


def _val_class_not_in_train(tmp):
    make_image_folder(tmp, per_class=1, val_per_class=1)
    write_jpeg(tmp / "val" / "dog" / "d.JPEG", photo_like(10, 10, 0))
    return tmp, tmp / "val" / "dog"


def _empty_val(tmp):
    make_image_folder(tmp, per_class=1, val_per_class=0)
    (tmp / "val").mkdir()
    return tmp, tmp / "val"


def _unsorted_imagenet_val(tmp):
    make_image_folder(tmp, per_class=1, val_per_class=0)
    write_jpeg(tmp / "val" / "ILSVRC2012_val_00000001.JPEG", photo_like(10, 10, 0))
    return tmp, tmp / "val"


def _not_an_image(tmp):
    make_image_folder(tmp, per_class=1, val_per_class=0)
    bad = tmp / "train" / "bee" / "bad.JPEG"
    bad.write_bytes(b"<html>404 Not Found</html>")
    return tmp, bad


def _truncated_header(tmp):
    make_image_folder(tmp, per_class=1, val_per_class=0)
    bad = tmp / "train" / "cat" / "cut.JPEG"
    bad.write_bytes(write_jpeg(tmp / "whole.jpg", photo_like(30, 30, 0)).read_bytes()[:60])
    return tmp, bad


def _empty_file(tmp):
    make_image_folder(tmp, per_class=1, val_per_class=0)
    bad = tmp / "train" / "ant" / "zero.png"
    bad.write_bytes(b"")
    return tmp, bad


def _name_not_utf8(tmp):
    make_image_folder(tmp, per_class=1, val_per_class=0)
    write_jpeg(Path(os.fsdecode(bytes(tmp / "train" / "ant") + b"/caf\xe9.JPEG")), photo_like(10, 10, 0))
    return tmp, tmp / "train"


@pytest.mark.parametrize(
    "case",
    [
        _missing_root,
        _missing_train,
        _train_without_class_folders,
        _train_with_loose_images,
        _class_folder_without_images,
        _val_class_not_in_train,
        _empty_val,
        _unsorted_imagenet_val,
        _not_an_image,
        _truncated_header,
        _empty_file,
        _name_not_utf8,
    ],
    ids=lambda f: f.__name__.strip("_"),
)
def test_dataset_mistakes_raise_one_line_errors_naming_the_path(tmp_path, case):
    root, offending = case(tmp_path)
    with pytest.raises(DatasetError) as caught:
        index_dataset(root, workers=2)
    message = str(caught.value)
    assert isinstance(caught.value, ValueError), f"{type(caught.value).__mro__} is not a ValueError"
    assert "\n" not in message, f"message is not one line: {message!r}"
    assert str(offending) in message, f"message does not name {offending}: {message}"


def test_all_unreadable_files_are_reported_at_once(tmp_path):
    make_image_folder(tmp_path, per_class=2, val_per_class=1)
    bad = [f"train/{c}/bad{i}.JPEG" for c in ("ant", "cat") for i in range(4)]
    for rel in bad:
        (tmp_path / rel).write_bytes(b"GIF89a not really")
    with pytest.raises(DatasetError) as caught:
        index_dataset(tmp_path, workers=2)
    message = str(caught.value)
    assert f"8 of {6 + 8 + 3} image files cannot be read" in message, message
    for rel in bad:
        assert str(tmp_path / rel) in message, f"{rel} not named in: {message}"
    assert "more" not in message, f"up to 20 files are named, not counted: {message}"
    assert "cannot identify image file" in message, f"PIL's reason missing: {message}"
    assert "_000.JPEG" not in message, "a good file was blamed"

    with pytest.raises(DatasetError, match="1 of 1 image files"):
        read_sizes(tmp_path, [bad[0]], workers=1)


def test_missing_file_in_read_sizes_names_it(tmp_path):
    with pytest.raises(DatasetError) as caught:
        read_sizes(tmp_path, ["train/a/gone.JPEG"], workers=1)
    assert str(tmp_path / "train/a/gone.JPEG") in str(caught.value), f"the missing file is not named: {caught.value}"
    assert "No such file or directory" in str(caught.value), f"the reason is not given: {caught.value}"


def _within(seconds: float, fn):
    """fn()'s result or exception, or TimeoutError when it is still running after `seconds`."""
    out = {}

    def call():
        try:
            out["value"] = fn()
        except Exception as exc:  # handed to the test thread
            out["error"] = exc

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        return TimeoutError(f"still running after {seconds} s")
    return out.get("error", out.get("value"))


def test_a_fifo_named_like_an_image_is_reported_not_opened(tmp_path):
    """A FIFO (or device) under train/ would block the header read forever: it is never opened."""
    make_image_folder(tmp_path, per_class=2, val_per_class=1)
    fifo = tmp_path / "train" / "bee" / "pipe.JPEG"
    os.mkfifo(fifo)
    (tmp_path / "train" / "ant" / "link.JPEG").symlink_to(tmp_path / "train" / "ant" / "ant_000.JPEG")
    try:
        failed = _within(20, lambda: index_dataset(tmp_path, workers=2, on_bad="error"))
        skipped = _within(20, lambda: index_dataset(tmp_path, workers=2, on_bad="skip"))
    finally:
        try:  # a reader blocked in open() is released by a writer appearing
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:  # no reader waiting: nothing blocked
            pass
    assert isinstance(failed, DatasetError), f"on_bad='error' with a FIFO in train/bee gave {failed!r}"
    assert f"{fifo} (not a regular file (fifo))" in str(failed), f"the FIFO is not named: {failed}"
    assert "1 of 11 image files" in str(failed), f"a symlink to an image is fine; message: {failed}"
    assert not isinstance(skipped, Exception), f"on_bad='skip' with a FIFO in train/bee gave {skipped!r}"
    assert "train/bee/pipe.JPEG" not in skipped.train.paths, f"the FIFO was indexed: {skipped.train.paths}"
    assert len(skipped.train) == 7, f"{len(skipped.train)} train images indexed, expected 6 files and 1 symlink"
    assert skipped.skipped == (("train/bee/pipe.JPEG", "not a regular file (fifo)"),), (
        f"skipped records {skipped.skipped}"
    )


# --- images over PIL's decompression-bomb limit ----------------------------------------------------------


def _bomb_warnings(record) -> tuple[list[str], list[str]]:
    """(skd's warnings, PIL's DecompressionBombWarnings) among recorded warnings, as text."""
    from skd.errors import SkdWarning

    ours = [str(w.message) for w in record if issubclass(w.category, SkdWarning)]
    pils = [str(w.message) for w in record if issubclass(w.category, Image.DecompressionBombWarning)]
    return ours, pils


def test_an_image_over_the_decompression_bomb_limit_is_named_once_by_the_index(tmp_path, monkeypatch):
    """PIL's DecompressionBombWarning names no file; the index names the image, its size and the limit, once."""
    from skd.errors import SkdWarning

    for name in ("a.png", "b.png"):
        write_image(tmp_path / "train" / "small" / name, 20, 20, "PNG")  # 400 pixels: under the limit
    big = write_image(tmp_path / "train" / "large" / "big.png", 40, 40, "PNG")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 1600 pixels: over it, under twice (PIL's error)
    with pytest.warns(SkdWarning) as record:
        index = index_dataset(tmp_path, workers=2)
    ours, pils = _bomb_warnings(record)
    assert len(ours) == 1, f"{len(ours)} skd warnings for one image over PIL's limit 1000: {ours}"
    assert str(big) in ours[0] and "1600 pixels" in ours[0] and "limit of 1000" in ours[0], (
        f"the warning does not name {big}, its 1600 pixels and the limit 1000: {ours[0]}"
    )
    assert not pils, f"PIL's own DecompressionBombWarning escaped the index: {pils}"
    assert "train/large/big.png" in index.train.paths, f"an image over the warning limit is indexed: {index.train}"
    with pytest.warns(SkdWarning) as record:
        image_size(big)  # the one-file read skd-cache verify uses
    ours, pils = _bomb_warnings(record)
    assert len(ours) == 1 and str(big) in ours[0] and not pils, f"image_size({big}) warned {ours}, PIL {pils}"


def test_an_image_over_the_decompression_bomb_limit_is_named_once_by_the_torchvision_loader(tmp_path, monkeypatch):
    """load_view opens the image at every view: one warning naming it, not PIL's nameless one per open."""
    from skd.errors import SkdWarning

    big = write_image(tmp_path / "big.png", 40, 40, "PNG")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 1600 pixels: over it, under twice (PIL's error)
    with pytest.warns(SkdWarning) as record:
        for flip in (False, True):
            load_view(str(big), (0, 0, 40, 40), flip, 16, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    ours, pils = _bomb_warnings(record)
    assert len(ours) == 1, f"{len(ours)} skd warnings for two views of one image over PIL's limit 1000: {ours}"
    assert str(big) in ours[0] and "1600 pixels" in ours[0], f"the warning does not name {big} (1600 pixels): {ours}"
    assert not pils, f"PIL's own DecompressionBombWarning escaped load_view: {pils}"


def test_folder_links_that_loop_or_leave_the_class_are_not_followed(tmp_path):
    """`train/ant/loop -> ..` would index every class again ~40 levels deep, labelled ant; a link to another
    class would label its images as this one. Such links are left out with a warning; a link to a folder inside
    the class folder is followed as torchvision follows it."""
    from skd.errors import SkdWarning

    make_image_folder(tmp_path, per_class=3, val_per_class=1)
    ant = tmp_path / "train" / "ant"
    (ant / "loop").symlink_to("..")
    (ant / "bees").symlink_to(tmp_path / "train" / "bee")
    (ant / "more").mkdir()
    write_jpeg(ant / "more" / "a.JPEG", photo_like(24, 24, 0))
    (ant / "again").symlink_to(ant / "more")  # a second path to a folder already read
    with pytest.warns(SkdWarning, match="3 folder links under .*ant lead out of it or back into"):
        index = index_dataset(tmp_path, workers=2, with_val=False)
    ant_paths = [p for p, label in zip(index.train.paths, index.train.labels) if index.classes[label] == "ant"]
    assert sorted(ant_paths) == sorted([*(f"train/ant/ant_00{i}.JPEG" for i in range(3)), "train/ant/more/a.JPEG"]), (
        f"ant's images: {ant_paths}"
    )
    assert len(index.train) == 3 * len(index.classes) + 1, f"{len(index.train)} train images indexed"
