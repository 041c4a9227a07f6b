#!/usr/bin/env bash
# Every GPU check of this repository in one call, for a session lent a GPU for a
# few minutes: each part has its own time limit, and a part that fails or runs out
# of time does not stop the next. Run from the repository root:
#
#   OUT=/some/dir bash benchmarks/gpu_session.sh
#
# Writes under $OUT: gpu_llm.json (LLM training steps in bfloat16, per method),
# gpu_llm_torch.json (the same with PEFT + PyTorch),
# paper_memory_gpu.json (the paper rule and the seed rule on float32, bfloat16 and
# int8 bases), gpu/gpu.json (the step benchmark's telescoped paper rule against
# LoRA), pytest_gpu.txt (the exact-math tests of the rules, on the GPU), and log.txt.
set -uo pipefail
out="${OUT:?set OUT to a folder}"
mkdir -p "$out/gpu"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
part() {  # part SECONDS NAME COMMAND...
  local limit=$1 name=$2
  shift 2
  echo "=== $name (limit ${limit}s) $(date +%T)"
  local start=$SECONDS
  timeout "$limit" "$@"
  echo "=== $name: exit $? after $((SECONDS - start))s"
}
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c 'import jax, flax, optax; print("jax", jax.__version__, "flax", flax.__version__, "optax", optax.__version__, jax.devices())'
  part 230 gpu_llm python3 benchmarks/gpu_llm.py --out "$out/gpu_llm.json"
  part 100 gpu_llm_torch python3 benchmarks/gpu_llm_torch.py --out "$out/gpu_llm_torch.json"
  part 70 paper_memory python3 benchmarks/bench_paper_memory.py --width 4096 --layers 4 \
    --rows 2048 --repeats 5 --out "$out/paper_memory_gpu.json"
  part 70 pytest_gpu env JAX_DEFAULT_MATMUL_PRECISION=highest python3 -m pytest -q -x \
    -p no:cacheprovider tests/test_paper_telescoped.py tests/test_quantized_base.py \
    >"$out/pytest_gpu.txt" 2>&1
  tail -3 "$out/pytest_gpu.txt"
  part 60 gpu_step python3 benchmarks/gpu.py --widths 4096 --models mlp attention \
    --variants full_adamw lora_adamw paper paper_inplace seed --repeats 5 --out "$out/gpu"
} 2>&1 | tee "$out/log.txt"
