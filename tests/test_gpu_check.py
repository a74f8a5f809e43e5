"""benchmarks/gpu_check.sh: its wheel list covers what skd needs, and its CPU rehearsal runs in a fresh environment
that holds only torch (and what torch needs) plus the wheels, as the GPU machine does."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from fresh_env import REPO, carried_list, needed, torch_only_base, uncovered, wheels_of


def test_the_wheel_list_holds_everything_install_requires_needs():
    pins = carried_list()
    assert uncovered(pins) == [], (
        f"benchmarks/gpu_check_wheels.txt lacks or mis-pins {uncovered(pins)}: the GPU check would die at import"
    )
    extra = sorted(set(pins) - set(needed()))
    assert extra == [], f"gpu_check_wheels.txt carries {extra}, which skd does not need"


def test_a_dependency_left_out_of_the_list_is_named():
    pins = carried_list()
    without = {name: version for name, version in pins.items() if name not in ("pydantic-core", "zarrs")}
    assert uncovered(without) == ["pydantic-core (missing)", "zarrs (missing)"], uncovered(without)
    moved = {**pins, "numpy": "1.0"}
    assert uncovered(moved) == ["numpy (pinned 1.0, setup.cfg asks <3,>=1.26)"], uncovered(moved)


def test_the_cpu_rehearsal_runs_on_torch_and_the_carried_wheels_alone(tmp_path):
    """About 45 s on 2 cores: a torch-only base (links), the wheels packed from this environment, the script."""
    base = torch_only_base(tmp_path / "base")
    bare = subprocess.run([base, "-c", "import pydantic"], capture_output=True, text=True)
    assert bare.returncode != 0, "the base must not hold pydantic, or the rehearsal proves nothing"
    wheels = wheels_of(carried_list(), tmp_path / "wheels")
    pinned = tmp_path / "requirements.txt"  # the list's packages at the versions installed (and packed) here
    pinned.write_text("".join(f"{name}=={version}\n" for name, version in needed().items()))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "OUT")}
    started = time.perf_counter()
    run = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--python", str(base), "--wheels", str(wheels[0].parent)]
        + ["--requirements", str(pinned), "--work", str(tmp_path / "work"), "--cpu-test"],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,  # the script must not import the checkout's skd/ even from here
        timeout=240,
    )
    seconds = time.perf_counter() - started
    out = run.stdout + run.stderr
    assert run.returncode == 0, (
        f"gpu_check.sh --cpu-test failed ({run.returncode}) after {seconds:.0f} s:\n{out[-3000:]}"
    )
    venv = tmp_path / "work" / "venv"
    ok = next(line for line in out.splitlines() if line.startswith("python ok"))
    assert f"from {venv}" in ok, f"skd was not imported from the script's venv: {ok}"
    assert "not run: DALI" in out, "the check must say it could not run DALI"
    assert "| student, online SKD (teacher in the loop) |" in out, out[-2000:]
    assert "| two processes under torchrun (whole command) |" in out, "the torchrun build did not run:\n" + out[-2000:]
    assert "FAILED" not in out, out[-2000:]
    print(f"gpu_check.sh --cpu-test: {seconds:.0f} s with {len(wheels)} wheels on {sys.platform}")
