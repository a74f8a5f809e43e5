"""Caches on object storage: a real S3 server (moto, in a child process on 127.0.0.1) holds caches written and
read through zarr's ObjectStore over obstore, with the zarrs pipeline; they read back byte for byte like local
ones, lost objects are named, the build lease is exclusive and expires, and bad URLs are one-line errors."""

import itertools
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import build_args
from handmade import assert_same, make_store, write_shard
from s3server import DUMMY_KEY, DUMMY_SECRET, S3Server

from skd.errors import BusyError, CacheError
from skd.inspect.info import describe, info_lines
from skd.storage.location import LocalFolder, parse_location
from skd.storage.locks import FolderLock, Lease
from skd.storage.objectstore import ObjectPrefix, check_objects
from skd.storage.zarr_internals import codec_pipeline
from skd.store.cache_store import VAL, StoreError, cache_state, open_store
from skd.store.codecs import get_codec
from skd.store.reader import RowReader

# zarrs rebuilds obstore's store in its own copy of object_store, and warns for every array it opens
pytestmark = pytest.mark.filterwarnings("ignore:Successfully reconstructed a store:RuntimeWarning")
BUCKETS = (f"skd-test-{i}" for i in itertools.count())


@pytest.fixture(scope="module")
def server():
    with S3Server() as s3:
        yield s3


