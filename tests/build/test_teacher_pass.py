"""Stage one: the cache holds exactly the teacher's logits of the recorded views, and builds resume."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
import zarr
from conftest import REPO, build_args, run_skd, small_build_config, torchrun
from handmade import load_view

from skd.build.teacher_pass import build_cache
from skd.errors import OptionError
from skd.pipelines import IMAGENET_MEAN, IMAGENET_STD
from skd.store.cache_store import open_store


def cli(*args, env=None):
    """Run `skd-cache` as a user would (a fresh process)."""
    return run_skd(*args, env=env)


def config(root, out, teacher_file, **overrides):
    return small_build_config(root, out, teacher_file, **overrides)


def build_command(root, out, teacher_file, **options):
    """The `skd-cache build` arguments of the reference cache (small_build_config's settings)."""
    return build_args(weights=teacher_file, data=root, out=out, **options)


@pytest.fixture
def reference(fp32_cache) -> Path:
    return fp32_cache


def arrays(path: Path) -> dict:
    g = zarr.open_group(str(path), mode="r")
    return {name: np.asarray(a[...]) for name, a in g.arrays()} | {
        f"{grp}/{name}": np.asarray(a[...]) for grp in ("samples", "views", "val") for name, a in g[grp].arrays()
    }


def test_replayed_windows_reproduce_cached_logits(reference, teacher_file):
    """Crop the recorded window ourselves, run the teacher, compare with the cached row."""
    store = open_store(reference)
    teacher = torchvision.models.resnet18(num_classes=3)
    teacher.load_state_dict(torch.load(teacher_file, weights_only=True))
    teacher.eval()
    samples = store.split("samples")
    root = Path(store.meta["dataset"]["root"])
    worst = 0.0
    for view in range(2):
        order, box, flip = store.view_plan(view)
        logits = store.read_logits(view)
        for p in (0, 5, 11, 17):
            image = load_view(
                str(root / samples.paths[order[p]]), box[p], bool(flip[p]), 32, IMAGENET_MEAN, IMAGENET_STD
            )
            with torch.no_grad():
                want = teacher(image[None]).numpy()[0]
            worst = max(worst, float(np.abs(want - logits[p]).max()))
    assert worst < 1e-4, f"replayed logits differ from the cache by up to {worst:.2e}"


def test_batch_size_does_not_change_the_cache(image_root, teacher_file, reference, tmp_path):
    build_cache(config(image_root, tmp_path / "b4", teacher_file, batch_size=4))
    a, b = open_store(reference).read_logits(0), open_store(tmp_path / "b4").read_logits(0)
    diff = float(np.abs(a - b).max())
    assert diff < 1e-5, f"batch 8 and batch 4 caches differ by {diff:.2e}"


def test_int8_within_one_quantisation_step(image_root, teacher_file, reference, tmp_path):
    build_cache(config(image_root, tmp_path / "int8", teacher_file, codec="int8"))
    exact = open_store(reference).read_logits(1)
    store = open_store(tmp_path / "int8")
    decoded = store.read_logits(1)
    step = store.read_rows(1, 0, store.num_samples).scale
    steps = float((np.abs(decoded - exact) / step[:, None]).max())
    assert steps <= 1.0, f"int8 rows are up to {steps:.2f} quantisation steps from fp32"
    assert store.group["views/logits"].dtype == np.uint8, f"int8 logits stored as {store.group['views/logits'].dtype}"


def test_a_topk_cache_stores_the_k_largest_and_every_reader_rebuilds_whole_rows(
    image_root, teacher_file, reference, tmp_path, in_process
):
    """topk:2 of 3 classes: the two largest logits in fp16 with their classes, the third at the mean of the rest
    (itself); the store, the API's rows and batches, stats and info read whole rows."""
    import skd

    build_cache(config(image_root, tmp_path / "top2", teacher_file, codec="topk:2"))
    g = zarr.open_group(str(tmp_path / "top2"), mode="r")
    layout = {name: (g[f"views/{name}"].shape, str(g[f"views/{name}"].dtype)) for name in ("logits", "index", "offset")}
    assert (
        layout
        == {
            "logits": ((2, 18, 2), "float16"),
            "index": ((2, 18, 2), "uint16"),
            "offset": ((2, 18), "float32"),
        }
        and "scale" not in g["views"]
    ), f"top-2 arrays {layout}"
    exact = open_store(reference).read_logits(1)
    best = np.argsort(-exact, axis=1, kind="stable")[:, :2]
    want = exact.copy()
    np.put_along_axis(want, best, np.take_along_axis(exact, best, 1).astype(np.float16).astype(np.float32), 1)
    decoded = open_store(tmp_path / "top2").read_logits(1)
    assert np.abs(decoded - want).max() < 1e-5, f"top-2 rows {np.abs(decoded - want).max():.3g} from the fp32 rows"
    batches = list(skd.open_cache(tmp_path / "top2").loader(1, batch_size=4, loader="torchvision", workers=0))
    assert torch.equal(torch.cat([b.logits for b in batches]), torch.from_numpy(decoded)), "the loader's rows differ"
    for command in ("stats", "info", "verify"):
        code, err = in_process("cache", command, tmp_path / "top2")
        assert code == 0, f"skd-cache {command} on a top-k cache: {err[-600:]}"


def test_dali_build_matches_torchvision_build(image_root, teacher_file, reference, tmp_path):
    build_cache(config(image_root, tmp_path / "dali", teacher_file, loader="dali", workers=1))
    a, b = open_store(reference).read_logits(0), open_store(tmp_path / "dali").read_logits(0)
    diff = float(np.abs(a - b).mean())
    assert diff < 0.05, f"DALI and torchvision caches differ by {diff:.4f} on average (logit units)"


def test_killed_build_resumes_to_identical_cache(image_root, teacher_file, reference, tmp_path):
    out = tmp_path / "resumed"
    args = build_command(image_root, out, teacher_file)
    killed = cli(*args, env={"SKD_FAULT": "after-shard:1"})
    assert killed.returncode == -9, (
        f"fault injection did not kill the build: {killed.returncode} {killed.stderr[-300:]}"
    )
    done = open_store(out).complete()
    assert done.sum() == 1, f"after a kill at the first shard, {done.sum()} shards are marked complete"
    rerun = cli(*args)
    assert rerun.returncode == 0, rerun.stderr[-500:]
    assert "written now" in rerun.stdout, f"the rerun's summary: {rerun.stdout[-300:]}"
    want, got = arrays(reference), arrays(out)
    for name in want:
        assert np.array_equal(want[name], got[name]), f"{name} differs after resume"


def test_two_process_build_equals_one_process(image_root, teacher_file, reference, tmp_path):
    """Batches of 5 over shards of 8: a rank's batches span its shards 0 and 2, which are not adjacent."""
    out = tmp_path / "ddp"
    cmd = torchrun("-m", "skd.cli.main", *build_command(image_root, out, teacher_file, batch_size=5))
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    summary = result.stdout + result.stderr
    assert "rows 42 (42 written now)" in summary, f"the summary must count both processes' rows: {summary[-600:]}"
    want, got = arrays(reference), arrays(out)
    for name in want:
        close = (
            np.allclose(want[name], got[name], atol=1e-5)
            if want[name].dtype.kind == "f"
            else np.array_equal(want[name], got[name])
        )
        assert close, f"{name} differs between the 2-process and the 1-process build"


def test_user_errors_are_one_line(image_root, teacher_file, tmp_path, in_process):
    cases = {
        "missing data": (
            build_args(weights="none", data=tmp_path / "nowhere", out=tmp_path / "new" / "c"),
            "does not exist",
        ),
        "no data at all": (["build", "--teacher", "resnet18"], "--data"),
        "unknown teacher": (build_args(teacher="resnet9000", data=image_root, out=tmp_path / "c"), "unknown model"),
        "missing weights": (
            build_args(weights=tmp_path / "w.pth", data=image_root, out=tmp_path / "c"),
            "does not exist",
        ),
    }
    for name, (args, needle) in cases.items():
        code, err = in_process("cache", *args, env={"SKD_DATA": ""})
        assert code == 2 and needle in err and err.count("\n") == 1, f"{name}: exit {code}: {err}"
    assert not (tmp_path / "new").exists(), "a build refused for a missing --data created --out's parent folders"
    code, err = in_process("cache", *build_command(image_root, tmp_path / "c", teacher_file), env={"WORLD_SIZE": "2"})
    assert code == 2 and "torchrun --nproc-per-node" in err and err.count("\n") == 1, f"exit {code}: {err[-800:]}"


def test_missing_pretrained_weights_say_where_to_put_them(image_root, tmp_path):
    args = build_args(teacher="resnet152", data=image_root, out=tmp_path / "c")  # no --weights: torchvision's file
    result = cli(*args, env={"TORCH_HOME": str(tmp_path / "hub")})
    assert result.returncode == 2 and "resnet152-" in result.stderr and str(tmp_path / "hub") in result.stderr, (
        result.stderr
    )


def test_a_teacher_input_beyond_published_recipes_is_warned_before_work(image_root, teacher_file, tmp_path):
    """--teacher-size 5000 allocated 21 GB with no word: a size beyond any published recipe is one warning with
    the batch's memory, before the teacher runs (here the plan check then stops the build at once)."""
    from skd.errors import SkdWarning

    cfg = config(image_root, tmp_path / "cache", teacher_file, teacher_size=5000, views=10**9)
    with pytest.warns(SkdWarning, match="teacher input 5000 px is beyond published recipes .* 2.4 GB"):
        with pytest.raises(OptionError, match="build fewer views"):
            build_cache(cfg)
