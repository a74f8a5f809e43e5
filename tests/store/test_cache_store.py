"""An open cache (skd/store/cache_store.py): whole shards written through it read back, fill values included; a
shard file lost from a finished cache is named by info and by the reader, and a rerun of the build rewrites it."""

import numpy as np
import pytest
from conftest import small_build_config
from handmade import assert_same, make_store, write_shard

from skd.build.teacher_pass import build_cache
from skd.store.cache_store import StoreError, open_store
from skd.store.codecs import get_codec
from skd.store.reader import RowReader


@pytest.mark.parametrize("writer", ["skd", "zarr's default"])
def test_chunks_of_fill_values_read_as_fill_value(tmp_path, writer):
    """Constant int8 rows encode to levels and scale 0, the fill value: skd stores such chunks (every shard
    file is whole); zarr's default leaves them out, and they read as the fill value either way."""
    make_store(tmp_path / "c", views=1)
    store = open_store(tmp_path / "c", mode="r+")
    x = np.random.default_rng(3).normal(0, 3, (16, 7)).astype(np.float32)
    x[4:8] = 2.5  # one whole chunk of constant rows
    encoded = get_codec("int8").encode(x)
    if writer == "skd":
        write_shard(store, 0, 1, encoded)
    else:
        for name, data in zip(("logits", "scale", "offset"), encoded):
            store.group[f"views/{name}"][0, 16:32] = data  # an integer index: zarr's own pipeline writes
    store = open_store(tmp_path / "c")
    index = (tmp_path / "c" / "views" / "logits" / "c" / "0" / "1" / "0").read_bytes()[-(4 * 16 + 4) : -4]
    offsets = np.frombuffer(index, "<u8").reshape(4, 2)[:, 0]
    stored = [int(o != 2**64 - 1) for o in offsets]
    want = [1, 1, 1, 1] if writer == "skd" else [1, 0, 1, 1]
    assert stored == want, f"{writer}: chunks stored {stored}, expected {want} (chunk 1 is constant)"
    reader = RowReader(store, 0, 0, 50)
    assert_same(reader._read(0, 50), store.read_rows(0, 0, 50))
    decoded = store.codec.decode(reader._read(20, 24))
    assert np.allclose(decoded, 2.5), f"{writer}: the constant rows read as {np.unique(decoded)}, not 2.5"


def test_a_shard_of_fill_values_is_written_and_reads_back(tmp_path):
    """A whole shard of the fill value (all-zero levels, scale and offset) keeps its files."""
    make_store(tmp_path / "c", views=1)
    store = open_store(tmp_path / "c", mode="r+")
    zeros = get_codec("int8").encode(np.zeros((16, 7), np.float32))
    nonzero = sum(int(a.astype(bool).sum()) for a in zeros if a is not None)
    assert nonzero == 0, f"int8 of zero rows holds {nonzero} values other than the fill value"
    write_shard(store, 0, 1, zeros)
    got = RowReader(open_store(tmp_path / "c"), 0, 16, 32)._read(16, 32)
    assert not got.logits.any(), f"{int(got.logits.astype(bool).sum())} non-zero levels"


def test_a_lost_shard_is_named_by_info_and_rebuilt_by_a_rerun(image_root, teacher_file, tmp_path):
    """A shard file deleted from a finished cache (a half-done copy, a lost object): info names it, reading it
    names the rerun, and rerunning the same build rewrites just that shard, equal to what it was."""
    from skd.inspect.info import describe, info_lines
    from skd.store.reader import RowReader

    out = tmp_path / "cache"
    build_cache(small_build_config(image_root, out, teacher_file))
    want = open_store(out).read_logits(1)
    lost = out / "views" / "logits" / "c" / "1" / "1" / "0"
    lost.unlink()
    store = open_store(out)
    info = describe(store)
    assert info["lost_shards"] == {"1": [1]}, f"lost shards: {info['lost_shards']}"
    assert any(line.startswith("lost      view 1: shards 1") for line in info_lines(info)), info_lines(info)
    with pytest.raises(StoreError, match="views/logits/c/1/1/0 is missing.*rerun the cache's `skd-cache build`"):
        list(RowReader(store, 1, 0, store.num_samples).batches(8))
    summary = build_cache(small_build_config(image_root, out, teacher_file))
    assert summary.rows_written == 8, f"the rerun wrote {summary.rows_written} rows, expected the lost shard's 8"
    got = open_store(out).read_logits(1)
    assert np.array_equal(got, want), f"the rebuilt view differs by up to {np.abs(got - want).max()}"
    assert describe(open_store(out))["lost_shards"] == {}, "the rebuilt shard is still reported lost"
