"""The zarr and zarrs internals skd relies on (skd/storage/zarr_internals.py) are still where it reaches for them:
these fail on an upgrade that moves one, before a cache is read with the wrong pipeline or too few threads."""

import zarr
import zarr.core.sync as zsync
import zarr.storage

from skd.storage.zarr_internals import ZARR_IO_THREADS, codec_pipeline, widen_zarr_thread_pool, zarrs_reads


def test_arrays_opened_for_reading_decode_through_zarrs(tmp_path):
    zarr.create_array(str(tmp_path / "a"), shape=(8, 4), dtype="int8", chunks=(4, 4))
    with zarrs_reads():
        array = zarr.open_array(str(tmp_path / "a"), mode="r")
    pipeline = array._async_array.codec_pipeline
    assert type(pipeline).__name__ == "ZarrsCodecPipeline", f"opened inside zarrs_reads: {type(pipeline).__name__}"
    assert hasattr(pipeline, "impl") and hasattr(pipeline, "python_impl"), "zarrs' pipeline lost impl/python_impl"
    assert codec_pipeline(array) == "ZarrsCodecPipeline", codec_pipeline(array)


def test_outside_zarrs_reads_zarr_keeps_its_own_pipeline(tmp_path):
    """Configuration is scoped to the opening: nothing global is left behind."""
    zarr.create_array(str(tmp_path / "a"), shape=(8,), dtype="uint8", chunks=(4,))
    with zarrs_reads():
        pass
    pipeline = codec_pipeline(zarr.open_array(str(tmp_path / "a")))
    assert pipeline == "BatchedCodecPipeline", f"an array opened outside zarrs_reads decodes through {pipeline}"
    memory = zarr.create_array(zarr.storage.MemoryStore(), shape=(4,), dtype="uint8", chunks=(2,))
    assert codec_pipeline(memory) == "BatchedCodecPipeline", f"a memory store: {codec_pipeline(memory)}"


def test_zarrs_executor_is_widened_for_object_stores():
    """zarr runs every zarrs read in `zarr.core.sync._executor`: it must take ZARR_IO_THREADS requests at once."""
    assert hasattr(zsync, "_executor") and hasattr(zsync, "_get_loop"), "zarr.core.sync moved its executor"
    widen_zarr_thread_pool()
    workers = zsync._executor._max_workers
    assert workers >= ZARR_IO_THREADS, f"zarr's executor has {workers} threads, want {ZARR_IO_THREADS}"
