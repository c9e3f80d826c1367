// RMSNorm as DiffusionGemma defines it: y = x * (mean(x^2) + eps)^-0.5 * weight, float32 statistics.
// weight may be null (the scale-free norms: v_norm, router norm, self-conditioning post_norm).
// x, y: [rows, dim] row-major; one block per row. First of the CUDA backend's kernels (issue #3).
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

namespace dgemma::kernels {

template <typename Tx, typename Ty>
cudaError_t rmsnorm_mixed(const Tx* x, const float* weight, Ty* y, int64_t rows, int dim, float eps, cudaStream_t stream);

template <typename T>
cudaError_t rmsnorm(const T* x, const T* weight, T* y, int rows, int dim, float eps, cudaStream_t stream);

}  // namespace dgemma::kernels
