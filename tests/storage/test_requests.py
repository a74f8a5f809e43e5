"""On a real S3 server (moto, counting every request it serves), a view costs the same requests whether the cache
holds 2 views or 12: a build's requests per view, appending views, `skd-cache info` and a training start."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import zarr
from conftest import small_build_config
from s3server import S3Server

from skd.build.teacher_pass import build_cache
from skd.inspect.info import describe
from skd.storage.location import parse_location
from skd.store.cache_store import open_store
from skd.train.loop import TrainConfig, train

# zarrs rebuilds obstore's store in its own copy of object_store, and warns for every array it opens
pytestmark = pytest.mark.filterwarnings("ignore:Successfully reconstructed a store:RuntimeWarning")


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    with S3Server() as server, pytest.MonkeyPatch.context() as mp:
        for key, value in server.env.items():
            mp.setenv(key, value)
        for key in ("AWS_SESSION_TOKEN", "AWS_PROFILE"):
            mp.delenv(key, raising=False)
        server.create_bucket("counted")
        yield server


def counted(server: S3Server, work) -> Counter:
    """Requests by method that `work()` made, but those on the build's lease (taken, renewed every few seconds
    and released: they follow the clock, not the views), by kind."""
    server.clear()
    work()
    return Counter(KINDS[method] for method, path in server.requests if not path.endswith(".lock"))


# a chunk zarr writes is a PUT, or a delete (a POST) where it holds only the fill value (a view's flips may):
# which of the two depends on the drawn values, not on the number of views
KINDS = {"GET": "GET", "HEAD": "HEAD", "PUT": "write", "POST": "write", "DELETE": "write"}


def views_arrays(url: str) -> dict:
    """Every `views/*` array of the cache at `url`, read with plain zarr."""
    group = zarr.open_group(parse_location(url).zarr_store(read_only=True), mode="r")
    return {name: array[...] for name, array in group["views"].arrays()}


def total(counts: Counter) -> int:
    return sum(counts.values())


def test_requests_per_view_do_not_grow_with_the_views(s3, image_root, teacher_file, tmp_path):
    def build(name: str, views: int):
        url = f"s3://counted/{name}"
        return lambda: build_cache(small_build_config(image_root, url, teacher_file, views=views, val=False))

    builds = {views: counted(s3, build(f"b{views}", views)) for views in (2, 6, 12)}
    first, later = (total(builds[6]) - total(builds[2])) / 4, (total(builds[12]) - total(builds[6])) / 6
    assert first == later, f"requests per view: {first} from 2 to 6 views, {later} from 6 to 12 ({builds})"

    grown = {views: counted(s3, build(f"b{views}", views + 2)) for views in (2, 12)}
    assert grown[2] == grown[12], f"appending 2 views to 2 views took {grown[2]}, to 12 views {grown[12]}"
    assert total(grown[2]) <= total(builds[2]), (
        f"appending 2 views took {total(grown[2])} requests, more than a fresh 2-view build's {total(builds[2])}"
    )

    grown_to = {4: "s3://counted/b2", 14: "s3://counted/b12"}  # the caches grown by 2 views
    fresh, grown_views = views_arrays("s3://counted/b6"), views_arrays(grown_to[4])
    differ = [name for name, values in grown_views.items() if not np.array_equal(values, fresh[name][:4])]
    assert not differ, f"the S3 cache grown from 2 to 4 views differs from a fresh build's first 4 in {differ}"
    infos = {views: counted(s3, lambda url=url: describe(open_store(url))) for views, url in grown_to.items()}
    assert infos[4] == infos[14], f"info on 4 views: {infos[4]}, on 14 views: {infos[14]}"

    def start(views: int):
        config = TrainConfig(
            cache=grown_to[views],
            epochs=1,
            batch_size=4,
            amp="none",
            device="cpu",
            loader="torchvision",
            workers=0,
            steps_per_epoch=1,
            val=False,
            out=tmp_path / f"run{views}",
        )
        return lambda: train(config)

    starts = {views: counted(s3, start(views)) for views in (4, 14)}
    assert starts[4] == starts[14], f"one training step on 4 views: {starts[4]}, on 14 views: {starts[14]}"
    print(f"requests: builds {dict(builds)}; +2 views {dict(grown)}; info {dict(infos)}; training {dict(starts)}")
