"""What a cache holds and costs (`skd-cache info`): teacher, dataset, plan, codec, completion,
bytes.

Works on an unfinished cache too, and reads no logits.
"""

from __future__ import annotations

import numpy as np
from tqdm import tqdm

from skd.plan.mixing import MixParams, mix_summary, summary_line
from skd.storage.zarr_internals import codec_pipeline
from skd.store.cache_store import Store
from skd.store.codec_table import fidelity_line

SHOWN = 10  # skipped files listed


def shard_ranges(ids) -> str:
    """'0, 3-5, 9' for [0, 3, 4, 5, 9]: missing shards named compactly."""
    ids = sorted(int(i) for i in ids)
    parts, start = [], None
    for i, v in enumerate(ids):
        start = v if start is None else start
        if i + 1 == len(ids) or ids[i + 1] != v + 1:
            parts.append(str(v) if v == start else f"{start}-{v}")
            start = None
    return ", ".join(parts)


def describe(store: Store) -> dict:
    """Everything `skd-cache info` shows, as plain JSON-able values; works on an unfinished
    cache."""
    meta = store.meta
    teacher, dataset, plan = meta.get("teacher", {}), meta.get("dataset", {}), meta.get("plan", {})
    complete = store.complete()
    missing = {
        k: np.flatnonzero(~complete[k]).tolist()
        for k in range(store.num_views)
        if not complete[k].all()
    }
    val_complete = store.val_complete()
    return {
        # a URL is shown without user info or query strings; credentials never
        "path": str(store.path),
        "kind": store.location.kind,  # "folder" or "object store"
        "complete": store.is_complete(),
        "teacher": {
            k: teacher.get(k)
            for k in (
                "name",
                "weights",
                "weights_sha256",
                "amp",
                "num_classes",
                "input",
                "pretrained_cfg",
            )
        },
        "dataset": {
            "root": dataset.get("root"),
            "num_samples": store.num_samples,
            "num_val": store.num_val,
            "num_classes": len(dataset.get("classes", [])),
            "fingerprint": dataset.get("fingerprint"),
            "val_fingerprint": dataset.get("val_fingerprint"),
            "skipped": [list(item) for item in dataset.get("skipped", [])],
        },
        "plan": {
            k: plan.get(k) for k in ("seed", "image_size", "crop", "val_crop_fraction", "loader")
        },
        "codec": store.codec.name,
        "codec_fidelity": meta.get("codec_fidelity"),
        "shard_rows": store.shard_rows,
        "chunk_rows": meta.get("chunk_rows"),
        "codec_pipeline": codec_pipeline(store.array("views/logits")),
        "mixing": {"options": plan.get("mix"), "view 0": mix_summary(*store.view_mix(0))},
        "augment": plan.get("augment"),
        "views": {
            "total": store.num_views,
            "complete": store.num_views - len(missing),
            "shards_complete": int(complete.sum()),
            "shards_total": int(complete.size),
            "missing_shards": {str(k): v for k, v in missing.items()},
            # an append of views a kill interrupted (cache/README.md)
            "growing_to": meta.get("growing"),
        },
        "lost_shards": {str(part): shards for part, shards in store.lost_shards().items()},
        "val": {
            "rows": store.num_val,
            "shards_complete": int(val_complete.sum()),
            "shards_total": int(val_complete.size),
            "missing_shards": np.flatnonzero(~val_complete).tolist(),
        }
        if store.has_val
        else None,
        "bytes_on_disk": store.bytes_on_disk(),
        **store.storage(),
        "software": meta.get("software", {}),
    }


