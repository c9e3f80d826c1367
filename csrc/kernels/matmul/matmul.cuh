// General BF16 GEMM on the tensor cores of every architecture we build (sm_90a, sm_100a, sm_120a):
// mma.sync m16n8k16 (bf16 in, fp32 accumulate), ldmatrix from XOR-swizzled shared tiles, a 3-stage
// cp.async ring. Needs no CUTLASS: the CUDA backend's fallback where the CUTLASS sm90 GEMM does not run,
// its LM head (f32 logits with the softcap fused) and the self-conditioning product softmax @ E (K = vocab,
// split-K).
//
//   y[M, N] = softcap(alpha * (x[M, K] @ op(w)))     op(w) = w^T for w [N, K] (w_kn false, nn.Linear "TN"),
//                                                   w       for w [K, N] (w_kn true, "NN")
//   softcap(v) = softcap * tanhf(v / softcap) when softcap > 0, else v; in f32, one rounding at the store.
//
// Grouped (G > 0): rows [offsets[g], offsets[g+1]) of x and y use w[g] of w [G, N, K] (w_kn must be false,
// split_k must be 1). offsets is a device array [G + 1]: offsets[0] = 0, non-decreasing, offsets[G] = M;
// the host never reads it (the grid covers ceil(M / BM) + G row tiles; each CTA finds its group and tile
// from offsets and exits when it has none). G <= 4096.
//
// Split-K (split_k > 1, not grouped): K is cut into split_k parts of whole k-tiles; part s writes its f32
// partial sums to workspace [split_k, M, N], and a second kernel sums the parts in order s = 0, 1, ...
// then applies alpha and the softcap. Deterministic in every mode (no atomics; the reduction order
// depends only on the shape and split_k).
//
// Alignment: the fast path (16-byte cp.async) needs K % 8 == 0, N % 8 == 0 when w_kn, and 16-byte
// aligned x and w; otherwise a slower path loads the same tiles element by element (zero-filled at the
// edges). Any M, N, K >= 1 work. M == 0 or N == 0 is a no-op.
//
// cudaErrorInvalidValue: M, N, K < 0 or >= 2^31; a null x, w, y (M, N > 0); grouped with w_kn, split_k > 1,
// G > 4096 or a null offsets; split_k < 1 or > 256; a workspace smaller than matmul_workspace_bytes(p);
// more than 65535 column tiles (N > 65535 * 128).
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace dgemma::kernels {

struct MatmulParams {
  const __nv_bfloat16* x = nullptr;  // [M, K] row-major
  const __nv_bfloat16* w = nullptr;  // w_kn ? [K, N] : [N, K], row-major. Grouped: [G, N, K]
  void* y = nullptr;                 // [M, N] row-major: float if y_f32, else __nv_bfloat16
  bool y_f32 = false;
  bool w_kn = false;                 // false: y = x @ w^T (nn.Linear, "TN"); true: y = x @ w ("NN")
  int64_t M = 0, N = 0, K = 0;
  float alpha = 1.0f;                // y = alpha * (x @ w...), then the softcap
  float softcap = 0.0f;              // > 0: y = softcap * tanhf(y / softcap), in f32 before the store
  const int32_t* offsets = nullptr;  // grouped (G > 0): device [G + 1], offsets[0] = 0, non-decreasing,
  int G = 0;                         //   offsets[G] = M; rows [offsets[g], offsets[g+1]) use w[g]; w_kn must be false
  int split_k = 1;                   // > 1 (not grouped): K in split_k parts, fp32 partials in workspace, summed in part order
  void* workspace = nullptr;         // device, >= matmul_workspace_bytes(p) bytes
  size_t workspace_bytes = 0;
};

// split_k * M * N * sizeof(float) when split_k > 1, else 0.
size_t matmul_workspace_bytes(const MatmulParams& p);

cudaError_t matmul_bf16(const MatmulParams& p, cudaStream_t stream);

// A split_k for a (non-grouped) shape on the current device: 1 when the output tiles already fill the
// SMs or K is short; else enough parts for about one wave of CTAs, each part keeping >= 1024 of K.
// 1 when no device can be queried.
int matmul_pick_split_k(int64_t M, int64_t N, int64_t K);

}  // namespace dgemma::kernels
