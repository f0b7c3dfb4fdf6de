#!/usr/bin/env bash
# Checks the CUDA backend on a machine with a GPU, in one go (under 8 minutes on one GPU):
#   1. builds the CUDA targets (build-gpu/, for this machine's GPU architecture);
#   2. runs the kernel parity tests (cuda_test) and the whole-model tests on the three tiny
#      checked-in models under compute-sanitizer (memcheck: out-of-bounds and misaligned
#      accesses, leaks of device memory; racecheck on the kernels' shared memory);
#   3. runs the whole-model tests (cuda_model_test) on every model there is, plainly;
#   4. runs the GPU benchmark (bench/gpu_throughput.cc) on the default model when it is there
#      and writes bench/results/gpu.json.
# Usage: tools/gpu_check.sh [--no-build]. Exit 0: every step passed; 2: no GPU here.
# The machine needs the build dependencies of tools/setup.sh (it is run when apt-get can
# reach Debian) and the CUDA toolkit (nvcc, compute-sanitizer) under /usr/local/cuda or PATH.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
build=build-gpu
no_build=0
for arg in "$@"; do
  case "$arg" in
    --no-build) no_build=1 ;;
    *) echo "usage: tools/gpu_check.sh [--no-build]" >&2; exit 2 ;;
  esac
done
start=$SECONDS
step() { echo "== [$((SECONDS - start)) s] $*" >&2; }
export PATH="$PATH:/usr/local/cuda/bin"

if ! command -v nvidia-smi >/dev/null || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "gpu_check: no GPU here (nvidia-smi finds none); nothing to check" >&2
  exit 2
fi
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader >&2
for tool in nvcc cmake ninja; do
  command -v "$tool" >/dev/null ||
    { echo "gpu_check: $tool is missing (CUDA toolkit / tools/setup.sh)" >&2; exit 1; }
done

if [[ $no_build == 0 ]]; then
  step "configure + build the CUDA targets"
  cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DCTXCACHE_CUDA=ON \
    -DCMAKE_CUDA_ARCHITECTURES=native -DCTXCACHE_BUILD_BENCH=ON >"$build.configure.log" 2>&1 ||
    { tail -30 "$build.configure.log" >&2; echo "gpu_check: configure failed (above)" >&2; exit 1; }
  cmake --build "$build" -j"$(nproc)" --target cuda_test cuda_model_test gpu_throughput
fi

sanitizer="$(command -v compute-sanitizer || true)"
if [[ -z $sanitizer ]]; then
  echo "gpu_check: compute-sanitizer is missing (part of the CUDA toolkit)" >&2
  exit 1
fi
step "kernel parity under compute-sanitizer memcheck"
"$sanitizer" --tool memcheck --leak-check full --error-exitcode 3 \
  "$build/tests/cuda_test" --gtest_brief=1
step "kernel parity under compute-sanitizer racecheck"
"$sanitizer" --tool racecheck --error-exitcode 3 "$build/tests/cuda_test" --gtest_brief=1
step "whole tiny models under compute-sanitizer memcheck"
"$sanitizer" --tool memcheck --error-exitcode 3 \
  "$build/tests/cuda_model_test" --gtest_brief=1 --gtest_filter='Tiny/*:CudaDeviceTest.*'
step "whole models: GPU against the CPU engine"
# A real model that is not fetched here skips with the reason; the tiny ones always run.
"$build/tests/cuda_model_test" --gtest_brief=1

model="${CTXCACHE_MODEL:-$root/models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf}"
if [[ -f $model ]]; then
  step "GPU benchmark on $(basename "$model") -> bench/results/gpu.json"
  mkdir -p bench/results
  "$build/bench/gpu_throughput" "$model" bench/results/gpu.json
else
  echo "gpu_check: $model is not here (tools/fetch_model.sh); no benchmark run" >&2
fi
step "done: every step passed"
