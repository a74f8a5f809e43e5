"""parse_location: what a cache argument names, and the URLs refused before anything is written."""

from pathlib import Path

import pytest

from skd.storage.location import LocalFolder, parse_location
from skd.storage.objectstore import ObjectPrefix, StoreError


@pytest.mark.parametrize(
    "url",
    ["s3://b/hash#x/c1", "s3://b/c#", "gs://b/line\nbreak/c", "az://b/tab\there", "s3://b/bell\x07"],
)
def test_urls_whose_characters_do_not_survive_as_keys_are_refused(url):
    """`s3://b/hash#x/c1` would be written under `hash/` while messages name the whole URL, and a second
    `hash#y` would collide with it: such URLs are refused in one line, naming the part before the character."""
    with pytest.raises(StoreError, match="do not survive as object keys") as refused:
        parse_location(url)
    message = str(refused.value)
    assert "\n" not in message and "\t" not in message, f"a control character reached the message: {message!r}"


def test_plain_paths_and_urls_parse_to_their_home():
    local = parse_location("cache/r#1")
    assert local == LocalFolder(Path("cache/r#1")), f"a '#' in a local path is part of its name: {local}"
    remote = parse_location("s3://bucket/caches/r152/")
    assert isinstance(remote, ObjectPrefix) and (remote.bucket, remote.prefix) == ("bucket", "caches/r152"), remote
    assert str(remote) == "s3://bucket/caches/r152", str(remote)


def test_an_oversized_zarr_json_in_a_folder_is_refused_before_zarr_reads_it(tmp_path):
    """zarr reads metadata whole: a folder's zarr.json over 1 MiB is refused as an object store's is, the
    group's own included (it is the first file zarr opens)."""
    from skd.errors import CacheError
    from skd.storage.files import MAX_METADATA_BYTES

    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "zarr.json").write_bytes(b" " * (MAX_METADATA_BYTES + 1))
    with pytest.raises(CacheError, match=f"zarr.json has {MAX_METADATA_BYTES + 1} bytes, more than"):
        LocalFolder(tmp_path / "c").inspect()
