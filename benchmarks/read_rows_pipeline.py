"""Store.read_rows of whole shards, three ways side by side in one process (alternating passes):

- now: the Store's arrays opened once inside skd.storage.zarr_internals.zarrs_reads, read with slices;
- outside zarrs_reads: the arrays opened from the group as plain zarr does (zarr's own Python pipeline), the
  state of commit 791f5ce that benchmarks/README.md section 9 measured at 0.51x;
- global zarrs config: zarrs set for every array opening and an integer view index, as before issue 19.

Usage: python benchmarks/read_rows_pipeline.py [--rows N] [--classes C] [--passes P]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import zarr
from bench_common import synthetic_store

from skd.store.cache_store import open_store
from skd.store.codecs import Encoded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=131072)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--passes", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        synthetic_store(f"{folder}/c", args.rows, args.classes)
        store = open_store(f"{folder}/c")

        def outside_zarrs_reads(view, a, b):
            group, prefix = store._logit_group(view)
            selection = prefix + (slice(a, b),)
            return Encoded(
                group["logits"][selection], group["scale"][selection], group["offset"][selection]
            )

        def global_zarrs_config(view, a, b):
            with zarr.config.set({"codec_pipeline.path": "zarrs.ZarrsCodecPipeline"}):
                return outside_zarrs_reads(view, a, b)

        ways = {
            "now": store.read_rows,
            "outside zarrs_reads": outside_zarrs_reads,
            "global zarrs config": global_zarrs_config,
        }
        rates: dict[str, list[float]] = {name: [] for name in ways}
        for _ in range(args.passes):
            for name, read in ways.items():
                started = time.perf_counter()
                for shard in range(store.num_shards(args.rows)):
                    read(0, *store.shard_bounds(shard, args.rows))
                rates[name].append(args.rows / (time.perf_counter() - started))
    for name, values in rates.items():
        print(
            f"{name:20s} {statistics.median(values):>12,.0f} rows/s (passes: {', '.join(f'{v:,.0f}' for v in values)})"
        )
    for name in ("outside zarrs_reads", "global zarrs config"):
        ratio = statistics.median(now / other for now, other in zip(rates["now"], rates[name]))
        print(f"now / {name}: {ratio:.2f} (median of passes)")


if __name__ == "__main__":
    main()
