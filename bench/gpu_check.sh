#!/usr/bin/env bash
# The GPU check of issue 25, as ONE device call of at most 9 minutes, every part under its own
# timeout and everything written to $OUT (default ./gpu_check_out; at most 8 files come back):
#
#   1. versions: the card (as jax and nvidia-smi name it), driver, jax, torch, transformers
#   2. bench/train_step.py: jax_sft unrolled vs torch eager vs torch.compile at 8 x 4096 and at
#      NeMo RL's default 32 x 1024 step, packed-4096, and 32 x 1024 in micro-batches of 1
#   3. bench/trainer_step.py: `python -m jax_sft.train` on NeMo RL's own sft.yaml with a
#      Llama-3.2-1B-shaped random model and synthetic SQuAD-shaped rows, 16 steps, as configured
#      (micro-batch 1, padded) and with micro-batch 8 and packing, against the bench's same shape
#   4. the quickstart (python -m jax_sft.quickstart), its figures against the README's
#
# Prepare here first (`bash bench/gpu_prepare.sh`: the wheels the device image lacks into .whl/,
# NeMo RL's sft.yaml into .gpu/), then one device call carrying .whl and .gpu:
#
#     bash bench/gpu_check.sh                 # on the GPU machine, from the repository root
#     bash bench/gpu_check.sh --dry           # here, on the CPU: every part starts (tests/test_bench.py)
#
# Part budgets (seconds): versions 30, bench 250, trainer 170, quickstart 80: 530 s in all.
#
#     bash bench/gpu_check.sh --long          # issue 24's long context, its own device call instead:
#                                             # versions 30, bench/train_step.py --long 400 (rows of
#                                             # 32k and 128k tokens, context 1 vs every GPU)
set -u -o pipefail
DRY=0 LONG=0
[ "${1:-}" = "--dry" ] && DRY=1
[ "${1:-}" = "--long" ] && LONG=1
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
: > "$LOG"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python3}
SFT_YAML=${SFT_YAML:-.gpu/sft.yaml}
[ -f "$SFT_YAML" ] || SFT_YAML=../shared/reference/nemo-rl-configs/examples/configs/sft.yaml
WORK=${WORK:-/tmp/jax_sft_gpu_check}
if [ "$DRY" = 1 ]; then
  export JAX_PLATFORMS=cpu
else
  export JAX_PLATFORMS=${JAX_PLATFORMS:-cuda} XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
fi

# part NAME SECONDS COMMAND...: runs COMMAND under its own timeout, logs it, records its exit.
part() {
  local name=$1 limit=$2
  shift 2
  echo "=== part $name (limit ${limit}s): $*" | tee -a "$LOG"
  local t0=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
  local code=${PIPESTATUS[0]}
  echo "=== part $name: exit $code after $((SECONDS - t0))s" | tee -a "$LOG" "$OUT/parts.txt"
}

# The versions part, as one shell command (a function cannot run under `timeout`).
VERSIONS='date -u
[ "$DRY" = 1 ] || nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
$PY -c "import jax, flax, optax, torch, transformers; d = jax.devices()[0]; \
print(\"jax\", jax.__version__, \"flax\", flax.__version__, \"optax\", optax.__version__, \"torch\", \
torch.__version__, \"transformers\", transformers.__version__); print(\"device:\", d.device_kind, \
getattr(d, \"compute_capability\", \"\"))"
$PY -c "import grain, datasets, ml_collections, omegaconf, tensorboardX; print(\"grain\", grain.__version__, \
\"datasets\", datasets.__version__)"'
export DRY PY

BENCH_CASES="jax:padded-4096 torch-eager:padded-4096 torch-compile:padded-4096 jax:padded-1024 \
torch-eager:padded-1024 torch-compile:padded-1024 jax:packed-4096 jax:padded-4096-fp8 jax:padded-1024-mb1"
: > "$OUT/parts.txt"
part versions 30 bash -c "$VERSIONS"
if [ "$LONG" = 1 ]; then
  part long 400 $PY bench/train_step.py --long --warmup 1 --steps 2 --out "$OUT/long" --time-budget 380
elif [ "$DRY" = 1 ]; then
  part bench 60 $PY bench/train_step.py --dry --out "$OUT" --only $BENCH_CASES
  part trainer 120 $PY bench/trainer_step.py --dry --config "$SFT_YAML" --out "$OUT" --work "$WORK"
  part quickstart 60 $PY -m jax_sft.quickstart --help
else
  part bench 250 $PY bench/train_step.py --out "$OUT" --time-budget 235 --warmup 1 --steps 4 --only $BENCH_CASES
  part trainer 170 $PY bench/trainer_step.py --config "$SFT_YAML" --out "$OUT" --work "$WORK" --time-budget 150
  part quickstart 80 $PY -m jax_sft.quickstart --out "$WORK/quickstart"
fi
cat "$OUT/parts.txt"
cat "$OUT/bench_table.txt" 2>/dev/null
! grep -q "exit [1-9]" "$OUT/parts.txt"
