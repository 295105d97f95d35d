#!/usr/bin/env bash
# The whole GPU check in one go, for a machine with a CUDA GPU, Python, torch (CUDA build), nvcc and
# ninja installed, and no internet: build fastbn from this source tree for the local GPU, run the
# CUDA tests (each training-pass test twice: the two-pass kernels, and the persistent ones forced),
# benchmark against torch (cuDNN where it picks it, and with cuDNN off), torch.compile and the copy
# floor, with fastbn as it chooses and with each of its paths forced, check the issue's targets, and
# profile a few layers kernel by kernel. About 6-7 minutes on an H100/H200.
#
#   bash bench/gpu_check.sh [OUT_DIR]      (default: $OUT, else ./gpu-check)
#   QUICK=1 bash bench/gpu_check.sh ...    skips the torch.compile and per-call overhead stages
#
# Everything printed is also written to OUT_DIR/gpu_check.log, next to the JSON and PNG results.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-gpu-check}}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
exec > >(tee "$OUT_DIR/gpu_check.log") 2>&1
PY=${PYTHON:-python3}
start=$SECONDS
status=0
stage() { echo; echo "== $1 ($((SECONDS - start)) s)"; }
fail() { echo "FAILED: $1"; status=1; }

stage "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || fail "nvidia-smi"
command -v nvcc && nvcc --version | tail -2
$PY - <<'PY' || { echo "torch sees no GPU: nothing to check"; exit 1; }
import torch, sys
print("python", sys.version.split()[0], "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| cudnn", torch.backends.cudnn.version())
assert torch.cuda.is_available()
p = torch.cuda.get_device_properties(0)
print(f"{p.name}: {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}")
PY

stage "build from source for this GPU"
ARCH=$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
SITE=${TMPDIR:-/tmp}/fastbn-gpu-check-site  # outside OUT_DIR: only the log and results travel back
rm -rf "$SITE" build
build_start=$SECONDS
if FASTBN_CUDA=1 TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS=$(nproc) \
   timeout 240 $PY -m pip install --no-build-isolation --no-deps --no-index -q --target "$SITE" . ; then
  echo "built for sm_${ARCH/./} in $((SECONDS - build_start)) s"
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
else  # e.g. a setuptools too old for pyproject.toml's metadata: build in place instead
  (( SECONDS - build_start > 60 )) && { fail "build (compilation)"; exit 1; }
  echo "pip build failed before compiling; building in place with setup.py"
  FASTBN_CUDA=1 TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS=$(nproc) timeout 240 $PY setup.py -q build_ext --inplace \
    || { fail "build"; exit 1; }
  export PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
fi
$PY -c "import fastbn; print(fastbn.build_info())" || fail "import"

stage "CUDA tests (float64 CPU references, outputs poisoned with NaN before each test)"
# Several workers share the GPU (xdist, where installed); each keeps few CPU threads for its references.
WORKERS=$($PY -c "import xdist" 2>/dev/null && echo "-n 8" || echo "")
# A kernel that hangs (a grid-wide wait that never ends) fails its own test, not the whole stage.
PER_TEST=$($PY -c "import pytest_timeout" 2>/dev/null && echo "--timeout=60 --timeout-method=thread" || echo "")
OMP_NUM_THREADS=2 timeout 200 $PY -m pytest tests/test_cuda.py -q $WORKERS $PER_TEST --maxfail=200 -rfE \
  --tb=short -p no:cacheprovider --junitxml="$OUT_DIR/test_cuda.xml" || fail "CUDA tests"
# The benchmark times the persistent kernels only where their tests passed: a fault there would lose
# every number after it.
BENCH_IMPLS=fastbn,fastbn_persistent,fastbn_two_pass,torch,torch_native,floor
if ! grep -q 'testsuite[^>]*errors="0"[^>]*failures="0"' "$OUT_DIR/test_cuda.xml" 2>/dev/null \
   && { [[ ! -s "$OUT_DIR/test_cuda.xml" ]] || grep -q '<testcase[^>]*persistent[^>]*>\s*<\(failure\|error\)' \
          <(tr -d '\n' < "$OUT_DIR/test_cuda.xml" | sed 's/<testcase/\n<testcase/g'); }; then
  echo "persistent kernels failed (or the tests did not finish): benchmarking the two-pass kernels only"
  export FASTBN_CUDA_PERSISTENT=0
  BENCH_IMPLS=fastbn,torch,torch_native,floor
fi

stage "benchmark: ResNet-50 BatchNorm shapes, fp32/bf16/fp16, NCHW and channels_last"
timeout 240 $PY -m fastbn.bench --device cuda --preset resnet50 --dtype float32,bfloat16,float16 \
  --layout nchw,nhwc --impls $BENCH_IMPLS --reps 11 \
  --json "$OUT_DIR/gpu-resnet50.json" --plot "$OUT_DIR/gpu-resnet50.png" || fail "benchmark"

stage "targets"
$PY bench/gpu_targets.py "$OUT_DIR/gpu-resnet50.json" || fail "targets"

stage "profile: a training step's kernels on a few layers, fastbn's paths and torch's"
timeout 90 $PY bench/gpu_profile.py || fail "profile"

if [[ -z "${QUICK:-}" ]]; then
stage "benchmark: against torch.compile (inductor) on one layer"
timeout 120 $PY -m fastbn.bench --device cuda --shape 32x256x56x56 \
  --dtype float32,bfloat16 --layout nchw,nhwc --impls fastbn,torch,inductor,floor --reps 15 \
  --json "$OUT_DIR/gpu-inductor.json" || fail "inductor benchmark"

stage "per-call overhead: BatchNorm2d modules on a tiny input, back to back"
timeout 60 $PY -m fastbn.bench --device cuda --overhead --reps 9 --json "$OUT_DIR/gpu-overhead.json" \
  || fail "overhead benchmark"
fi

stage "done: status $status in $((SECONDS - start)) s; log and results in $OUT_DIR"
exit $status
