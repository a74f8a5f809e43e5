"""The input pipelines: exact replay, DALI/torchvision agreement, axis order, EXIF, colour modes.

Everything a student replay relies on: an item's tensor is the same whatever the batch size,
thread count or run, both pipelines cut the same window out of the same (EXIF-rotated) frame,
and odd JPEGs (grayscale, CMYK) come out as the same RGB view.
"""

from __future__ import annotations

import struct
import sys
import zlib

import numpy as np
import pytest
import torch
from conftest import photo_like, write_jpeg
from PIL import Image, ImageOps

from skd.data.image_probe import image_size
from skd.errors import DeviceError
from skd.pipelines import IMAGENET_MEAN, IMAGENET_STD, make_loader
from skd.plan.crops import crop_windows, flips

SIZE = 48
STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def load(kind, files, boxes, flip=None, *, batch_size=4, workers=1, image_size=SIZE, positions=None):
    """All batches of a loader over `files`, plus the concatenated images and positions."""
    n = len(files)
    positions = np.arange(n) if positions is None else positions
    loader = make_loader(
        kind,
        files=[str(f) for f in files],
        boxes=boxes,
        flips=np.zeros(n, np.uint8) if flip is None else flip,
        labels=np.arange(n) % 3,
        positions=positions,
        image_size=image_size,
        batch_size=batch_size,
        workers=workers,
    )
    batches = list(loader)
    assert len(batches) == len(loader), f"{kind} loader says {len(loader)} batches, delivered {len(batches)}"
    return batches, torch.cat([b.images for b in batches]), torch.cat([b.positions for b in batches])


def levels(images: torch.Tensor) -> torch.Tensor:
    """Normalised images back on the 0-255 scale."""
    return (images * STD + MEAN) * 255


