"""A tampered cache is refused on open by every command: one `error:` line naming the cache and the field or
file, exit status 2, no traceback, no large allocation, no hang (a FIFO), and never a `verify` that says ok."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
import traceback
import tracemalloc
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import zarr
from conftest import small_build_config, train_args

from skd.build.teacher_pass import build_cache
from skd.store.schema import samples_sha256

PEAK_LIMIT = 64 * 2**20  # bytes of Python and numpy allocation a refused open may take


def _edit_attrs(path: Path, edit) -> None:
    group = zarr.open_group(str(path), mode="r+")
    meta = dict(group.attrs["skd"])
    edit(meta)
    group.attrs["skd"] = meta


def _set(*keys, value):
    """An attribute edit setting skd.<keys...> to `value`."""

    def edit(meta):
        node = meta
        for key in keys[:-1]:
            node[key] = dict(node[key])
            node = node[key]
        node[keys[-1]] = value

    return lambda path: _edit_attrs(path, edit)


def _drop(key: str):
    return lambda path: _edit_attrs(path, lambda meta: meta.pop(key))


def _edit_json(name: str, edit):
    """An edit of the zarr.json of array `name` (what zarr 3 reads for its shape and data type)."""

    def tamper(path: Path) -> None:
        file = path / name / "zarr.json"
        doc = json.loads(file.read_text())
        edit(doc)
        file.write_text(json.dumps(doc))

    return tamper


def _logits_classes(doc) -> None:
    doc["shape"][-1] = 10**10


def _label_float(doc) -> None:
    doc["data_type"] = "float32"
    doc["fill_value"] = 0.0


SHARD = "views/logits/c/0/0/0"  # shard 0 of view 0 (sharded arrays: one file per shard)


def _fifo(path: Path) -> None:
    (path / SHARD).unlink()
    os.mkfifo(path / SHARD)


def _symlink(path: Path) -> None:
    (path / SHARD).unlink()
    (path / SHARD).symlink_to("/etc/passwd")


def _metadata_fifo(path: Path) -> None:
    (path / "views/logits/zarr.json").unlink()
    os.mkfifo(path / "views/logits/zarr.json")


def _metadata_link_out(path: Path) -> None:
    """A link out of the cache, read before it is checked, could lead to /dev/zero and fill memory; here it
    leads to a FIFO beside the cache, which blocks instead (the watchdog below ends that)."""
    os.mkfifo(path.parent / "outside.fifo")
    (path / "views/logits/zarr.json").unlink()
    (path / "views/logits/zarr.json").symlink_to(path.parent / "outside.fifo")


def _huge_chunks(doc) -> None:
    doc["chunk_grid"]["configuration"]["chunk_shape"] = [10**12]


def _val_hidden(path: Path) -> None:
    """num_val 0 while val/ stays, with its logits' shape at 10^10 classes: val must not escape the checks."""
    _set("dataset", "num_val", value=0)(path)
    _edit_json("val/logits", _logits_classes)(path)


def _labels(value: int):
    """Sample 0's label set to `value` (samples_sha256 recomputed): labels must index skd.dataset.classes."""

    def tamper(path: Path) -> None:
        group = zarr.open_group(str(path), mode="r+")
        group["samples/label"][0:1] = np.array([value], np.int32)
        _rehash(group)

    return tamper


def _rehash(group) -> None:
    digest = samples_sha256(
        [str(p) for p in group["samples/path"][:]], group["samples/label"][:], group["samples/size"][:]
    )
    meta = dict(group.attrs["skd"])
    meta["dataset"] = {**meta["dataset"], "samples_sha256": digest}
    group.attrs["skd"] = meta


def _plan(name: str, value):
    """Position 0 of view 0 of plan array views/<name> set to `value` (no hash covers the plan arrays)."""

    def tamper(path: Path) -> None:
        zarr.open_group(str(path), mode="r+")[f"views/{name}"][0, 0:1] = np.array([value], np.int32)

    return tamper


def _swap_paths(path: Path) -> None:
    paths = zarr.open_group(str(path), mode="r+")["samples/path"]
    first, second = str(paths[0]), str(paths[1])
    paths[0:2] = np.array([second, first], dtype=object)


