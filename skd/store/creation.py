"""Laying out a new cache: the samples, the plan of every view and empty, sharded logit arrays.

The group starts with only the `skd_creating` attribute and gets `skd` last, so an interrupted
creation is recognisable as ours (`store.cache_state`). A cache grows by views (`grow_store`): its
arrays keep their names and get longer along the view axis. Array names and chunking are the
contract in cache/README.md.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import zarr
import zarr.codecs

from skd.data.index import Split
from skd.errors import fault
from skd.plan.crops import PlanId, ViewPlan
from skd.storage.location import Location, parse_location
from skd.store.cache_store import ATTR_KEY, CREATING_KEY, Store
from skd.store.codecs import Codec, get_codec
from skd.store.schema import augment_arrays, check_meta, expected_arrays, samples_sha256


def _zstd():
    """zstd with a content checksum per chunk: a flipped byte anywhere fails to decode, never
    decodes silently to another value (the shard index has its own crc32c)."""
    return zarr.codecs.ZstdCodec(level=3, checksum=True)


def _create(
    group: zarr.Group,
    name: str,
    data=None,
    *,
    shape=None,
    dtype=None,
    chunks,
    shards=None,
    compress=True,
    fill=0,
) -> zarr.Array:
    text = data is not None and data.dtype.kind in "UTO"
    if data is not None:
        shape, dtype = data.shape, (str if text else data.dtype)
    arr = group.create_array(
        name,
        shape=shape,
        dtype=dtype,
        chunks=chunks,
        shards=shards,
        compressors=_zstd() if compress else None,
        fill_value=None if text else fill,
        overwrite=True,
    )
    if data is not None:
        arr[...] = data
    return arr


def _write_split(group: zarr.Group, name: str, split: Split, chunk: int) -> None:
    n = len(split.paths)
    c = max(1, min(chunk * 64, n))
    _create(group, f"{name}/path", np.array(split.paths, dtype=object), chunks=(c,))
    _create(group, f"{name}/label", np.asarray(split.labels, np.int32), chunks=(c,))
    _create(group, f"{name}/size", np.asarray(split.sizes, np.int32), chunks=(c, 2))
    if split.tails is not None:
        _create(group, f"{name}/tail", np.asarray(split.tails, np.uint64), chunks=(c,))


def create_logit_arrays(
    group: zarr.Group,
    prefix: str,
    lead: tuple,
    rows: int,
    classes: int,
    codec: Codec,
    shard_rows: int,
    chunk_rows: int,
) -> None:
    """Create the codec's arrays (logits, + scale/offset or offset/index) of shape lead + (rows,
    ...), sharded along rows, and `complete`."""
    ones = (1,) * len(lead)
    shard, chunk = shard_rows, chunk_rows  # a shard may overhang the array's end; zarr trims it
    for name, (row, dtype) in codec.array_specs(classes).items():
        _create(
            group,
            f"{prefix}/{name}",
            shape=lead + (rows, *row),
            dtype=dtype,
            chunks=ones + (chunk, *row),
            shards=ones + (shard, *row),
        )
    _create(
        group,
        f"{prefix}/complete",
        shape=lead + (-(-rows // shard_rows),),
        dtype="uint8",
        chunks=ones + (1,),
        compress=False,
    )


def create_store(
    path: Path | str | Location,
    meta: dict,
    *,
    train: Split,
    plans: Sequence[ViewPlan],
    val: Split | None,
    val_boxes: np.ndarray | None,
    num_classes: int,
) -> Store:
    """Write a new, empty cache: samples, the plan of every view, empty logit arrays; the plan's id
    (skd.plan.crops.PlanId) is recorded in `skd.plan.id`.

    `plans` may make each view's plan when asked (`ViewPlans`): views are written and hashed one at
    a time, so creating a cache of K views holds one view's plan, not K. The group starts with only
    the `skd_creating` attribute and gets `skd` last, so an interrupted creation is recognisable as
    ours. `path` (a folder or an object-store URL) must be absent or empty (mode w-: nothing already
    there is ever cleared).
    """
    location = parse_location(path)
    codec = get_codec(meta["codec"])
    shard_rows, chunk_rows = int(meta["shard_rows"]), int(meta["chunk_rows"])
    group = zarr.open_group(
        location.zarr_store(read_only=False),
        mode="w-",
        zarr_format=3,
        attributes={CREATING_KEY: True},
    )
    n, k = len(train.paths), len(plans)
    if shard_rows % chunk_rows:
        raise ValueError(f"shard rows {shard_rows} must be a multiple of chunk rows {chunk_rows}")
    _write_split(group, "samples", train, chunk_rows)
    hashes = {
        "samples_sha256": samples_sha256(train.paths, train.labels, train.sizes),
        "val_sha256": None if val is None else samples_sha256(val.paths, val.labels, val.sizes),
    }
    params = {key: value for key, value in meta["plan"].items() if key not in ("id", "loader")}
    val_boxes = None if val is None else np.asarray(val_boxes, np.int32)
    plan_id = PlanId(hashes["samples_sha256"], hashes["val_sha256"], params, val_boxes)
    shard = min(shard_rows, n)
    arrays = plan_arrays(meta["plan"])
    for name, dtype, row in arrays:
        fill = PLAN_FILL.get(name, 0)
        _create(
            group,
            f"views/{name}",
            shape=(k, n, *row),
            dtype=dtype,
            chunks=(1, shard, *row),
            fill=fill,
        )
    for view, plan in enumerate(plans):
        _write_view(group, view, plan, plan_id, arrays)
    create_logit_arrays(group, "views", (k,), n, num_classes, codec, shard_rows, chunk_rows)
    if val is not None:
        _write_split(group, "val", val, chunk_rows)
        _create(group, "val/box", val_boxes, chunks=(min(shard_rows, len(val.paths)), 4))
        create_logit_arrays(
            group, "val", (), len(val.paths), num_classes, codec, shard_rows, chunk_rows
        )
    dataset = {**meta["dataset"], **hashes, "tails": train.tails is not None}
    meta = {**meta, "dataset": dataset, "plan": {**meta["plan"], "id": plan_id.hexdigest()}}
    group.attrs.put({ATTR_KEY: check_meta(location.path, meta)})
    return Store(location, group)


# the plan arrays of a view: name, dtype and the shape of each row (cache/README.md)
PLAN_ARRAYS = (
    ("order", "int32", ()),
    ("box", "int32", (4,)),
    ("flip", "uint8", ()),
    ("mix_lambda", "float32", ()),
    ("mix_box", "float32", (4,)),
)


# an unmixed row's mixing is the arrays' fill value, so an unmixed view stores no mixing chunk at
# all
PLAN_FILL = {"mix_lambda": 1.0}


def plan_arrays(plan: dict) -> tuple[tuple[str, str, tuple], ...]:
    """The plan arrays of a view of this plan: PLAN_ARRAYS, then those of its recorded augmentation,
    if any."""
    return PLAN_ARRAYS + augment_arrays(plan)


def _write_view(
    group: zarr.Group, view: int, plan: ViewPlan, plan_id: PlanId, arrays: tuple
) -> None:
    """Write one view's plan arrays `arrays` (a view without mixing: every row unmixed) and extend
    the plan's id by them, in that order."""
    n = len(plan.order)
    mix = plan.mix or (np.ones(n, np.float32), np.zeros((n, 4), np.float32))
    values = {
        "order": plan.order,
        "box": plan.box,
        "flip": plan.flip,
        "mix_lambda": mix[0],
        "mix_box": mix[1],
    }
    values.update(plan.augment or {})
    written = [np.asarray(values[name], dtype) for name, dtype, _ in arrays]
    for (name, _, _), array in zip(arrays, written):
        target = group[f"views/{name}"]
        # all fill: nothing to store (nor, on S3, a request to make)
        if (array != target.fill_value).any():
            target[view] = array
    plan_id.add_view(written)