def grey_levels_apart(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference per image, in 0-255 grey levels."""
    return ((a - b).abs() * STD * 255).mean(dim=(1, 2, 3))


@pytest.fixture(scope="module")
def planned(image_root):
    """Ten training images with their RandomResizedCrop windows and flips from the plan."""
    files = sorted((image_root / "train").rglob("*.JPEG"))[:10]
    sizes = np.array([ImageOps.exif_transpose(Image.open(f)).size[::-1] for f in files])
    ids = np.arange(len(files))
    return files, crop_windows(3, 0, ids, sizes), flips(3, 0, ids)


def test_dali_replay_is_exact_for_any_batch_size_threads_and_run(planned):
    files, boxes, flip = planned
    positions = np.random.default_rng(0).permutation(1000)[: len(files)]
    runs = {}
    for batch_size, workers in ((1, 1), (3, 2), (3, 2), (8, 1), (8, 2)):
        batches, images, got = load(
            "dali", files, boxes, flip, batch_size=batch_size, workers=workers, positions=positions
        )
        sizes = [len(b.positions) for b in batches]
        expected = {1: [1] * 10, 3: [3, 3, 3, 1], 8: [8, 2]}[batch_size]
        assert sizes == expected, f"batch size {batch_size}: delivered batches of {sizes}, expected {expected}"
        assert got.tolist() == positions.tolist(), f"batch size {batch_size}: delivered positions {got.tolist()}"
        labels = torch.cat([b.labels for b in batches]).tolist()
        assert labels == [i % 3 for i in range(10)], f"batch size {batch_size}: delivered labels {labels}"
        for key, other in runs.items():
            worst = (images - other).abs().max().item()
            assert torch.equal(images, other), f"batch size/threads {(batch_size, workers)} vs {key}: max diff {worst}"
        runs[(batch_size, workers)] = images

    loader = make_loader(
        "dali",
        files=[str(f) for f in files],
        boxes=boxes,
        flips=flip,
        labels=np.zeros(10),
        positions=positions,
        image_size=SIZE,
        batch_size=4,
    )
    first, second = (torch.cat([b.images for b in loader]) for _ in range(2))
    assert torch.equal(first, second), f"iterating one loader twice: max diff {(first - second).abs().max().item()}"
    assert torch.equal(first, images), "a second loader with batch size 4 differs from batch size 8"


def test_dali_and_torchvision_cut_the_same_views(planned, tmp_path):
    files, boxes, flip = planned
    # Plus a 7x downscale, where a resize without antialiasing would stand out.
    big = write_jpeg(tmp_path / "big.jpg", photo_like(300, 400, seed=11))
    files, boxes, flip = [*files, big], np.vstack([boxes, [(0, 0, 300, 400)]]), np.append(flip, 1)
    _, dali, _ = load("dali", files, boxes, flip)
    _, reference, _ = load("torchvision", files, boxes, flip)
    apart = grey_levels_apart(dali, reference)
    # The contract allows 3 levels. Measured (DALI 2.4, Pillow): 0.16-0.20 on the planned crops and
    # 0.09 on the big image, all from the two resizes (the decoded windows are bit-identical);
    # DALI without antialias is 2.6 levels off on the big image, hence the bound of 1.
    assert apart.max() < 1, f"DALI vs torchvision mean abs diff per image {apart.tolist()} grey levels"


def block_image(tmp_path):
    """60 high x 100 wide, blue, with a 20x32 block in the top-right corner: red left half, green right half."""
    array = np.zeros((60, 100, 3), np.uint8)
    array[:] = BLUE
    array[:20, 68:84] = RED
    array[:20, 84:] = GREEN
    return write_jpeg(tmp_path / "block.jpg", array, quality=95)


def mean_colour(images: torch.Tensor) -> list[list[float]]:
    """The mean RGB of each image, on the 0-255 scale."""
    return levels(images).mean(dim=(2, 3)).round().tolist()


def assert_colour(images: torch.Tensor, colour, what: str):
    got = mean_colour(images)
    for rgb in got:
        apart = max(abs(a - b) for a, b in zip(rgb, colour))
        assert apart < 40, f"{what}: mean colour {rgb}, expected {colour}"


@pytest.mark.parametrize("kind", ["dali", "torchvision"])
def test_windows_are_y_x_h_w_and_flip_mirrors_after_cropping(kind, tmp_path):
    path = block_image(tmp_path)
    # (y, x, h, w): a window with x and y swapped would not fit the 60-pixel height.
    _, red, _ = load(kind, [path], [(0, 68, 20, 16)])
    assert_colour(red, RED, f"{kind}, window on the red half of the top-right block")
    _, blue, _ = load(kind, [path], [(30, 0, 30, 60)])
    assert_colour(blue, BLUE, f"{kind}, window on the bottom-left background")

    _, views, _ = load(kind, [path, path], [(0, 68, 20, 32)] * 2, np.array([0, 1], np.uint8))
    quarter = SIZE // 4
    left, right = views[..., :quarter], views[..., -quarter:]
    assert_colour(left[:1], RED, f"{kind}, unflipped block, left quarter")
    assert_colour(right[:1], GREEN, f"{kind}, unflipped block, right quarter")
    assert_colour(left[1:], GREEN, f"{kind}, flipped block, left quarter")
    assert_colour(right[1:], RED, f"{kind}, flipped block, right quarter")
    assert torch.equal(views[1], views[0].flip(-1)), f"{kind}: the flipped view is not the mirror of the unflipped one"


def test_exif_rotation_gives_the_same_frame_in_both_pipelines(tmp_path):
    # Stored 40 high x 80 wide with the red marker at the stored top-left; orientation 6 (rotate 90
    # clockwise) shows it 80 high x 40 wide with the marker in the top-right corner, rows 0-23, columns 24-39.
    stored = np.zeros((40, 80, 3), np.uint8)
    stored[:] = BLUE
    stored[:16, :24] = RED
    path = write_jpeg(tmp_path / "rotated.jpg", stored, exif_orientation=6, quality=95)
    for kind in ("dali", "torchvision"):
        _, marker, _ = load(kind, [path], [(0, 24, 24, 16)])
        assert_colour(marker, RED, f"{kind}, marker window in the EXIF-rotated frame")
        # Rows 56-79 exist only in the rotated frame (the stored image is 40 high).
        _, bottom, _ = load(kind, [path], [(56, 0, 24, 40)])
        assert_colour(bottom, BLUE, f"{kind}, bottom window in the EXIF-rotated frame")


def test_all_exif_orientations_agree(tmp_path):
    base = photo_like(40, 80, seed=5)
    files = [write_jpeg(tmp_path / f"o{o}.jpg", base, exif_orientation=o) for o in range(1, 9)]
    # A window that fits only the displayed frame: 80 high for orientations 5-8, 80 wide for 1-4.
    boxes = [(2, 44, 30, 30) if o <= 4 else (44, 2, 30, 30) for o in range(1, 9)]
    _, dali, _ = load("dali", files, boxes, batch_size=8)
    _, reference, _ = load("torchvision", files, boxes, batch_size=8)
    apart = grey_levels_apart(dali, reference)
    assert apart.max() < 1, f"EXIF orientations 1-8: DALI vs torchvision {apart.tolist()} grey levels"


XMP_ORIENTATION_6 = (
    b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
    b'<rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="6"/>'
    b"</rdf:RDF></x:xmpmeta>"
)


def png_with_exif_after_pixels(path, array, orientation):
    """A PNG whose eXIf chunk comes after IDAT (allowed by the PNG spec; some tools write it there)."""
    Image.fromarray(array).save(path, "PNG")
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = exif.tobytes().removeprefix(b"Exif\x00\x00")
    chunk = struct.pack(">I", len(data)) + b"eXIf" + data + struct.pack(">I", zlib.crc32(b"eXIf" + data))
    raw = path.read_bytes()
    end = raw.rindex(b"IEND") - 4
    path.write_bytes(raw[:end] + chunk + raw[end:])
    return path


def test_every_container_is_turned_as_dali_turns_it(tmp_path):
    """The index plans windows in the frame both loaders decode: a TIFF's orientation tag and a PNG's late
    eXIf chunk turn the image; an orientation only XMP states does not (DALI reads EXIF only)."""
    base = photo_like(40, 80, seed=7)
    tiff = tmp_path / "turned.tif"
    Image.fromarray(base).save(tiff, tiffinfo={0x0112: 6})
    xmp = tmp_path / "xmp.jpg"
    Image.fromarray(base).save(xmp, "JPEG", quality=90, xmp=XMP_ORIENTATION_6)
    cases = {
        "TIFF orientation 6": (tiff, (80, 40)),
        "PNG eXIf after IDAT": (png_with_exif_after_pixels(tmp_path / "late.png", base, 6), (80, 40)),
        "JPEG with XMP orientation only": (xmp, (40, 80)),
    }
    for what, (path, frame) in cases.items():
        assert image_size(path) == frame, f"{what}: index says (h, w) {image_size(path)}, decoders give {frame}"
    files = [path for path, _ in cases.values()]
    # Windows that fit only the expected frame (80 high for the turned ones, 80 wide for the XMP one).
    boxes = [(44, 2, 30, 30) if frame[0] == 80 else (2, 44, 30, 30) for _, frame in cases.values()]
    _, dali, _ = load("dali", files, boxes, batch_size=3)
    _, reference, _ = load("torchvision", files, boxes, batch_size=3)
    apart = grey_levels_apart(dali, reference)
    assert apart.max() < 1, f"{list(cases)}: DALI vs torchvision {apart.tolist()} grey levels apart"


def test_an_image_dali_cannot_decode_is_one_line_naming_the_way_out(tmp_path):
    """DALI 2.4 cannot read a lossless WebP carrying EXIF (PIL can). Either DALI decodes it like torchvision, or
    the failure is an OSError (as an unreadable file) on one line naming the batch and --loader torchvision."""
    exif = Image.Exif()
    exif[0x0112] = 1
    path = tmp_path / "lossless.webp"
    Image.fromarray(photo_like(40, 50, seed=3)).save(path, "WEBP", lossless=True, exif=exif.tobytes())
    _, reference, _ = load("torchvision", [path], [(0, 0, 40, 50)], workers=0)
    try:
        _, dali, _ = load("dali", [path], [(0, 0, 40, 50)], workers=0)
    except OSError as exc:
        text = str(exc)
        assert "\n" not in text and "lossless.webp" in text and "--loader torchvision" in text, text
    else:
        apart = grey_levels_apart(dali, reference)
        assert apart.max() < 1, f"DALI decoded the WebP {apart.tolist()} grey levels from PIL"


def test_grayscale_and_cmyk_decode_to_the_same_rgb(tmp_path):
    photo = photo_like(56, 72, seed=9)
    files = [write_jpeg(tmp_path / f"{mode}.jpg", photo, mode=mode) for mode in ("L", "CMYK", "RGB")]
    boxes = [(4, 6, 48, 60)] * 3
    _, dali, _ = load("dali", files, boxes)
    _, reference, _ = load("torchvision", files, boxes)
    assert dali.shape == reference.shape == (3, 3, SIZE, SIZE), f"shapes {dali.shape}, {reference.shape}"
    apart = grey_levels_apart(dali, reference)
    assert apart.max() < 1, f"grayscale, CMYK, RGB: DALI vs torchvision {apart.tolist()} grey levels"
    for kind, images in (("dali", dali), ("torchvision", reference)):
        gray = levels(images[:1])[0]
        spread = (gray.amax(dim=0) - gray.amin(dim=0)).max().item()
        assert spread < 0.01, f"{kind}: grayscale JPEG channels differ by up to {spread} levels"
        # CMYK is neither inverted nor channel-swapped: it matches the RGB JPEG of the same photo.
        cmyk_vs_rgb = grey_levels_apart(images[1:2], images[2:3]).item()
        assert cmyk_vs_rgb < 6, f"{kind}: CMYK JPEG is {cmyk_vs_rgb:.2f} levels from the RGB JPEG"


def test_16_bit_grey_png_agrees_and_is_not_white(tmp_path):
    """PIL's convert("RGB") clips 16-bit grey to 255: the reference must scale it as DALI does."""
    grey = photo_like(40, 50, seed=4)[..., 0].astype(np.uint16) * 200 + 3000
    path = tmp_path / "deep.png"
    Image.fromarray(grey).save(path)
    assert Image.open(path).mode.startswith("I"), "the test image should open as 16-bit grey"
    _, dali, _ = load("dali", [path], [(2, 3, 36, 44)])
    _, reference, _ = load("torchvision", [path], [(2, 3, 36, 44)])
    apart = grey_levels_apart(dali, reference).max().item()
    spread = (levels(reference).amax() - levels(reference).amin()).item()
    assert apart < 1 and spread > 50, (
        f"DALI vs torchvision {apart:.2f} grey levels apart; reference spread {spread:.0f}"
    )


def test_torchvision_workers_do_not_change_batches(planned):
    files, boxes, flip = planned
    single, images_single, _ = load("torchvision", files, boxes, flip, batch_size=4, workers=0)
    multi, images_multi, positions = load("torchvision", files, boxes, flip, batch_size=4, workers=2)
    sizes = [len(b.positions) for b in multi]
    assert sizes == [4, 4, 2], f"batches of {sizes}: the short last batch must be delivered"
    assert positions.tolist() == list(range(len(files))), f"positions {positions.tolist()}"
    worst = (images_single - images_multi).abs().max().item()
    assert torch.equal(images_single, images_multi), f"workers=0 vs workers=2: max diff {worst}"
    assert all(torch.equal(a.labels, b.labels) for a, b in zip(single, multi)), "labels differ between worker counts"


@pytest.mark.parametrize("kind", ["dali", "torchvision"])
def test_window_outside_the_frame_is_refused(kind, tmp_path):
    path = write_jpeg(tmp_path / "small.jpg", photo_like(40, 60, seed=1))
    # workers=0: a DataLoader whose worker raised is left in a reference cycle (torch's reraise) and
    # its shutdown at the next garbage collection waits 5 s for the worker.
    with pytest.raises((OSError, ValueError), match="small.jpg"):
        load(kind, [path], [(30, 0, 20, 20)], workers=0)


def test_missing_dali_says_to_use_torchvision(monkeypatch):
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)
    monkeypatch.delitem(sys.modules, "skd.pipelines.dali_pipeline", raising=False)
    with pytest.raises(DeviceError, match="--loader torchvision"):
        make_loader(
            "dali", files=[], boxes=np.zeros((0, 4)), flips=[], labels=[], positions=[], image_size=SIZE, batch_size=1
        )
