"""RowReader: the direct shard reads give exactly what zarr gives, in any range, block size and batch size."""
from types import SimpleNamespace

import numpy as np
import pytest

from skd.codecs import get_codec
from skd.reader import RowReader
from skd.store import FORMAT_VERSION, Split, StoreError, create_store, open_store


def make_store(path, *, rows=50, classes=7, codec="int8", shard_rows=16, chunk_rows=4, views=2, val=13,
               skip_shards=()):
    rng = np.random.default_rng(0)
    meta = {"format": FORMAT_VERSION, "codec": codec, "views": views, "shard_rows": shard_rows,
            "chunk_rows": chunk_rows, "teacher": {"name": "t", "num_classes": classes},
            "dataset": {"num_samples": rows, "classes": [str(i) for i in range(classes)]}, "plan": {}}
    split = Split([f"train/c/{i}.JPEG" for i in range(rows)], rng.integers(0, classes, rows), np.full((rows, 2), 8))
    plans = [SimpleNamespace(order=rng.permutation(rows), box=np.zeros((rows, 4)), flip=np.zeros(rows))
             for _ in range(views)]
    vsplit = Split([f"val/c/{i}.JPEG" for i in range(val)], rng.integers(0, classes, val), np.full((val, 2), 8))
    store = create_store(path, meta, train=split, plans=plans, val=vsplit, val_boxes=np.zeros((val, 4)),
                         num_classes=classes)
    enc = get_codec(codec)
    for view, n in [(k, rows) for k in range(views)] + [(None, val)]:
        for shard in range(store.num_shards(n)):
            if (view, shard) in skip_shards:
                continue
            a, b = store.shard_bounds(shard, n)
            store.write_shard(view, shard, enc.encode(rng.normal(0, 3, (b - a, classes)).astype(np.float32)))
    return open_store(path)


def assert_same(got, want):
    for g, w in zip(got, want):
        assert (g is None) == (w is None)
        if g is not None:
            assert g.dtype == w.dtype and np.array_equal(g, w), "direct read differs from zarr's"


@pytest.mark.parametrize("codec", ["int8", "fp16", "fp32", "compact"])
def test_direct_reads_match_zarr(tmp_path, codec):
    store = make_store(tmp_path / "c", codec=codec)
    for view, n in [(0, 50), (1, 50), (None, 13)]:
        reader = RowReader(store, view, 0, n)
        assert reader._direct is not None, "the store's own layout should be read directly"
        for a, b in [(0, n), (3, n - 2), (5, 6), (16, 32), (15, 17), (n - 1, n)]:
            if b > n:
                continue
            assert_same(reader._read(a, b), store.read_rows(view, a, b))


@pytest.mark.parametrize("block_rows,batch,threads", [(None, 5, 2), (None, 16, 1), (7, 3, 2), (4, 64, 3),
                                                      (16, 1, 1), (None, 100, 4), (48, 5, 3)])
def test_batches_cover_the_range_in_order(tmp_path, block_rows, batch, threads):
    store = make_store(tmp_path / "c")
    start, stop = 3, 47
    got = list(RowReader(store, 1, start, stop, block_rows=block_rows, threads=threads).batches(batch))
    firsts = [f for f, _ in got]
    sizes = [len(e.logits) for _, e in got]
    assert firsts == list(range(start, stop, batch)), "batches must start every batch_size rows"
    assert all(s == batch for s in sizes[:-1]) and sum(sizes) == stop - start
    whole = [np.concatenate([e[i] for _, e in got]) for i in range(3)]
    assert_same(whole, store.read_rows(1, start, stop))


def test_a_missing_shard_file_is_an_error_not_zeros(tmp_path):
    """Readers read complete shards, each written whole: a missing file is a lost file (zarr reads it as
    zeros, which trained silently on zero teacher logits)."""
    store = make_store(tmp_path / "c", skip_shards={(0, 1)})
    assert_same(RowReader(store, 0, 0, 16)._read(0, 16), store.read_rows(0, 0, 16))
    with pytest.raises(StoreError, match="views/logits/c/0/1/0 is missing"):
        list(RowReader(store, 0, 0, 50).batches(8))
    # Caches written before whole shards: zarr left out shards of fill values only, which read as such.
    open_store(tmp_path / "c", mode="r+").group.attrs.put(
        {"skd": {k: v for k, v in store.meta.items() if k != "whole_shards"}})
    old = open_store(tmp_path / "c")
    assert_same(RowReader(old, 0, 0, 50)._read(0, 50), old.read_rows(0, 0, 50))
    assert not RowReader(old, 0, 0, 50)._read(16, 32).logits.any(), "an old cache's absent shard is not fill values"


