"""A cache written by an earlier skd still opens and means the same: tests/store/data/format3 was written by
git ec9917e (format 3, flat modules, before the packages) with tests/store/data/build_format3.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import zarr
from conftest import small_build_config

from skd.build.teacher_pass import build_cache
from skd.inspect.info import describe
from skd.store.cache_store import open_store

FORMAT3 = Path(__file__).parent / "data" / "format3"
OPTIONS = dict(codec="int8", mixup=0.2, aa="rand-m9-n2", reprob=0.25)
PLAN_ARRAYS = [
    "samples/path",
    "samples/label",
    "samples/size",
    "views/order",
    "views/box",
    "views/flip",
    "views/mix_lambda",
    "views/mix_box",
    "views/aug_op",
    "views/aug_magnitude",
    "views/erase_box",
    "views/erase_value",
]


def test_a_format_3_cache_of_an_earlier_skd_opens_and_equals_a_fresh_build(image_root, teacher_file, tmp_path):
    """Today's code opens the earlier cache through every check of the store, and a fresh build with the same
    options on the same images holds the same samples, plan arrays and plan id, and logits within a step of
    int8 (the teacher's float32 logits may differ in their last bits between machines)."""
    old = open_store(FORMAT3)
    assert old.meta["format"] == 3 and old.is_complete(), f"format {old.meta['format']}, complete {old.is_complete()}"
    views = describe(old)["views"]
    assert views["complete"] == views["total"] == 2, f"info of the earlier cache: views {views}"
    build_cache(small_build_config(image_root, tmp_path / "new", teacher_file, **OPTIONS))
    new = open_store(tmp_path / "new")
    assert new.meta["plan"]["id"] == old.meta["plan"]["id"], "the plan id of the same options and images changed"
    before, after = zarr.open_group(FORMAT3, mode="r"), zarr.open_group(tmp_path / "new", mode="r")
    differ = [name for name in PLAN_ARRAYS if not np.array_equal(before[name][...], after[name][...])]
    assert not differ, f"plan arrays that differ from the earlier skd's: {differ}"
    for view in range(2):
        old_rows, new_rows = old.read_logits(view, 0, old.num_samples), new.read_logits(view, 0, new.num_samples)
        step = (old_rows.max(1) - old_rows.min(1)) / 255
        worst = float((np.abs(old_rows - new_rows) / step[:, None]).max())
        assert worst <= 1.0, f"view {view}: logits differ by {worst:.2f} int8 steps from the earlier skd's"
