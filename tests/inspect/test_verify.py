"""`skd-cache verify`: passes on a fresh cache; fails, naming the cause, on changed data, weights or bytes."""

import json
import shutil

import numpy as np
import pytest
import torch
import torchvision
import zarr
from click.testing import CliRunner
from conftest import make_image_folder, photo_like, write_jpeg
from PIL import Image

from skd.build.teacher_pass import BuildConfig, build_cache
from skd.cli.main import cache as cli
from skd.store.cache_store import open_store

SHARD = "views/logits/c/1/0/0"  # view 1, shard 0 (rows 0-7)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A folder with data/ (12 train + 3 val images), t.pth (the teacher) and cache/ (2 views + val, fp32)."""
    base = tmp_path_factory.mktemp("verify")
    make_image_folder(base / "data", per_class=4, val_per_class=1)
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(num_classes=3).state_dict(), base / "t.pth")
    build_cache(
        BuildConfig(
            teacher="resnet18",
            weights=str(base / "t.pth"),
            data=base / "data",
            out=base / "cache",
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
    )
    return base


@pytest.fixture
def copy(built, tmp_path):
    """A private copy of `built` to damage; verify it with --data and --weights pointing into the copy."""
    return shutil.copytree(built, tmp_path / "w")


def verify(cache, *args):
    """(exit status, JSON report or None, stderr) of `skd-cache verify CACHE ARGS --json`."""
    result = CliRunner().invoke(cli, ["verify", str(cache), *map(str, args), "--json", "--workers", "0"])
    report = json.loads(result.stdout) if result.stdout.strip() else None
    return result.exit_code, report, result.stderr


def check(report, name):
    return next(c for c in report["checks"] if c["name"] == name)


def test_fresh_cache_passes(built):
    code, report, err = verify(built / "cache", "--integrity")  # recorded data root and weights path
    assert code == 0 and report["ok"], f"exit {code}: {err}"
    c = report["comparison"]
    assert c["rows"] == 2 * 12 + 3, f"compared {c['rows']} rows, the cache holds 27 (--samples 256 covers all)"
    assert c["max_abs_diff"] < 1e-4 and c["top1_agreement"] == 1.0, (
        f"re-computed logits differ from the stored ones: max |diff| {c['max_abs_diff']:.2e}, "
        f"top-1 agreement {c['top1_agreement']}"
    )


def test_changed_image_is_different_data(copy):
    image = copy / "data/train/bee/bee_001.JPEG"
    with Image.open(image) as opened:
        width, height = opened.size
    write_jpeg(image, photo_like(height, width, seed=99), quality=75)  # same size in pixels, other content
    code, report, err = verify(copy / "cache", "--data", copy / "data", "--weights", copy / "t.pth")
    assert code == 1 and "different data" in err, f"exit {code}, stderr {err!r}"
    assert not check(report, "data")["ok"] and check(report, "weights")["ok"], f"checks: {report['checks']}"
    data = check(report, "data")
    assert "bee_001.JPEG" in data["detail"], f"the changed file is not named: {data}"


def test_an_image_replaced_by_one_of_the_same_byte_and_pixel_size_is_named(copy, tmp_path):
    """The folder's fingerprint (paths and byte sizes) and the recorded pixel size all still match: the digest of
    the file's tail recorded at the build tells the replacement apart, and verify names the image."""
    image = copy / "data/train/bee/bee_001.JPEG"
    original = image.read_bytes()
    with Image.open(image) as opened:
        width, height = opened.size
    for quality in range(95, 5, -5):  # another photo, at most as many bytes, padded after its end marker
        write_jpeg(tmp_path / "other.JPEG", photo_like(height, width, seed=7), quality=quality)
        other = (tmp_path / "other.JPEG").read_bytes()
        if len(original) - 3000 < len(other) <= len(original):
            break
    else:
        pytest.fail(f"no re-encoding of another photo fits {len(original)} bytes")
    image.write_bytes(other + bytes(len(original) - len(other)))
    assert image.stat().st_size == len(original), "the replacement must keep the byte size"
    code, report, err = verify(copy / "cache", "--data", copy / "data", "--weights", copy / "t.pth")
    data = check(report, "data")
    assert code == 1 and "different data" in err, f"exit {code}, stderr {err!r}"
    assert not data["ok"] and "bee_001.JPEG holds another image" in data["detail"], f"data check: {data}"
    assert "shards holding them are corrupted" not in err, f"misdiagnosed as corrupted shards: {err!r}"


def test_resaved_weights_verify(copy):
    """The same tensors in a DDP checkpoint are the same teacher."""
    state = torch.load(copy / "t.pth", weights_only=True)
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, copy / "ddp.pth")
    code, report, err = verify(copy / "cache", "--data", copy / "data", "--weights", copy / "ddp.pth")
    assert code == 0 and check(report, "weights")["ok"], f"re-saved weights: exit {code}, {err}"


