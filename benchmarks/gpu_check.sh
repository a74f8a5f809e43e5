#!/usr/bin/env bash
# The GPU check: one script for a GPU machine with PyTorch, without DALI and without network (< 8 minutes).
#
# It generates a few thousand JPEGs, builds a cache with resnet50 (--weights none: speed only) under bf16
# AMP with --loader torchvision, trains resnet18 from it for a few hundred steps with --kd skd and with
# --kd none, and online SKD with the teacher in the loop, then prints one table: teacher images/s through
# the pipeline vs on synthetic in-memory tensors, student images/s cached SKD vs hard labels vs online SKD.
# The measurements are benchmarks/gpu_check.py; this script prepares the Python environment.
#
# Usage: bash benchmarks/gpu_check.sh [--python PY] [--venv DIR | --no-venv] [--wheels DIR] [--work DIR]
#                                    [--cpu-test] [-- ARGS for gpu_check.py, e.g. --images 8192 --steps 400]
#        bash benchmarks/gpu_check.sh --download   (where there is network: fetch the wheels, then stop)
#   --python PY   interpreter that has torch and torchvision (default: python3)
#   --venv DIR    virtual environment to create on top of it (--system-site-packages, so torch comes along);
#                 default WORK/venv. --no-venv installs into PY's own environment instead.
#   --wheels DIR  wheels of benchmarks/gpu_check_wheels.txt (default: benchmarks/wheels), installed offline
#   --requirements FILE  another list of the same packages (the test suite's rehearsal pins what it has)
#   --work DIR    scratch folder (default: a new temporary folder); results also go to $OUT when it is set
#   --cpu-test    tiny sizes on the CPU, to test this script where there is no GPU (not a measurement)
#   --download    pip download the wheels of gpu_check_wheels.txt for Python 3.12 on x86-64 Linux into
#                 --wheels (48 MB), for a device machine that has no network: carry that folder
#
# Everything skd imports beyond torch and torchvision comes from the wheels (gpu_check_wheels.txt, pinned; the
# test suite checks it against setup.cfg's install_requires), then skd itself is installed from this checkout
# (pip install --no-deps: skd.pipelines is the top-level pipelines/ folder, mapped only by installation).
# DALI is not installed (its wheel is 424 MB): the check measures --loader torchvision and says so.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LIST="$REPO/benchmarks/gpu_check_wheels.txt"
PY=python3
VENV=""
USE_VENV=1
WHEELS="$REPO/benchmarks/wheels"
WORK=""
EXTRA=()
CPU_TEST=0
DOWNLOAD=0
while [ $# -gt 0 ]; do
    case "$1" in
        --python) PY="$2"; shift 2 ;;
        --venv) VENV="$2"; shift 2 ;;
        --no-venv) USE_VENV=0; shift ;;
        --wheels) WHEELS="$2"; shift 2 ;;
        --requirements) LIST="$(cd "$(dirname "$2")" && pwd)/$(basename "$2")"; shift 2 ;;
        --work) WORK="$2"; shift 2 ;;
        --cpu-test) CPU_TEST=1; shift ;;
        --download) DOWNLOAD=1; shift ;;
        --) shift; EXTRA=("$@"); break ;;
        -h|--help) sed -n '2,26p' "$0"; exit 0 ;;
        *) echo "gpu_check.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done

if [ "$DOWNLOAD" = 1 ]; then
    PLATFORMS=()
    for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
        PLATFORMS+=(--platform "$p")
    done
    "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${PLATFORMS[@]}" \
        -d "$WHEELS" -r "$LIST"
    exit 0
fi

STARTED=$SECONDS
WORK="${WORK:-$(mktemp -d /tmp/skd-gpu-check.XXXXXX)}"
mkdir -p "$WORK"
WORK="$(cd "$WORK" && pwd)"
cd "$WORK"  # never the checkout: python - and -c would import its skd/ instead of the installed one
log() { echo "[gpu_check $((SECONDS - STARTED)) s] $*"; }

if ! "$PY" -c "import torch, torchvision" 2>/dev/null; then
    echo "gpu_check.sh: $PY cannot import torch and torchvision; pass --python PY of an environment that has them" >&2
    exit 1
