"""Several teachers on one plan: --plan-from copies a cache's samples and plan, skd-train reads several caches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
import zarr
from conftest import build_args, small_build_config, small_train_config
from handmade import load_view

from skd.build.teacher_pass import build_cache
from skd.errors import DatasetError, SkdError
from skd.pipelines import IMAGENET_MEAN, IMAGENET_STD
from skd.store.cache_store import VAL, open_store
from skd.train.loop import TrainConfig, train

PLAN_ARRAYS = (
    "samples/path",
    "samples/label",
    "samples/size",
    "views/order",
    "views/box",
    "views/flip",
    "views/mix_lambda",
    "views/mix_box",
    "val/path",
    "val/label",
    "val/size",
    "val/box",
)


@pytest.fixture(scope="module")
def second_teacher(tmp_path_factory) -> Path:
    torch.manual_seed(5)
    path = tmp_path_factory.mktemp("t2") / "t2.pth"
    torch.save(torchvision.models.resnet18(num_classes=3).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def second_cache(fp32_cache, image_root, second_teacher, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("second") / "cache"
    build_cache(small_build_config(image_root, out, second_teacher, codec="int8", plan_from=fp32_cache))
    return out


def test_plan_from_copies_the_plan_and_the_logits_are_its_own_teachers(fp32_cache, second_cache, second_teacher):
    a, b = zarr.open_group(str(fp32_cache), mode="r"), zarr.open_group(str(second_cache), mode="r")
    differ = [name for name in PLAN_ARRAYS if not np.array_equal(a[name][...], b[name][...])]
    assert not differ, f"--plan-from changed {differ}"
    assert a.attrs["skd"]["plan"]["id"] == b.attrs["skd"]["plan"]["id"], "caches on one plan have other plan ids"
    assert b.attrs["skd"]["codec"] == "int8", f"codec {b.attrs['skd']['codec']}"
    store = open_store(second_cache)
    teacher = torchvision.models.resnet18(num_classes=3)
    teacher.load_state_dict(torch.load(second_teacher, weights_only=True))
    teacher.eval()
    order, box, flip = store.view_plan(1)
    paths, root = store.split("samples").paths, store.meta["dataset"]["root"]
    with torch.no_grad():
        want = teacher(
            torch.stack(
                [
                    load_view(f"{root}/{paths[order[p]]}", box[p], bool(flip[p]), 32, IMAGENET_MEAN, IMAGENET_STD)
                    for p in range(len(order))
                ]
            )
        ).numpy()
    got = store.read_logits(1)
    step = float(store.read_rows(1, 0, len(order)).scale.max())
    gap = float(np.abs(got - want).max())
    assert gap <= step, f"view 1 of the --plan-from cache is {gap:.2e} from its own teacher (int8 step {step:.2e})"


def test_plan_from_refuses_plan_options_and_other_images(fp32_cache, image_root, second_teacher, tmp_path, in_process):
    only_views = dict(views=3, image_size=None, loader=None)  # of the plan options, --views alone
    args = build_args(weights=second_teacher, data=image_root, out=tmp_path / "c", plan_from=fp32_cache, **only_views)
    code, err = in_process("cache", *args)
    assert code == 2 and "--views 3: --plan-from takes the whole plan" in err and len(err.strip().splitlines()) == 1, (
        err
    )
    other = tmp_path / "data"
    import shutil

    shutil.copytree(image_root, other)
    next(other.rglob("*.JPEG")).unlink()
    with pytest.raises(DatasetError, match="differ from those --plan-from"):
        build_cache(small_build_config(other, tmp_path / "d", second_teacher, plan_from=fp32_cache))
    assert not (tmp_path / "d").exists(), "a refused --plan-from build wrote its --out"


def base(out: Path, **overrides) -> TrainConfig:
    """The shared small training settings at the caches' own image size and views."""
    return small_train_config(out, image_size=None, views=None, **overrides)


def losses_of(cfg: TrainConfig) -> np.ndarray:
    seen = []
    train(cfg, on_step=lambda epoch, step, parts: seen.append((parts.loss.item(), parts.kd.item())))
    return np.array(seen)


