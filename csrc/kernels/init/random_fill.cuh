// Random weights made on the device (ModelWeights::random): dst[i] = random_weights::value(seed,
// first + i, amplitude, offset) (common/random_weights.h), stored as float or rounded to bf16. The
// same values the host computes for the CPU backend, in seconds instead of a 50 GB checkpoint.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace dgemma::kernels {

template <typename T>  // float or __nv_bfloat16
cudaError_t fill_random(T* dst, int64_t n, uint64_t seed, uint64_t first, float amplitude, float offset,
                        cudaStream_t stream);

}  // namespace dgemma::kernels
