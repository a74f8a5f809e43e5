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
#   --python PY   interpreter that has torch and torchvision (default: python3)
#   --venv DIR    virtual environment to create on top of it (--system-site-packages, so torch comes along);
#                 default WORK/venv. --no-venv installs into PY's own environment instead.
#   --wheels DIR  wheels of the missing packages (default: benchmarks/wheels), installed with --no-index
#   --work DIR    scratch folder (default: a new temporary folder); results also go to $OUT when it is set
#   --cpu-test    tiny sizes on the CPU, to test this script where there is no GPU (not a measurement)
#
# The wheels (zarr, zarrs, numcodecs, obstore, pydantic and what it needs, filelock, donfig, google-crc32c,
# typing-extensions, packaging, pyyaml, click, tqdm, numpy, and setuptools + wheel to install skd itself), on a machine with network, for Python 3.12 on
# x86-64 Linux; pinned to the versions skd is tested with:
#   pip download --python-version 3.12 --only-binary=:all: --platform manylinux2014_x86_64 \
#       --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 -d benchmarks/wheels \
#       zarr==3.1.6 zarrs==0.2.3 numcodecs==0.16.6 obstore==0.12.1 pydantic filelock==4.3.2 click tqdm \
#       setuptools wheel
# (about 27 MB; without the pins pip picks zarr 3.4, which skd's reader also handles).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY=python3
VENV=""
USE_VENV=1
WHEELS="$REPO/benchmarks/wheels"
WORK=""
EXTRA=()
CPU_TEST=0
while [ $# -gt 0 ]; do
    case "$1" in
        --python) PY="$2"; shift 2 ;;
        --venv) VENV="$2"; shift 2 ;;
        --no-venv) USE_VENV=0; shift ;;
        --wheels) WHEELS="$2"; shift 2 ;;
        --work) WORK="$2"; shift 2 ;;
        --cpu-test) CPU_TEST=1; shift ;;
        --) shift; EXTRA=("$@"); break ;;
        -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
        *) echo "gpu_check.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done
STARTED=$SECONDS
WORK="${WORK:-$(mktemp -d /tmp/skd-gpu-check.XXXXXX)}"
mkdir -p "$WORK"
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

# Packages skd needs that the interpreter lacks: install them from the wheels folder, offline.
MISSING=$("$PY" - <<'PYEOF'
import importlib.util
need = {"zarr": "zarr", "zarrs": "zarrs", "numcodecs": "numcodecs", "click": "click", "tqdm": "tqdm", "PIL": "pillow",
        "numpy": "numpy", "obstore": "obstore", "pydantic": "pydantic", "filelock": "filelock"}
print(" ".join(pkg for mod, pkg in need.items() if importlib.util.find_spec(mod) is None))
PYEOF
)
if [ -n "$MISSING" ]; then
    if [ ! -d "$WHEELS" ]; then
        echo "gpu_check.sh: missing Python packages ($MISSING) and no wheels folder $WHEELS: see the pip download" \
             "command at the top of this script" >&2
        exit 1
    fi
    log "installing $MISSING from $WHEELS (offline)"
    "$PY" -m pip install -q --no-index --find-links "$WHEELS" $MISSING
fi

# skd itself, without its dependencies (no DALI here); the source tree on PYTHONPATH if pip cannot build it.
if "$PY" -m pip install -q --no-index --find-links "$WHEELS" --no-deps -e "$REPO" 2>"$WORK/pip-skd.log" \
    || "$PY" -m pip install -q --no-index --no-build-isolation --no-deps -e "$REPO" 2>>"$WORK/pip-skd.log"; then
    log "skd installed (pip install --no-deps -e .)"
else
    log "pip could not install skd offline (see $WORK/pip-skd.log): using the source tree on PYTHONPATH"
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
"$PY" - <<'PYEOF'
import torch, torchvision, zarr, numcodecs, skd
cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
print(f"python ok: torch {torch.__version__} ({cuda}), torchvision {torchvision.__version__}, zarr {zarr.__version__}, "
      f"numcodecs {numcodecs.__version__}, skd {skd.__version__}")
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
