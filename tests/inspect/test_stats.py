"""`skd-cache info` and `skd-cache stats` on caches written from hand-made logits with known statistics."""

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from handmade import cache_meta, write_shard

from skd.cli.main import cache as cli
from skd.data.index import Split
from skd.inspect.stats import CacheStats, logit_stats, split_summary
from skd.inspect.stats_plot import plot_stats
from skd.inspect.stats_rows import RowStats
from skd.loss import spherical_normalize
from skd.plan.crops import ViewPlan
from skd.replay.cached_logits import auto_multiplier
from skd.store.cache_store import VAL, open_store
from skd.store.codecs import get_codec
from skd.store.creation import create_store

N, C, NUM_VAL, CLASSES = 300, 10, 200, [f"c{i}" for i in range(10)]
CONFUSED, AS = 3, 5  # every sample of class c3 is predicted c5


def teacher_rows(labels: np.ndarray, seed: int) -> np.ndarray:
    """Logits with varied scale; the label wins by a margin, except 20% random misses and class 3 -> 5."""
    rng = np.random.default_rng(seed)
    n = len(labels)
    x = rng.normal(0, 1, (n, C)) * rng.uniform(0.5, 3, (n, 1)) + rng.normal(0, 2, (n, 1))
    winner = np.where(rng.random(n) < 0.8, labels, rng.integers(0, C, n))
    winner[labels == CONFUSED] = AS
    x[np.arange(n), winner] += rng.uniform(1, 8, n) + 30 * (labels == CONFUSED)
    return x.astype(np.float32)


def random_windows(sizes: np.ndarray, order: np.ndarray, seed: int) -> np.ndarray:
    """(y, x, h, w) per position of windows inside the images order[position], of any area; the first
    rows sit exactly on the crop-area bucket edges 25%, 50% and 75%."""
    rng = np.random.default_rng(seed)
    height, width = sizes[order].T
    h = np.maximum(1, (height * rng.random(len(order)) ** 0.5).astype(np.int64))
    w = np.maximum(1, (width * rng.random(len(order))).astype(np.int64))
    for p, (fh, fw) in enumerate([(0.5, 0.5), (1.0, 0.5), (0.75, 1.0)]):  # sizes are multiples of 4
        h[p], w[p] = height[p] * fh, width[p] * fw
    return np.stack([rng.integers(0, height - h + 1), rng.integers(0, width - w + 1), h, w], 1)


def handmade_cache(path: Path, codec: str = "fp32", *, unwritten: dict | None = None) -> SimpleNamespace:
    """A cache of 2 views + val whose logits and windows are chosen here; `unwritten` = {view: [shards]}
    left empty."""
    labels = np.arange(N) % C
    sizes = 4 * np.random.default_rng(9).integers(5, 30, (N, 2))  # (height, width) by sample id
    val_labels = np.arange(NUM_VAL) % C
    orders = [np.random.default_rng(k).permutation(N) for k in range(2)]
    by_sample = teacher_rows(labels, 0)
    views = [by_sample[orders[0]], teacher_rows(labels, 1)[orders[1]]]
    views[1][::3] = by_sample[orders[1]][::3]  # a third of view 1 repeats view 0's rows: known consistency
    val = teacher_rows(val_labels, 2)
    meta = cache_meta(
        codec=codec, views=2, num_samples=N, num_val=NUM_VAL, classes=CLASSES, shard_rows=64, chunk_rows=16
    )
    split = lambda n, lab, hw: Split([f"x/{i}.JPEG" for i in range(n)], lab, hw)  # noqa: E731
    boxes = [random_windows(sizes, o, k) for k, o in enumerate(orders)]
    plans = [ViewPlan(order=o, box=b, flip=np.zeros(N)) for o, b in zip(orders, boxes)]
    store = create_store(
        path,
        meta,
        train=split(N, labels, sizes),
        plans=plans,
        val=split(NUM_VAL, val_labels, np.full((NUM_VAL, 2), 32)),
        val_boxes=np.zeros((NUM_VAL, 4)),
        num_classes=C,
    )
    enc = get_codec(codec)
    for view, rows in [(0, views[0]), (1, views[1]), (VAL, val)]:
        for shard in range(store.num_shards(len(rows))):
            if shard in (unwritten or {}).get(view, []):
                continue
            a, b = store.shard_bounds(shard, len(rows))
            write_shard(store, view, shard, enc.encode(rows[a:b]))
    return SimpleNamespace(
        path=path, views=views, orders=orders, labels=labels, val=val, val_labels=val_labels, sizes=sizes, boxes=boxes
    )


