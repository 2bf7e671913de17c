#!/usr/bin/env bash
# Every worker of a Cloud TPU pod slice runs one fcd_jax process; jax.distributed joins them.
#
#   launch/tpu_pod.sh TPU_NAME ZONE [fcd_jax.main arguments...]
#   launch/tpu_pod.sh fcd-v4-32 us-central2-b --config configs/cifar100_super.py \
#       --config.teacher.checkpoint=/mnt/shared/ViT-B_16.npz --workdir /mnt/shared/runs/cifar100
#
# 1. copies this checkout to ~/fcd_jax on every worker (gcloud ... scp --worker=all),
# 2. installs it with JAX for TPU (pip install -e . "jax[tpu]"),
# 3. starts `python -m fcd_jax.main` on every worker at once with FCD_DISTRIBUTED=1:
#    jax.distributed.initialize() finds the coordinator and the process ids on a TPU VM itself.
#
# --workdir and the teacher checkpoint must be on a file system every worker sees (NFS,
# Filestore, a gcsfuse mount): orbax writes checkpoints from all processes into one directory,
# and process 0 writes the reports. Each worker logs to ~/fcd_jax/fcd_worker.log.
#
# Environment: PROJECT (gcloud project; default: gcloud's), SKIP_INSTALL=1 (run only).
set -euo pipefail

if [[ $# -lt 2 ]]; then
  echo "usage: $0 TPU_NAME ZONE [fcd_jax.main arguments...]" >&2
  exit 2
fi
tpu=$1
zone=$2
shift 2
repo=$(cd "$(dirname "$0")/.." && pwd)
project_flag=()
[[ -n "${PROJECT:-}" ]] && project_flag=(--project="$PROJECT")
ssh_all=(gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" "${project_flag[@]}" --worker=all)

if [[ "${SKIP_INSTALL:-0}" != 1 ]]; then
  archive=$(mktemp --suffix=.tar.gz)
  git -C "$repo" ls-files -z | tar -C "$repo" --null -T - -czf "$archive"
  gcloud compute tpus tpu-vm scp "$archive" "$tpu:~/fcd_jax.tar.gz" --zone="$zone" \
    "${project_flag[@]}" --worker=all
  rm -f "$archive"
  "${ssh_all[@]}" --command "set -e; rm -rf ~/fcd_jax; mkdir -p ~/fcd_jax; \
    tar -C ~/fcd_jax -xzf ~/fcd_jax.tar.gz; \
    python3 -m pip install --quiet --upgrade pip; \
    python3 -m pip install --quiet -e ~/fcd_jax 'jax[tpu]'"
fi

args=$(printf ' %q' "$@")
"${ssh_all[@]}" --command "cd ~/fcd_jax && FCD_DISTRIBUTED=1 python3 -m fcd_jax.main$args \
  2>&1 | tee fcd_worker.log"
