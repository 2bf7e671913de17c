#!/usr/bin/env bash
# N JAX processes on 127.0.0.1 with CPU devices: the multi-host code path on one machine.
#
#   launch/local_multiprocess.sh N [fcd_jax.main arguments...]
#   launch/local_multiprocess.sh 2 --config configs/demo.py:runlocal --workdir runs/mp
#
# Process i runs `python -m fcd_jax.main --distributed --coordinator_address=127.0.0.1:PORT
# --num_processes=N --process_id=i ARGS...` (jax.distributed over gloo, JAX's default CPU
# collectives) and writes its own log. The script waits for all of them; when one fails it stops
# the others (they would wait forever in a collective) and exits with that failure's status.
#
# Environment:
#   FCD_DEVICES_PER_PROCESS  CPU devices per process (default 1; appended to XLA_FLAGS)
#   FCD_PORT                 coordinator port (default: a free one)
#   FCD_LOG_DIR              where process_<i>.log go (default: runs/multiprocess_logs)
#   PYTHON                   the interpreter (default: python)
set -euo pipefail

if [[ $# -lt 1 || ! "$1" =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: $0 NUM_PROCESSES [fcd_jax.main arguments...]" >&2
  exit 2
fi
num_processes=$1
shift
python=${PYTHON:-python}
devices=${FCD_DEVICES_PER_PROCESS:-1}
log_dir=${FCD_LOG_DIR:-runs/multiprocess_logs}
port=${FCD_PORT:-$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
mkdir -p "$log_dir"

pids=()
stop_all() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
}
trap 'stop_all; exit 130' INT TERM

for ((i = 0; i < num_processes; i++)); do
  JAX_PLATFORMS=cpu \
  XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$devices" \
    "$python" -m fcd_jax.main --distributed \
      --coordinator_address="127.0.0.1:$port" --num_processes="$num_processes" --process_id="$i" \
      "$@" >"$log_dir/process_$i.log" 2>&1 &
  pids+=($!)
done
echo "started $num_processes processes (coordinator 127.0.0.1:$port), logs in $log_dir/" >&2

status=0
for ((n = 0; n < num_processes; n++)); do
  finished=0
  wait -n -p finished "${pids[@]}" || status=$?
  if [[ $status -ne 0 ]]; then
    for ((i = 0; i < num_processes; i++)); do
      [[ ${pids[$i]} == "$finished" ]] && echo "process $i failed (exit $status):" >&2 \
        && tail -n 5 "$log_dir/process_$i.log" >&2
    done
    stop_all
    wait || true
    exit "$status"
  fi
  remaining=()
  for pid in "${pids[@]}"; do [[ $pid != "$finished" ]] && remaining+=("$pid"); done
  pids=("${remaining[@]}")
done
echo "all $num_processes processes finished" >&2