def ece_reference(logits: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """Expected calibration error the textbook way: a loop over the bins (lo, hi]."""
    p = torch.softmax(torch.from_numpy(logits).double(), 1).numpy()
    conf, correct = p.max(1), p.argmax(1) == labels
    edges = np.linspace(0, 1, bins + 1)
    total = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (conf > lo) & (conf <= hi)
        if inside.any():
            total += inside.mean() * abs(correct[inside].mean() - conf[inside].mean())
    return total


@pytest.fixture(scope="module")
def fp32(tmp_path_factory):
    return handmade_cache(tmp_path_factory.mktemp("stats") / "cache")


@pytest.fixture(scope="module")
def fp32_stats(fp32):
    return logit_stats(open_store(fp32.path), [0, 1], temperature=4.0, multiplier=2.0)


def test_accuracy_std_and_ece_match_an_independent_computation(fp32, fp32_stats):
    view0, view1, val = fp32_stats.splits
    for got, rows, labels in [(view0, fp32.views[0], fp32.labels[fp32.orders[0]]), (val, fp32.val, fp32.val_labels)]:
        top1 = float((rows.argmax(1) == labels).mean())
        assert got.top1 == pytest.approx(top1, abs=1e-12), f"{got.name}: top-1 {got.top1:.4f}, expected {top1:.4f}"
        top5 = float((np.argsort(-rows, 1)[:, :5] == labels[:, None]).any(1).mean())
        assert got.top5 == pytest.approx(top5, abs=1e-12), f"{got.name}: top-5 {got.top5:.4f}, expected {top5:.4f}"
        std = torch.from_numpy(rows).double().std(1).numpy()
        for name, expected in [
            ("mean", std.mean()),
            ("median", np.median(std)),
            ("p5", np.percentile(std, 5)),
            ("p95", np.percentile(std, 95)),
        ]:
            value = getattr(got, f"std_{name}")
            assert value == pytest.approx(expected, rel=1e-5), (
                f"{got.name}: std {name} {value:.5f}, expected {expected:.5f}"
            )
    expected = ece_reference(fp32.val, fp32.val_labels)
    assert val.ece == pytest.approx(expected, abs=1e-6), f"val ECE {val.ece:.5f}, expected {expected:.5f}"
    assert view0.ece is None and view1.ece is None, "ECE is a val/ figure: views are augmented training crops"


def test_confidence_of_logits_and_of_the_skd_target(fp32, fp32_stats):
    x = torch.from_numpy(fp32.val).double()
    p = torch.softmax(x, 1)
    target = torch.softmax(spherical_normalize(torch.from_numpy(fp32.val), 2.0).double() / 4.0, 1)
    got = fp32_stats.splits[2]
    for name, value, expected in [
        ("max-probability", got.max_prob, p.max(1).values.mean()),
        ("entropy", got.entropy, -(p * p.log()).sum(1).mean()),
        ("SKD target max-probability", got.target_max_prob, target.max(1).values.mean()),
        ("SKD target entropy", got.target_entropy, -(target * target.log()).sum(1).mean()),
    ]:
        assert value == pytest.approx(float(expected), rel=1e-5), (
            f"val {name} {value:.5f}, expected {float(expected):.5f}"
        )


def test_suggested_multiplier_is_what_training_uses(fp32, fp32_stats):
    used = auto_multiplier([open_store(fp32.path)])
    assert fp32_stats.auto_multiplier == pytest.approx(used, rel=1e-5), (
        f"stats suggests m={fp32_stats.auto_multiplier:.4f}, skd-train --multiplier auto uses {used:.4f}"
    )


def test_consistency_worst_classes_and_confusions(fp32, fp32_stats):
    top1 = [np.empty(N, np.int64) for _ in range(2)]
    for k in range(2):
        top1[k][fp32.orders[k]] = fp32.views[k].argmax(1)
    expected = float((top1[0] == top1[1]).mean())
    assert fp32_stats.consistency == pytest.approx(expected), (
        f"consistency {fp32_stats.consistency:.4f}, expected {expected:.4f}"
    )
    view0 = fp32_stats.splits[0]
    worst = view0.worst_classes[0]
    assert (worst["class"], worst["accuracy"]) == (f"c{CONFUSED}", 0.0), f"worst class: {worst}, expected c3 at 0%"
    pair = view0.confused_pairs[0]
    assert (pair["true"], pair["predicted"], pair["count"]) == (f"c{CONFUSED}", f"c{AS}", N // C), (
        f"most confused pair: {pair}, expected c3->c5 {N // C} times"
    )


def test_int8_statistics_match_the_decoded_logits(tmp_path):
    made = handmade_cache(tmp_path / "cache", codec="int8")
    store = open_store(made.path)
    got = logit_stats(store, [0], val=False).splits[0]
    decoded = torch.from_numpy(store.read_logits(0)).double()
    labels = made.labels[made.orders[0]]
    top1 = float((decoded.argmax(1).numpy() == labels).mean())
    assert got.top1 == pytest.approx(top1, abs=1e-12), f"int8 top-1 {got.top1:.4f}, decoded rows give {top1:.4f}"
    std = float(decoded.std(1).mean())
    assert got.std_mean == pytest.approx(std, rel=1e-5), f"int8 mean std {got.std_mean:.5f}, decoded {std:.5f}"
    target = torch.softmax(spherical_normalize(decoded, 2.0).double() / 4.0, 1).max(1).values.mean()
    assert got.target_max_prob == pytest.approx(float(target), rel=1e-5), (
        f"int8 SKD target max-probability {got.target_max_prob:.5f}, decoded {float(target):.5f}"
    )


def test_storage_figures(fp32, fp32_stats):
    files = [
        f
        for d in ("views", "val")
        for a in ("logits", "scale", "offset")  # the shard files, not zarr.json
        for f in (fp32.path / d / a / "c").rglob("*")
        if f.is_file()
    ]
    per_row = sum(f.stat().st_size for f in files) / (2 * N + NUM_VAL)
    got = fp32_stats.storage
    assert got["bytes_per_row"] == pytest.approx(per_row), (
        f"{got['bytes_per_row']:.1f} B per row, expected {per_row:.1f}"
    )
    assert got["ratio_vs_fp32"] == pytest.approx(4 * C / per_row), f"ratio vs float32 {got['ratio_vs_fp32']:.3f}"
    assert got["ratio_vs_fp16"] == pytest.approx(2 * C / per_row), f"ratio vs float16 {got['ratio_vs_fp16']:.3f}"


def test_cli_stats_json_text_and_plot(fp32, fp32_stats, tmp_path):
    runner = CliRunner()
    plot = tmp_path / "stats.png"
    result = runner.invoke(cli, ["stats", str(fp32.path), "--views", "all", "--json", "--plot", str(plot)])
    assert result.exit_code == 0, f"exit {result.exit_code}: {result.stderr}"
    doc = json.loads(result.stdout)
    assert [s["name"] for s in doc["splits"]] == ["view 0", "view 1", "val"], f"splits: {doc['splits']}"
    assert doc["splits"][2]["top1"] == fp32_stats.splits[2].top1, f"JSON val top-1 {doc['splits'][2]['top1']}"
    head = plot.read_bytes()[:8] if plot.exists() else b""
    assert head == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 10_000, f"--plot wrote {head!r}, not a PNG figure"
    text = runner.invoke(cli, ["stats", str(fp32.path)])
    assert text.exit_code == 0 and "teacher top-1" in text.stdout and "suggested SKD multiplier" in text.stdout, (
        f"text report:\n{text.stdout}{text.stderr}"
    )
    assert "consistency" not in text.stdout, "consistency needs two views; the default streams view 0 only"


def crop_area_reference(made, view: int) -> list[tuple[int, float, float]]:
    """(rows, top-1, mean max-probability) per crop-area bucket 8-25%, 25-50%, 50-75%, 75-100%, by a loop."""
    rows, hits, conf = [0] * 4, [0] * 4, [0.0] * 4
    p = torch.softmax(torch.from_numpy(made.views[view]).double(), 1).numpy()
    for position, sample in enumerate(made.orders[view]):
        y, x, h, w = made.boxes[view][position]
        area = h * w / (made.sizes[sample][0] * made.sizes[sample][1])
        bucket = 0 if area < 0.25 else 1 if area < 0.5 else 2 if area < 0.75 else 3
        rows[bucket] += 1
        hits[bucket] += int(p[position].argmax() == made.labels[sample])
        conf[bucket] += p[position].max()
    return [(n, hits[b] / n, conf[b] / n) for b, n in enumerate(rows)]


def test_top1_and_confidence_by_crop_area_match_a_hand_computation(fp32, fp32_stats):
    for view in (0, 1):
        got = fp32_stats.splits[view].crop_areas
        for bucket, (rows, top1, max_prob) in zip(got, crop_area_reference(fp32, view)):
            where = f"view {view}, crop area {bucket['bucket']}"
            assert bucket["rows"] == rows and rows > 0, f"{where}: {bucket['rows']} rows, expected {rows}"
            assert bucket["top1"] == pytest.approx(top1, abs=1e-12), (
                f"{where}: top-1 {bucket['top1']:.4f}, expected {top1:.4f}"
            )
            assert bucket["max_prob"] == pytest.approx(max_prob, rel=1e-5), (
                f"{where}: max-probability {bucket['max_prob']:.5f}, expected {max_prob:.5f}"
            )
    assert [b["bucket"] for b in got] == ["8-25%", "25-50%", "50-75%", "75-100%"], f"buckets: {got}"
    assert fp32_stats.splits[2].crop_areas is None, "val has centre crops: no crop-area buckets"

    result = CliRunner().invoke(cli, ["stats", str(fp32.path), "--no-val"])
    (rows, top1, max_prob), *_ = crop_area_reference(fp32, 0)
    expected = f"  by crop area: 8-25% top-1 {top1:.1%} (p {max_prob:.2f}, {rows:,} rows), 25-50% top-1 "
    assert expected in result.stdout, f"text report lacks {expected!r}:\n{result.stdout}{result.stderr}"
    doc = json.loads(CliRunner().invoke(cli, ["stats", str(fp32.path), "--no-val", "--json"]).stdout)
    assert doc["splits"][0]["crop_areas"] == fp32_stats.splits[0].crop_areas, f"JSON: {doc['splits'][0]}"
    assert doc["cache"] == str(fp32.path), f"JSON names the cache {doc['cache']!r}, expected {fp32.path}"


def svg_text(stats, path: Path) -> str:
    """The plot as SVG with its text kept as text, so a test can read what a person reads."""
    import matplotlib

    with matplotlib.rc_context({"svg.fonttype": "none"}):
        plot_stats(stats, path)
    return path.read_text()


def test_plot_labels_classes_names_the_cache_and_shows_crop_areas(fp32, fp32_stats, tmp_path):
    text = svg_text(fp32_stats, tmp_path / "stats.svg")
    (rows, top1, _), *_ = crop_area_reference(fp32, 0)
    for expected in (
        "skd-cache stats of cache",
        f"view 0: {N} rows",
        f"val: {NUM_VAL} rows",
        f"teacher top-1 per class on val: all {C} classes, worst first",
        f"c{CONFUSED} ({NUM_VAL // C} rows)",
        "teacher top-1 by crop area",
        "8-25%",
        "75-100%",
        f">{top1:.0%}<",
        f">{rows} rows<",
        "logit std per row",
    ):
        assert expected in text, f"the plot lacks {expected!r}"


def test_plot_of_many_classes_shows_the_worst_30_sorted(tmp_path):
    classes, n = [f"class{i:03d}" for i in range(200)], 2000
    labels = np.arange(n) % 200
    accuracy = labels / 200  # class i: about i/200 of its rows right, so the low ids are the worst
    pred = np.where(np.random.default_rng(0).random(n) < accuracy, labels, (labels + 1) % 200)
    rows = RowStats(pred, (pred != labels).astype(np.int64), *(np.full(n, 0.5) for _ in range(5)))
    split = split_summary("val", rows, labels, classes, ece=True)
    stats = CacheStats([split], 4.0, 2.0, None, None, [], {}, cache="/data/r152", classes=classes)
    text = svg_text(stats, tmp_path / "many.svg")
    assert "worst 30 of 200 classes, worst first" in text, "the subplot title does not say only the worst are shown"
    worst = [classes[i] for i in np.argsort(split.class_accuracy, kind="stable")[:30]]
    shown = [name for name in classes if f"{name} (10 rows)" in text]
    assert sorted(shown) == sorted(worst), f"plotted classes {shown[:5]}..., expected the worst 30 {worst[:5]}..."
    assert text.index(worst[0]) < text.index(worst[-1]), "bars are not sorted worst first"
    assert "skd-cache stats of r152" in text, "the figure title does not name the cache"


def test_info_on_an_unfinished_cache_names_what_is_missing(tmp_path):
    made = handmade_cache(tmp_path / "cache", unwritten={1: [2, 3, 4], VAL: [0]})
    runner = CliRunner()
    result = runner.invoke(cli, ["info", str(made.path)])
    assert result.exit_code == 0, f"exit {result.exit_code}: {result.stderr}"
    for expected in ("UNFINISHED", "1 of 2 complete", "view 1: shards 2-4 missing", "shards 0 missing"):
        assert expected in result.stdout, f"info lacks {expected!r}:\n{result.stdout}"
    doc = json.loads(runner.invoke(cli, ["info", str(made.path), "--json"]).stdout)
    assert doc["views"]["missing_shards"] == {"1": [2, 3, 4]} and doc["complete"] is False, (
        f"info --json: {doc['views']}"
    )
    written = 2 * N + NUM_VAL - (N - 2 * 64) - 64  # view 1 lacks rows 128-299, val its first 64 rows
    assert doc["rows_written"] == written, f"rows written {doc['rows_written']}, expected {written}"
    stats = runner.invoke(cli, ["stats", str(made.path), "--views", "1"])
    assert stats.exit_code == 2 and stats.stderr.count("\n") == 1 and "views 1" in stats.stderr, (
        f"stats on an unfinished view: exit {stats.exit_code}, {stats.stderr!r}"
    )


def test_bytes_per_row_count_complete_shards_only(tmp_path):
    """A build killed mid-shard leaves that shard's data without its mark (and zarr's temporary files):
    neither may inflate the bytes per row that `info` reports for the rows written."""
    finished = open_store(handmade_cache(tmp_path / "finished", "int8").path).storage()
    made = handmade_cache(tmp_path / "cache", "int8")
    store = open_store(made.path, mode="r+")
    store.group["views/complete"][1, 2] = 0  # its data stays on disk, unmarked
    (made.path / "views" / "logits" / "c" / "1" / "2" / "0.0123abcd.partial").write_bytes(b"x" * 50_000)
    unfinished = open_store(made.path).storage()
    assert unfinished["rows_written"] == finished["rows_written"] - 64, f"rows written {unfinished['rows_written']}"
    assert abs(unfinished["bytes_per_row"] - finished["bytes_per_row"]) < 0.05 * finished["bytes_per_row"], (
        f"{unfinished['bytes_per_row']:.1f} B per row unfinished vs {finished['bytes_per_row']:.1f} finished"
    )


@pytest.mark.parametrize(
    "args, says",
    [
        (["stats", "{missing}"], "does not exist"),
        (["info", "{missing}"], "does not exist"),
        (["stats", "{cache}", "--views", "0,7"], "not 7"),
        (["stats", "{cache}", "--plot", "{missing}.xyz"], "name a .png"),
    ],
)
def test_user_errors_are_one_line(fp32, tmp_path, args, says):
    args = [a.format(missing=tmp_path / "nothing", cache=fp32.path) for a in args]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2 and result.stderr.count("\n") == 1 and says in result.stderr, (
        f"{args}: exit {result.exit_code}, stderr {result.stderr!r}"
    )
    assert result.stderr.startswith("error: "), f"{args}: {result.stderr!r}"
