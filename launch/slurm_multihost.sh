#!/usr/bin/env bash
# Multi-host GPUs under SLURM: one process per node, all GPUs of the node per process.
#   sbatch --nodes=2 --ntasks-per-node=1 --gpus-per-node=8 launch/slurm_multihost.sh configs/cifar100.py:tasks=10 runs/c100_10
# jax.distributed.initialize() picks up SLURM's environment (main.py calls it when SLURM_NTASKS is set).
# Re-submitting the same command after preemption resumes from the shared workdir.
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
config=${1:?config file}; workdir=${2:?workdir on a shared filesystem}; shift 2
srun python -m jdcl_jax.main --config="$config" --workdir="$workdir" "$@"
