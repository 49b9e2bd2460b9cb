#!/usr/bin/env bash
# A SLURM job whose run asks for more nodes as its batch grows. Submit the first round with
#   sbatch --nodes=1 --gpus-per-node=4 scripts/slurm-grow.sh configs/my-run.yaml runs/gns 8
# (the config sets max_accumulation). Each job is one round: torchrun on the job's nodes
# runs `largebatch train ... --resume --set on_outgrown=stop`. When the run's batch
# outgrows the round's processes, it saves at that decision point and writes
# OUT/world.json (the processes it asks for); this job then submits the next round with
# enough nodes for them (at most NODES_MAX), which resumes there. A round on NODES_MAX
# nodes goes on at the higher accumulation instead (on_outgrown=continue). OUT must be on
# a file system that all nodes share. See docs/elastic.md.
#SBATCH --job-name=largebatch-grow
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=16
#SBATCH --time=24:00:00
set -euo pipefail
usage="usage: slurm-grow.sh CONFIG.yaml OUT_DIR NODES_MAX"
CONFIG=${1:?$usage}
OUT=${2:?$usage}
NODES_MAX=${3:?$usage}
NODES=${SLURM_JOB_NUM_NODES:?run under sbatch}
GPUS_PER_NODE=${SLURM_GPUS_ON_NODE:-$(nvidia-smi -L | wc -l)}
HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1  # (torch 2.13; see slurm-train.sh)
if [ "$NODES" -ge "$NODES_MAX" ]; then OUTGROWN=continue; else OUTGROWN=stop; fi
rm -f "$OUT/world.json"  # this round's request only

status=0
srun torchrun \
    --nnodes="$NODES" \
    --nproc_per_node="$GPUS_PER_NODE" \
    --rdzv_id="$SLURM_JOB_ID" \
    --rdzv_backend=c10d \
    --rdzv_endpoint="$HEAD:29500" \
    -m largebatch train --config "$CONFIG" --out "$OUT" --resume \
    --set "on_outgrown=$OUTGROWN" || status=$?

if [ ! -f "$OUT/world.json" ]; then
    echo "slurm-grow: round on $NODES node(s) ended with status $status"
    exit "$status"
fi
# nodes for the processes asked for, at most NODES_MAX, at least one more than now
NEXT=$("${PYTHON:-python3}" - "$OUT/world.json" "$GPUS_PER_NODE" "$NODES" "$NODES_MAX" <<'EOF'
import json, sys
asked = json.load(open(sys.argv[1]))["processes"]
per_node, now, most = map(int, sys.argv[2:])
print(min(max(-(-int(asked) // per_node), now + 1), most))
EOF
)
echo "slurm-grow: the run asked for $(tr -d '\n' < "$OUT/world.json"); next round on $NEXT node(s)"
sbatch --nodes="$NEXT" --gpus-per-node="$GPUS_PER_NODE" "$0" "$CONFIG" "$OUT" "$NODES_MAX"
