"""RowReader: reads through the zarrs pipeline give exactly what zarr's own gives, in any range, block size and
batch size; lost or damaged shard files are one-line StoreErrors naming them."""

import numpy as np
import pytest
import zarr
from handmade import assert_same, make_store

from skd.storage.zarr_internals import codec_pipeline
from skd.store.cache_store import VAL, StoreError, open_store, part_name
from skd.store.reader import RowReader


@pytest.mark.parametrize("codec", ["int8", "fp16", "fp32", "compact"])
def test_reads_match_zarr(tmp_path, codec):
    """The reader's zarrs reads against Store.read_rows (zarr's own pipeline: an integer view index)."""
    store = make_store(tmp_path / "c", codec=codec)
    for view, n in [(0, 50), (1, 50), (VAL, 13)]:
        reader = RowReader(store, view, 0, n)
        for a, b in [(0, n), (3, n - 2), (5, 6), (16, 32), (15, 17), (n - 1, n)]:
            if b > n:
                continue
            got = reader._read(a, b)
            assert all(x is None or x.flags.c_contiguous for x in got), f"rows {a}-{b}: not C-contiguous"
            assert_same(got, store.read_rows(view, a, b))


@pytest.mark.parametrize(
    "block_rows,batch,threads",
    [(None, 5, 2), (None, 16, 1), (7, 3, 2), (4, 64, 3), (16, 1, 1), (None, 100, 4), (48, 5, 3)],
)
def test_batches_cover_the_range_in_order(tmp_path, block_rows, batch, threads):
    store = make_store(tmp_path / "c")
    start, stop = 3, 47
    got = list(RowReader(store, 1, start, stop, block_rows=block_rows, threads=threads).batches(batch))
    firsts = [f for f, _ in got]
    sizes = [len(e.logits) for _, e in got]
    assert firsts == list(range(start, stop, batch)), f"batches start at {firsts}, not every {batch} rows"
    assert all(s == batch for s in sizes[:-1]) and sum(sizes) == stop - start, (
        f"batch sizes {sizes} (sum {sum(sizes)}) for {stop - start} rows in batches of {batch}"
    )
    whole = [np.concatenate([e[i] for _, e in got]) for i in range(3)]
    assert_same(whole, store.read_rows(1, start, stop))


def test_only_batches_that_straddle_blocks_are_copied(tmp_path):
    """Batches are views of the reader's blocks (no copy per batch); a batch across a block edge is a copy."""
    store = make_store(tmp_path / "c")
    got = list(RowReader(store, 0, 0, 50, block_rows=16).batches(5))
    straddling = [first for first, _ in got if first // 16 != (first + 4) // 16 and first + 5 <= 50]
    views = [first for first, e in got if all(x.base is not None for x in e if x is not None)]
    copies = [first for first, _ in got if first not in views]
    assert copies == straddling, f"copied batches start at {copies}, the straddling ones at {straddling}"


def test_a_missing_shard_file_is_an_error_not_zeros(tmp_path):
    """Readers read complete shards, each written whole: a missing file is a lost file (zarr and zarrs read
    it as zeros, which trained silently on zero teacher logits)."""
    store = make_store(tmp_path / "c", skip_shards={(0, 1)})
    assert_same(RowReader(store, 0, 0, 16)._read(0, 16), store.read_rows(0, 0, 16))
    with pytest.raises(StoreError, match="rows 16-32 of view 0 .*views/logits/c/0/1/0 is missing"):
        list(RowReader(store, 0, 0, 50).batches(8))
    with pytest.raises(StoreError, match="views/logits/c/0/1/0 is missing"):  # a range inside the shard too
        RowReader(store, 0, 20, 21)


def test_a_lost_scale_file_is_named(tmp_path):
    """The affine codecs' scale and offset files are checked like the logits'."""
    store = make_store(tmp_path / "c")
    (tmp_path / "c" / "val" / "offset" / "c" / "0").unlink()
    assert_same(RowReader(store, 1, 0, 50)._read(0, 50), store.read_rows(1, 0, 50))
    with pytest.raises(StoreError, match="rows 0-13 of val .*val/offset/c/0 is missing"):
        RowReader(store, VAL, 0, 13)


def test_a_shard_that_cannot_be_opened_names_the_file_not_the_images(tmp_path):
    """An OS error on a cache file (here a folder where the shard should be; permissions, EIO and stale
    mounts alike) is the cache's problem, named with the file, not a failed image read."""
    store = make_store(tmp_path / "c")
    shard = tmp_path / "c" / "views" / "logits" / "c" / "0" / "1" / "0"
    shard.unlink()
    shard.mkdir()
    with pytest.raises(StoreError, match="Is a directory.*views/logits/c/0/1/0.*permissions"):
        list(RowReader(store, 0, 0, 50).batches(8))


def test_a_failed_system_call_in_zarrs_names_the_file_not_damage(tmp_path):
    """zarrs reports an I/O error as RuntimeError("... (os error N)"), without the file: the reader names
    the shard file and the OS error, and asks for the files' permissions, not a rebuild."""
    store = make_store(tmp_path / "c")
    reader = RowReader(store, 0, 0, 50)

    class Failing:
        """The scale array, whose reads fail as zarrs reports EIO."""

        def __getattr__(self, name):
            return getattr(store.group["views/scale"], name)

        def __getitem__(self, sel):
            raise RuntimeError("Input/output error (os error 5)")

    reader._arrays["scale"] = Failing()
    needle = "rows 16-32 of view 0 .*Input/output error: .*views/scale/c/0/1\\).*permissions"
    with pytest.raises(StoreError, match=needle):
        reader._read(16, 32)


def test_damaged_shard_index_is_an_error(tmp_path):
    store = make_store(tmp_path / "c")
    shard = tmp_path / "c" / "views" / "logits" / "c" / "0" / "1" / "0"
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="rows 16-32 of view 0 .*views/logits/c/0/1/0: .*checksum.*damaged"):
        list(RowReader(store, 0, 0, 50).batches(8))


