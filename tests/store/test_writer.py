"""Writing logits into a cache (skd/store/writer.py): each shard written whole, so a shard left damaged and unfinished
is written afresh by the rerun, and a full disk is one line with the cache left resumable."""

import shutil
import subprocess

import numpy as np
import pytest
import zarr
from conftest import build_args, run_skd
from handmade import cache_arrays

from skd.store.cache_store import open_store


def test_damaged_unfinished_shards_are_rewritten_on_resume(image_root, teacher_file, fp32_cache, tmp_path):
    """A shard left damaged and unfinished (a full one, and the short last one zarr would merge into) is
    written afresh by the rerun, not merged into or stopped on."""
    out = shutil.copytree(fp32_cache, tmp_path / "cache")
    g = zarr.open_group(str(out), mode="r+")
    last = g["views/complete"].shape[1] - 1
    for shard in (0, last):
        g["views/complete"][1, shard] = 0
        path = out / "views" / "logits" / "c" / "1" / str(shard) / "0"
        data = bytearray(path.read_bytes())
        data[0] ^= 0xFF
        path.write_bytes(bytes(data))
    leftover = out / "views" / "logits" / "c" / "1" / "0" / "0.0123abcd.partial"  # zarr's temporary file, killed
    leftover.write_bytes(b"half a shard")
    rerun = run_skd(*build_args(weights=teacher_file, data=image_root, out=out))
    assert rerun.returncode == 0, f"shards 0 and {last} of view 1: exit {rerun.returncode}: {rerun.stderr[-500:]}"
    assert not leftover.exists(), "the resumed build left a killed write's temporary file behind"
    want, got = cache_arrays(fp32_cache), cache_arrays(out)
    assert np.array_equal(want["views/logits"], got["views/logits"]), "rewritten shards differ from the original build"


def test_disk_full_is_a_clear_error_and_the_cache_stays_resumable(image_root, tmp_path, teacher_file):
    """A real full disk: a small tmpfs. The cache is then moved to a roomy disk and resumed."""
    import torch
    import torchvision

    torch.manual_seed(0)
    wide = tmp_path / "wide.pth"  # 1000 outputs: 4 KB per fp32 row, so shards outgrow the small disk
    torch.save(torchvision.models.resnet18(num_classes=1000).state_dict(), wide)
    reference = tmp_path / "reference"
    built = run_skd(*build_args(weights=wide, data=image_root, out=reference, views=4, batch_size=4))
    assert built.returncode == 0, f"the reference build: exit {built.returncode}: {built.stderr[-500:]}"
    used = sum(f.stat().st_size for f in reference.rglob("*") if f.is_file())
    mount = tmp_path / "small"
    mount.mkdir()
    size_kib = 320  # holds the cache's creation (~100 files of 4 KiB pages) but not all its logits
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(mount)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root): the disk-full test needs a real small disk")
    try:
        out = mount / "cache"
        full = run_skd(*build_args(weights=wide, data=image_root, out=out, views=4, batch_size=4))
        assert full.returncode == 2, (
            f"exit {full.returncode} with {used} bytes on a {size_kib} KiB disk: {full.stderr[-500:]}"
        )
        assert "cannot write shard" in full.stderr and "No space left" in full.stderr, full.stderr[-500:]
        assert "Traceback" not in full.stderr, full.stderr[-500:]
        done = int(open_store(out).complete().sum())
        moved = tmp_path / "moved"
        shutil.copytree(out, moved)
    finally:
        subprocess.run(["umount", str(mount)])
    resumed = run_skd(*build_args(weights=wide, data=image_root, out=moved, views=4, batch_size=4))
    assert resumed.returncode == 0, resumed.stderr[-500:]
    want, got = cache_arrays(reference), cache_arrays(moved)
    for name in want:
        assert np.array_equal(want[name], got[name]), f"{name} differs after a full disk ({done} shards had completed)"
