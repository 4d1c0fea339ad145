#!/usr/bin/env bash
# GPU tests and benchmarks in one call, for a machine that has only torch + Triton (e.g. the lent H100/H200):
#
#   OUT=/some/dir [TESTS=tests/gpu/test_x.py] [BENCHES="bench_a bench_b"] bash benchmarks/run_gpu_checks.sh [WHEELS_DIR]
#
# WHEELS_DIR (default .whl, written by benchmarks/gpu_wheels.sh): wheels installed offline with --no-deps into
# /tmp/site, put first on PYTHONPATH: the pinned diffusers / transformers / tokenizers / huggingface-hub / peft
# and nvidia-modelopt with the dependencies that machine lacks (it has transformers 5 and no diffusers).
#
# Default: tests/gpu (at most TEST_TIMEOUT = 90 s; TESTS=none skips them), bench_w4a4_kernel at batch 8 (the W4A4 GEMM vs cuBLAS fp16 and
# torch._int_mm at the batch-8 FFN shapes) and bench_gpu_e2e on SD1.5 512px batch 1 with the rows issue 13's goals
# need (baseline, our best fp16 row, fp8, then the torch.compile peer, whose max-autotune compile may not fit:
# rows not started by --time-budget are skipped, and the JSON is rewritten after each row), each under `timeout`:
# at most 90 + 45 + 240 s plus installs, about 6.5 minutes on an H200. The artifacts compile in a second process
# (CPU) while the diffusers rows run. The peer alone, if it was cut:
#   TESTS=none BENCHES=bench_gpu_e2e BENCH_TIMEOUT_bench_gpu_e2e=420 \
#   BENCH_ARGS_bench_gpu_e2e="--archs sd15 --batches 1 --rows diffusers-sdpa,diffusers-compile,fp8 --calibration quick --background-compile" \
#   bash benchmarks/run_gpu_checks.sh Writes at most 8 files to $OUT: gpu.txt (GPU and
# versions), gpu_tests.txt (the test log), bench_log.txt (the benchmarks' output), and each benchmark's JSON and
# Markdown.
#
# BENCH_ARGS_<name> replaces a benchmark's default arguments, BENCH_TIMEOUT_<name> its timeout (s), e.g.
#   BENCH_ARGS_bench_gpu_e2e="--archs sdxl --batches 1 --rows diffusers-sdpa,torch-graphs-fused"
set -u
OUT=${OUT:-benchmarks/results/gpu}
WHEELS=${1:-.whl}
mkdir -p "$OUT"
export PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 SDCOMPILER_QUIET=1
unset TRITON_INTERPRET
if compgen -G "$WHEELS/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  python3 - <<'EOF'
from importlib.metadata import PackageNotFoundError, version
for name in ("diffusers", "transformers", "tokenizers", "huggingface-hub", "peft", "accelerate", "nvidia-modelopt", "pydantic"):
    try:
        print(name, version(name))
    except PackageNotFoundError:
        print(name, "not installed")
EOF
} > "$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"
if [ "${TESTS:-}" != none ]; then
  timeout "${TEST_TIMEOUT:-90}" python3 -m pytest ${TESTS:-tests/gpu} --confcutdir=tests/gpu -q -p no:cacheprovider -rs \
    > "$OUT/gpu_tests.txt" 2>&1
  rc=$?
  echo "gpu tests: exit $rc$([ $rc = 124 ] && echo ", cut at ${TEST_TIMEOUT:-90} s")" >> "$OUT/gpu_tests.txt"
  tail -25 "$OUT/gpu_tests.txt"
fi
declare -A DEFAULT_ARGS=(
  [bench_w4a4_kernel]="--batch 8 --repeats 20"
  [bench_gpu_e2e]="--archs sd15 --batches 1 --rows diffusers-sdpa,torch-graphs-fused,fp8,diffusers-compile,torch-eager --calibration quick --background-compile --time-budget 200"
)
declare -A DEFAULT_TIMEOUT=([bench_w4a4_kernel]=45 [bench_gpu_e2e]=240)
: > "$OUT/bench_log.txt"
for bench in ${BENCHES:-bench_w4a4_kernel bench_gpu_e2e}; do
  args_var="BENCH_ARGS_$bench" timeout_var="BENCH_TIMEOUT_$bench"
  limit=${!timeout_var:-${DEFAULT_TIMEOUT[$bench]:-240}}
  echo "== $bench (at most $limit s)" | tee -a "$OUT/bench_log.txt"
  # shellcheck disable=SC2086  (the arguments are split on purpose)
  timeout "$limit" python3 "benchmarks/$bench.py" --out "$OUT" ${!args_var:-${DEFAULT_ARGS[$bench]:-}} >> "$OUT/bench_log.txt" 2>&1
  rc=$?  # 124: cut by the timeout (bench_gpu_e2e's JSON keeps the rows it measured before)
  echo "$bench: exit $rc$([ $rc = 124 ] && echo ", cut at $limit s")" | tee -a "$OUT/bench_log.txt"
done
tail -60 "$OUT/bench_log.txt"
