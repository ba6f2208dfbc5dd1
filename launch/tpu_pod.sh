#!/usr/bin/env bash
# TPU pod slice: the same command on every worker (jax.distributed.initialize() reads the TPU env).
#   gcloud compute tpus tpu-vm ssh NAME --worker=all --command "cd jdcl-jax && launch/tpu_pod.sh configs/imagenet100.py gs://BUCKET/runs/in100"
set -euo pipefail
cd "$(dirname "$0")/.."
config=${1:?config file}; workdir=${2:?workdir (shared: gs:// or NFS)}; shift 2
exec python -m jdcl_jax.main --config="$config" --workdir="$workdir" "$@"
