#!/usr/bin/env bash
# Run one benchmark script of two commits side by side: each tree exported with `git archive`, run with the
# project's venv and PYTHONPATH at the export, as alternating processes old new new old (repeated), so each
# adjacent pair shares the machine's state (each round: old new new old, two pairs). Logs land in
# OUT/<n>-<old|new>.log; compare the figures of each adjacent pair.
#
# Usage: benchmarks/before_after.sh OLD NEW OUT ROUNDS SCRIPT [ARGS...]
#   e.g. benchmarks/before_after.sh ec9917e HEAD /tmp/ba 4 benchmarks/train_overhead.py --rounds 2
set -euo pipefail
old=$1 new=$2 out=$3 rounds=$4 script=$5
shift 5
repo=$(git rev-parse --show-toplevel)
python=${PYTHON:-$repo/.venv/bin/python}
mkdir -p "$out"
for side in old new; do
    rev=${!side}
    rm -rf "$out/$side" && mkdir -p "$out/$side"
    git -C "$repo" archive "$rev" | tar -x -C "$out/$side"
    # skd.pipelines is the top-level pipelines/ folder, mapped by installation only
    ln -s ../pipelines "$out/$side/skd/pipelines"
    echo "$side: $(git -C "$repo" rev-parse --short "$rev")" | tee -a "$out/trees.txt"
done
n=0
for ((i = 0; i < rounds; i++)); do
    for side in old new new old; do
        n=$((n + 1))
        (cd "$out/$side" && PYTHONPATH="$out/$side" "$python" "$script" "$@") >"$out/$n-$side.log" 2>&1
        echo "$n $side done (load $(cut -d' ' -f1 /proc/loadavg))"
    done
done
