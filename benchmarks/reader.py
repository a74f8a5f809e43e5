"""Logit reader throughput: rows/s of one process streaming one view of an int8 cache in order.

Modes, measured side by side in rounds (the machine is shared: compare ratios, not absolutes):
  stored   RowReader(...).batches(B): uint8 rows + scale/offset as stored (the GPU path decodes on the device)
  decoded  skd.replay.cached_logits.cached_logits(..., device=cpu): float32 logits decoded on the CPU
  decoded-1  the same loop with RowReader(threads=1): zarrs decodes one chunk at a time
  memory   the same float32 decode from uncompressed arrays already in memory (the ceiling)
  memory-3op  the decode as first written (convert, multiply, add), from memory
  shards   Store.read_rows of whole shards, one after another, no read-ahead (an integer view index: zarr's
           own pipeline, not zarrs)
  stored-old, decoded-old  the stored and decoded loops with the RowReader of --compare-with FILE (e.g. the
           hand-written shard parser: `git show bd16f02:skd/store/reader.py > /tmp/old_reader.py`)
Targets: stored >= 300k rows/s and >= 0.95 x stored-old; decoded >= 150k rows/s.

Usage: python benchmarks/reader.py [--rows 262144] [--batch 256] [--threads 1] [--rounds 5] [--only decoded ...]
       [--compare-with /tmp/old_reader.py] [--block-rows N] [--reader-threads N] [--zarr-config KEY=VALUE ...]
The synthetic store is written to a temporary folder (warm page cache: it was just written).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import zarr
from bench_common import git_state, machine, synthetic_store, table

from skd.replay.cached_logits import cached_logits
from skd.store.cache_store import Store, open_store
from skd.store.reader import RowReader


def run_stored(reader_class, store, n, batch, **kw):
    rows = 0
    for _, enc in reader_class(store, 0, 0, n, **kw).batches(batch):
        rows += enc.logits.shape[0]
    return rows


def run_decoded(store, n, batch):
    rows = 0
    for _, logits in cached_logits(store, 0, 0, n, batch, torch.device("cpu")):
        rows += logits.shape[0]
    return rows


def run_decoded_with(reader_class, store, n, batch, **kw):
    """cached_logits' CPU path with another reader class or its options."""
    rows = 0
    for _, enc in reader_class(store, 0, 0, n, **kw).batches(batch):
        logits = store.codec.decode_torch(
            *(None if a is None else torch.from_numpy(np.ascontiguousarray(a)) for a in enc)
        )
        rows += logits.shape[0]
    return rows


def load_reader(path: Path):
    """RowReader of another reader.py, loaded as skd._compared_reader (its relative imports resolve in skd).

    The hand-written reader of git bd16f02 reads `store.whole_shards`, an attribute current stores lack: every
    cache is whole-shard now, so that one expression is replaced by True before loading.
    """
    source = path.read_text()
    source = source.replace("store.whole_shards", "True")
    spec = importlib.util.spec_from_loader("skd._compared_reader", loader=None)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = "skd"
    exec(compile(source, str(path), "exec"), module.__dict__)  # noqa: S102 (a file the user names)
    return module.RowReader


def run_memory(codec, arrays, batch):
    logits, scale, offset = (torch.from_numpy(a) for a in arrays)
    rows = 0
    for a in range(0, logits.shape[0], batch):
        out = codec.decode_torch(logits[a : a + batch], scale[a : a + batch], offset[a : a + batch])
        rows += out.shape[0]
    return rows


def run_memory_3op(arrays, batch):
    """The decode as first written (convert, multiply, add: three new tensors): the issue's baseline."""
    logits, scale, offset = (torch.from_numpy(a) for a in arrays)
    rows = 0
    for a in range(0, logits.shape[0], batch):
        out = (
            logits[a : a + batch].float() * scale[a : a + batch][:, None]
            + offset[a : a + batch][:, None]
        )
        rows += out.shape[0]
    return rows


def warm_allocator() -> None:
    """Free one 32 MiB block first: glibc then serves the 1 MiB batch tensors from its heap, as in any process
    that has already freed big arrays (a training run), instead of a fresh mmap and page faults per batch.
    Without it the figures depend on which libraries happened to be imported (2-4x on the decode)."""
    block = np.ones(32 << 20, np.uint8)
    del block


def run_shards(store: Store, n, batch):
    rows = 0
    for shard in range(store.num_shards(n)):
        rows += store.read_rows(0, *store.shard_bounds(shard, n)).logits.shape[0]
    return rows


TARGETS = {
    "stored": ">= 300,000 and >= 0.95 x stored-old",
    "decoded": ">= 150,000",
    "decoded-1": "(one chunk at a time)",
    "memory": "(ceiling)",
    "memory-3op": "(the first decode)",
    "shards": "(zarr's own pipeline)",
    "stored-old": "(--compare-with)",
    "decoded-old": "(--compare-with)",
}


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=262_144)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (the decode)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--only", nargs="+", choices=list(TARGETS), help="these modes only")
    ap.add_argument(
        "--compare-with",
        type=Path,
        metavar="FILE",
        help="a reader.py whose RowReader runs beside (modes stored-old and decoded-old)",
    )
    ap.add_argument(
        "--block-rows", type=int, help="RowReader(block_rows=...) (default: the shard's rows)"
    )
    ap.add_argument(
        "--reader-threads", type=int, help="RowReader(threads=...) (default: the reader's)"
    )
    ap.add_argument(
        "--zarr-config",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="zarr config set before any array opens, e.g. async.concurrency=4 (VALUE is JSON)",
    )
    ap.add_argument(
        "--dir", type=Path, help="where to write the synthetic cache (default: a temporary folder)"
    )
    ap.add_argument(
        "--store", type=Path, help="reuse (or create and keep) the synthetic cache at this path"
    )
    return ap.parse_args()


