"""Peak memory of creating a cache as the number of views grows: `create_store` plans and writes one view at
a time, so its peak should not grow with the views (it held every view's plan at ~75 B per row and view).

Each setting runs in a fresh process (peak RSS is per process): the dataset's samples (synthetic sizes), the
plan of every view drawn by skd.plan exactly as a build draws it, written into a real Zarr store.

Usage: python benchmarks/scale.py [--rows N] [--views 10 100] [--dir DIR]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_common import cache_meta

from skd.creation import ViewPlans, create_store
from skd.index import Split
from skd.mixing import MixParams
from skd.plan import CropParams
from skd.replay import planned_view


def create(rows: int, views: int, folder: str, all_at_once: bool) -> dict:
    """Create a cache of `views` planned views of `rows` images; seconds and this process's peak RSS.
    `all_at_once`: every view's plan made first and held in a list (as builds did before ViewPlans)."""
    rng = np.random.default_rng(0)
    sizes = np.stack([rng.integers(200, 600, rows), rng.integers(200, 600, rows)], axis=1).astype(np.int32)
    train = Split([f"train/c/{i}.JPEG" for i in range(rows)], rng.integers(0, 1000, rows), sizes)
    meta = cache_meta(codec="int8", views=views, num_samples=rows, classes=[str(i) for i in range(1000)])
    plans = ViewPlans(views, lambda view: planned_view(0, view, sizes, CropParams(), MixParams(), 224))
    plans = list(plans) if all_at_once else plans
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    create_store(f"{folder}/c", meta, train=train, plans=plans, val=None, val_boxes=None, num_classes=1000)
    return {
        "rows": rows,
        "views": views,
        "seconds": time.perf_counter() - started,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_before_mb": before / 1024,
        "all_at_once": all_at_once,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_281_167)
    parser.add_argument("--views", type=int, nargs="+", default=[10, 100])
    parser.add_argument("--dir", default=None, help="where to write the caches (default: a temporary folder)")
    parser.add_argument("--compare", action="store_true", help="also hold every plan at once (the old way)")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # a child process: one view count
    parser.add_argument("--all-at-once", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one is not None:
        with tempfile.TemporaryDirectory(dir=args.dir) as folder:
            print(json.dumps(create(args.rows, args.one, folder, args.all_at_once)))
        return
    for all_at_once in (False, True) if args.compare else (False,):
        results = []
        for views in args.views:
            command = [sys.executable, str(Path(__file__)), "--rows", str(args.rows), "--one", str(views)]
            command += (["--dir", args.dir] if args.dir else []) + (["--all-at-once"] if all_at_once else [])
            out = subprocess.run(command, capture_output=True, text=True, check=True, cwd=Path(__file__).parent)
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
            r = results[-1]
            print(
                f"{'all plans held' if all_at_once else 'one view at a time':<18} {r['rows']:>9,} rows x "
                f"{r['views']:>4} views: peak RSS {r['peak_rss_mb']:,.0f} MB (before creating "
                f"{r['rss_before_mb']:,.0f} MB), {r['seconds']:,.1f} s"
            )
        for r in results[1:]:
            ratio = r["peak_rss_mb"] / results[0]["peak_rss_mb"]
            print(f"  peak RSS at {r['views']} views / at {results[0]['views']} views: {ratio:.2f}")


if __name__ == "__main__":
    main()
