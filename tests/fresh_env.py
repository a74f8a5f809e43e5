"""A device-like Python environment built from this one: torch alone in the base, everything else from wheels.

The GPU machine has Python with torch and torchvision (and what they need) and no network; benchmarks/gpu_check.sh
installs the rest from carried wheels. `torch_only_base` makes such a base here (a venv whose site-packages links
to the installed torch, torchvision, pip and setuptools distributions and what they require, and nothing else);
`wheels_of` packs installed distributions back into wheel files, so the script's offline install runs on the very
versions the suite runs with. No pytest here, so a benchmark can use it too.
"""

from __future__ import annotations

import configparser
import importlib.metadata as md
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
NOT_CARRIED = {"torch", "torchvision", "nvidia-dali-cuda120"}  # the machine's own, or too large to carry


def install_requires() -> list[Requirement]:
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    return [Requirement(line) for line in cfg["options"]["install_requires"].splitlines() if line.strip()]


def closure(names) -> dict[str, str]:
    """{name: installed version} of `names` and everything they require here (no extras), transitively."""
    seen: dict[str, str] = {}
    todo = [canonicalize_name(n) for n in names]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        dist = md.distribution(name)
        seen[name] = dist.version
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(canonicalize_name(req.name))
    return seen


def carried_list(path: Path = REPO / "benchmarks" / "gpu_check_wheels.txt") -> dict[str, str]:
    """{name: pinned version} of the script's wheel list."""
    pins = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version.strip()
    return pins


def needed() -> dict[str, str]:
    """What skd needs beyond torch, torchvision and DALI: {name: version installed here}."""
    return closure(r.name for r in install_requires() if canonicalize_name(r.name) not in NOT_CARRIED)


def _top_levels(dist) -> set[str]:
    return {Path(f).parts[0] for f in dist.files or [] if not str(f).startswith("..")}


def torch_only_base(folder: Path) -> Path:
    """A venv at `folder` holding (as links) only torch, torchvision, pip, setuptools and what they require;
    returns its python. A folder shared with other distributions (nvidia/, home of DALI too) is made
    anew with links to only these distributions' entries in it."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True)
    python = folder / "bin" / "python"
    site = Path(
        subprocess.run(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    here = Path(sysconfig.get_paths()["purelib"])
    keep = closure(["torch", "torchvision", "pip", "setuptools"])
    owners: dict[str, set[str]] = {}
    for dist in md.distributions():
        for top in _top_levels(dist):
            owners.setdefault(top, set()).add(canonicalize_name(dist.metadata["Name"]))
    for name in keep:
        dist = md.distribution(name)
        for top in _top_levels(dist):
            if owners[top] <= set(keep):
                link = site / top
                if not link.exists():
                    link.symlink_to(here / top)
                continue
            (site / top).mkdir(exist_ok=True)
            for f in dist.files or []:
                parts = Path(f).parts
                if parts[0] == top and len(parts) > 2 and not (site / top / parts[1]).exists():
                    (site / top / parts[1]).symlink_to(here / top / parts[1])
    return python


def wheels_of(names, folder: Path) -> list[Path]:
    """Each installed distribution of `names` packed back into a wheel in `folder` (its installed files and
    metadata, tagged as it was installed; scripts outside site-packages left out)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for name in names:
        dist = md.distribution(name)
        files = [f for f in dist.files or [] if not str(f).startswith("..") and "__pycache__" not in str(f)]
        info = next(Path(f).parts[0] for f in files if Path(f).parts[0].endswith(".dist-info"))
        tag = next(line.split(": ")[1] for line in dist.read_text("WHEEL").splitlines() if line.startswith("Tag: "))
        wheel = folder / f"{info.removesuffix('.dist-info')}-{tag}.whl"
        with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as z:
            for f in files:
                if Path(f).name != "RECORD":
                    z.write(dist.locate_file(f), str(f))
            z.writestr(f"{info}/RECORD", "".join(f"{f},,\n" for f in [*files, f"{info}/RECORD"]))
        out.append(wheel)
    return out


def uncovered(pins: dict[str, str]) -> list[str]:
    """What skd needs beyond torch, torchvision and DALI that `pins` leaves out, or pins outside the range
    setup.cfg's install_requires gives it, one 'name (why)' each."""
    asked = {canonicalize_name(r.name): r.specifier for r in install_requires()}
    out = []
    for name in sorted(needed()):
        if name not in pins:
            out.append(f"{name} (missing)")
        elif name in asked and pins[name] not in asked[name]:
            out.append(f"{name} (pinned {pins[name]}, setup.cfg asks {asked[name]})")
    return out