@pytest.mark.parametrize("kd", ["skd", "hinton"])
def test_an_ensemble_of_one_cache_twice_is_that_cache(fp32_cache, second_cache, tmp_path, kd):
    one = losses_of(base(tmp_path / "one", cache=fp32_cache, kd=kd))
    twice = losses_of(base(tmp_path / "twice", cache=[fp32_cache, fp32_cache], kd=kd))
    both = losses_of(base(tmp_path / "both", cache=[fp32_cache, second_cache], kd=kd))
    assert one.shape == (6, 2) and np.array_equal(one, twice), (
        f"{kd}: --cache A --cache A differs from --cache A by {np.abs(one - twice).max():.2e}"
    )
    moved = float(np.abs(both - one).max())
    assert moved > 1e-3, f"{kd}: a second teacher changed the losses by only {moved:.2e}"


def test_the_loss_receives_the_weighted_mean_of_normalised_teachers(fp32_cache, second_cache, tmp_path, monkeypatch):
    import skd.loss

    received = []
    original = skd.loss.spherical_kd_loss

    def spy(s, t, y, **kwargs):
        received.append((t.clone(), kwargs["teacher_normalized"]))
        return original(s, t, y, **kwargs)

    monkeypatch.setattr(skd.loss, "spherical_kd_loss", spy)
    train(base(tmp_path / "run", cache=[fp32_cache, second_cache], teacher_weights=[1.0, 3.0], epochs=1))
    a, b = open_store(fp32_cache).read_logits(0), open_store(second_cache).read_logits(0)

    def norm(x):
        return F.layer_norm(torch.from_numpy(x), (x.shape[1],), eps=1e-7)

    for step, (target, normalized) in enumerate(received):
        rows = slice(4 * step, 4 * step + 4)
        want = 0.25 * norm(a[rows]) + 0.75 * norm(b[rows])
        gap = float((target - want).abs().max())
        assert normalized and gap < 1e-6, f"step {step}: the loss got a target {gap:.2e} from the hand computation"
    assert len(received) == 3, f"{len(received)} steps seen"


def test_caches_on_other_plans_are_refused_naming_both(fp32_cache, image_root, teacher_file, tmp_path):
    other = tmp_path / "seed1"
    build_cache(small_build_config(image_root, other, teacher_file, seed=1, views=1))
    with pytest.raises(SkdError, match=f"caches {fp32_cache} and {other} differ in plan"):
        train(base(tmp_path / "run", cache=[fp32_cache, other]))


def test_stats_compares_teachers_on_identical_views(fp32_cache, second_cache):
    import json

    from skd.inspect.compare import compare_teachers

    a, b = open_store(fp32_cache), open_store(second_cache)
    report = compare_teachers([a, b], (0, 1))
    val_a, val_b = a.read_logits(VAL), b.read_logits(VAL)
    labels = a.split("val").labels
    want = {"a": float((val_a.argmax(1) == labels).mean()), "b": float((val_b.argmax(1) == labels).mean())}
    got = report["val"]["top1"]
    assert got[str(a.path)] == want["a"] and got[str(b.path)] == want["b"], f"val top-1 {got}, by hand {want}"
    norm = lambda x: F.layer_norm(torch.from_numpy(x), (x.shape[1],), eps=1e-7)  # noqa: E731
    ensemble = float(((norm(val_a) + norm(val_b)).argmax(1).numpy() == labels).mean())
    assert report["val"]["ensemble_top1"] == ensemble, f"ensemble top-1 {report['val']['ensemble_top1']} vs {ensemble}"
    agree = float((a.read_logits(1).argmax(1) == b.read_logits(1).argmax(1)).mean())
    pair = report["views"]["1"]["pairs"][0]
    assert pair["top1_agreement"] == pytest.approx(agree) and pair["mean_kl"] > 0, f"view 1: {pair}, by hand {agree}"
    from click.testing import CliRunner

    from skd.cli.main import cache as cli

    result = CliRunner().invoke(cli, ["stats", str(fp32_cache), str(second_cache), "--json"])
    printed = json.loads(result.stdout)
    assert result.exit_code == 0 and printed["val"]["ensemble_top1"] == ensemble, (
        f"exit {result.exit_code}: {printed.get('val')}"
    )