def test_a_shard_that_cannot_be_opened_names_the_file_not_the_images(tmp_path):
    """An OS error on a cache file (here a folder where the shard should be; permissions, EIO and stale
    mounts alike) is the cache's problem, named with the file, not a failed image read."""
    store = make_store(tmp_path / "c")
    shard = tmp_path / "c" / "views" / "logits" / "c" / "0" / "1" / "0"
    shard.unlink()
    shard.mkdir()
    with pytest.raises(StoreError, match="Is a directory.*views/logits/c/0/1/0.*permissions"):
        list(RowReader(store, 0, 0, 50).batches(8))


def test_damaged_shard_index_is_an_error(tmp_path):
    store = make_store(tmp_path / "c")
    shard = tmp_path / "c" / "views" / "logits" / "c" / "0" / "1" / "0"
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="crc32c"):
        list(RowReader(store, 0, 0, 50).batches(8))


@pytest.mark.parametrize("threads", [1, 3])
def test_damaged_chunk_is_an_error(tmp_path, threads):
    """With zstd threads too, a damaged chunk (here the second of the shard) stops the read."""
    store = make_store(tmp_path / "c")
    shard = tmp_path / "c" / "views" / "logits" / "c" / "0" / "0" / "0"
    data = bytearray(shard.read_bytes())
    index = np.frombuffer(bytes(data[-(4 * 16 + 4):-4]), "<u8").reshape(4, 2)
    offset, nbytes = (int(v) for v in index[1])
    data[offset + 6:offset + nbytes - 4] = bytes(nbytes - 10)
    shard.write_bytes(bytes(data))
    with pytest.raises((RuntimeError, ValueError), match="(?i)zstd|damaged"):
        list(RowReader(store, 0, 0, 16, threads=threads).batches(8))


def test_threads_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="threads must be >= 1, got 0"):
        RowReader(make_store(tmp_path / "c"), 0, 0, 50, threads=0)


def test_other_layouts_fall_back_to_zarr(tmp_path, monkeypatch):
    store = make_store(tmp_path / "c")
    monkeypatch.setattr(RowReader._Sharded, "_understood", staticmethod(lambda array, row_axis: False))
    reader = RowReader(store, 0, 0, 50)
    assert reader._direct is None
    got = np.concatenate([e.logits for _, e in reader.batches(7)])
    assert np.array_equal(got, store.read_rows(0, 0, 50).logits)


@pytest.mark.parametrize("writer", ["skd", "zarr's default"])
def test_chunks_of_fill_values_read_as_fill_value(tmp_path, writer):
    """Constant int8 rows encode to levels and scale 0, the fill value: skd stores such chunks (every shard
    file is whole); caches written with zarr's default left them out, and they still read as the fill value."""
    make_store(tmp_path / "c", views=1)
    store = open_store(tmp_path / "c", mode="r+")
    x = np.random.default_rng(3).normal(0, 3, (16, 7)).astype(np.float32)
    x[4:8] = 2.5  # one whole chunk of constant rows
    encoded = get_codec("int8").encode(x)
    if writer == "skd":
        store.write_shard(0, 1, encoded)
    else:
        for name, data in zip(("logits", "scale", "offset"), encoded):
            store.group[f"views/{name}"][0, 16:32] = data
    store = open_store(tmp_path / "c")
    index = (tmp_path / "c" / "views" / "logits" / "c" / "0" / "1" / "0").read_bytes()[-(4 * 16 + 4):-4]
    left_out = np.frombuffer(index, "<u8").reshape(4, 2)[1, 0] == 2**64 - 1
    assert left_out == (writer != "skd"), f"{writer}: the constant chunk was {'left out' if left_out else 'stored'}"
    reader = RowReader(store, 0, 0, 50)
    assert_same(reader._read(0, 50), store.read_rows(0, 0, 50))
    assert np.allclose(store.codec.decode(reader._read(20, 24)), 2.5)


@pytest.mark.parametrize("view,start,stop,needle", [(2, 0, 10, "outside the cache's 2 views"),
                                                    (0, 0, 51, "outside the 50 rows of view 0"),
                                                    (0, 8, 4, "outside"), (None, 0, 14, "13 rows of val")])
def test_ranges_outside_the_cache_are_refused(tmp_path, view, start, stop, needle):
    """Never the fill value for rows that do not exist (zarr itself refuses or clips them)."""
    with pytest.raises(ValueError, match=needle):
        RowReader(make_store(tmp_path / "c"), view, start, stop)
