// (placeholder declaration; the implementation lands from the kernels branch)
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace dgemma::kernels {

struct MatmulParams {
  const __nv_bfloat16* x = nullptr;
  const __nv_bfloat16* w = nullptr;
  void* y = nullptr;
  bool y_f32 = false;
  bool w_kn = false;
  int64_t M = 0, N = 0, K = 0;
  float alpha = 1.0f;
  float softcap = 0.0f;
  const int32_t* offsets = nullptr;
  int G = 0;
  int split_k = 1;
  void* workspace = nullptr;
  size_t workspace_bytes = 0;
};
size_t matmul_workspace_bytes(const MatmulParams& p);
cudaError_t matmul_bf16(const MatmulParams& p, cudaStream_t stream);
int matmul_pick_split_k(int64_t M, int64_t N, int64_t K);

}  // namespace dgemma::kernels
