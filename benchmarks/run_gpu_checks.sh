#!/usr/bin/env bash
# GPU tests and kernel benchmarks, for a machine that has only torch + Triton (e.g. the lent H100/H200):
#
#   OUT=/some/dir [TESTS=tests/gpu/test_x.py] [BENCHES="bench_a bench_b"] bash benchmarks/run_gpu_checks.sh [WHEELS_DIR]
#
# WHEELS_DIR (optional) holds pure-Python wheels of pytest and its dependencies, installed offline when
# pytest is missing. Results (test log, benchmark JSON/Markdown, GPU and versions) go to $OUT.
set -u
OUT=${OUT:-benchmarks/results/gpu}
WHEELS=${1:-}
mkdir -p "$OUT"
export PYTHONDONTWRITEBYTECODE=1
unset TRITON_INTERPRET
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__)"
} > "$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"
if ! python -c "import pytest" 2>/dev/null && [ -n "$WHEELS" ]; then
  python -m pip install -q --no-index --find-links "$WHEELS" pytest
fi
# diffusers (pure Python; its dependencies come with transformers there) for the U-Net parts of the tests
if ! python -c "import diffusers" 2>/dev/null && [ -n "$WHEELS" ]; then
  python -m pip install -q --no-index --no-deps --find-links "$WHEELS" diffusers
fi
python -m pytest ${TESTS:-tests/gpu} --confcutdir=tests/gpu -q -p no:cacheprovider -rs > "$OUT/gpu_tests.txt" 2>&1
echo "gpu tests: exit $?"; tail -25 "$OUT/gpu_tests.txt"
# BENCHES (optional): which benchmarks to run, default all
# BENCH_ARGS_<name> (optional): extra arguments, e.g. BENCH_ARGS_bench_torch_target_gpu=--compile
for bench in ${BENCHES:-bench_torch_target_gpu bench_w4a4_kernel bench_gri_kernel bench_fused_kernels}; do
  echo "== $bench"
  extra_var="BENCH_ARGS_$bench"
  timeout 240 python "benchmarks/$bench.py" --out "$OUT" ${!extra_var:-} 2>&1 | tail -40
done
