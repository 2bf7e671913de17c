#!/usr/bin/env bash
# ViT-B/16 FCD train and score steps on one GPU in bfloat16 (compute; params, anchor and losses
# stay float32), at batch 32 and 128: images/s, compile time, device memory, and the fraction of a
# bfloat16 matmul peak measured in the same run (benchmarks/bench.py). Correctness first: every run
# checks its losses and scores against fcd-jax in float32 on the host CPU (same weights, same
# images) within bfloat16 tolerance (--low_precision_rtol) and stops if they differ.
#
# Usage, from anywhere:   bash benchmarks/gpu.sh [OUT_DIR]      (default OUT_DIR: bench_gpu)
# Environment: PYTHON (default python3), WHEEL_DIR (default .whl: jax[cuda] wheels to install
# offline if JAX sees no GPU), STEPS (timed rounds, default 20), BATCHES (default "32 128"),
# SPLITS (splits of the stacked programs timed at the first batch size, default 4).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
WHEEL_DIR=${WHEEL_DIR:-.whl}
OUT_DIR=${1:-bench_gpu}
STEPS=${STEPS:-20}
BATCHES=${BATCHES:-"32 128"}
mkdir -p "$OUT_DIR"
exec > >(tee -a "$OUT_DIR/gpu.log") 2>&1

echo "== $(date -u +%FT%TZ) $(hostname)"
nvidia-smi || echo "nvidia-smi not found"
"$PYTHON" --version

has_gpu() { "$PYTHON" -c "import jax, sys; sys.exit(jax.default_backend() != 'gpu')" 2>/dev/null; }
if ! has_gpu; then
  if [ -d "$WHEEL_DIR" ]; then
    echo "== JAX sees no GPU: installing jax[cuda] from $WHEEL_DIR (offline)"
    "$PYTHON" -m pip install --no-index --find-links "$WHEEL_DIR" "jax[cuda13]" \
      || "$PYTHON" -m pip install --no-index --find-links "$WHEEL_DIR" "jax[cuda12]"
  else
    echo "== JAX sees no GPU and there is no wheel directory $WHEEL_DIR: trying pip"
    "$PYTHON" -m pip install "jax[cuda13]" || "$PYTHON" -m pip install "jax[cuda12]" || true
  fi
fi
"$PYTHON" -c "import fcd_jax" 2>/dev/null || "$PYTHON" -m pip install -e . --no-deps
"$PYTHON" -c "import jax; print('jax', jax.__version__, jax.default_backend(), jax.devices())"
has_gpu || { echo "ERROR: JAX still sees no GPU; stopping"; exit 1; }

SPLITS=${SPLITS:-4}
for batch in $BATCHES; do
  # The production programs: the stacked step of one split and of $SPLITS at once, the group
  # score step of $SPLITS students on a shared test batch (first batch size only: time).
  # At the first batch size also the CPU's defaults' alternatives, timed in the same run: the
  # heads-first attention instead of JAX's choice (cuDNN), no rematerialisation, and the stack
  # mapped (the CPU's "auto") beside vmapped (the GPU's).
  splits=1; variants=()
  if [ "$batch" = "${BATCHES%% *}" ]; then
    splits=$SPLITS
    variants=(--jax_variant=model.attention_implementation=heads_first --jax_variant=model.remat=False
              --stack_mode=vmap --stack_mode=map)
  fi
  echo "== ViT-B/16, batch $batch, bfloat16, splits $splits"
  "$PYTHON" -m benchmarks.bench --variant=B/16 --image_size=224 --dtype=bfloat16 \
    --batch="$batch" --score_batch="$batch" --steps="$STEPS" --score_steps="$STEPS" --warmup=2 \
    --impls=jax --reference=jax_cpu_f32 --peak_size=8192 --no_huge_pages --splits="$splits" \
    "${variants[@]}" --json="$OUT_DIR/vit_b16_bf16_batch$batch.json"
done
"$PYTHON" -m benchmarks.deploy_latency --variants=S/16,B/16 --json="$OUT_DIR/deploy_latency_gpu.json"
echo "== done: $OUT_DIR/gpu.log and $OUT_DIR/*.json"
