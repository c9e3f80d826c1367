#!/bin/bash
# Builds and runs probe.cpp against the oneDNN v3.2 pip wheels (onednn-devel-cpu-gomp / onednn-cpu-gomp
# 2023.2.0, unpacked into $DNNL) and this tree's CPU build (build/dev/libdgemma_core.a).
# Usage: DNNL=/path/to/unpacked/wheels bash bench/onednn_probe/run.sh [reps]
set -e
cd "$(dirname "$0")/../.."
inc=$(dirname "$(find "$DNNL" -path '*include/oneapi/dnnl/dnnl.hpp' | head -1)")/../..
lib=$(dirname "$(find "$DNNL" -name 'libdnnl.so.3' | head -1)")
g++ -std=c++17 -O2 -fopenmp -Icsrc -I"$inc" bench/onednn_probe/probe.cpp build/dev/libdgemma_core.a \
    -L"$lib" -ldnnl -Wl,-rpath,"$lib" -o build/onednn_probe
OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} build/onednn_probe "$@"
