"""Logit reader throughput: rows/s of one process streaming one view of an int8 cache in order.

Modes, measured side by side in rounds (the machine is shared: compare ratios, not absolutes):
  stored   RowReader(...).batches(B): uint8 rows + scale/offset as stored (the GPU path decodes on the device)
  decoded  skd.train.cached_teacher_batches(..., device=cpu): float32 logits decoded on the CPU
  decoded-1  the same with one zstd thread (RowReader(threads=1)): what the default of two threads adds
  memory   the same float32 decode from uncompressed arrays already in memory (the ceiling)
  memory-3op  the decode as first written (convert, multiply, add), from memory: what the target was set on
  shards   plain zarr reads of whole shards, one after another, no read-ahead (reference)
Targets (issue 6): stored >= 300k rows/s, decoded >= 150k rows/s and >= 0.5 x memory.

Usage: python benchmarks/reader.py [--rows 262144] [--batch 256] [--threads 1] [--rounds 5] [--only decoded]
The synthetic store is written to a temporary folder (warm page cache: it was just written).
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench_common import git_state, machine, synthetic_store, table
from skd.reader import RowReader
from skd.store import open_store
from skd.train import cached_teacher_batches


def run_stored(store, n, batch):
    rows = 0
    for _, enc in RowReader(store, 0, 0, n).batches(batch):
        rows += enc.logits.shape[0]
    return rows


def run_decoded(store, n, batch):
    rows = 0
    for _, logits in cached_teacher_batches(store, 0, 0, n, batch, torch.device("cpu")):
        rows += logits.shape[0]
    return rows


def run_decoded_one_thread(store, n, batch):
    """cached_teacher_batches' CPU path with RowReader(threads=1): chunks decompressed one at a time."""
    rows = 0
    for _, enc in RowReader(store, 0, 0, n, threads=1).batches(batch):
        logits = store.codec.decode_torch(*(torch.from_numpy(np.ascontiguousarray(a)) for a in enc))
        rows += logits.shape[0]
    return rows


def run_memory(codec, arrays, batch):
    logits, scale, offset = (torch.from_numpy(a) for a in arrays)
    rows = 0
    for a in range(0, logits.shape[0], batch):
        out = codec.decode_torch(logits[a:a + batch], scale[a:a + batch], offset[a:a + batch])
        rows += out.shape[0]
    return rows


def run_memory_3op(arrays, batch):
    """The decode as first written (convert, multiply, add: three new tensors): the issue's baseline."""
    logits, scale, offset = (torch.from_numpy(a) for a in arrays)
    rows = 0
    for a in range(0, logits.shape[0], batch):
        out = logits[a:a + batch].float() * scale[a:a + batch][:, None] + offset[a:a + batch][:, None]
        rows += out.shape[0]
    return rows


def warm_allocator() -> None:
    """Free one 32 MiB block first: glibc then serves the 1 MiB batch tensors from its heap, as in any process
    that has already freed big arrays (a training run), instead of a fresh mmap and page faults per batch.
    Without it the figures depend on which libraries happened to be imported (2-4x on the decode)."""
    block = np.ones(32 << 20, np.uint8)
    del block


def run_shards(store, n, batch):
    rows = 0
    for shard in range(store.num_shards(n)):
        rows += store.read_rows(0, *store.shard_bounds(shard, n)).logits.shape[0]
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=262_144)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (the decode)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--only", choices=["stored", "decoded", "decoded-1", "memory", "memory-3op", "shards"],
                    help="one mode (for profiling)")
    ap.add_argument("--dir", type=Path, help="where to write the synthetic cache (default: a temporary folder)")
    ap.add_argument("--store", type=Path, help="reuse (or create and keep) the synthetic cache at this path")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warm_allocator()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        t = time.perf_counter()
        path = args.store or Path(tmp) / "cache"
        if args.store and (args.store / "zarr.json").is_file():
            store = open_store(args.store)
            assert store.num_samples == args.rows and store.num_classes == args.classes, "--store holds other sizes"
        else:
            store = synthetic_store(path, args.rows, args.classes, "int8")
        print(f"{args.rows:,} rows x {args.classes} ready in {time.perf_counter() - t:.1f} s, "
              f"{store.bytes_on_disk() / args.rows:.0f} B/row on disk")
        enc = store.read_rows(0, 0, args.rows)
        arrays = (np.ascontiguousarray(enc.logits), enc.scale, enc.offset)
        modes = {"stored": lambda: run_stored(store, args.rows, args.batch),
                 "decoded": lambda: run_decoded(store, args.rows, args.batch),
                 "decoded-1": lambda: run_decoded_one_thread(store, args.rows, args.batch),
                 "memory": lambda: run_memory(store.codec, arrays, args.batch),
                 "memory-3op": lambda: run_memory_3op(arrays, args.batch),
                 "shards": lambda: run_shards(store, args.rows, args.batch)}
        if args.only:
            modes = {args.only: modes[args.only]}
        rates: dict[str, list[float]] = {m: [] for m in modes}
        cpu: dict[str, list[float]] = {m: [] for m in modes}
        load = [os.getloadavg()[0]]
        for r in range(args.rounds):
            for name, fn in modes.items():
                t, c = time.perf_counter(), time.process_time()
                rows = fn()
                assert rows == args.rows, (name, rows)
                rates[name].append(rows / (time.perf_counter() - t))
                cpu[name].append(rows / (time.process_time() - c))
            load.append(os.getloadavg()[0])
            print(f"round {r}: " + ", ".join(f"{m} {v[-1]:,.0f}" for m, v in rates.items()), flush=True)
    med = {m: statistics.median(v) for m, v in rates.items()}
    targets = {"stored": ">= 300,000", "decoded": ">= 150,000 and >= 0.5 x memory",
               "decoded-1": "(one zstd thread)", "memory": "(ceiling)",
               "memory-3op": "(the decode the target was set against)", "shards": "(reference)"}
    rows = [[m, f"{med[m]:,.0f}", f"{max(rates[m]):,.0f}", f"{statistics.median(cpu[m]):,.0f}", targets[m]]
            for m in modes]
    print(f"\n{machine()}; git {git_state()}; {args.rows:,} rows x {args.classes}, batch {args.batch}, "
          f"torch threads {args.threads}, {args.rounds} rounds; load average {min(load):.1f}-{max(load):.1f} "
          "(other jobs on the machine)")
    print(table(["mode", "rows/s (median)", "rows/s (best)", "rows per CPU-second", "target"], rows))
    if "decoded" in med and "memory" in med:
        ratios = [d / m for d, m in zip(rates["decoded"], rates["memory"])]
        cpu_ratio = statistics.median(cpu["decoded"]) / statistics.median(cpu["memory"])
        print(f"\ndecoded / memory: {statistics.median(ratios):.2f} wall (median of per-round ratios; target >= 0.5), "
              f"{cpu_ratio:.2f} in rows per CPU-second (the ratio if no core were free for the reader thread)")
        if "memory-3op" in rates:
            old = [d / m for d, m in zip(rates["decoded"], rates["memory-3op"])]
            print(f"decoded / memory-3op: {statistics.median(old):.2f} wall")
        if "decoded-1" in rates:
            gain = [d / s for d, s in zip(rates["decoded"], rates["decoded-1"])]
            print(f"decoded / decoded-1: {statistics.median(gain):.2f} wall (two zstd threads against one)")


if __name__ == "__main__":
    main()
