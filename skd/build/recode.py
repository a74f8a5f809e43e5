"""`skd-cache recode`: a cache's logits stored with another codec, without the teacher or the
images.

The new cache copies the source's samples, plan and validation windows, so it is the cache a build
with that codec would have made (an int8 recode of an fp32 cache equals an int8 build byte for
byte), and caches built with --plan-from either stay readable together. Whole shards, completion
recorded per shard: rerunning the same command resumes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm import tqdm

from skd.build.prepare import check_out, differences, software_versions
from skd.errors import CacheError, OptionError
from skd.storage.location import Location, parse_location
from skd.store.cache_store import Store, cache_state, open_store, part_name
from skd.store.codec_table import FIDELITY_ROWS, codec_fidelity
from skd.store.codecs import get_codec
from skd.store.creation import ViewPlans, create_store
from skd.store.reader import RowReader
from skd.store.writer import ShardWriter, mark_finished


def recode_cache(
    source_path: str | Path,
    out: str | Path,
    codec_name: str,
    *,
    overwrite: bool = False,
    progress: bool = False,
) -> Store:
    """Write (or resume) the cache at `out`: the source's plan, its logits decoded and encoded with
    `codec_name`."""
    try:
        codec = get_codec(codec_name)
    except ValueError as exc:
        raise OptionError(f"--codec: {exc}") from None
    source = open_store(source_path)
    unfinished = [
        f"{part_name(view)} shard {shard}" for view, shard, _, _ in missing_ranges(source)
    ]
    if unfinished:
        raise CacheError(
            f"{source.path} is not finished ({unfinished[0]} and {len(unfinished) - 1} more shards have no logits): "
            "rerun its build to finish it first"
        )
    where = parse_location(out).absolute()
    if str(where.path) == str(source.location.absolute().path):
        raise OptionError(
            f"--out {out} is the source cache: write the recoded cache somewhere else"
        )
    check_out(where, Path(source.meta["dataset"]["root"]))
    meta = recoded_meta(source, codec.name)
    first = source.read_logits(0, 0, min(FIDELITY_ROWS, source.num_samples, source.shard_rows))
    _, meta["codec_fidelity"] = codec_fidelity(
        codec.name,
        first,
        max_kl=None,
        shard_rows=source.shard_rows,
        chunk_rows=int(source.meta["chunk_rows"]),
        reference=f"the {source.codec.name} rows of {source.path}",
    )
    lock = where.lock()
    try:
        store = (
            resume(where, meta)
            if not where.is_empty() and not overwrite
            else create(where, source, meta)
        )
        for view in store.parts():
            recode_part(source, store, view, lock, progress)
        mark_finished(store)
        return store
    finally:
        lock.release()


def recoded_meta(source: Store, codec: str) -> dict:
    """The source's attributes with the new codec (and this software), as a build with that codec
    records them."""
    meta = {k: v for k, v in source.meta.items() if k not in ("complete", "growing")}
    return {
        **meta,
        "plan": {k: v for k, v in source.meta["plan"].items() if k != "id"},
        "codec": codec,
        "software": software_versions(),
        "recoded_from": {"codec": source.meta["codec"], "plan_id": source.meta["plan"]["id"]},
    }


def create(where: Location, source: Store, meta: dict) -> Store:
    """A new cache at `where` holding the source's samples, plan and validation windows, and no
    logits yet."""
    if not where.is_empty():
        where.remove_all()
    plans = ViewPlans(source.num_views, source.recorded_view)
    return create_store(
        where,
        meta,
        train=source.split("samples"),
        plans=plans,
        val=source.split("val") if source.has_val else None,
        val_boxes=source.val_boxes() if source.has_val else None,
        num_classes=source.num_classes,
    )


def resume(where: Location, meta: dict) -> Store:
    """The recode at `where`, to continue, if it recodes the same source with the same codec."""
    if cache_state(where) == "creating":
        raise OptionError(
            f"{where} holds an unfinished cache creation: pass --overwrite to start it again"
        )
    store = open_store(where, mode="r+")
    changed = differences(store.meta, meta)
    if changed or store.meta.get("recoded_from") != meta["recoded_from"]:
        raise OptionError(
            f"{where} holds another cache ({', '.join(changed) or 'another source'} differ): pass --overwrite "
            "to replace it, or another --out"
        )
    where.discard_partial_writes()
    return store


def recode_part(source: Store, store: Store, view, lock, progress: bool) -> int:
    """Decode, re-encode and write every shard of one part (a view, or VAL) that the new cache
    lacks."""
    rows = store.part_rows(view)
    complete = store.part_complete(view)
    shards = [j for j in range(len(complete)) if not complete[j]]
    if not shards:
        return 0
    writer = ShardWriter(store, view, shards, rows, lock=lock)
    label = "val" if view == "val" else f"view {view}/{store.num_views}"
    written = 0
    with tqdm(
        total=len(shards), desc=label, unit="shard", disable=not progress, dynamic_ncols=True
    ) as bar:
        try:
            for shard in shards:
                start, stop = store.shard_bounds(shard, rows)
                for first, block in RowReader(source, view, start, stop).blocks():
                    logits = source.codec.decode(block)
                    writer.put(np.arange(first, first + len(logits)), logits)
                    written += len(logits)
                bar.update(1)
        except BaseException:  # Ctrl-C, a read error: the shards already written stay complete
            writer.abort()
            raise
        writer.close()
    return written


def missing_ranges(store: Store) -> list[tuple]:
    """(part, shard, start, stop) of every shard of the cache without logits."""
    out = []
    for view in store.parts():
        rows = store.part_rows(view)
        for shard, done in enumerate(store.part_complete(view)):
            if not done:
                out.append((view, shard, *store.shard_bounds(shard, rows)))
    return out
