#!/usr/bin/env bash
# One machine, all local devices (CPU, one or more GPUs): ./launch/run_local.sh configs/cifar10.py runs/c10 [--config.x=y ...]
set -euo pipefail
cd "$(dirname "$0")/.."
config=${1:?config file}; workdir=${2:?workdir}; shift 2
exec python -m jdcl_jax.main --config="$config" --workdir="$workdir" "$@"
