"""What a cache costs as its number of views grows, at ImageNet's 1,281,167 rows.

Default: peak memory of creating a cache: `create_store` plans and writes one view at a time, so its peak should
not grow with the views (it held every view's plan at ~75 B per row and view). Each setting runs in a fresh
process (peak RSS is per process): synthetic image sizes, every view planned by skd.plan.crops as a build plans it,
written into a real Zarr store.

`--info`: a finished int8 cache of 1,000 classes and K views in the layout a build leaves (view 0 real: its plan
drawn, a shard of logits encoded; every other view's files hard links to view 0's, so the listing and the
metadata are a real K-view cache's at little disk), then what depends on K: opening it, `skd-cache info`
(`describe`), a build's bookkeeping for one view (its completion, its plan read and checked) at the first and at
the last view, and appending one view (`grow_store`).

`--draws`: seconds of one view's draws (`skd.plan.draws`: the order, the flips and ten crop tries of four values
per sample) and of planning the view (`plan_view`: those draws made into windows), best of three, at `--rows`
synthetic image sizes (tests/plan/test_draws.py and test_crops.py check the same at ImageNet's size, untimed).

Usage: python benchmarks/scale.py [--rows N] [--views 10 100] [--dir DIR] [--compare] [--info] [--draws]
"""

from __future__ import annotations

import argparse
import errno
import itertools
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_common import cache_meta
from handmade import write_shard

from skd.data.index import Split
from skd.inspect.info import describe
from skd.plan import draws
from skd.plan.crops import TRIES, CropParams, plan_view
from skd.plan.mixing import MixParams
from skd.replay.sources import planned_view
from skd.store.cache_store import Store, open_store
from skd.store.creation import ViewPlans, create_store, grow_store
from skd.store.schema import expected_arrays

CLASSES = 1000


def samples(rows: int) -> Split:
    """`rows` samples of synthetic ImageNet-like sizes and labels."""
    rng = np.random.default_rng(0)
    sizes = np.stack([rng.integers(200, 600, rows), rng.integers(200, 600, rows)], axis=1).astype(
        np.int32
    )
    return Split([f"train/c/{i}.JPEG" for i in range(rows)], rng.integers(0, CLASSES, rows), sizes)


def view_plans(views: int, sizes: np.ndarray) -> ViewPlans:
    return ViewPlans(
        views, lambda view: planned_view(0, view, sizes, CropParams(), MixParams(), 224)
    )


def create(rows: int, views: int, folder: str, all_at_once: bool) -> dict:
    """Create a cache of `views` planned views of `rows` images; seconds and this process's peak RSS.
    `all_at_once`: every view's plan made first and held in a list (as builds did before ViewPlans)."""
    train = samples(rows)
    meta = cache_meta(
        codec="int8", views=views, num_samples=rows, classes=[str(i) for i in range(CLASSES)]
    )
    plans = view_plans(views, train.sizes)
    plans = list(plans) if all_at_once else plans
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    create_store(
        f"{folder}/c", meta, train=train, plans=plans, val=None, val_boxes=None, num_classes=CLASSES
    )
    return {
        "rows": rows,
        "views": views,
        "seconds": time.perf_counter() - started,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_before_mb": before / 1024,
        "all_at_once": all_at_once,
    }


def linked_cache(rows: int, views: int, path: Path) -> Store:
    """A finished cache of `views` views laid out as a build leaves it: view 0 real, every other view's files
    (plan chunks, logit shards, completion flags) hard links to view 0's first ones."""
    train = samples(rows)
    meta = cache_meta(
        codec="int8", views=1, num_samples=rows, classes=[str(i) for i in range(CLASSES)]
    )
    store = create_store(
        path,
        meta,
        train=train,
        plans=view_plans(1, train.sizes),
        val=None,
        val_boxes=None,
        num_classes=CLASSES,
    )
    logits = np.random.default_rng(1).normal(0, 3, (store.shard_rows, CLASSES)).astype(np.float32)
    write_shard(store, 0, 0, store.codec.encode(logits))
    names = [name for name in expected_arrays(store.meta, False) if name.startswith("views/")]
    for name in names:
        store.group[name].resize((views, *store.group[name].shape[1:]))
        view0 = path / name / "c" / "0"
        # shard 0's file, at every shard of every view
        if name.endswith(("logits", "scale", "offset", "complete")):
            first = view0 / "0"
            tail = ("0",) if first.is_dir() else ()
            source = view0.joinpath("0", *tail)
            for view, shard in itertools.product(range(views), range(store.num_shards(rows))):
                source = link(source, path.joinpath(name, "c", str(view), str(shard), *tail))
        else:  # a plan array: view 0's chunk files at every other view
            for source in [f for f in view0.rglob("*") if f.is_file()]:
                for view in range(1, views):
                    link(source, path / name / "c" / str(view) / source.relative_to(view0))
    store.group.attrs["skd"] = {**store.meta, "views": views, "complete": True}
    return open_store(path)


def link(source: Path, target: Path) -> Path:
    """`target` made a hard link to `source`, or a copy where `source` has all the links a file may have (65,000 on
    ext4); returns the file to link the next target to."""
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(source, target)
        except OSError as exc:
            if exc.errno != errno.EMLINK:
                raise
            shutil.copyfile(source, target)
            return target
    return source


