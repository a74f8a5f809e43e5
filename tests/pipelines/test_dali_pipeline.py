"""DALI's decode modes (--dali-decode roi|full|cpu): the same windows whichever decodes them, and the child-process
smoke test that stands between a crashing GPU ROI decoder and the run. A CPU-only run decodes on the CPU in every
mode: `roi` is decoders.image_slice, `full` decoders.image then slice, the graphs a GPU runs with device "mixed"."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import photo_like, write_jpeg

from skd.pipelines import DaliOptions, make_loader
from skd.pipelines.dali_smoke import TOLERANCE, _problem, smoke_images


def views(files, boxes, decode, *, batch_size=4, flips=None):
    n = len(files)
    loader = make_loader(
        "dali",
        files=[str(f) for f in files],
        boxes=boxes,
        flips=np.zeros(n, np.uint8) if flips is None else flips,
        labels=np.zeros(n),
        positions=np.arange(n),
        image_size=40,
        batch_size=batch_size,
        workers=1,
        dali=DaliOptions(decode=decode),
    )
    return torch.cat([b.images for b in loader])


@pytest.mark.parametrize("decode", ["full", "cpu"])
def test_every_decode_mode_cuts_the_windows_roi_cuts(decode, tmp_path):
    files, boxes = smoke_images(tmp_path, 12)  # EXIF orientations 1, 3, 6, 8; windows on the bottom-right edge
    flips = np.arange(12) % 2
    roi = views(files, boxes, "roi", flips=flips)
    other = views(files, boxes, decode, batch_size=5, flips=flips)
    apart = (roi - other).abs().amax().item() * 255 * 0.229
    # measured on DALI 2.4's CPU decoder: bit-identical (libjpeg-turbo decodes the same pixels for a window)
    assert torch.equal(roi, other), f"--dali-decode {decode} vs roi: {apart:.3f} grey levels apart at most"


@pytest.mark.parametrize("decode", ["roi", "full", "cpu"])
def test_a_window_outside_the_frame_is_refused_in_every_mode(decode, tmp_path):
    path = write_jpeg(tmp_path / "small.jpg", photo_like(40, 60, seed=1))
    with pytest.raises((OSError, ValueError), match="small.jpg"):
        views([path], [(30, 0, 20, 20)], decode)


def test_a_bad_decode_option_is_one_line_naming_it():
    with pytest.raises(ValueError, match=r"^--dali-decode 'gpu': choose one of roi, full, cpu$"):
        DaliOptions(decode="gpu")
    with pytest.raises(ValueError, match=r"^--hw-decoder-load 1.5: give a share between 0 and 1$"):
        DaliOptions(hw_decoder_load=1.5)


def test_the_smoke_test_child_compares_two_decoders_and_judges_them():
    """The child the GPU path runs before its first ROI batch, here on the CPU (roi vs full)."""
    command = [sys.executable, "-m", "skd.pipelines.dali_smoke", "--decode", "roi", "--reference", "full"]
    run = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads(run.stdout.splitlines()[-1])
    assert report["images"] == 8 and max(report["max"]) == 0, f"roi vs full on the CPU: {report}"
    assert _problem(run) is None, _problem(run)
    crashed = subprocess.CompletedProcess(command, -11, "", "")
    assert _problem(crashed) == "the decoding process was killed by signal 11", f"exit -11: {_problem(crashed)!r}"
    off = subprocess.CompletedProcess(command, 0, json.dumps({"mean": [0.1, TOLERANCE + 1]}) + "\n", "")
    assert _problem(off) == f"windows {TOLERANCE + 1:.1f} grey levels off the CPU decoder's", (
        f"a mean {TOLERANCE + 1} off: {_problem(off)!r}"
    )


def test_the_commands_options_reach_every_loader_of_the_process():
    import click
    from click.testing import CliRunner

    from skd.cli.machine import machine_options
    from skd.models import runtime
    from skd.pipelines import dali_options, set_dali_options

    @click.command()
    @machine_options
    def command():
        click.echo(f"{dali_options()} {runtime._dist_timeout}")

    try:
        result = CliRunner().invoke(command, ["--dali-decode", "full", "--hw-decoder-load", "0", "--dist-timeout", "5"])
        assert result.output.strip() == "DaliOptions(decode='full', hw_decoder_load=0.0) 5.0", result.output
    finally:
        set_dali_options(DaliOptions())
        runtime.set_dist_timeout(runtime.DIST_TIMEOUT_MINUTES)


def test_one_pipeline_serves_every_view_of_a_configuration(tmp_path):
    """A build's views and a training run's epochs reuse the pipeline their configuration built first; views of
    other lengths (a short last batch, a single batch) come out as the first view cut them."""
    from skd.pipelines import dali_pipeline

    files, boxes = smoke_images(tmp_path, 10)
    n = len(files)

    def loader(order):
        return make_loader(
            "dali",
            files=[files[i] for i in order],
            boxes=boxes[order],
            flips=np.zeros(len(order), np.uint8),
            labels=np.zeros(len(order)),
            positions=np.asarray(order),
            image_size=36,  # a configuration no other test uses, so this one builds its pipeline
            batch_size=4,
            workers=1,
        )

    before = dali_pipeline.built["pipelines"]
    first = torch.cat([b.images for b in loader(list(range(n)))])
    orders = [list(range(n - 1, 2, -1)), [3, 1, 4, 2], [5], list(range(n))]
    for order in orders:
        images = torch.cat([b.images for b in loader(order)])
        assert torch.equal(images, first[order]), f"a reused pipeline cut view {order} differently"
    built = dali_pipeline.built["pipelines"] - before
    assert built == 1, f"{len(orders) + 1} views of one configuration built {built} pipelines"
    partly = iter(loader(list(range(n))))
    next(partly)
    partly.close()  # left part way: that pipeline is dropped, the next view builds one
    again = torch.cat([b.images for b in loader(list(range(n)))])
    assert torch.equal(again, first), "the view after an abandoned one differs"
    assert dali_pipeline.built["pipelines"] - before == 2, "an abandoned pipeline was reused or none was built"