@pytest.fixture
def bucket(server, monkeypatch) -> str:
    """A new, empty bucket on the server, with AWS_* pointing obstore at it."""
    for key, value in server.env.items():
        monkeypatch.setenv(key, value)
    for key in ("AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(key, raising=False)
    name = next(BUCKETS)
    server.create_bucket(name)
    return name


@pytest.fixture(scope="module")
def pair(server, tmp_path_factory):
    """(local store, s3 store): the same cache made twice, locally and in a bucket of the module's server."""
    with pytest.MonkeyPatch.context() as mp:
        for key, value in server.env.items():
            mp.setenv(key, value)
        server.create_bucket("skd-pair")
        local = make_store(tmp_path_factory.mktemp("pair") / "c")
        remote = make_store("s3://skd-pair/caches/c")
        yield local, remote


def one_line(exc) -> str:
    text = str(exc.value)
    assert "\n" not in text, f"a multi-line error: {text!r}"
    assert DUMMY_SECRET not in text and DUMMY_KEY not in text, f"a credential in {text!r}"
    return text


def test_a_cache_on_s3_reads_back_like_the_local_one(server, pair, monkeypatch):
    for key, value in server.env.items():
        monkeypatch.setenv(key, value)
    local, remote = pair
    assert str(remote.path) == "s3://skd-pair/caches/c", f"shown as {remote.path}"
    objects = server.client().list_objects_v2(Bucket="skd-pair", Prefix="caches/c/")["Contents"]
    files = {str(f.relative_to(local.path)) for f in local.path.rglob("*") if f.is_file()}
    keys = {o["Key"][len("caches/c/") :] for o in objects}
    assert keys == files, f"objects differ from files: {sorted(keys ^ files)[:5]}"
    different = [
        k
        for k in sorted(keys)
        if server.client().get_object(Bucket="skd-pair", Key=f"caches/c/{k}")["Body"].read()
        != (local.path / k).read_bytes()
    ]
    assert not different, f"objects whose bytes differ from the local files: {different[:5]}"
    for view, n in [(0, 50), (1, 50), (VAL, 13)]:
        reader = RowReader(remote, view, 0, n)
        want = {name: "ZarrsCodecPipeline" for name in ("logits", "scale", "offset")}
        assert reader.pipelines == want, f"pipelines of {view}: {reader.pipelines}"
        for start, stop, block, batch in [(0, n, None, 7), (3, n - 2, 5, 4), (n - 3, n - 2, None, 1)]:
            got = list(RowReader(remote, view, start, stop, block_rows=block).batches(batch))
            expected = list(RowReader(local, view, start, stop, block_rows=block).batches(batch))
            assert [f for f, _ in got] == [f for f, _ in expected], f"batch starts differ, view {view}"
            for (_, g), (_, e) in zip(got, expected):
                assert_same(g, e)
    pipeline = codec_pipeline(remote.array("views/logits"))
    assert pipeline == "ZarrsCodecPipeline", f"the S3 cache's logits are read by {pipeline}"
    assert remote.storage() == local.storage() and remote.bytes_on_disk() == local.bytes_on_disk(), (
        f"storage {remote.storage()} vs {local.storage()}, bytes {remote.bytes_on_disk()} vs {local.bytes_on_disk()}"
    )


@pytest.mark.parametrize("parallel", [1, 3])
def test_read_ahead_keeps_order_and_stops_early(server, pair, monkeypatch, parallel):
    for key, value in server.env.items():
        monkeypatch.setenv(key, value)
    local, remote = pair
    got = list(RowReader(remote, 1, 2, 49, block_rows=4, parallel=parallel, prefetch=1).batches(5))
    want = list(RowReader(local, 1, 2, 49, block_rows=4).batches(5))
    starts, want_starts = [f for f, _ in got], [f for f, _ in want]
    assert starts == want_starts, f"read ahead ({parallel} at once): batches start at {starts}, not {want_starts}"
    for (_, g), (_, w) in zip(got, want):
        assert_same(g, w)
    blocks = RowReader(remote, 0, 0, 50, block_rows=4, parallel=parallel).blocks()
    first, _ = next(blocks)
    blocks.close()  # a consumer that stops early: the pool winds down
    assert first == 0, f"the first block starts at row {first}, not 0"


def test_a_shard_is_one_put_and_no_read(server, bucket):
    """A shard's objects are written in one PUT each (encoded in memory), with no GET of the old ones first."""
    store = make_store(f"s3://{bucket}/c", views=1)
    store = open_store(f"s3://{bucket}/c", mode="r+")
    encoded = get_codec("int8").encode(np.random.default_rng(1).normal(0, 3, (16, 7)).astype(np.float32))
    server.clear()
    write_shard(store, 0, 1, encoded)
    shard_requests = [r for r in server.requests if "/c/0/1" in r[1]]
    want = [
        ("PUT", f"/{bucket}/c/views/{name}/c/0/1{'/0' if name == 'logits' else ''}")
        for name in ("logits", "scale", "offset")
    ] + [("PUT", f"/{bucket}/c/views/complete/c/0/1")]
    assert sorted(shard_requests) == sorted(want), f"requests on the shard: {shard_requests}"
    assert_same(RowReader(open_store(f"s3://{bucket}/c"), 0, 16, 32)._read(16, 32), encoded)


def test_a_deleted_shard_object_is_named(server, bucket):
    make_store(f"s3://{bucket}/c")
    server.client().delete_object(Bucket=bucket, Key="c/views/logits/c/0/1/0")
    store = open_store(f"s3://{bucket}/c")
    missing = store.missing_shard_files(0, 1)
    assert missing == ["views/logits/c/0/1/0"], f"missing: {missing}"
    assert store.location.name(missing[0]) == f"s3://{bucket}/c/views/logits/c/0/1/0", store.location.name(missing[0])
    assert store.missing_shard_files(0, 2) == [], f"shard 2 of view 0 misses {store.missing_shard_files(0, 2)}"
    with pytest.raises(StoreError, match=f"rows 16-32 of view 0 .*s3://{bucket}/c/views/logits/c/0/1/0 is missing"):
        RowReader(store, 0, 0, 50)
    one_line(pytest.raises(StoreError, RowReader, store, 0, 20, 21))
    assert_same(RowReader(store, 0, 32, 50)._read(32, 50), store.read_rows(0, 32, 50))


def test_info_shows_the_url_and_no_secret(server, pair, monkeypatch):
    for key, value in server.env.items():
        monkeypatch.setenv(key, value)
    local, remote = pair
    info = describe(open_store("s3://skd-pair/caches/c"))
    text = "\n".join(info_lines(info))
    assert info["path"] == "s3://skd-pair/caches/c" and "cache s3://skd-pair/caches/c (complete)" in text, text[:200]
    assert "zarrs codec pipeline" in text, text
    assert DUMMY_SECRET not in text + repr(info) and DUMMY_KEY not in text + repr(info), "a credential is shown"
    assert info["bytes_on_disk"] == local.bytes_on_disk() and info["logit_bytes"] == local.logit_bytes(), (
        f"S3: {info['bytes_on_disk']} bytes, {info['logit_bytes']} of logits; "
        f"local: {local.bytes_on_disk()}, {local.logit_bytes()}"
    )


def test_urls_made_into_paths_and_file_urls_open(server, pair, monkeypatch):
    """pathlib turns s3://b/p into s3:/b/p: such a Path still names the URL; file:///PATH names the folder."""
    for key, value in server.env.items():
        monkeypatch.setenv(key, value)
    local, _ = pair
    named = str(open_store(Path("s3://skd-pair/caches/c")).path)
    assert named == "s3://skd-pair/caches/c", f"Path('s3://skd-pair/caches/c') opens {named}"
    opened = open_store(f"file://{local.path.resolve()}").path
    assert opened == local.path.resolve(), f"file://{local.path.resolve()} opens {opened}"
    states = cache_state("s3://skd-pair/caches/c"), cache_state("s3://skd-pair/nothing")
    assert states == ("cache", None), f"cache states of the cache and of an empty prefix: {states}"


def test_create_refuses_a_prefix_that_holds_objects_and_overwrite_clears_it(server, bucket):
    server.client().put_object(Bucket=bucket, Key="c/notes.txt", Body=b"mine")
    location = parse_location(f"s3://{bucket}/c")
    assert not location.is_empty() and cache_state(location) is None, (
        f"a prefix holding notes.txt: empty {location.is_empty()}, cache state {cache_state(location)}"
    )
    with pytest.raises(FileExistsError):
        make_store(location)
    location.remove_all()
    assert location.is_empty(), f"remove_all left {sorted(location.listing())}"
    make_store(location, views=1)
    assert cache_state(location) == "cache", f"the new cache's state: {cache_state(location)}"
    leases = server.client().list_objects_v2(Bucket=bucket, Prefix="c.lock").get("KeyCount")
    assert leases == 0, f"{leases} lease objects left beside the cache"


def test_the_lease_is_exclusive_renewed_and_taken_over_after_expiry(server, bucket):
    url = f"s3://{bucket}/c"
    first = parse_location(url).lock(ttl=1.5)
    assert isinstance(first, Lease), type(first)
    with pytest.raises(BusyError, match=f"{url} is being built by pid \\d+ on .*wait for it") as refused:
        parse_location(url).lock(ttl=1.5)
    one_line(refused)
    time.sleep(3.2)  # two ttls: renewed meanwhile, so still held
    with pytest.raises(BusyError, match="is being built by"):
        parse_location(url).lock(ttl=1.5)
    first._stop.set()  # the holder stalls: no more renewals
    first.thread.join()
    time.sleep(1.7)
    second = parse_location(url).lock(ttl=1.5)  # expired: taken over
    assert not first.renew() and first.lost is not None, f"the stalled holder renewed, or lost {first.lost}"
    with pytest.raises(BusyError, match="lost its lease"):
        first.check()
    first.release()  # not ours any more: left alone
    with pytest.raises(BusyError, match="is being built by"):
        parse_location(url).lock(ttl=1.5)
    second.release()
    third = parse_location(url).lock(ttl=1.5)  # released: free at once
    third.release()
    keys = server.client().list_objects_v2(Bucket=bucket).get("KeyCount")
    assert keys == 0, f"{keys} objects left after release"


def test_a_lease_of_a_dead_process_on_this_host_is_taken_at_once(server, bucket):
    """As flock after kill -9: a rerun on the same host need not wait for the lease to expire."""
    import json
    import socket

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    body = {
        "owner": f"pid {pid} on {socket.gethostname()}",
        "host": socket.gethostname(),
        "pid": pid,
        "token": "x",
        "ttl": 3600,
        "expires": time.time() + 3600,
    }
    server.client().put_object(Bucket=bucket, Key="c.lock", Body=json.dumps(body).encode())
    parse_location(f"s3://{bucket}/c").lock(ttl=60).release()
    body["host"] = "another-host"
    server.client().put_object(Bucket=bucket, Key="c.lock", Body=json.dumps(body).encode())
    with pytest.raises(BusyError, match=f"being built by pid {pid} on"):
        parse_location(f"s3://{bucket}/c").lock(ttl=60)


def test_each_location_locks_its_own_way(tmp_path, bucket):
    """A folder gets a file lock beside it, removed on release; an object-store prefix a lease beside it."""
    lock = parse_location(tmp_path / "c").lock()
    assert isinstance(lock, FolderLock) and (tmp_path / "c.lock").exists(), type(lock)
    lock.release()
    assert not (tmp_path / "c.lock").exists(), "the lock file stayed after release"
    lease = parse_location(f"s3://{bucket}/c").lock(ttl=30)
    assert isinstance(lease, Lease), type(lease)
    lease.release()


@pytest.mark.parametrize(
    "url,needle",
    [
        ("ftp://host/c", "unknown scheme ftp://"),
        ("s3:///c", "names no bucket"),
        ("s3://skd-no-such-bucket/c", "bucket skd-no-such-bucket does not exist"),
        ("s3://BUCKET/c/../d", "'..' part"),
        (f"s3://{DUMMY_KEY}:{DUMMY_SECRET}@b/c", "user info"),
        ("s3://skd-bad/empty", "does not exist \\(no object under it\\)"),
        ("s3://skd-bad/text", "is not a zarr v3 cache"),
        ("s3://skd-bad/group", "is not an skd cache"),
    ],
)
def test_bad_urls_are_one_line_errors(server, bucket, url, needle):
    import zarr

    if "skd-bad" in url:
        server.create_bucket("skd-bad") if "skd-bad" not in {
            b["Name"] for b in server.client().list_buckets()["Buckets"]
        } else None
        server.client().put_object(Bucket="skd-bad", Key="text/readme.txt", Body=b"not a cache")
        zarr.open_group(parse_location("s3://skd-bad/group").zarr_store(read_only=False), mode="a", zarr_format=3)
    with pytest.raises(StoreError, match=needle) as exc:
        open_store(url)
    one_line(exc)


def test_wrong_credentials_are_one_line_errors(server, bucket, monkeypatch):
    """moto accepts any key until its signature checks are on: then a wrong secret is refused."""
    make_store(f"s3://{bucket}/c", views=1)
    key, secret = server.check_credentials(True)
    try:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
        views = open_store(f"s3://{bucket}/c").num_views  # the right key works
        assert views == 1, f"the cache opened with the right key has {views} views, not 1"
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", DUMMY_SECRET)
        with pytest.raises(StoreError, match=f"s3://{bucket}/c: access denied .*check the credentials") as exc:
            open_store(f"s3://{bucket}/c")
        assert secret not in str(exc.value) and key not in str(exc.value), "the error shows the credentials"
        one_line(exc)
    finally:
        server.check_credentials(False)


def test_an_unreachable_endpoint_is_a_one_line_error(bucket, monkeypatch):
    from s3server import free_port

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    with pytest.raises(StoreError, match="cannot be reached .*AWS_ENDPOINT_URL") as exc:
        parse_location("s3://b0/c").listing()
    one_line(exc)


def test_object_listings_are_checked_like_folders():
    """check_objects: keys stay inside the prefix, and no key is both an object and a folder of others."""
    where = parse_location("s3://b/c")
    check_objects(where, {"zarr.json": 5, "views/zarr.json": 3})
    for listing, needle in [
        ({"views/../x": 1}, "leaves the prefix"),
        ({"a//b": 1}, "leaves the prefix"),
        ({"views": 1, "views/zarr.json": 2}, "views is an object and a folder"),
        ({"views/zarr.json": 2**21}, "more than zarr metadata"),
    ]:
        with pytest.raises(CacheError, match=needle):
            check_objects(where, listing)


def test_locations_name_their_keys():
    """Messages name a cache's file or object in full: the path in a folder, the URL in an object store."""
    remote, local = parse_location("s3://b/c"), parse_location("/data/c")
    assert isinstance(remote, ObjectPrefix) and isinstance(local, LocalFolder), (remote, local)
    key = "views/logits/c/0/1/0"
    assert remote.name(key) == "s3://b/c/views/logits/c/0/1/0" and str(remote) == "s3://b/c", remote.name(key)
    assert local.name(key) == "/data/c/views/logits/c/0/1/0" and str(local) == "/data/c", local.name(key)


def test_create_store_on_a_url_records_the_url_nowhere(server, bucket):
    """The cache's attributes hold no store URL, endpoint or key: a cache can be copied between stores."""
    store = make_store(f"s3://{bucket}/c", views=1)
    text = repr(dict(store.group.attrs))
    for secret in (DUMMY_KEY, DUMMY_SECRET, server.endpoint, bucket):
        assert secret not in text, f"{secret} in the attributes"


@pytest.mark.parametrize("key", ["c/views/../evil", "c/views//x", "c/views/x\\y"])
def test_a_key_that_leaves_the_prefix_is_refused(server, bucket, key):
    """Keys are untrusted as paths are: an object whose key has a '..', '.' or empty part, or a backslash."""
    make_store(f"s3://{bucket}/c", views=1)
    server.client().put_object(Bucket=bucket, Key=key, Body=b"x")
    with pytest.raises((StoreError, CacheError), match="leave.* the prefix") as exc:
        open_store(f"s3://{bucket}/c")
    one_line(exc)


def test_a_damaged_shard_object_is_an_error_naming_it(server, bucket):
    make_store(f"s3://{bucket}/c", views=1)
    key = "c/views/logits/c/0/1/0"
    data = bytearray(server.client().get_object(Bucket=bucket, Key=key)["Body"].read())
    data[-10] ^= 0xFF  # the shard index's checksum
    server.client().put_object(Bucket=bucket, Key=key, Body=bytes(data))
    store = open_store(f"s3://{bucket}/c")
    with pytest.raises(StoreError, match=f"rows 16-32 of view 0 .*s3://{bucket}/{key}: .*damaged") as exc:
        list(RowReader(store, 0, 0, 50).batches(8))
    one_line(exc)


def test_a_cache_on_s3_resumes_and_is_marked_complete(server, bucket):
    """Open r+ (a build's resume): shards written then, and the attributes updated, as on a local cache."""
    make_store(f"s3://{bucket}/c", views=1, skip_shards={(0, 2)})
    store = open_store(f"s3://{bucket}/c", mode="r+")
    done = store.complete()[0].tolist()
    assert not store.is_complete() and done == [True, True, False, True], f"shards complete: {done}"
    write_shard(store, 0, 2, get_codec("int8").encode(np.ones((16, 7), np.float32)))
    store.group.attrs["skd"] = {**store.meta, "complete": True}
    again = open_store(f"s3://{bucket}/c")
    assert again.is_complete() and again.meta["complete"], "the shard or the attribute did not reach the store"
    rows = again.read_logits(0, 32, 48)
    assert np.allclose(rows, 1.0, atol=0.05), f"the written shard reads {rows.min():.3f}-{rows.max():.3f}, not 1"
    info = "\n".join(info_lines(describe(again)))
    assert "stored    " in info and "on disk" not in info, info


def test_credentials_in_the_environment_are_masked_in_messages(monkeypatch):
    from skd.storage.objectstore import scrub

    monkeypatch.setenv("AWS_SESSION_TOKEN", "FwoGZXIvYXdzEXAMPLETOKEN")
    masked = scrub("denied for FwoGZXIvYXdzEXAMPLETOKEN at s3://b/c")
    assert masked == "denied for *** at s3://b/c", f"the session token is not masked: {masked!r}"


# ---------------------------------------------------------------------------------------------
# The product end to end on s3://: build, kill -9 and resume, train, the commands


def zarr_arrays(where) -> dict:
    import zarr

    group = zarr.open_group(parse_location(where).zarr_store(read_only=True), mode="r")
    return {
        f"{prefix}/{name}": array[...]
        for prefix in ("samples", "views", "val")
        if prefix in group
        for name, array in group[prefix].arrays()
    }


def test_build_kill_resume_and_train_on_s3_equal_the_local_cache(
    bucket, server, fp32_cache, image_root, teacher_file, tmp_path
):
    import os

    from conftest import small_build_config

    from skd.build.teacher_pass import build_cache
    from skd.train.loop import TrainConfig, train

    url = f"s3://{bucket}/caches/r18"
    args = build_args(weights=teacher_file, data=image_root, out=url)
    env = {**os.environ, **server.env, "SKD_FAULT": "after-shard:2"}
    killed = subprocess.run(
        [sys.executable, "-c", "from skd.cli.main import main_cache; main_cache()", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
    )
    assert killed.returncode == -9, f"the build was not killed ({killed.returncode}): {killed.stderr[-500:]}"
    build_cache(small_build_config(image_root, url, teacher_file))  # the rerun takes the dead build's lease
    local, remote = zarr_arrays(fp32_cache), zarr_arrays(url)
    differ = [name for name in local if not np.array_equal(local[name], remote[name])]
    assert set(local) == set(remote) and not differ, f"s3 cache differs from the local build in {differ}"
    runs = {}
    for name, cache in (("local", fp32_cache), ("s3", url)):
        losses = []
        train(
            TrainConfig(
                cache=cache,
                epochs=1,
                batch_size=4,
                amp="none",
                device="cpu",
                loader="torchvision",
                workers=0,
                steps_per_epoch=3,
                val=False,
                out=tmp_path / name,
            ),
            on_step=lambda epoch, step, parts: losses.append(parts.loss.item()),
        )
        runs[name] = losses
    assert runs["local"] == runs["s3"] and len(runs["s3"]) == 3, f"losses local {runs['local']} vs s3 {runs['s3']}"


def test_stats_and_verify_work_on_a_url_and_print_no_secret(
    bucket, server, image_root, teacher_file, in_process, capsys
):
    from conftest import small_build_config

    from skd.build.teacher_pass import build_cache

    url = f"s3://{bucket}/caches/v"
    build_cache(small_build_config(image_root, url, teacher_file, views=1))
    for args in (("stats", url), ("verify", url, "--data", image_root, "--weights", teacher_file, "--samples", 8)):
        code, err = in_process("cache", *args)
        out = capsys.readouterr().out
        assert code == 0, f"skd-cache {args[0]} on {url}: exit {code}: {err[-500:]}"
        assert DUMMY_SECRET not in err + out and DUMMY_KEY not in err + out, f"{args[0]} printed a credential"


def test_an_endpoint_that_never_answers_is_one_line_within_the_timeout(server, bucket, monkeypatch):
    """An endpoint that accepts connections and does not answer was silent for 184 s (object_store's retries):
    no retry starts after SKD_STORE_TIMEOUT seconds, so the open ends after one request's timeout (object_store's
    default 30 s; 5 s here, through AWS_TIMEOUT): the server sees that one request, never a retry."""
    make_store(f"s3://{bucket}/c", views=1)
    monkeypatch.setenv("SKD_STORE_TIMEOUT", "1")
    monkeypatch.setenv("AWS_TIMEOUT", "5s")
    server.clear()
    server.set_delay(30)
    try:
        with pytest.raises(StoreError, match="cannot be reached") as exc:
            open_store(f"s3://{bucket}/c")
    finally:
        server.set_delay(0)
    one_line(exc)
    sent = server.requests
    assert len(sent) == 1, (
        f"the open sent {len(sent)} requests to the unanswering store with SKD_STORE_TIMEOUT=1: {sent}"
    )


def s3_build(url: str, teacher_file, image_root, **options) -> list[str]:
    """The `skd-cache build` command line of the small fp32 cache these tests build into `url`."""
    args = build_args(weights=teacher_file, data=image_root, out=url, batch_size=4, shard_size=4, **options)
    return [sys.executable, "-c", "from skd.cli.main import main_cache; main_cache()", *args]


def wait_for_request(server: S3Server, process: subprocess.Popen, method: str, fragment: str, what: str) -> None:
    """Wait (up to 120 s) until `process` has sent the server a `method` request whose path holds `fragment`."""
    deadline = time.monotonic() + 120

    def seen() -> bool:
        return any(m == method and fragment in path for m, path in server.requests)

    while not seen() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    ended = process.poll()
    assert seen(), f"no {method} request for {fragment} before {what}: the process " + (
        f"ended (exit {ended})" if ended is not None else "still runs, the wait of 120 s is over"
    )


def test_a_store_that_goes_away_mid_build_is_one_line(image_root, teacher_file, tmp_path):
    """The S3 server stops while a build writes view 1 (its own server: the others' stay up): the build ends
    with one `error:` line naming the remedy and exit 2, not an obstore traceback."""
    import os

    with S3Server() as own:
        own.create_bucket("gone")
        env = {**os.environ, **own.env, "SKD_STORE_TIMEOUT": "2"}
        command = s3_build("s3://gone/c", teacher_file, image_root, views=4)
        build = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        wait_for_request(own, build, "PUT", "/logits/c/1/", "writing view 1")
    _, err = build.communicate(timeout=240)
    lines = [line for line in err.splitlines() if line.strip() and "\r" not in line]
    assert build.returncode == 2 and "Traceback" not in err, f"exit {build.returncode}: {err[-1500:]}"
    assert lines[-1].startswith("error: ") and "rerun the same command" in lines[-1], lines[-1]


def test_a_build_resumes_once_a_store_that_stopped_answering_answers_again(image_root, teacher_file, tmp_path):
    """The S3 server stops answering while a build writes view 1 (its requests hang): the build ends with one line
    naming the rerun; when the server answers again, the same command finishes the cache, and its rows are those
    of the same build in a folder."""
    import os

    from conftest import small_build_config

    from skd.build.teacher_pass import build_cache

    command = s3_build("s3://paused/c", teacher_file, image_root, views=3, no_val=True)
    with S3Server() as own:
        own.create_bucket("paused")
        # a request's own timeout (object_store's client option, read from AWS_TIMEOUT) of 5 s, not its default 30
        env = {**os.environ, **own.env, "SKD_STORE_TIMEOUT": "1", "AWS_TIMEOUT": "5s"}
        build = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
        wait_for_request(own, build, "PUT", "/logits/c/1/", "writing view 1")
        own.set_delay(45)  # beyond a request's own timeout: every request from now on hangs
        _, err = build.communicate(timeout=240)
        own.set_delay(0)
        last = [line for line in err.splitlines() if line.strip() and "\r" not in line][-1]
        assert build.returncode == 2 and "rerun the same command" in last, f"exit {build.returncode}: {err[-800:]}"
        rerun = subprocess.run(command, capture_output=True, text=True, env=env)
        assert rerun.returncode == 0, f"the rerun after the outage: {rerun.stderr[-800:]}"
        for key, value in own.env.items():
            os.environ[key] = value
        try:
            remote = open_store("s3://paused/c")
            rows = [remote.read_logits(view) for view in range(3)]
            complete = remote.is_complete()
        finally:
            for key in own.env:
                os.environ.pop(key, None)
    build_cache(small_build_config(image_root, tmp_path / "c", teacher_file, views=3, shard_rows=4, val=False))
    local = open_store(tmp_path / "c")
    assert complete, "the resumed build left the cache unfinished"
    gap = max(float(np.abs(rows[v] - local.read_logits(v)).max()) for v in range(3))
    assert gap == 0.0, f"the build resumed after the outage differs from a folder build by {gap:.3g}"


def test_a_store_that_goes_away_mid_training_is_one_line(image_root, teacher_file, tmp_path, monkeypatch):
    """The S3 server holding the cache stops after training has read its first logits: the run ends with one
    `error:` line and exit 2, its run folder intact for --resume."""
    import os

    from conftest import small_build_config

    from skd.build.teacher_pass import build_cache

    with S3Server() as own:
        for key, value in own.env.items():
            monkeypatch.setenv(key, value)
        own.create_bucket("gone")
        build_cache(small_build_config(image_root, "s3://gone/c", teacher_file, views=4, val=False))
        own.clear()
        args = ["--cache", "s3://gone/c", "--epochs", 4, "--batch-size", 4, "--steps-per-epoch", 2, "--no-val"]
        args += ["--loader", "torchvision", "--workers", 0, "--device", "cpu", "--out", tmp_path / "run"]
        run = subprocess.Popen(
            [sys.executable, "-c", "from skd.cli.main import main_train; main_train()", *map(str, args)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **own.env, "SKD_STORE_TIMEOUT": "2"},
        )
        wait_for_request(own, run, "GET", "/logits/c/0/", "reading view 0")
    _, err = run.communicate(timeout=240)
    lines = [line for line in err.splitlines() if line.strip() and "\r" not in line]
    assert run.returncode == 2 and "Traceback" not in err, f"exit {run.returncode}: {err[-1500:]}"
    assert lines[-1].startswith("error: ") and "with --resume to continue" in lines[-1], lines[-1]
