#!/usr/bin/env bash
# The analysis paper's study on CPU: both grids, then their runs' small files and reports
# (report.md and claims.md with their figures) into docs/results. About 1.5 hours on 2 cores.
#   scripts/study.sh [WORK_DIR]     (default runs/study; checkpoints stay there)
set -euo pipefail
work=${1:-runs/study}
largebatch_cmd=${LARGEBATCH:-largebatch}
for name in fashion-mnist digits; do
    "$largebatch_cmd" compare --config "configs/cpu-study-$name.yaml" --out "$work/$name"
    LARGEBATCH=$largebatch_cmd scripts/keep-study.sh "$work/$name" "docs/results/study-$name"
done
