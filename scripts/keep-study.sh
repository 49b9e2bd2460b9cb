#!/usr/bin/env bash
# Keep a finished `largebatch compare` study as committed data, then rebuild its report:
#   scripts/keep-study.sh runs/cpu-fashion-mnist-c1 docs/results/cpu-fashion-mnist-c1
# Copies each run's small files (config.yaml, metrics.jsonl, summary.json, robust.json,
# hessian.json, error.txt) and grid.json; checkpoints stay behind. The report is then
# made from the copies alone, so `largebatch report DEST` regenerates it at any time.
set -euo pipefail
if [ $# -ne 2 ]; then
    echo "usage: $0 STUDY_DIR DEST_DIR" >&2
    exit 2
fi
src=$1
dest=$2
if [ ! -d "$src/runs" ]; then
    echo "error: $src has no runs/ folder (is it the --out of largebatch compare?)" >&2
    exit 2
fi
mkdir -p "$dest"
for run in "$src"/runs/*/; do
    name=$(basename "$run")
    mkdir -p "$dest/runs/$name"
    for file in config.yaml metrics.jsonl summary.json robust.json hessian.json error.txt; do
        if [ -f "$run/$file" ]; then
            cp "$run/$file" "$dest/runs/$name/$file"
        fi
    done
done
if [ -f "$src/grid.json" ]; then
    cp "$src/grid.json" "$dest/grid.json"
fi
largebatch_cmd=${LARGEBATCH:-largebatch}
"$largebatch_cmd" report "$dest"