def grow_store(
    store: Store, views: int, plans: Sequence[ViewPlan], check_id: Callable[[str], None] = None
) -> None:
    """Append views `store.num_views` .. `views` - 1 to a cache, or finish a growth a kill
    interrupted (`views` may then equal the recorded count): every array with a view axis gets
    longer along it (zarr rewrites only its zarr.json, no file of an existing view is touched), each
    new view's plan is written and the plan's id extended by it, and the attributes take the new
    count and id last. Until then `skd.growing` names the count the arrays may have, and the cache
    reads as the views it had. `check_id(new id)` may refuse the new plan before it counts.

    Logits of the new views are then missing, as in an unfinished build: the build's rerun computes
    them.
    """
    meta, group, old = dict(store.meta), store.group, store.num_views
    group.attrs[ATTR_KEY] = check_meta(store.path, {**meta, "growing": views})
    for name in expected_arrays(meta, store.has_val):
        if name.startswith("views/"):
            array = group[name]
            array.resize((views, *array.shape[1:]))
    plan_id = PlanId.extending(meta["plan"]["id"])
    for view in range(old, views):
        _write_view(group, view, plans[view], plan_id, plan_arrays(meta["plan"]))
        fault("grow-view", view - old + 1)  # a kill here: the attributes still say `old` views
    meta.pop("growing", None)
    if views > old:
        if check_id is not None:
            check_id(plan_id.hexdigest())
        meta.update(views=views, complete=False, plan={**meta["plan"], "id": plan_id.hexdigest()})
    group.attrs[ATTR_KEY] = check_meta(store.path, meta)
    store.reopen(meta)


class ViewPlans(Sequence):
    """The plans of `count` views, each made by `plan_of(view)` only when it is asked for."""

    def __init__(self, count: int, plan_of: Callable[[int], ViewPlan]):
        self.count, self.plan_of = count, plan_of

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, view: int) -> ViewPlan:
        if not 0 <= view < self.count:
            raise IndexError(view)
        return self.plan_of(view)