def info_lines(info: dict) -> list[str]:
    """`describe`'s answer as text lines."""
    t, d, p, v = info["teacher"], info["dataset"], info["plan"], info["views"]
    crop = p.get("crop") or {}
    lines = [
        f"cache {info['path']} ({'complete' if info['complete'] else 'UNFINISHED'})",
        f"teacher   {t['name']}, weights {t['weights']} (sha256 {t['weights_sha256'] or '-'}), AMP {t['amp']}, "
        f"{t['num_classes']} classes",
        f"dataset   {d['root']}: {d['num_samples']:,} train images, {d['num_val']:,} val, {d['num_classes']} classes",
        f"          fingerprint {d['fingerprint']}"
        + (f", val {d['val_fingerprint']}" if d["val_fingerprint"] else ""),
    ]
    if d["skipped"]:
        named = ", ".join(f"{path} ({reason})" for path, reason in d["skipped"][:SHOWN])
        more = f" and {len(d['skipped']) - SHOWN} more" if len(d["skipped"]) > SHOWN else ""
        lines.append(
            f"          left out (--on-bad-image skip): {len(d['skipped'])}: {named}{more}"
        )
    lines += [
        f"input     {recipe_line(t['input'])}",
        f"          student {p['image_size']} px (skd-train's default; --image-size, --mean and --std may change it), "
        "bilinear, ImageNet mean/std",
        f"plan      seed {p['seed']}, {p['image_size']} px, area {crop.get('scale')}, aspect "
        f"{[round(r, 4) for r in crop.get('ratio', [])]}, flip {crop.get('flip_prob')}, loader {p['loader']}",
        f"mixing    {mixing_line(info['mixing'])}",
        f"augment   {augment_line(info['augment'])}",
        f"codec     {info['codec']}, shards of {info['shard_rows']:,} rows, chunks of {info['chunk_rows']:,}",
        f"          {fidelity_line(info['codec_fidelity'])}",
        f"reader    {reader_line(info['codec_pipeline'])}",
        f"views     {v['complete']} of {v['total']} complete, {v['shards_complete']} of {v['shards_total']} shards",
    ]
    lines += [
        f"          view {k}: shards {shard_ranges(s)} missing"
        for k, s in v["missing_shards"].items()
    ]
    if v.get("growing_to"):
        lines.append(
            f"          growing to {v['growing_to']} views was interrupted: rerun the build with --views "
            f"{v['growing_to']} to finish it (the cache reads as its {v['total']} views meanwhile)"
        )
    lines += [
        f"lost      {part if part == 'val' else f'view {part}'}: shards {shard_ranges(s)} recorded complete but "
        "their files are gone: rerun the cache's `skd-cache build` command to rebuild them"
        for part, s in info["lost_shards"].items()
    ]
    if info["val"] is not None:
        val = info["val"]
        lines.append(
            f"val       {val['rows']:,} rows, {val['shards_complete']} of {val['shards_total']} shards"
            + (
                f", shards {shard_ranges(val['missing_shards'])} missing"
                if val["missing_shards"]
                else ""
            )
        )
    else:
        lines.append("val       not cached")
    per_row = info["bytes_per_row"]
    lines.append(
        f"{'stored':<10}{human_bytes(info['bytes_on_disk'])}, logits {human_bytes(info['logit_bytes'])}"
        + (
            f" for {info['rows_written']:,} rows: {per_row:,.0f} B per row, compression "
            f"{info['ratio_vs_fp32']:.2f}x vs float32"
            if per_row
            else ", no rows written"
        )
    )
    return lines


def recipe_line(recipe: dict) -> str:
    """The teacher's input recipe and where each part came from, in words."""

    def numbers(values):
        return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"

    fields_by_source: dict[str, list[str]] = {}
    for field, where in recipe["source"].items():
        fields_by_source.setdefault(where, []).append(field)
    origins = "; ".join(
        f"{', '.join(fields)} from {where}" for where, fields in fields_by_source.items()
    )
    return (
        f"teacher {recipe['size']} px {recipe['interpolation']}, mean {numbers(recipe['mean'])}, "
        f"std {numbers(recipe['std'])} ({origins})"
    )


def mixing_line(mixing: dict) -> str:
    """The plan's MixUp / CutMix options and what view 0 holds, in words."""
    o = mixing["options"]
    if not MixParams.from_dict(o).enabled:
        return "off"
    return (
        f"--mixup {o['mixup_alpha']:g} --cutmix {o['cutmix_alpha']:g} --mixup-prob {o['prob']:g} "
        f"--mixup-switch-prob {o['switch_prob']:g}; view 0: {summary_line(mixing['view 0'])}"
    )


def augment_line(augment: dict | None) -> str:
    """The plan's recorded RandAugment and erasing options, in words."""
    if not augment:
        return "off"
    parts = [f"--aa {augment['aa']}"] if augment["aa"] else []
    if augment["reprob"] > 0:
        parts.append(
            f"--reprob {augment['reprob']:g} --remode {augment['remode']} --recount {augment['recount']}"
        )
    return (
        " ".join(parts)
        + " (recorded per image: views/aug_op, aug_magnitude, erase_box, erase_value)"
    )


def reader_line(pipeline: str) -> str:
    """Which codec pipeline decodes this cache's chunks, in words."""
    if pipeline == "ZarrsCodecPipeline":
        return "zarr with the zarrs codec pipeline (Rust)"
    return (
        f"zarr's own codec pipeline ({pipeline}): zarrs does not serve this store, reads are slower"
    )


def human_bytes(n: float) -> str:
    """Bytes in SI units (kB, MB, GB: powers of 1000), as tqdm's progress bars show them."""
    return tqdm.format_sizeof(n, "B", 1000)
