"""Caches on object storage: RowReader rows/s from a local S3 server against local disk, in the same run, and how
many blocks read at once (RowReader's `parallel`) hide a per-request delay.

The S3 server is moto's (tests/s3server.py), in a child process on 127.0.0.1: it serves from memory, in Python,
so its own cost per request and per byte is part of every S3 figure. `--delays` adds a sleep to every request
it answers (a far-away store); the reader's blocks are whole shards (16,384 rows by default), each read as one
HEAD and one GET per array (logits, scale, offset), the arrays one after another.

Also measured: the longest time the consumer thread waited for the GIL during an S3 read (a heartbeat thread
ticking every 5 ms), since zarrs holds the GIL while it fetches the index of a shard it reads only in part.

Usage: python benchmarks/objectstore.py [--rows 262144] [--classes 1000] [--batch 256] [--rounds 3]
       [--delays 0.02 0.05] [--parallel 1 2 4 8] [--shard-rows 16384] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import numpy as np
from bench_common import git_state, machine, synthetic_store, table

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from s3server import S3Server  # noqa: E402  (moto in a child process)

from skd.store.cache_store import open_store  # noqa: E402
from skd.store.reader import RowReader  # noqa: E402

warnings.filterwarnings("ignore", message="Successfully reconstructed a store")


def read_all(store, rows: int, batch: int, **kw) -> tuple[float, float, float]:
    """(seconds to open the reader, rows/s streaming view 0 in batches after that, longest GIL wait in ms of
    a thread ticking every 5 ms)."""
    ticks: list[float] = []
    done = threading.Event()

    def tick():
        while not done.is_set():
            ticks.append(time.perf_counter())
            time.sleep(0.005)

    ticker = threading.Thread(target=tick, daemon=True)
    ticker.start()
    opened = time.perf_counter()
    reader = RowReader(store, 0, 0, rows, **kw)  # opens the arrays, lists the shard objects
    started, n = time.perf_counter(), 0
    for _, enc in reader.batches(batch):
        n += enc.logits.shape[0]
    seconds = time.perf_counter() - started
    done.set()
    ticker.join()
    assert n == rows, f"read {n} rows of {rows}"
    gap = max(np.diff(ticks), default=0.0) * 1000 - 5
    return started - opened, rows / seconds, max(gap, 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=262144)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--shard-rows", type=int, default=16384)
    parser.add_argument("--delays", type=float, nargs="*", default=[0.02, 0.05])
    parser.add_argument("--parallel", type=int, nargs="*", default=[1, 2, 4, 8])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    with S3Server() as server, tempfile.TemporaryDirectory() as tmp:
        os.environ.update(server.env)
        server.create_bucket("bench")
        made = time.perf_counter()
        synthetic_store(Path(tmp) / "c", args.rows, args.classes, shard_rows=args.shard_rows)
        local_write = time.perf_counter() - made
        made = time.perf_counter()
        server.clear()
        synthetic_store("s3://bench/c", args.rows, args.classes, shard_rows=args.shard_rows)
        s3_write, write_requests = time.perf_counter() - made, len(server.requests)
        local, remote = open_store(Path(tmp) / "c"), open_store("s3://bench/c")
        print(f"# {machine()}; git {git_state()}; load {os.getloadavg()[0]:.1f}", flush=True)
        print(
            f"# cache {args.rows:,} x {args.classes} int8, shards of {args.shard_rows:,} rows: written in "
            f"{local_write:.1f} s locally, {s3_write:.1f} s to S3 ({write_requests} requests)",
            flush=True,
        )

        results: dict[str, list] = {}
        modes = {"local disk": (local, {}), "S3, parallel 1": (remote, {"parallel": 1})}
        modes.update(
            {f"S3, parallel {p}": (remote, {"parallel": p}) for p in args.parallel if p > 1}
        )
        for _ in range(args.rounds):  # side by side: the machine is shared
            for name, (store, kw) in modes.items():
                results.setdefault(name, []).append(read_all(store, args.rows, args.batch, **kw))
        base = statistics.median(r[1] for r in results["local disk"])
        med = {
            name: [statistics.median(r[i] for r in got) for i in (0, 1)]
            for name, got in results.items()
        }
        rows = [
            [
                name,
                f"{med[name][0] * 1000:.0f}",
                f"{med[name][1]:,.0f}",
                f"{med[name][1] / base:.2f}",
                f"{max(r[2] for r in got):.0f}",
            ]
            for name, got in results.items()
        ]
        print("\n## No added delay\n")
        print(
            table(
                ["reader", "open, ms", "rows/s (median)", "/ local disk", "longest GIL wait, ms"],
                rows,
            ),
            flush=True,
        )

        delayed: dict[str, list] = {}
        for delay in args.delays:
            server.set_delay(delay)
            for p in args.parallel:
                server.clear()
                opened, rate, gap = read_all(remote, args.rows, args.batch, parallel=p)
                delayed.setdefault(f"{delay * 1000:.0f} ms", []).append(
                    (p, opened, rate, gap, len(server.requests))
                )
            server.set_delay(0)
        rows = [
            [
                delay,
                p,
                f"{opened * 1000:.0f}",
                f"{rate:,.0f}",
                f"{rate / base:.2f}",
                f"{gap:.0f}",
                n,
            ]
            for delay, got in delayed.items()
            for p, opened, rate, gap, n in got
        ]
        print("\n## A delay added to every request\n")
        print(
            table(
                [
                    "delay per request",
                    "parallel",
                    "open, ms",
                    "rows/s",
                    "/ local disk",
                    "longest GIL wait, ms",
                    "requests",
                ],
                rows,
            ),
            flush=True,
        )
        if args.json:
            args.json.write_text(json.dumps({"no_delay": results, "delayed": delayed}, indent=1))


if __name__ == "__main__":
    main()
