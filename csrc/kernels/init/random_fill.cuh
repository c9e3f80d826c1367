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

// Synthetic NVFP4 in the stored form: packed[b] = code(2b) | code(2b + 1) << 4 for b < n / 2 and
// scales[j] = nvfp4_scale(seed, j) for j < n / 16 (common/random_weights.h), n % 16 == 0; the layout
// the W4A16 shuffle (shuffle_w4a16) then takes.
cudaError_t fill_random_nvfp4(uint8_t* packed, uint8_t* scales, int64_t n, uint64_t seed, cudaStream_t stream);

}  // namespace dgemma::kernels
