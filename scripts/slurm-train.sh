#!/usr/bin/env bash
# Example SLURM job: ABSA on N nodes x G GPUs with torchrun. Submit with
#   sbatch --nodes=2 --gpus-per-node=4 scripts/slurm-train.sh configs/my-run.yaml runs/absa
# Every rank runs the same command; --resume makes a requeued or restarted job continue
# from the last checkpoint (also with another number of nodes: the global batch and the
# schedule do not depend on the world size). --max-restarts lets torchrun restart the
# workers after one dies, without a requeue; see docs/elastic.md. OUT_DIR must be on a
# file system that all nodes share.
#SBATCH --job-name=largebatch
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=16
#SBATCH --time=24:00:00
#SBATCH --requeue
set -euo pipefail
CONFIG=${1:?usage: slurm-train.sh CONFIG.yaml OUT_DIR}
OUT=${2:?usage: slurm-train.sh CONFIG.yaml OUT_DIR}
GPUS_PER_NODE=${SLURM_GPUS_ON_NODE:-$(nvidia-smi -L | wc -l)}
HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
# torch 2.13: with the agent's shared store (the default), a restart in which a node
# joins can deadlock the c10d rendezvous. With this set, worker rank 0 hosts a new store
# in each round instead (docs/elastic.md).
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1

srun torchrun \
    --nnodes="$SLURM_JOB_NUM_NODES" \
    --nproc_per_node="$GPUS_PER_NODE" \
    --rdzv_id="$SLURM_JOB_ID" \
    --rdzv_backend=c10d \
    --rdzv_endpoint="$HEAD:29500" \
    --max-restarts=3 \
    -m largebatch train --config "$CONFIG" --out "$OUT" --resume
