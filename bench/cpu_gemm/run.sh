#!/bin/bash
# Builds gemm_bench.cpp against a CPU build's static library and runs it.
# Usage: bash bench/cpu_gemm/run.sh [build dir, default build/dev] [reps] [bf16|f32|both]
set -e
cd "$(dirname "$0")/../.."
dir=${1:-build/dev}
shift || true
g++ -std=c++17 -O2 -fopenmp -Icsrc bench/cpu_gemm/gemm_bench.cpp "$dir/libdgemma_core.a" -o "$dir/gemm_bench"
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} "$dir/gemm_bench" "$@"