@pytest.mark.parametrize("threads", [1, 3])
def test_damaged_chunk_is_an_error(tmp_path, threads):
    """With several decode threads too, a damaged chunk (here the second of the shard) stops the read."""
    store = make_store(tmp_path / "c")
    shard = tmp_path / "c" / "views" / "logits" / "c" / "0" / "0" / "0"
    data = bytearray(shard.read_bytes())
    index = np.frombuffer(bytes(data[-(4 * 16 + 4) : -4]), "<u8").reshape(4, 2)
    offset, nbytes = (int(v) for v in index[1])
    data[offset + 6 : offset + nbytes - 4] = bytes(nbytes - 10)
    shard.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="rows 0-16 of view 0 .*views/logits/c/0/0/0: .*damaged"):
        list(RowReader(store, 0, 0, 16, threads=threads).batches(8))


def test_threads_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="threads must be >= 1, got 0"):
        RowReader(make_store(tmp_path / "c"), 0, 0, 50, threads=0)


def test_local_caches_are_read_by_zarrs(tmp_path):
    """zarrs falls back to zarr's own pipeline without an error: the reader says which one serves it."""
    store = make_store(tmp_path / "c", codec="int8")
    for view in (0, VAL):
        reader = RowReader(store, view, 0, 5)
        want = {name: "ZarrsCodecPipeline" for name in ("logits", "scale", "offset")}
        assert reader.pipelines == want, f"{part_name(view)}: pipelines {reader.pipelines}"
    paths = codec_pipeline(store.array("samples/path"))
    assert paths == "BatchedCodecPipeline", f"string arrays are zarr's own to read, not {paths}"
    memory = zarr.create_array(zarr.storage.MemoryStore(), shape=(4,), dtype="uint8", chunks=(2,))
    assert codec_pipeline(memory) == "BatchedCodecPipeline", f"a memory store: {codec_pipeline(memory)}"


@pytest.mark.parametrize(
    "view,start,stop,needle",
    [
        (2, 0, 10, "outside the cache's 2 views"),
        (0, 0, 51, "outside the 50 rows of view 0"),
        (0, 8, 4, "outside"),
        (VAL, 0, 14, "13 rows of val"),
    ],
)
def test_ranges_outside_the_cache_are_refused(tmp_path, view, start, stop, needle):
    """Never the fill value for rows that do not exist (zarr itself refuses or clips them)."""
    with pytest.raises(ValueError, match=needle):
        RowReader(make_store(tmp_path / "c"), view, start, stop)


@pytest.mark.parametrize("codec, array", [("fp32", "logits"), ("fp16", "logits"), ("int8", "scale")])
def test_a_row_that_decodes_to_nan_or_inf_is_named_not_trained_on(tmp_path, codec, array):
    """A non-finite stored value (a damaged or hand-edited cache) would make every student step NaN and stats
    print numpy warnings: reading it is one StoreError naming the view and the row."""
    make_store(tmp_path / "c", codec=codec)
    store = open_store(tmp_path / "c", mode="r+")
    values = store.group[f"views/{array}"][0:1, 16:32]
    values[0, 5] = np.inf if array == "scale" else np.nan
    store.group[f"views/{array}"][0:1, 16:32] = values
    store = open_store(tmp_path / "c")
    with pytest.raises(StoreError, match="row 21 of view 0 holds non-finite logits") as refused:
        list(RowReader(store, 0, 0, 50).batches(8))
    assert "\n" not in str(refused.value), str(refused.value)
    assert len(list(RowReader(store, 1, 0, 50).batches(8))) == 7, "view 1 is intact and reads in full"
