#!/usr/bin/env bash
# The GPU benchmark sequence (issue 3's GPU targets), most important first, for a machine with
# one CUDA GPU where jax[cuda] and torch are installed:
#
#   benchmarks/gpu.sh OUTDIR [ARCHIVE]
#
# Each step runs benchmarks/decode.py under its own time limit and writes OUTDIR/NAME.json and
# NAME.log; ARCHIVE (default OUTDIR.tgz) is refreshed after every step, so a sequence cut short
# keeps what ran.
set -u
out=${1:-out/gpu}
archive=${2:-$out.tgz}
mkdir -p "$out"
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
# JAX takes 75% of the GPU by default; HF's model lives in the same process.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.6}

step() {  # step NAME SECONDS [ENV=VALUE ...] -- decode.py flags
  local name=$1 limit=$2
  shift 2
  local envs=()
  while [[ $1 != -- ]]; do envs+=("$1"); shift; done
  shift
  echo "=== $name: ${envs[*]:-} $*"
  env "${envs[@]}" timeout "$limit" "$py" -m benchmarks.decode "$@" --json="$out/$name.json" \
    >"$out/$name.log" 2>&1
  echo "rc=$?"
  grep -E "^(device|preset|prefill|decode|ratios|greedy|ours reaches|read bandwidth|HF cross|Traceback|[A-Za-z]*Error)" \
    "$out/$name.log" | cut -c1-220
  tar czf "$archive" -C "$(dirname "$out")" "$(basename "$out")"
}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,clocks.mem \
  --format=csv | tee "$out/nvidia-smi.txt"
"$py" -c "import jax, flax, torch, transformers; print('jax', jax.__version__, 'flax', \
flax.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__, \
jax.devices())" 2>&1 | tail -1 | tee "$out/versions.txt"

N=32
step 3b_bf16_b1 240 -- --preset=3b --dtype=bfloat16 --batch_size=1 --max_decode_len=$N
step 3b_bf16_b8 240 -- --preset=3b --dtype=bfloat16 --batch_size=8 --max_decode_len=$N
# Float32 at full precision (no TF32), so the greedy tokens must equal HF's.
step tiny_f32_b1 100 JAX_DEFAULT_MATMUL_PRECISION=highest -- --preset=tiny --batch_size=1 \
  --max_decode_len=$N
step 3b_bf16_b1_stored_layout 150 -- --preset=3b --dtype=bfloat16 --batch_size=1 \
  --max_decode_len=$N --skip_hf --out_major=false
step small_f32_b1 120 JAX_DEFAULT_MATMUL_PRECISION=highest -- --preset=small --batch_size=1 \
  --max_decode_len=$N
