"""A cache grows by views: rerunning the build with a larger --views appends views, leaves every file of the views
it had untouched, and gives the cache a fresh build of that many views gives; a kill during the append resumes."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr
from conftest import build_args, run_skd, small_build_config
from handmade import cache_arrays

from skd.build.teacher_pass import build_cache
from skd.errors import OptionError
from skd.inspect.info import describe, info_lines
from skd.store.cache_store import open_store


def file_hashes(path: Path) -> dict[str, str]:
    """sha256 of every file of the cache but the zarr.json metadata (which records the shapes)."""
    return {
        f.relative_to(path).as_posix(): hashlib.sha256(f.read_bytes()).hexdigest()
        for f in path.rglob("*")
        if f.is_file() and f.name != "zarr.json"
    }


def same_cache(got: Path, want: Path) -> list[str]:
    """What differs between two caches: arrays (plan, logits, completion) and the plan id."""
    a, b = cache_arrays(got), cache_arrays(want)
    differ = sorted(set(a) ^ set(b)) + [n for n in a if n in b and not np.array_equal(a[n], b[n])]
    ids = [open_store(p).meta["plan"]["id"] for p in (got, want)]
    return differ + (["plan id"] if ids[0] != ids[1] else [])


@pytest.fixture(scope="module")
def fresh4(image_root, teacher_file, tmp_path_factory) -> Path:
    """A cache built with --views 4 in one go."""
    out = tmp_path_factory.mktemp("fresh4") / "cache"
    build_cache(small_build_config(image_root, out, teacher_file, views=4))
    return out


def test_a_larger_views_appends_views_equal_to_a_fresh_build(image_root, teacher_file, fp32_cache, fresh4, tmp_path):
    out = tmp_path / "cache"
    shutil.copytree(fp32_cache, out)
    before = file_hashes(out)
    summary = build_cache(small_build_config(image_root, out, teacher_file, views=4))
    n = open_store(out).num_samples
    assert summary.rows_written == 2 * n, f"the grown build wrote {summary.rows_written} rows, not 2 views of {n}"
    after = file_hashes(out)
    changed = [key for key, digest in before.items() if after.get(key) != digest]
    assert not changed, f"{len(changed)} files of the 2 views the cache had changed or went: {changed[:5]}"
    differ = same_cache(out, fresh4)
    assert not differ, f"the cache grown from 2 to 4 views differs from a fresh 4-view build in {differ}"
    store = open_store(out)
    assert store.num_views == 4 and store.is_complete() and store.meta["complete"], store.meta["views"]
    again = build_cache(small_build_config(image_root, out, teacher_file, views=4)).rows_written
    assert again == 0, f"rerunning the finished grown build wrote {again} rows"


def test_fewer_views_than_the_cache_holds_are_refused_in_one_line(
    image_root, teacher_file, fp32_cache, tmp_path, in_process
):
    out = tmp_path / "cache"
    shutil.copytree(fp32_cache, out)
    before = file_hashes(out) | {"zarr.json": (out / "zarr.json").read_text()}
    args = build_args(weights=teacher_file, data=image_root, out=out, views=1)
    code, err = in_process("cache", *args)
    assert code == 2 and err.count("\n") == 1, f"exit {code}: {err}"
    assert "--views 1, fewer than the 2 of" in err and "never shrinks" in err, err
    assert file_hashes(out) | {"zarr.json": (out / "zarr.json").read_text()} == before, "the refused build wrote"


def test_kill_9_during_the_append_resumes_to_the_fresh_build(image_root, teacher_file, fp32_cache, fresh4, tmp_path):
    """Killed while the new views' plans are written (the cache still reads as its 2 views), then while their
    logits are computed: each rerun of the same command carries on, to the cache a fresh 4-view build gives."""
    out = tmp_path / "cache"
    shutil.copytree(fp32_cache, out)
    args = build_args(weights=teacher_file, data=image_root, out=out, views=4)
    killed = run_skd(*args, env={"SKD_FAULT": "grow-view:1"})
    assert killed.returncode == -9, f"not killed while growing ({killed.returncode}): {killed.stderr[-500:]}"
    store = open_store(out)
    assert store.num_views == 2 and store.is_complete() and store.meta.get("growing") == 4, (
        f"a growth killed half-way reads as {store.num_views} views, growing {store.meta.get('growing')}"
    )
    assert np.array_equal(store.read_logits(1), open_store(fp32_cache).read_logits(1)), "view 1 changed"
    shown = "\n".join(info_lines(describe(store)))
    assert "growing to 4 views was interrupted: rerun the build with --views 4" in shown, shown
    killed = run_skd(*args, env={"SKD_FAULT": "after-shard:1"})
    assert killed.returncode == -9, f"not killed after a shard ({killed.returncode}): {killed.stderr[-500:]}"
    done = open_store(out).complete()
    assert done.shape == (4, 3) and done[:2].all() and done[2:].sum() == 1, f"complete after the kill:\n{done}"
    rerun = run_skd(*args)
    assert rerun.returncode == 0, rerun.stderr[-800:]
    differ = same_cache(out, fresh4)
    assert not differ, f"the resumed growth differs from a fresh 4-view build in {differ}"


def test_plan_from_follows_a_grown_plan(image_root, teacher_file, fp32_cache, fresh4, tmp_path):
    """A second teacher's cache built --plan-from a 2-view cache grows with it: rerun once the first has 4 views,
    it appends them, copied, and shares the grown plan id (the two can be read together)."""
    first, second = tmp_path / "first", tmp_path / "second"
    shutil.copytree(fp32_cache, first)
    build_cache(small_build_config(image_root, second, teacher_file, codec="int8", plan_from=first))
    build_cache(small_build_config(image_root, first, teacher_file, views=4))
    summary = build_cache(small_build_config(image_root, second, teacher_file, codec="int8", plan_from=first))
    a, b = cache_arrays(first), cache_arrays(second)
    plan = [f"views/{name}" for name in ("order", "box", "flip", "mix_lambda", "mix_box")]
    differ = [name for name in plan if not np.array_equal(a[name], b[name])]
    assert not differ and b["views/order"].shape[0] == 4, f"the second cache's plan differs in {differ}"
    ids = {p.name: open_store(p).meta["plan"]["id"] for p in (first, second, fresh4)}
    assert len(set(ids.values())) == 1, f"plan ids differ: {ids}"
    assert summary.rows_written == 2 * open_store(second).num_samples, f"{summary.rows_written} rows written"


def test_plan_from_a_cache_with_fewer_views_is_refused(image_root, teacher_file, fp32_cache, tmp_path):
    """A cache that grew past its --plan-from source: rerunning it --plan-from that source would shrink it."""
    second = tmp_path / "second"
    build_cache(small_build_config(image_root, second, teacher_file, plan_from=fp32_cache))
    build_cache(small_build_config(image_root, second, teacher_file, views=3))
    with pytest.raises(
        OptionError, match=f"--plan-from {fp32_cache} holds 2 views, fewer than the 3 of .*never shrinks"
    ):
        build_cache(small_build_config(image_root, second, teacher_file, plan_from=fp32_cache))
    assert open_store(second).num_views == 3, "the refused build changed the cache"


def test_changed_argument_is_refused(image_root, teacher_file, fp32_cache):
    before = open_store(fp32_cache).read_logits(0)
    result = run_skd(*build_args(weights=teacher_file, data=image_root, out=fp32_cache, seed=3))
    assert result.returncode == 2, f"exit {result.returncode}"
    assert "other settings (seed)" in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert np.array_equal(open_store(fp32_cache).read_logits(0), before), "the refused rerun changed the cache"
    with pytest.raises(OptionError, match="codec"):
        build_cache(small_build_config(image_root, fp32_cache, teacher_file, codec="int8"))


def test_resume_without_no_val_is_refused(image_root, teacher_file, tmp_path):
    """A cache built with --no-val cannot silently stay without validation logits when rerun without it."""
    out = tmp_path / "cache"
    build_cache(small_build_config(image_root, out, teacher_file, val=False, views=1))
    with pytest.raises(OptionError, match="built with --no-val"):
        build_cache(small_build_config(image_root, out, teacher_file, views=1))
    again = build_cache(small_build_config(image_root, out, teacher_file, val=False, views=1)).rows_written
    assert again == 0, f"rerunning the finished --no-val build with --no-val wrote {again} rows"


def test_a_view_count_out_of_all_proportion_is_refused_before_planning(image_root, teacher_file, tmp_path):
    """--views 1000000000 sat silent at 1 GB and growing: a count far beyond any recipe is one line before any
    view is planned."""
    with pytest.raises(OptionError, match="--views 1,000,000,000 is more than 100,000.*build fewer views"):
        build_cache(small_build_config(image_root, tmp_path / "cache", teacher_file, views=10**9))
    assert not (tmp_path / "cache" / "zarr.json").exists(), "a cache was created for a plan that cannot fit"


def test_overwrite_never_deletes_what_is_not_a_cache(image_root, teacher_file, tmp_path):
    """--overwrite replaces a cache; the dataset, a folder inside it or any other folder is refused untouched."""
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "thesis.txt").write_text("important")
    data = tmp_path / "data"
    shutil.copytree(image_root, data)
    images = sorted(data.rglob("*.JPEG"))
    afile = tmp_path / "afile"
    afile.write_text("x")
    embeddings = tmp_path / "embeddings"  # somebody else's zarr store
    zarr.open_group(str(embeddings), mode="w-", zarr_format=3).create_array("emb", data=np.ones((4, 2), "f4"))
    cases = {
        data: "overlaps the dataset",
        data / "train" / "new": "overlaps the dataset",
        tmp_path: "overlaps the dataset",
        notes: "is not an skd cache",
        afile: "is a file",
        afile / "sub": "is a file",
        embeddings: "a zarr group skd did not create",
    }
    for out, needle in cases.items():
        with pytest.raises(OptionError, match=needle):
            build_cache(small_build_config(data, out, teacher_file, overwrite=True))
    assert sorted(data.rglob("*.JPEG")) == images, "a refused --overwrite removed images"
    assert (notes / "thesis.txt").read_text() == "important", "a refused --overwrite removed a user's file"
    assert zarr.open_group(str(embeddings), mode="r")["emb"][...].sum() == 8, (
        "a refused --overwrite removed a zarr array"
    )
    assert not list(tmp_path.glob("*.lock")), "a refused build left its lock file behind"
    dali = dict(views=1, loader="dali", workers=1)
    result = run_skd(*build_args(weights=teacher_file, data=data, out=notes, **dali, overwrite=True))  # as typed
    assert result.returncode == 2 and "is not an skd cache" in result.stderr and "Traceback" not in result.stderr, (
        f"exit {result.returncode}: {result.stderr[-500:]}"
    )
