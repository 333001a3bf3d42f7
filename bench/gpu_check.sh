#!/usr/bin/env bash
# The GPU check of issues 6 and 15, as one script: the GPU attention/scan tests (cuDNN padded and
# packed layouts, many short segments, windows, model-level cuDNN vs xla), a probe of cuDNN's packed
# layout, bench/train_step.py (jax_sft unrolled and scanned at 32 x 1024 and 8 x 4096, packed,
# LoRA, vs PyTorch eager and torch.compile), bench/step_overhead.py, and a Qwen3-4B-shaped run. Logs and the table go to $OUT (default
# ./gpu_check_out). Run from the repository root with the GPU image's python3:
#
#     bash bench/gpu_check.sh [bench time budget in seconds, default 340]
#
# Wall time: ~3-4 min of tests (each GPU test compiles its kernels) + the bench budget + ~2 min of
# step_overhead + QWEN_BUDGET (default 240 s) + LONG_BUDGET (default 200 s) + <= 90 s of
# test_model.py: more than one 10-minute device call; give it two (`QWEN_BUDGET=0 LONG_BUDGET=0 bash
# bench/gpu_check.sh 200`, then the Qwen3 and long-context parts alone) or a shorter budget. The
# 2026-11-26 run used 100 s / 40 s test timeouts and lost the tail of both.
# Long context alone (issue 24): `BUDGET_ONLY_LONG=1 bash bench/gpu_check.sh` runs the env lines and
# the long-context part only (~3-4 min on one GPU).
set -u -o pipefail
OUT=${OUT:-gpu_check_out}
BUDGET=${1:-340}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1
export JAX_PLATFORMS=${JAX_PLATFORMS:-cuda} XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python3}

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
  $PY -c "import jax, flax, optax, torch, transformers; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__); print(jax.devices(), jax.devices()[0].device_kind, jax.devices()[0].compute_capability)"
  $PY -c "from jax._src.lib import cuda_versions as c; print('cudnn', c.cudnn_get_version())"
} 2>&1 | tee "$OUT/env.txt"

# Long context (issue 24): one row of 32768 and of 131072 tokens per step (Llama-1B shape, remat
# full), whole on one GPU (cuDNN flash attention) against split over a context axis of every GPU
# (ring / all-gather attention, models/context.py; only where there is more than one GPU).
long_context() {
  LONG_BUDGET=${LONG_BUDGET:-200}
  if [ "$LONG_BUDGET" -gt 0 ]; then
    timeout $((LONG_BUDGET + 15)) $PY bench/train_step.py --long --warmup 1 --steps 2 --out "$OUT/long" \
      --time-budget "$LONG_BUDGET" 2>&1 | tee "$OUT/bench_long.log"
  fi
}
if [ "${BUDGET_ONLY_LONG:-0}" = 1 ]; then
  long_context
  exit 0
fi

# fp32 parity tests need true fp32 matmuls (XLA's GPU default is TF32).
JAX_DEFAULT_MATMUL_PRECISION=highest timeout 200 $PY -m pytest -q -p no:cacheprovider \
  tests/test_attention.py tests/test_scan.py 2>&1 | tee "$OUT/pytest_gpu.log"

timeout 25 $PY tests/gpu/probe_packed.py 2>&1 | tee "$OUT/probe.log"

timeout $((BUDGET + 15)) $PY bench/train_step.py --out "$OUT" --time-budget "$BUDGET" \
  --scan ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log"

# The fixed cost per micro-batch: weights cast once per step against once per micro-step.
timeout 150 $PY bench/step_overhead.py --micro-batches 32 --tokens 256 2>&1 | tee "$OUT/step_overhead.log"

# A Qwen3-4B-shaped full fine-tune at 8 x 4096 against torch on the same card (QWEN_BUDGET=0 skips).
QWEN_BUDGET=${QWEN_BUDGET:-240}
if [ "$QWEN_BUDGET" -gt 0 ]; then
  timeout $((QWEN_BUDGET + 15)) $PY bench/train_step.py --model qwen3-4b --out "$OUT/qwen3_4b" \
    --time-budget "$QWEN_BUDGET" --only jax:padded-4096 torch-eager:padded-4096 torch-compile:padded-4096 \
    2>&1 | tee "$OUT/bench_qwen3_4b.log"
fi

long_context

# The model tests on the GPU (parity with transformers), if time remains in the caller's limit.
JAX_DEFAULT_MATMUL_PRECISION=highest timeout 90 $PY -m pytest -q -p no:cacheprovider -x \
  tests/test_model.py 2>&1 | tail -15 | tee "$OUT/pytest_model_gpu.log"
cat "$OUT/bench_table.txt" 2>/dev/null