def _sample_path(new: str):
    """Sample 0's path set to `new`, with samples_sha256 recomputed: the path itself must be refused."""

    def tamper(path: Path) -> None:
        group = zarr.open_group(str(path), mode="r+")
        group["samples/path"][0:1] = np.array([new], dtype=object)
        _rehash(group)

    return tamper


# case: (tamper, what the error line must name besides the cache)
CASES = {
    "views-huge": (_set("views", value=10**9), "skd.views"),
    "views-text": (_set("views", value="abc"), "skd.views"),
    "views-negative": (_set("views", value=-1), "skd.views"),
    "shard-rows-zero": (_set("shard_rows", value=0), "skd.shard_rows"),
    "codec-bogus": (_set("codec", value="bogus"), "skd.codec"),
    "teacher-missing": (_drop("teacher"), "skd.teacher"),
    "classes-huge": (_set("teacher", "num_classes", value=10**10), "skd.teacher.num_classes"),
    "logits-shape-huge": (_edit_json("views/logits", _logits_classes), "views/logits"),
    "label-float": (_edit_json("samples/label", _label_float), "samples/label"),
    "shard-fifo": (_fifo, SHARD),
    "shard-symlink": (_symlink, SHARD),
    "paths-swapped": (_swap_paths, "samples arrays"),
    "path-parent": (_sample_path("../x.JPEG"), "'../x.JPEG'"),
    "path-absolute": (_sample_path("/etc/passwd"), "'/etc/passwd'"),
    # beyond the obvious: metadata files zarr reads whole, chunks it allocates whole, a split the attributes
    # hide, labels past the classes (the loss's IndexError, a CUDA assert)
    "metadata-fifo": (_metadata_fifo, "views/logits/zarr.json"),
    "metadata-link-out": (_metadata_link_out, "views/logits/zarr.json"),
    "label-chunks-huge": (_edit_json("samples/label", _huge_chunks), "samples/label"),
    "val-hidden": (_val_hidden, "skd.dataset.num_val"),
    "label-past-classes": (_labels(99), "label 99"),
    "label-negative": (_labels(-1), "label -1"),
    "classes-short": (_set("dataset", "classes", value=["a"]), "skd.dataset.classes"),
    "order-past-samples": (_plan("order", 10**9), "views/order"),
    "box-past-image": (_plan("box", [0, 0, 10**6, 10**6]), "views/box"),
}
# info reads no plan arrays; the plan's values are checked where a view is replayed (stats, verify, train)
NOT_READ_BY = {"order-past-samples": "info", "box-past-image": "info"}


COMMANDS = ("info", "stats", "verify", "train")


@pytest.fixture(scope="module")
def built(image_root, teacher_file, tmp_path_factory) -> Path:
    """One finished cache for the module; each test tampers its own copy. The commands' modules are imported
    here, so that their import is not counted in a command's traced memory."""
    import skd.inspect.info  # noqa: F401
    import skd.inspect.stats  # noqa: F401
    import skd.inspect.verify  # noqa: F401
    import skd.train.loop  # noqa: F401

    out = tmp_path_factory.mktemp("schema") / "cache"
    build_cache(small_build_config(image_root, out, teacher_file))
    return out


def tampered(built: Path, tmp_path: Path, case: str) -> Path:
    copy = tmp_path / f"cache-{case}"
    shutil.copytree(built, copy)
    CASES[case][0](copy)
    return copy


def command(name: str, cache: Path, image_root: Path, teacher_file: Path, tmp_path: Path) -> tuple[str, list]:
    """(tool, arguments) of one command on `cache`."""
    return {
        "info": ("cache", ["info", cache]),
        "stats": ("cache", ["stats", cache, "--views", "all"]),
        "verify": ("cache", ["verify", cache, "--data", image_root, "--weights", teacher_file]),
        "train": ("train", train_args(cache=cache, out=tmp_path / "run", steps_per_epoch=1, no_val=True)),
    }[name]


FIFO_PATIENCE = 3.0  # seconds a command may take before the FIFOs in its cache are opened for it


