"""The Python API for your own training loop: `skd.open_cache`, its logits and its loader, checked against the
stored arrays, an independent replay of the plan, and what `skd-train` feeds its student."""

from __future__ import annotations

import multiprocessing
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import small_build_config, small_train_config

import skd
from skd import pipelines
from skd.build.teacher_pass import build_cache
from skd.plan.mixing import mix_batch
from skd.store.cache_store import open_store
from skd.train.loop import train
from skd.train.run import Learner


@pytest.fixture(scope="module")
def mixed_cache(image_root, teacher_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("mixed") / "cache"
    build_cache(small_build_config(image_root, out, teacher_file, mixup=0.8, cutmix=1.0))
    return out


@pytest.fixture(scope="module")
def second_cache(fp32_cache, image_root, tmp_path_factory):
    """A second teacher (other random weights) on the plan of `fp32_cache`."""
    import torchvision

    torch.manual_seed(7)
    weights = tmp_path_factory.mktemp("second") / "teacher.pth"
    torch.save(torchvision.models.resnet18(num_classes=3).state_dict(), weights)
    out = weights.parent / "cache"
    build_cache(small_build_config(image_root, out, weights, plan_from=fp32_cache))
    return out


def replayed(cache_path, view: int, start: int, stop: int, size: int = 32):
    """(images, labels) of positions [start, stop) of `view` decoded straight from the stored plan arrays with
    the torchvision loader, mixed as recorded: an independent reading of the cache's contract."""
    store = open_store(cache_path)
    order, box, flip = store.view_plan(view)
    samples = store.split("samples")
    root = store.meta["dataset"]["root"]
    ids = order[start:stop]
    loader = pipelines.make_loader(
        "torchvision",
        files=[f"{root}/{samples.paths[i]}" for i in ids],
        boxes=box[start:stop],
        flips=flip[start:stop],
        labels=samples.labels[ids],
        positions=np.arange(start, stop),
        image_size=size,
        batch_size=stop - start,
        workers=0,
    )
    batch = next(iter(loader))
    images = batch.images
    if "views/mix_lambda" in store.group:
        lam, mix_box = store.view_mix(view)
        images = mix_batch(images, torch.from_numpy(lam[start:stop]), torch.from_numpy(mix_box[start:stop]), start)
    return images, batch.labels


def test_logits_are_the_stored_rows(fp32_cache):
    cache = skd.open_cache(fp32_cache)
    stored = open_store(fp32_cache).group["views/logits"][...]
    assert (cache.num_views, cache.num_samples, cache.num_classes) == (2, 18, 3), (
        f"views, samples, classes: {cache.num_views}, {cache.num_samples}, {cache.num_classes}"
    )
    for view in range(2):
        got = cache.logits(view, 5, 13).numpy()
        assert got.dtype == np.float32 and np.array_equal(got, stored[view, 5:13]), (
            f"view {view} rows 5:13 differ from views/logits by {np.abs(got - stored[view, 5:13]).max():.3g}"
        )


@pytest.mark.parametrize("mixed", [False, True], ids=["plain", "mixed"])
def test_loader_batches_are_the_recorded_views_with_their_rows(fp32_cache, mixed_cache, mixed):
    """Each batch holds the recorded windows of its positions in plan order and the cache's rows of them; a
    mixed view's labels are lam * own + (1 - lam) * partner's."""
    path = mixed_cache if mixed else fp32_cache
    cache = skd.open_cache(path)
    batches = list(cache.loader(1, batch_size=4, loader="torchvision", workers=0, device="cpu"))
    images = torch.cat([b.images for b in batches])
    labels = torch.cat([b.labels for b in batches])
    logits = torch.cat([b.logits for b in batches])
    want_images, want_labels = replayed(path, 1, 0, len(images))
    assert len(batches) == 5 and len(images) == 18, f"{len(batches)} batches of {len(images)} images for 18 samples"
    gap = float((images - want_images).abs().max())
    assert gap == 0.0, f"loader images differ from a replay of the stored plan by {gap:.3g}"
    assert torch.equal(logits, cache.logits(1, 0, 18)), "loader logits are not the stored rows of view 1"
    if mixed:
        lam, _ = open_store(path).view_mix(1)
        partner = want_labels[torch.arange(18) ^ 1]
        want = torch.from_numpy(lam)[:, None] * torch.nn.functional.one_hot(want_labels, 3) + (
            1 - torch.from_numpy(lam)[:, None]
        ) * torch.nn.functional.one_hot(partner, 3)
        assert labels.shape == (18, 3) and torch.allclose(labels, want.float()), "soft labels are not lam-weighted"
        assert (lam < 1).any(), f"the mixed cache mixes nothing: lambdas {lam}"
    else:
        assert labels.dtype == torch.int64 and torch.equal(labels, want_labels), f"labels {labels} vs {want_labels}"


@pytest.mark.parametrize("kind", ["plain", "mixed", "ensemble"])
def test_loader_yields_what_skd_train_trains_on(fp32_cache, mixed_cache, second_cache, tmp_path, monkeypatch, kind):
    """skd-train's student sees exactly the loader's batches: images, labels and teacher logits, in order."""
    caches = {"plain": fp32_cache, "mixed": mixed_cache, "ensemble": [fp32_cache, second_cache]}[kind]
    seen = []
    original = Learner.step

    def spy(self, images, labels, teacher, loss_fn, device, amp):
        seen.append((images.clone(), labels.clone(), teacher.clone()))
        return original(self, images, labels, teacher, loss_fn, device, amp)

    monkeypatch.setattr(Learner, "step", spy)
    train(small_train_config(tmp_path / "run", cache=caches, epochs=2, steps_per_epoch=None))
    cache = skd.open_cache(caches)
    expected = [b for epoch in range(2) for b in cache.loader(epoch, batch_size=4, loader="torchvision", workers=0)]
    assert len(seen) == len(expected) == 10, f"skd-train ran {len(seen)} steps, the loader gives {len(expected)}"
    for step, ((images, labels, teacher), want) in enumerate(zip(seen, expected)):
        assert torch.equal(images, want.images), f"step {step}: other images"
        assert torch.equal(labels, want.labels), f"step {step}: other labels"
        assert torch.equal(teacher, want.logits), f"step {step}: other teacher logits"
    if kind == "ensemble":
        assert cache.teacher_normalized, "an SKD ensemble's target is layer-normalised: the loss must be told"


def test_two_ranks_split_a_view_into_disjoint_parts(mixed_cache):
    """Rank r of 2 reads its own half of the view (whole pairs); together the halves are the view."""
    cache = skd.open_cache(mixed_cache)
    parts = [cache.loader(0, batch_size=2, rank=r, world_size=2, loader="torchvision", workers=0) for r in (0, 1)]
    spans = [(p.start, p.stop) for p in parts]
    assert spans == [(0, 8), (8, 16)], f"ranks' positions {spans} for 18 samples (2 left over for equal parts)"
    logits = [torch.cat([b.logits for b in p]) for p in parts]
    for (start, stop), rows in zip(spans, logits):
        assert torch.equal(rows, cache.logits(0, start, stop)), f"rank rows {start}:{stop} are not the view's"


def test_the_loader_stops_its_workers_and_readers_when_the_loop_stops_early(fp32_cache):
    cache = skd.open_cache(fp32_cache)
    before = set(threading.enumerate())
    for _ in cache.loader(0, batch_size=2, loader="torchvision", workers=2, device="cpu"):
        break
    alive = [p.name for p in multiprocessing.active_children()]
    assert not alive, f"decoding workers still running after the loop stopped: {alive}"
    # zarr's executor (zarr_pool threads) is process-wide: its idle threads outlive any one reader by design
    started = [t for t in threading.enumerate() if t not in before and not t.name.startswith("zarr_pool")]
    for thread in started:  # multiprocessing's queue feeders end once the closed workers' queues drain
        thread.join(timeout=10)
    left = [t.name for t in started if t.is_alive()]
    assert not left, f"threads the loader started are still running 10 s after the loop stopped: {left}"


def test_open_cache_first_views_and_bad_requests_are_one_line_errors(fp32_cache, mixed_cache, tmp_path):
    assert skd.open_cache(fp32_cache, views=1).num_views == 1, "views=1 reads one view"
    cases = [
        (lambda: skd.open_cache(tmp_path / "none"), "none"),
        (lambda: skd.open_cache(fp32_cache, views=3), "views=3: .* holds views 0 to 1"),
        (lambda: skd.open_cache(fp32_cache).logits(2), "view 2: .* views 0 to 1"),
        (lambda: skd.open_cache(mixed_cache).loader(0, batch_size=3), "batch_size=3: .* even batch size"),
        (lambda: skd.open_cache(fp32_cache).loader(0, batch_size=0), "batch_size=0: input should be greater than 0"),
        (lambda: skd.open_cache(fp32_cache).logits(0.5), "view=0.5: input should be a valid integer"),
        (lambda: skd.open_cache(fp32_cache).loader(-1), "epoch=-1: input should be greater than or equal to 0"),
        (lambda: skd.open_cache(fp32_cache).loader(0, loader="pil"), "loader='pil': input should be 'dali' or"),
        (lambda: skd.open_cache(fp32_cache).loader(0, std=(0, 1, 1)), r"std=\(0, 1, 1\): item 0: .* greater than 0"),
        (lambda: skd.open_cache(fp32_cache).loader(0, device="gpu"), "device='gpu': not a device torch knows"),
        (lambda: skd.open_cache(fp32_cache, kd="x"), "kd='x': input should be 'skd', 'hinton' or 'none'"),
        (lambda: skd.open_cache(fp32_cache).loader(0, batch_size=2, rank=2, world_size=2), "rank 2 of world size 2"),
        (lambda: skd.open_cache([fp32_cache, fp32_cache], weights=[1.0]), "teacher weights 1.0: give 2 numbers"),
    ]
    for call, message in cases:
        with pytest.raises(skd.SkdError, match=message) as caught:
            call()
        assert "\n" not in str(caught.value), f"a multi-line error: {caught.value}"


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine with CUDA can use device='cuda'")
def test_a_gpu_asked_for_on_a_machine_without_one_is_a_device_error(fp32_cache):
    with pytest.raises(skd.DeviceError, match="device='cuda': this machine has no CUDA device") as caught:
        skd.open_cache(fp32_cache).loader(0, device="cuda")
    assert "\n" not in str(caught.value), f"a multi-line error: {caught.value}"


def test_skd_train_views_reads_the_first_views_of_a_cache(fp32_cache, tmp_path):
    metrics = []
    cfg = replace(small_train_config(tmp_path / "run", cache=fp32_cache, epochs=3, views=1), steps_per_epoch=1)
    train(cfg, log=metrics.append)
    views = [m.split(" view ")[1].split()[0] for m in metrics if m.startswith("epoch ")]
    assert views == ["0", "0", "0"], f"views of the 3 epochs with --views 1: {views}"
    assert any("views are reused from epoch 1 on" in m for m in metrics), f"log: {metrics}"


def test_the_readme_loop_runs_as_written(fp32_cache):
    """The README's own-training-loop example, on the test cache and the CPU, two epochs."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("## Your own training loop") :]
    code = section[section.index("```python") + len("```python") : section.index("```\n", section.index("```python"))]
    for old, new in [('"cache/r152"', repr(str(fp32_cache))), ("cuda", "cpu"), ("range(100)", "range(2)")]:
        assert old in code, f"the README loop no longer has {old}"
        code = code.replace(old, new)
    code = code.replace("image_size=224", "image_size=32").replace(".cpu()", "")
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["loss"].item() > 0 and namespace["epoch"] == 1, "the README loop did not run its two epochs"


@pytest.mark.filterwarnings("ignore:Successfully reconstructed a store:RuntimeWarning")
def test_a_cache_on_an_object_store_opens_and_loads_like_a_folder(image_root, teacher_file, tmp_path, monkeypatch):
    """The same build in a folder and in a bucket of a real S3 server: the API reads the same rows and batches."""
    from s3server import S3Server

    local = tmp_path / "c"
    build_cache(small_build_config(image_root, local, teacher_file, views=1, val=False))
    with S3Server() as server:
        for key, value in server.env.items():
            monkeypatch.setenv(key, value)
        server.create_bucket("api")
        build_cache(small_build_config(image_root, "s3://api/c", teacher_file, views=1, val=False))
        remote, here = skd.open_cache("s3://api/c"), skd.open_cache(local)
        assert torch.equal(remote.logits(0), here.logits(0)), "rows read from S3 differ from the folder's"
        options = dict(batch_size=4, loader="torchvision", workers=0, device="cpu")
        for a, b in zip(remote.loader(0, **options), here.loader(0, **options)):
            assert torch.equal(a.images, b.images) and torch.equal(a.logits, b.logits), "batches differ"


def test_non_finite_rows_are_refused_naming_the_view_and_row(fp32_cache, tmp_path):
    import shutil

    import zarr

    damaged = tmp_path / "cache"
    shutil.copytree(fp32_cache, damaged)
    logits = zarr.open_group(str(damaged), mode="r+")["views/logits"]
    block = logits[1:2, 8:16]
    block[0, 3, 1] = np.nan
    logits[1:2, 8:16] = block
    cache = skd.open_cache(damaged)
    assert torch.isfinite(cache.logits(0)).all(), "view 0 is intact"
    with pytest.raises(skd.SkdError, match="row 11 of view 1 holds non-finite logits") as refused:
        cache.logits(1)
    assert "\n" not in str(refused.value), str(refused.value)
    with pytest.raises(skd.SkdError, match="row 11 of view 1 holds non-finite logits"):
        list(cache.loader(1, batch_size=4, loader="torchvision", workers=0))
