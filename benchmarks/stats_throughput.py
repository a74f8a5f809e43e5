"""Throughput of `skd-cache stats` on a synthetic int8 cache: rows per second of one process.

The cache holds teacher-like rows (1000 classes) in ImageNet-default shards; the figure covers
reading (RowReader, zstd), the per-row statistics and the summaries of one view. Wall-clock rows/s
is the product figure (goal: >= 50k); rows per CPU-second (both threads) shows it when other jobs
share the cores.
Usage: python benchmarks/stats_throughput.py [--rows 200000] [--classes 1000] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from bench_common import git_state, machine, synthetic_store

from skd.inspect.stats import logit_stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument(
        "--dir", type=Path, help="where to write the synthetic cache (default: a temporary folder)"
    )
    args = ap.parse_args()
    print(f"{machine()}; skd {git_state()}")
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        store = synthetic_store(Path(tmp) / "cache", args.rows, args.classes, codec="int8")
        for _ in range(args.repeat):
            started, cpu = time.perf_counter(), time.process_time()
            logit_stats(store, [0], val=False)
            seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
            print(
                f"stats: {args.rows:,} rows x {args.classes} classes (int8) in {seconds:.2f} s: "
                f"{args.rows / seconds:,.0f} rows/s wall, {args.rows / cpu:,.0f} rows per CPU-second"
            )


if __name__ == "__main__":
    main()
