// RMSNorm as DiffusionGemma defines it: y = x * (mean(x^2) + eps)^-0.5 * weight, float32 statistics.
// weight may be null (the scale-free norms: v_norm, router norm, self-conditioning post_norm).
// x, y: [rows, dim] row-major; one block per row. First of the CUDA backend's kernels (issue #3).
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace dgemma::kernels {

template <typename T>
cudaError_t rmsnorm(const T* x, const T* weight, T* y, int rows, int dim, float eps, cudaStream_t stream);

// y[r] = x[r] * (mean(x[r]^2) + eps)^-0.5 * weight   (weight f32 [dim], or nullptr: no scale). Tx, Ty each
// float or __nv_bfloat16 (all 4 pairs instantiated); y may alias x when Tx == Ty (each element is read
// by the thread that writes it, after the row's statistics are complete).
// Statistics in f32: each thread sums x^2 over its strided elements in index order, then a fixed tree
// (warp butterfly, then the 8 warp sums in order), so a row's result depends only on dim, never on the
// launch or timing: deterministic. The CPU op (backend/cpu/ops.cpp) sums in double; the f32 tree's
// relative error is about (dim / 256 + 8) * 2^-24, far below bf16 output rounding. One rounding at the
// store. rows == 0 is a no-op; rows < 0, dim <= 0 or a null x / y: cudaErrorInvalidValue.
template <typename Tx, typename Ty>
cudaError_t rmsnorm_mixed(const Tx* x, const float* weight, Ty* y, int64_t rows, int dim, float eps,
                          cudaStream_t stream);

}  // namespace dgemma::kernels
