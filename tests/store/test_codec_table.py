"""`skd-cache codecs`: each codec's bytes per row and fidelity on a cache's own rows, against an independent
computation (numpy, float64) and the bytes the cache itself holds on disk."""

from __future__ import annotations

import json

import numpy as np

from skd.store.cache_store import open_store


def layer_norm(x: np.ndarray) -> np.ndarray:
    mean = x.mean(1, keepdims=True)
    return (x - mean) / np.sqrt(((x - mean) ** 2).mean(1, keepdims=True) + 1e-7)


def log_softmax(x: np.ndarray) -> np.ndarray:
    top = x.max(1, keepdims=True)
    return x - top - np.log(np.exp(x - top).sum(1, keepdims=True))


def kl(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    log_p, log_q = log_softmax(p_logits), log_softmax(q_logits)
    return float(np.maximum((np.exp(log_p) * (log_p - log_q)).sum(1), 0).mean())


def top_k_by_hand(x: np.ndarray, k: int) -> np.ndarray:
    """Top-k decoding written out: the k largest in fp16, every other class at the mean of the others."""
    out = np.empty_like(x, dtype=np.float64)
    for i, row in enumerate(x.astype(np.float64)):
        best = np.argsort(-row, kind="stable")[:k]
        rest = np.setdiff1d(np.arange(len(row)), best)
        out[i, rest] = row[rest].mean()
        out[i, best] = row[best].astype(np.float16)
    return out


def test_codecs_figures_equal_an_independent_computation(fp32_cache):
    """KL of both targets and agreement figures as written out by hand; the fp32 row size is what the cache's own
    shard of those 8 rows takes on disk (same layout: 8-row shards of 4-row chunks, zstd)."""
    from skd.store.codec_table import cache_codec_table

    store = open_store(fp32_cache)
    rows = store.read_logits(0, 0, 8).astype(np.float64)
    measured, figures = cache_codec_table(store, 8, ["fp32", "topk:2"], temperature=4.0, multiplier=2.0)
    fp32, top2 = figures
    shard_file = fp32_cache / "views" / "logits" / "c" / "0" / "0" / "0"
    assert measured == 8 and fp32.bytes_per_row == shard_file.stat().st_size / 8, (
        f"fp32 row {fp32.bytes_per_row} B; the cache's shard holds {shard_file.stat().st_size / 8} B per row"
    )
    assert fp32.kl_skd == 0 and fp32.top1_agreement == 1, f"fp32 against itself: {fp32}"
    decoded = top_k_by_hand(rows, 2)
    want_skd = kl(layer_norm(rows) * 2.0 / 4.0, layer_norm(decoded) * 2.0 / 4.0)
    want_hinton = kl(rows / 4.0, decoded / 4.0)
    assert abs(top2.kl_skd - want_skd) <= 1e-6 * max(1.0, want_skd), f"SKD KL {top2.kl_skd:.6g}, by hand {want_skd:.6g}"
    assert abs(top2.kl_hinton - want_hinton) <= 1e-6 * max(1.0, want_hinton), (
        f"Hinton KL {top2.kl_hinton:.6g}, by hand {want_hinton:.6g}"
    )
    top1 = float((rows.argmax(1) == decoded.argmax(1)).mean())
    assert top2.top1_agreement == top1, f"top-1 agreement {top2.top1_agreement}, by hand {top1}"


def test_codecs_prints_a_table_and_json_objects(fp32_cache):
    import subprocess
    import sys

    def run(*args):
        command = [sys.executable, "-c", "from skd.cli.main import main_cache; main_cache()", "codecs", str(fp32_cache)]
        return subprocess.run([*command, *args], capture_output=True, text=True)

    as_json = run("--rows", "8", "--json")
    assert as_json.returncode == 0, as_json.stderr[-800:]
    figures = json.loads(as_json.stdout)
    names = [f["codec"] for f in figures]
    assert names == ["fp32", "fp16", "int8", "compact", "topk:10", "topk:100"], names
    keys = {"codec", "bytes_per_row", "kl_skd", "kl_hinton", "top1_agreement", "top5_agreement"}
    assert all(set(f) == keys for f in figures), f"JSON keys {sorted(figures[0])}"
    table = run("--rows", "8", "--codecs", "int8,topk:2")
    assert table.returncode == 0 and table.stdout.splitlines()[2].startswith("int8"), table.stdout
    bad = run("--codecs", "int4")
    assert bad.returncode == 2 and "unknown codec 'int4'" in bad.stderr and "Traceback" not in bad.stderr, bad.stderr


def test_build_codec_auto_picks_the_smallest_codec_within_max_kl_and_records_it(
    fp32_cache, image_root, teacher_file, tmp_path, in_process
):
    """--max-kl X: the codec with the fewest bytes per row whose SKD KL on the first rows of view 0 is at most X,
    as the codec table of those exact rows (the fp32 cache's, same plan and teacher) says; info shows the figure."""
    from conftest import build_args, small_build_config

    from skd.build.teacher_pass import build_cache
    from skd.store.codec_table import CANDIDATES, codec_table

    exact = open_store(fp32_cache).read_logits(0, 0, 8)  # the first shard of view 0: the rows measured
    table = codec_table(exact, CANDIDATES, shard_rows=8, chunk_rows=4)
    for max_kl in (1e-9, 1e-2):
        out = tmp_path / f"auto{max_kl}"
        build_cache(small_build_config(image_root, out, teacher_file, codec="auto", max_kl=max_kl, views=1))
        store = open_store(out)
        want = min((f for f in table if f.kl_skd <= max_kl), key=lambda f: f.bytes_per_row)
        record = store.meta["codec_fidelity"]
        assert store.codec.name == want.codec, f"--max-kl {max_kl}: chose {store.codec.name}, the table {want.codec}"
        assert abs(record["kl_skd"] - want.kl_skd) <= 1e-6 * max(want.kl_skd, 1e-9) + 1e-12, (
            f"recorded SKD KL {record['kl_skd']:.3g}, the table's {want.kl_skd:.3g}"
        )
        assert record["rows"] == 8 and record["chosen_within_kl_skd"] == max_kl, record
    args = build_args(weights=teacher_file, data=image_root, out=tmp_path / "x", max_kl="1e-3", codec="int8")
    code, err = in_process("cache", *args)
    assert code == 2 and "--max-kl picks the codec" in err, err


def test_info_shows_the_codec_fidelity_and_skd_train_warns_of_a_lossy_one(image_root, teacher_file, tmp_path):
    """A top-1 cache of 3 classes loses most of the SKD target: info says so, skd-train --kd skd warns once."""
    import warnings

    from conftest import small_build_config, small_train_config

    from skd.build.teacher_pass import build_cache
    from skd.inspect.info import describe, info_lines
    from skd.train.loop import train

    out = tmp_path / "top1"
    build_cache(small_build_config(image_root, out, teacher_file, codec="topk:1", views=1))
    kl = open_store(out).meta["codec_fidelity"]["kl_skd"]
    text = "\n".join(info_lines(describe(open_store(out))))
    assert kl > 1e-3 and f"KL of the SKD target {kl:.2g}" in text, f"SKD KL {kl:.3g}; info:\n{text}"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(small_train_config(tmp_path / "run", cache=out, epochs=1, views=None, steps_per_epoch=1))
    lossy = [str(w.message) for w in caught if "SKD target is off by KL" in str(w.message)]
    assert len(lossy) == 1 and f"{kl:.2g}" in lossy[0], f"warnings: {[str(w.message)[:90] for w in caught]}"


def test_the_recorded_fidelity_is_measured_on_the_views_as_stored_augmentation_included(
    fp32_cache, image_root, teacher_file, tmp_path
):
    """With --aa and --reprob, the codec fidelity a build records equals the one measured on the rows the cache
    stores (an fp32 cache of the same plan holds them exactly), and differs from the plain views' figure: the build
    measures its codec on the augmented views its teacher sees, not on the crops alone."""
    from conftest import small_build_config

    from skd.build.teacher_pass import build_cache
    from skd.store.codec_table import codec_fidelity

    augment = dict(aa="rand-m9-n2", reprob=0.5, views=1)
    build_cache(small_build_config(image_root, tmp_path / "exact", teacher_file, **augment))
    build_cache(small_build_config(image_root, tmp_path / "int8", teacher_file, codec="int8", **augment))
    options = dict(max_kl=None, shard_rows=8, chunk_rows=4)
    _, stored = codec_fidelity("int8", open_store(tmp_path / "exact").read_logits(0, 0, 8), **options)
    _, plain = codec_fidelity("int8", open_store(fp32_cache).read_logits(0, 0, 8), **options)
    recorded = open_store(tmp_path / "int8").meta["codec_fidelity"]
    assert recorded["kl_skd"] == stored["kl_skd"], (
        f"recorded SKD KL {recorded['kl_skd']:.6g}, measured on the stored augmented rows {stored['kl_skd']:.6g}"
    )
    assert plain["kl_skd"] != stored["kl_skd"], f"the plain views give the same KL {plain['kl_skd']:.6g}"
