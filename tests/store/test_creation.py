"""Laying out a new cache (skd/store/creation.py): the arrays, shapes, shards and attributes a build leaves, as plain
zarr sees them; a creation stopped before its `skd` attribute is known as skd's own by its marker."""

import pytest
import zarr
from conftest import small_build_config

from skd.build.teacher_pass import build_cache
from skd.errors import CacheError
from skd.store.schema import FORMAT_VERSION


def test_plain_zarr_sees_the_design_layout(fp32_cache):
    g = zarr.open_group(str(fp32_cache), mode="r")
    n, k = 18, 2
    shapes = {
        "samples/path": (n,),
        "samples/label": (n,),
        "samples/size": (n, 2),
        "views/order": (k, n),
        "views/box": (k, n, 4),
        "views/flip": (k, n),
        "views/logits": (k, n, 3),
        "val/logits": (6, 3),
        "val/path": (6,),
        "val/label": (6,),
    }
    got = {name: g[name].shape for name in shapes}
    assert got == shapes, f"array shapes {got}"
    assert g["views/logits"].shards == (1, 8, 3), f"logits shards {g['views/logits'].shards}"
    meta = g.attrs["skd"]
    assert meta["format"] == FORMAT_VERSION and meta["complete"] is True, (
        f"format {meta['format']} (expected {FORMAT_VERSION}), complete {meta['complete']}"
    )
    assert meta["teacher"]["name"] == "resnet18" and len(meta["teacher"]["weights_sha256"]) == 64, (
        f"teacher {meta['teacher']['name']}, weights sha256 {meta['teacher']['weights_sha256']!r}"
    )
    assert meta["dataset"]["classes"] == ["ant", "bee", "cat"] and meta["dataset"]["num_samples"] == n, (
        f"classes {meta['dataset']['classes']}, {meta['dataset']['num_samples']} samples (expected {n})"
    )
    assert meta["plan"]["seed"] == 0 and meta["plan"]["image_size"] == 32 and meta["codec"] == "fp32", (
        f"seed {meta['plan']['seed']}, image size {meta['plan']['image_size']}, codec {meta['codec']}"
    )
    assert "torch" in meta["software"] and "zarr" in meta["software"], f"software recorded: {meta['software']}"
    order = g["views/order"][...]
    assert all(sorted(o) == list(range(n)) for o in order), "each view's order must be a permutation"


def test_an_interrupted_cache_creation_is_restarted_only_with_overwrite(image_root, teacher_file, tmp_path):
    """A creation stopped before its `skd` attribute is recognised as skd's own by its marker: refused, then
    replaced on --overwrite."""
    from skd.store.cache_store import CREATING_KEY

    out = tmp_path / "cache"
    zarr.open_group(str(out), mode="w-", zarr_format=3, attributes={CREATING_KEY: True}).create_array(
        "samples/path", shape=(3,), dtype=str
    )
    with pytest.raises(CacheError, match="unfinished cache creation: pass --overwrite"):
        build_cache(small_build_config(image_root, out, teacher_file))
    build_cache(small_build_config(image_root, out, teacher_file, overwrite=True))
    assert zarr.open_group(str(out), mode="r")["views/complete"][...].all(), "--overwrite did not finish the cache"