fi

if [ "$USE_VENV" = 1 ]; then
    VENV="${VENV:-$WORK/venv}"
    if [ ! -x "$VENV/bin/python" ]; then
        log "creating $VENV on top of $PY"
        # --without-pip: the base may lack ensurepip (uv-made or python3-venv not installed); the base's
        # pip runs inside this venv through the .pth below and installs into it
        "$PY" -m venv --system-site-packages --without-pip "$VENV"
        # PY may itself be a venv or conda env: its packages (torch) come along through a .pth file
        SITE=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
        "$PY" -c "import site; print('\n'.join(site.getsitepackages()))" > "$SITE/_gpu_check_base.pth"
    fi
    PY="$VENV/bin/python"
fi

if [ ! -d "$WHEELS" ]; then
    echo "gpu_check.sh: no wheels folder $WHEELS: run bash benchmarks/gpu_check.sh --download where there is" \
         "network, and carry benchmarks/wheels" >&2
    exit 1
fi
log "installing $(grep -c '^[a-z]' "$LIST") packages of $LIST from $WHEELS (offline)"
# what the base already has at the pinned version stays; anything missing from the wheels stops here, by name
"$PY" -m pip install -q --no-index --find-links "$WHEELS" -r "$LIST"
# skd itself, without its dependencies (no DALI, and torch is the machine's own); not editable: the venv
# holds a snapshot of this checkout
"$PY" -m pip install -q --no-index --no-build-isolation --no-deps "$REPO" 2>"$WORK/pip-skd.log" || {
    echo "gpu_check.sh: pip could not install skd from $REPO offline (setuptools missing?); see $WORK/pip-skd.log" >&2
    tail -5 "$WORK/pip-skd.log" >&2
    exit 1
}
log "skd installed (pip install --no-deps $REPO)"
# import every module skd ships, so a missing dependency stops here rather than halfway through a measurement
"$PY" - <<'PYEOF'
import importlib, pkgutil
import numcodecs, torch, torchvision, zarr
import skd
skipped = {"skd.pipelines.dali_pipeline", "skd.demo.__main__"}  # DALI; running the demo
names = [m.name for m in pkgutil.walk_packages(skd.__path__, "skd.") if m.name not in skipped]
for name in names:
    importlib.import_module(name)
cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
print(f"python ok: torch {torch.__version__} ({cuda}), torchvision {torchvision.__version__}, zarr {zarr.__version__}, "
      f"numcodecs {numcodecs.__version__}, skd {skd.__version__} from {skd.__path__[0]} ({len(names)} modules imported)")
try:
    import nvidia.dali
    print(f"DALI {nvidia.dali.__version__} is importable, but this check measures --loader torchvision")
except ImportError:
    print("not run: DALI (not installed: its wheel is 424 MB, over what a device call carries); the loader is torchvision")
PYEOF

ARGS=(--work "$WORK" --json "$WORK/gpu_check.json")
if [ "$CPU_TEST" = 1 ]; then
    ARGS+=(--device cpu --amp none --images 96 --jpeg-size 64 --size 32 --views 1 --teacher-batch 32 --batch 16
           --steps 12 --warmup 1 --workers 1)
fi
log "measuring (work folder $WORK)"
# 8 minutes in all: what is left after the set-up, less a margin to print
LEFT=$((470 - (SECONDS - STARTED)))
[ "$LEFT" -ge 60 ] || LEFT=60  # never 0: timeout 0 would mean no limit at all
set +e  # a failed or timed-out measurement must still hand back what it printed
timeout "$LEFT" "$PY" "$REPO/benchmarks/gpu_check.py" "${ARGS[@]}" "${EXTRA[@]}" 2>&1 | tee "$WORK/gpu_check.txt"
STATUS=${PIPESTATUS[0]}
set -e
if [ -n "${OUT:-}" ]; then
    cp "$WORK/gpu_check.txt" "$WORK/gpu_check.json" "$OUT/" 2>/dev/null || true
fi
log "finished with status $STATUS; table in $WORK/gpu_check.txt"
exit "$STATUS"
