#!/usr/bin/env bash
# Multi-node `loralab run` under SLURM: one torchrun per node, rendezvous through torchrun's c10d
# backend on the first node; every node must see the same experiment folder, output and results
# folders (a shared filesystem), since rank 0 writes checkpoints and resumed runs read them.
#   sbatch scripts/slurm_multinode.sh experiments/llm/seed000-llama3-8b-math/lora [--sharding fsdp]
#SBATCH --job-name=loralab
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
set -euo pipefail
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export LORALAB_OUTPUT_DIR=${LORALAB_OUTPUT_DIR:-$PWD/outputs} LORALAB_RESULTS_DIR=${LORALAB_RESULTS_DIR:-$PWD}
srun torchrun \
  --nnodes="$SLURM_JOB_NUM_NODES" --nproc_per_node="$GPUS_PER_NODE" \
  --rdzv_id="$SLURM_JOB_ID" --rdzv_backend=c10d --rdzv_endpoint="$head_node:29500" \
  -m loralab run --resume "$@"
