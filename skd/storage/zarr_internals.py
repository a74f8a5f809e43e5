"""Everything skd takes from zarr's and zarrs' internals, in one place, each with why.

zarr 3.1 and zarrs 0.2 expose no public way to do these; setup.cfg bounds both versions, and
tests/storage/test_zarr_internals.py fails when one of the internals moves. Configuration is applied when a
cache's arrays are opened (`zarrs_reads`), never at import.
"""

from __future__ import annotations

import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import zarr

ZARRS_PIPELINE = "zarrs.ZarrsCodecPipeline"  # Rust decoding, 1.04-1.09x a hand-written shard reader
# zarr's own, which keeps chunks of fill values
ZARR_PIPELINE = "zarr.core.codec_pipeline.BatchedCodecPipeline"
# zarr's executor, where each zarrs read of an object store waits on its requests
ZARR_IO_THREADS = 32


@contextmanager
def zarrs_reads(**settings):
    """Arrays opened inside decode through zarrs (`settings`: more zarr config, e.g.
    threading.max_workers).

    zarr binds an array's codec pipeline when the array is opened, so only the opening needs the
    setting. zarrs rebuilds an obstore store in its own copy of the object_store crate and warns so
    for every array.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="Successfully reconstructed a store", category=RuntimeWarning
        )
        with zarr.config.set({"codec_pipeline.path": ZARRS_PIPELINE, **settings}):
            yield


@contextmanager
def zarr_writes():
    """Arrays opened inside write through zarr's own pipeline: zarrs 0.2 drops chunks of fill values
    even with write_empty_chunks, and every shard must get its file (a missing file then always
    means damage)."""
    with zarr.config.set({"codec_pipeline.path": ZARR_PIPELINE}):
        yield


def codec_pipeline(array: zarr.Array) -> str:
    """Name of the codec pipeline class that serves reads of slices of `array`:
    "ZarrsCodecPipeline", or the one zarrs hands them to ("BatchedCodecPipeline") where it does not
    support the array's store or data type, or where the array was opened outside `zarrs_reads`.

    zarrs falls back without an error (a warning at most), so readers check and report this rather
    than assume it. (zarrs also hands over reads with an integer index, which drop an axis: read
    with slices.) Internals: `Array._async_array.codec_pipeline`, zarrs' `impl` and `python_impl`.
    """
    pipeline = array._async_array.codec_pipeline
    if type(pipeline).__name__ == "ZarrsCodecPipeline" and pipeline.python_impl is not None:
        dtype = array._async_array.metadata.data_type.to_native_dtype()
        if pipeline.impl is None or dtype.kind in "VSUMmOT":  # the kinds zarrs' read() hands over
            pipeline = pipeline.python_impl
    return type(pipeline).__name__


def widen_zarr_thread_pool() -> None:
    """Give zarr's executor ZARR_IO_THREADS threads (created as needed).

    zarr sizes it once, by the `threading.max_workers` in force at its first use (2 inside a
    RowReader's opening), and every zarrs read runs in it (asyncio.to_thread): against an object
    store that size would be the number of requests in flight in the whole process. Internals:
    `zarr.core.sync._executor` and `_get_loop`.
    """
    import zarr.core.sync as zsync

    current = zsync._executor
    if current is not None and current._max_workers >= ZARR_IO_THREADS:
        return
    zsync._executor = ThreadPoolExecutor(ZARR_IO_THREADS, thread_name_prefix="zarr_pool")
    zsync._get_loop().set_default_executor(zsync._executor)
    if current is not None:
        current.shutdown(wait=False)  # the reads it runs finish; new ones go to the wider one
