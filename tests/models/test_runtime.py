"""The process group under torchrun: its collective timeout is the --dist-timeout asked for (torch's default, 10
minutes for NCCL, is shorter than rank 0 indexing ImageNet while the other ranks wait in a broadcast)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from skd.errors import DeviceError
from skd.models.runtime import DIST_TIMEOUT_MINUTES, set_dist_timeout

RANK = """
import sys, torch, torch.distributed as dist
from skd.models.runtime import init_distributed, set_dist_timeout, shutdown
if sys.argv[1] != "default":
    set_dist_timeout(float(sys.argv[1]))
d = init_distributed("cpu")
group = dist.distributed_c10d._get_default_group()._get_backend(torch.device("cpu"))
minutes = group.options._timeout.total_seconds() / 60
with open(f"{sys.argv[2]}/rank{d.rank}.txt", "w") as out:  # a file each: the ranks' stdout lines interleave
    out.write(f"rank {d.rank} of {d.world}: timeout {minutes:g} minutes")
shutdown(d)
"""


@pytest.mark.parametrize("minutes", ["default", "90"])
def test_every_rank_joins_with_the_timeout_asked_for(minutes, tmp_path):
    script = tmp_path / "rank.py"
    script.write_text(RANK)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    run = subprocess.run(
        [*torchrun, script, minutes, tmp_path],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    expected = DIST_TIMEOUT_MINUTES if minutes == "default" else float(minutes)
    lines = [(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)]
    assert lines == [f"rank {r} of 2: timeout {expected:g} minutes" for r in (0, 1)], lines
    assert expected >= 60, f"the default timeout {expected} minutes is shorter than indexing ImageNet on rank 0"


def test_a_timeout_that_is_not_positive_is_refused_in_one_line():
    with pytest.raises(DeviceError, match=r"^--dist-timeout 0: give a positive number of minutes$"):
        set_dist_timeout(0)