def timed(work) -> tuple[float, object]:
    started = time.perf_counter()
    result = work()
    return time.perf_counter() - started, result


def draw_costs(rows: int, repeat: int = 3) -> dict:
    """Seconds (best of `repeat`) of one view's draws and of planning the view, at `rows` samples."""
    ids = np.arange(rows)
    sizes = samples(rows).sizes

    def view_draws():
        draws.uniform(0, 0, draws.ORDER, ids)
        draws.uniform(0, 0, draws.FLIP, ids)
        for t in range(TRIES):
            draws.uniform(0, 0, draws.CROP + t, ids, count=4)

    return {
        "rows": rows,
        "draws_s": min(timed(view_draws)[0] for _ in range(repeat)),
        "plan_view_s": min(timed(lambda: plan_view(0, 0, sizes))[0] for _ in range(repeat)),
    }


def info_costs(rows: int, views: int, folder: str) -> dict:
    """Seconds of what a K-view cache costs to open, describe, keep a view's books for and grow by a view."""
    path = Path(folder) / "c"
    layout, _ = timed(lambda: linked_cache(rows, views, path))
    opening, store = timed(lambda: open_store(path))
    info, described = timed(lambda: describe(open_store(path)))
    assert described["views"]["complete"] == views and described["lost_shards"] == {}, described[
        "views"
    ]
    # as a build resumes it: lost shards checked once, then view by view
    build = open_store(path, mode="r+")
    lost, _ = timed(build.lost_shards)
    per_view = {
        view: timed(lambda v=view: (build.part_complete(v), build.view_plan(v), build.view_mix(v)))[
            0
        ]
        for view in (0, views - 1)
    }
    grow, _ = timed(
        lambda: grow_store(build, views + 1, view_plans(views + 1, build.split("samples").sizes))
    )
    return {
        "rows": rows,
        "views": views,
        "files": len(store.listing()),
        "layout_s": layout,
        "open_s": opening,
        "info_s": info,
        "lost_check_s": lost,
        "first_view_s": per_view[0],
        "last_view_s": per_view[views - 1],
        "grow_one_view_s": grow,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_281_167)
    parser.add_argument("--views", type=int, nargs="+", default=[10, 100])
    parser.add_argument(
        "--dir", default=None, help="where to write the caches (default: a temporary folder)"
    )
    parser.add_argument(
        "--compare", action="store_true", help="also hold every plan at once (the old way)"
    )
    parser.add_argument(
        "--info", action="store_true", help="open, info, a view's bookkeeping and growth by views"
    )
    parser.add_argument(
        "--draws", action="store_true", help="one view's draws and its plan_view, in seconds"
    )
    # a child process: one view count
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--all-at-once", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one is not None:
        with tempfile.TemporaryDirectory(dir=args.dir) as folder:
            work = info_costs if args.info else lambda r, v, f: create(r, v, f, args.all_at_once)
            print(json.dumps(work(args.rows, args.one, folder)))
        return
    if args.info:
        return report_info(args)
    if args.draws:
        r = draw_costs(args.rows)
        print(
            f"{r['rows']:>9,} rows: one view's draws {r['draws_s']:.2f} s, "
            f"plan_view {r['plan_view_s']:.2f} s (best of 3)"
        )
        return
    for all_at_once in (False, True) if args.compare else (False,):
        results = []
        for views in args.views:
            results.append(child(args, views, *(["--all-at-once"] if all_at_once else [])))
            r = results[-1]
            print(
                f"{'all plans held' if all_at_once else 'one view at a time':<18} {r['rows']:>9,} rows x "
                f"{r['views']:>4} views: peak RSS {r['peak_rss_mb']:,.0f} MB (before creating "
                f"{r['rss_before_mb']:,.0f} MB), {r['seconds']:,.1f} s"
            )
        for r in results[1:]:
            ratio = r["peak_rss_mb"] / results[0]["peak_rss_mb"]
            print(f"  peak RSS at {r['views']} views / at {results[0]['views']} views: {ratio:.2f}")


def child(args, views: int, *flags: str) -> dict:
    """One setting in a fresh process: its JSON line."""
    command = [
        sys.executable,
        str(Path(__file__)),
        "--rows",
        str(args.rows),
        "--one",
        str(views),
        *flags,
    ]
    command += ["--dir", args.dir] if args.dir else []
    out = subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).parent)
    if out.returncode:
        raise SystemExit(f"{views} views failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def report_info(args) -> None:
    for views in args.views:
        r = child(args, views, "--info")
        print(
            f"{r['rows']:>9,} rows x {r['views']:>5,} views ({r['files']:,} files, laid out in {r['layout_s']:.0f} s): "
            f"open {r['open_s']:.2f} s, info {r['info_s']:.2f} s, lost-shard check {r['lost_check_s']:.2f} s, "
            f"a view's bookkeeping {r['first_view_s']:.2f} s (first) / {r['last_view_s']:.2f} s (last), "
            f"one view appended {r['grow_one_view_s']:.2f} s"
        )


if __name__ == "__main__":
    main()
