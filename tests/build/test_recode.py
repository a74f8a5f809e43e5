"""`skd-cache recode`: a cache's logits with another codec, no teacher run: equal to a build with that codec,
resumable after a kill, one-line refusals."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import small_build_config

from skd.build.recode import recode_cache
from skd.build.teacher_pass import build_cache
from skd.errors import SkdError
from skd.store.cache_store import open_store


def files(path: Path) -> dict[str, bytes]:
    """Every stored array file of a cache (not the zarr.json metadata, which names the software that wrote it)."""
    return {
        str(f.relative_to(path)): f.read_bytes()
        for f in sorted(path.rglob("*"))
        if f.is_file() and f.name != "zarr.json" and not f.name.startswith(".")
    }


def recode_cli(*args, env=None):
    return subprocess.run(
        [sys.executable, "-c", "from skd.cli.main import main_cache; main_cache()", "recode", *map(str, args)],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture(scope="module")
def int8_build(image_root, teacher_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("int8") / "cache"
    build_cache(small_build_config(image_root, out, teacher_file, codec="int8"))
    return out


def test_an_int8_recode_of_an_fp32_cache_equals_an_int8_build_byte_for_byte(fp32_cache, int8_build, tmp_path):
    recode_cache(fp32_cache, tmp_path / "r", "int8")
    built, recoded = files(int8_build), files(tmp_path / "r")
    assert len(built) > 20, f"only {len(built)} files compared"
    assert built.keys() == recoded.keys(), f"files differ: {sorted(built.keys() ^ recoded.keys())[:5]}"
    differ = [name for name in built if built[name] != recoded[name]]
    assert not differ, f"{len(differ)} of {len(built)} files differ from the int8 build, e.g. {differ[:3]}"
    store = open_store(tmp_path / "r")
    assert store.meta["complete"] and store.meta["plan"]["id"] == open_store(fp32_cache).meta["plan"]["id"], (
        "the recoded cache is not complete on the source's plan"
    )


def test_a_recode_killed_after_a_shard_resumes_to_the_same_cache(fp32_cache, tmp_path):
    recode_cache(fp32_cache, tmp_path / "whole", "topk:2")
    killed = recode_cli(fp32_cache, "--codec", "topk:2", "--out", tmp_path / "r", env={"SKD_FAULT": "after-shard:2"})
    assert killed.returncode == -9, f"the fault point did not kill the recode: {killed.returncode} {killed.stderr}"
    assert not open_store(tmp_path / "r").is_complete(), "the killed recode left a complete cache"
    resumed = recode_cli(fp32_cache, "--codec", "topk:2", "--out", tmp_path / "r")
    assert resumed.returncode == 0, resumed.stderr[-800:]
    assert files(tmp_path / "r") == files(tmp_path / "whole"), "the resumed recode differs from an uninterrupted one"
    exact, decoded = open_store(fp32_cache).read_logits(0), open_store(tmp_path / "r").read_logits(0)
    best = np.argsort(-exact, axis=1, kind="stable")[:, :2]
    kept = np.take_along_axis(decoded, best, 1)
    want = np.take_along_axis(exact, best, 1).astype(np.float16).astype(np.float32)
    assert np.array_equal(kept, want), f"top-2 rows off by {np.abs(kept - want).max():.3g}"


def test_recode_refusals_are_one_line(fp32_cache, int8_build, tmp_path):
    cases = [
        (lambda: recode_cache(fp32_cache, fp32_cache, "int8"), "is the source cache"),
        (lambda: recode_cache(fp32_cache, int8_build, "fp16"), "holds another cache .*codec.* --overwrite"),
        (lambda: recode_cache(fp32_cache, tmp_path / "x", "int4"), "--codec: unknown codec 'int4'"),
    ]
    for call, message in cases:
        with pytest.raises(SkdError, match=message) as caught:
            call()
        assert "\n" not in str(caught.value), f"a multi-line error: {caught.value}"
    assert open_store(int8_build).is_complete(), "a refused recode touched the cache at --out"


@pytest.mark.filterwarnings("ignore:Successfully reconstructed a store:RuntimeWarning")
def test_a_recode_onto_an_object_store_reads_back_like_the_local_one(fp32_cache, tmp_path, monkeypatch):
    from s3server import S3Server

    recode_cache(fp32_cache, tmp_path / "local", "int8")
    with S3Server() as server:
        for key, value in server.env.items():
            monkeypatch.setenv(key, value)
        server.create_bucket("recode")
        recode_cache(fp32_cache, "s3://recode/c", "int8")
        remote, local = open_store("s3://recode/c"), open_store(tmp_path / "local")
        assert remote.is_complete() and np.array_equal(remote.read_logits(1), local.read_logits(1)), (
            "the recode on S3 reads back other rows than the local one"
        )