@contextmanager
def fifo_watchdog(cache: Path):
    """After FIFO_PATIENCE seconds, open every FIFO under `cache` for writing and close it (again every 0.2 s), so
    a command blocked on one reads an empty file and ends, instead of hanging the test run (and, stuck in a
    zarr thread, the interpreter's exit). Yields a list that holds True once it had to."""
    fifos = [Path(d) / f for d, _, files in os.walk(cache) for f in files if (Path(d) / f).is_fifo()]
    done, fired = threading.Event(), []

    def watch():
        if done.wait(FIFO_PATIENCE):
            return
        fired.append(True)
        while not done.wait(0.2):
            for fifo in fifos:
                try:
                    os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
                except OSError:  # ENXIO: no reader waits on it (yet)
                    pass

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield fired
    finally:
        done.set()
        thread.join()


def run_traced(in_process, tool: str, args: list, cache: Path) -> tuple[int, str, int]:
    """(exit status, stderr, peak bytes traced by tracemalloc) of one in-process command on `cache`; fails the
    test when the command blocked on a FIFO."""
    start = time.monotonic()
    with fifo_watchdog(cache) as blocked:
        tracemalloc.start()
        try:
            code, err = in_process(tool, *args)
        except Exception:  # what the command line would end with: a traceback and exit status 1
            code, err = 1, traceback.format_exc()
        finally:
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
    assert not blocked, (
        f"skd-{tool} {args[0]} blocked on a FIFO in {cache} for {time.monotonic() - start:.1f} s "
        f"(unblocked by the test); stderr:\n{err}"
    )
    return code, err, peak


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "case,name", [(case, name) for case in CASES for name in COMMANDS if NOT_READ_BY.get(case) != name]
)
def test_tampered_cache_is_refused_in_one_line(case, name, built, image_root, teacher_file, tmp_path, in_process):
    cache = tampered(built, tmp_path, case)
    code, err, peak = run_traced(in_process, *command(name, cache, image_root, teacher_file, tmp_path), cache)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert "Traceback" not in err, f"{name} on {case}: a traceback instead of one line:\n{err}"
    assert code == 2, f"{name} on {case}: exit status {code}, not 2 (refused); stderr:\n{err}"
    assert len(errors) == 1, f"{name} on {case}: {len(errors)} 'error:' lines, not 1:\n{err}"
    assert str(cache) in errors[0], f"{name} on {case}: the error does not name the cache {cache}: {errors[0]}"
    what = CASES[case][1]
    assert what in errors[0], f"{name} on {case}: the error does not name {what!r}: {errors[0]}"
    assert peak < PEAK_LIMIT, f"{name} on {case}: {peak / 2**20:.1f} MiB traced before refusing (limit 64 MiB)"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", CASES)
def test_verify_never_passes_a_cache_training_refuses(case, built, image_root, teacher_file, tmp_path, in_process):
    cache = tampered(built, tmp_path, case)
    trained, train_err, _ = run_traced(in_process, *command("train", cache, image_root, teacher_file, tmp_path), cache)
    verify = ["verify", cache, "--data", image_root, "--weights", teacher_file, "--integrity"]
    verified, verify_err, _ = run_traced(in_process, "cache", verify, cache)
    assert trained != 0, f"skd-train accepted the cache tampered by {case}:\n{train_err}"
    assert verified != 0, (
        f"skd-cache verify --integrity reported ok (exit 0) for the cache tampered by {case}, "
        f"which skd-train refuses:\n{train_err}\nverify's stderr:\n{verify_err}"
    )


def test_untampered_copy_opens(built, tmp_path, in_process):
    """The control: a plain copy of the cache is accepted, so the refusals above are the tampering's."""
    copy = tmp_path / "cache"
    shutil.copytree(built, copy)
    code, err = in_process("cache", "info", copy)
    assert code == 0, f"skd-cache info refused an untampered copy {copy} (exit {code}):\n{err}"


@pytest.mark.timeout(60)
def test_fifo_as_group_metadata_is_refused_without_blocking(built, tmp_path, in_process):
    copy = tmp_path / "cache"
    shutil.copytree(built, copy)
    (copy / "zarr.json").unlink()
    os.mkfifo(copy / "zarr.json")
    code, err, _ = run_traced(in_process, "cache", ["info", copy], copy)
    assert code == 2 and "zarr.json" in err, f"skd-cache info on a FIFO zarr.json: exit {code}, stderr:\n{err}"