def test_swapped_weights_are_different_weights(copy):
    torch.manual_seed(1)
    torch.save(torchvision.models.resnet18(num_classes=3).state_dict(), copy / "t.pth")
    code, report, err = verify(copy / "cache", "--data", copy / "data", "--weights", copy / "t.pth")
    assert code == 1 and "different weights" in err, f"exit {code}, stderr {err!r}"
    assert check(report, "data")["ok"] and not check(report, "weights")["ok"], f"checks: {report['checks']}"
    assert report["comparison"]["kl_mean"] > 1e-3, f"other weights, yet KL {report['comparison']['kl_mean']:.2e}"


def test_undecodable_shard_is_named(copy):
    path = copy / "cache" / SHARD
    data = bytearray(path.read_bytes())
    data[0] ^= 0xFF  # the zstd frame's magic number
    path.write_bytes(data)
    code, report, err = verify(copy / "cache", "--data", copy / "data", "--weights", copy / "t.pth", "--integrity")
    assert code == 1 and "corrupted shard" in err, f"exit {code}, stderr {err!r}"
    for name in ("logits", "integrity"):
        assert "view 1 shard 0" in check(report, name)["detail"], f"{name} check does not name the shard: {report}"
    assert check(report, "data")["ok"] and check(report, "weights")["ok"], f"checks: {report['checks']}"


def test_missing_shard_files_and_damaged_plan_chunks_are_named(copy):
    """Files lost by a half-done copy read as zeros through zarr, and a damaged plan chunk stops training:
    --integrity names both."""
    (copy / "cache" / SHARD).unlink()
    order = sorted(p for p in (copy / "cache" / "views" / "order" / "c").rglob("*") if p.is_file())[0]
    order.write_bytes(b"not zstd at all")
    code, report, err = verify(copy / "cache", "--data", copy / "data", "--weights", copy / "t.pth", "--integrity")
    detail = check(report, "integrity")["detail"]
    assert code == 1 and "view 1 shard 0 (missing views/logits/c/1/0/0)" in detail and "views/order" in detail, (
        f"exit {code}, integrity: {detail!r}"
    )


def test_every_flipped_byte_of_a_shard_is_found_by_integrity(copy):
    """zstd's content checksum and the shard index's crc32c leave no byte whose damage goes unseen.

    A flip is either reported or harmless (e.g. zstd's frame-header bit 4 is unused by the format).
    """
    from skd.inspect.verify_checks import check_integrity

    path = copy / "cache" / SHARD
    pristine = path.read_bytes()
    want = open_store(copy / "cache").read_logits(1, 0, 8)
    missed = []
    for at in range(len(pristine)):
        damaged = bytearray(pristine)
        damaged[at] ^= 0x10
        path.write_bytes(damaged)
        store = open_store(copy / "cache")
        if check_integrity(store).ok and not np.array_equal(store.read_logits(1, 0, 8), want):
            missed.append(at)
    path.write_bytes(pristine)
    assert not missed, f"{len(missed)} of {len(pristine)} single-byte flips went unnoticed: offsets {missed[:10]}"
    assert check_integrity(open_store(copy / "cache")).ok, "the restored shard fails integrity"


@pytest.mark.parametrize("weights, says", [("none", "cannot be verified"), ("/gone/t.pth", "pass --weights")])
def test_teacher_that_cannot_be_recreated(copy, weights, says):
    group = zarr.open_group(str(copy / "cache"), mode="r+")
    meta = dict(group.attrs["skd"])
    group.attrs["skd"] = {**meta, "teacher": {**meta["teacher"], "weights": weights}}
    code, _, err = verify(copy / "cache", "--data", copy / "data")
    assert code == 2 and err.count("\n") == 1 and says in err, f"weights {weights!r}: exit {code}, stderr {err!r}"