def modes_for(args, store: Store, arrays) -> dict:
    """The measured callables, each returning the rows it read."""
    kw = {k: v for k, v in (("block_rows", args.block_rows), ("threads", args.reader_threads)) if v}
    n, b = args.rows, args.batch
    modes = {
        "stored": lambda: run_stored(RowReader, store, n, b, **kw),
        "decoded": (lambda: run_decoded_with(RowReader, store, n, b, **kw))
        if kw
        else (lambda: run_decoded(store, n, b)),
        "decoded-1": lambda: run_decoded_with(RowReader, store, n, b, **{**kw, "threads": 1}),
        "memory": lambda: run_memory(store.codec, arrays, b),
        "memory-3op": lambda: run_memory_3op(arrays, b),
        "shards": lambda: run_shards(store, n, b),
    }
    if args.compare_with:
        old = load_reader(args.compare_with)
        assert getattr(old(store, 0, 0, n), "_direct", True) is not None, (
            "the compared reader reads through zarr"
        )
        modes.update(
            {
                "stored-old": lambda: run_stored(old, store, n, b),
                "decoded-old": lambda: run_decoded_with(old, store, n, b),
            }
        )
    return {m: fn for m, fn in modes.items() if not args.only or m in args.only}


def measure(modes: dict, rounds: int, rows: int) -> tuple[dict, dict, list]:
    """Wall and CPU rows/s of every mode in every round (modes alternate within a round), load averages."""
    rates: dict[str, list[float]] = {m: [] for m in modes}
    cpu: dict[str, list[float]] = {m: [] for m in modes}
    load = [os.getloadavg()[0]]
    for r in range(rounds):
        for name, fn in modes.items():
            t, c = time.perf_counter(), time.process_time()
            got = fn()
            assert got == rows, f"{name} read {got} rows, not {rows}"
            rates[name].append(rows / (time.perf_counter() - t))
            cpu[name].append(rows / (time.process_time() - c))
        load.append(os.getloadavg()[0])
        print(f"round {r}: " + ", ".join(f"{m} {v[-1]:,.0f}" for m, v in rates.items()), flush=True)
    return rates, cpu, load


def ratio(rates: dict, a: str, b: str) -> float:
    """Median of the per-round ratios a / b (rounds share the machine's state)."""
    return statistics.median(x / y for x, y in zip(rates[a], rates[b]))


def report(args, rates: dict, cpu: dict, load: list, pipelines: dict) -> None:
    med = {m: statistics.median(v) for m, v in rates.items()}
    rows = [
        [
            m,
            f"{med[m]:,.0f}",
            f"{max(rates[m]):,.0f}",
            f"{statistics.median(cpu[m]):,.0f}",
            TARGETS[m],
        ]
        for m in rates
    ]
    print(
        f"\n{machine()}; git {git_state()}; {args.rows:,} rows x {args.classes}, batch {args.batch}, "
        f"torch threads {args.threads}, {args.rounds} rounds; load average {min(load):.1f}-{max(load):.1f} "
        f"(other jobs on the machine); RowReader pipelines {pipelines}; zarr config {args.zarr_config or '-'}"
    )
    print(
        table(["mode", "rows/s (median)", "rows/s (best)", "rows per CPU-second", "target"], rows)
    )
    pairs = [
        ("stored", "stored-old", ">= 0.95"),
        ("decoded", "decoded-old", ""),
        ("decoded", "memory", ""),
        ("decoded", "decoded-1", ""),
        ("stored", "shards", ""),
    ]
    for a, b, target in pairs:
        if a in rates and b in rates:
            note = f"; target {target}" if target else ""
            print(f"{a} / {b}: {ratio(rates, a, b):.2f} wall (median of per-round ratios{note})")


def main() -> None:
    args = parse_args()
    zarr.config.set({k: json.loads(v) for k, v in (kv.split("=", 1) for kv in args.zarr_config)})
    torch.set_num_threads(args.threads)
    warm_allocator()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        t = time.perf_counter()
        path = args.store or Path(tmp) / "cache"
        if args.store and (args.store / "zarr.json").is_file():
            store = open_store(args.store)
            assert store.num_samples == args.rows and store.num_classes == args.classes, (
                "--store holds other sizes"
            )
        else:
            store = synthetic_store(path, args.rows, args.classes, "int8")
        print(
            f"{args.rows:,} rows x {args.classes} ready in {time.perf_counter() - t:.1f} s, "
            f"{store.bytes_on_disk() / args.rows:.0f} B/row on disk"
        )
        enc = store.read_rows(0, 0, args.rows)
        arrays = (np.ascontiguousarray(enc.logits), enc.scale, enc.offset)
        pipelines = RowReader(store, 0, 0, args.rows).pipelines
        rates, cpu, load = measure(modes_for(args, store, arrays), args.rounds, args.rows)
    report(args, rates, cpu, load, pipelines)


if __name__ == "__main__":
    main()
