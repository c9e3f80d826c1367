// BF16 (and FP8, below) GEMMs on CUTLASS 3.x for Hopper (sm_90a: TMA + warp-specialized wgmma), fp32 accumulation,
// bf16 output. Both compute nn.Linear products, "TN" in BLAS terms:
//
//   gemm_bf16_tn:          Y[M, N] = X[M, K] @ W[N, K]^T          X, W, Y row-major
//   grouped_gemm_bf16_tn:  for g in [0, G):  D[o_g:o_{g+1}, :] = A[o_g:o_{g+1}, :] @ W[g]^T
//                          A [Mtot, K] (rows grouped by g, e.g. tokens permuted by expert),
//                          W [G, N, K], D [Mtot, N], o = offsets [G+1] on the device, o[0] = 0,
//                          non-decreasing, o[G] = Mtot. A group may be empty.
//
// The grouped GEMM builds its per-group problem sizes, pointers and strides on the device from
// `offsets` (a small setup kernel), so the host never needs the expert counts: no sync per step.
// It computes D_g^T = W_g @ A_g^T ("swap AB": the weight rows fill the 128-wide wgmma M tile and
// the few tokens of an expert, ~16 per step, a 32-wide N tile); the result is stored column-major,
// i.e. D row-major as above.
//
// Requirements (checked on the host, cudaErrorInvalidValue otherwise): K and N multiples of 8
// (16-byte TMA rows), all pointers 16-byte aligned, M, N, K, G >= 0 (M = 0 / Mtot = 0 is a no-op).
// Only Hopper (compute capability 9.0, code built for sm_90a) runs them: elsewhere, or when the
// build left out sm_90a, they return cudaErrorNotSupported (Blackwell has its own path later).
// The CUTLASS kernels exist only in builds with CUTLASS headers (DGEMMA_WITH_CUTLASS).
//
// Host work per call: each params struct may carry a ParamsCache (params_cache.h; the CUDA backend
// passes its own). A call whose key (pointers, sizes, device) has been seen before takes the kernel
// Params from it and only launches; otherwise CUTLASS checks the problem and encodes the TMA
// descriptors on the host (cuTensorMapEncode), and the cache keeps the result. The grouped GEMM's
// setup kernel runs every call: what it writes depends on the offsets, known only on the device.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace dgemma::kernels {

class ParamsCache;  // params_cache.h

struct GemmBf16Params {
  const __nv_bfloat16* x = nullptr;  // [M, K] row-major
  const __nv_bfloat16* w = nullptr;  // [N, K] row-major
  __nv_bfloat16* y = nullptr;        // [M, N] row-major
  int M = 0, N = 0, K = 0;
  ParamsCache* cache = nullptr;      // prepared launches, or null: prepare this one afresh
};

struct GroupedGemmBf16Params {
  const __nv_bfloat16* a = nullptr;  // [Mtot, K] row-major, group g = rows [offsets[g], offsets[g+1])
  const __nv_bfloat16* w = nullptr;  // [G, N, K] row-major
  __nv_bfloat16* d = nullptr;        // [Mtot, N] row-major
  const int32_t* offsets = nullptr;  // device [G + 1]
  int G = 0, N = 0, K = 0;
  void* workspace = nullptr;         // device, >= grouped_gemm_bf16_tn_workspace_size(G) bytes, 256-B aligned
  size_t workspace_bytes = 0;
  ParamsCache* cache = nullptr;      // prepared launches (keyed by workspace and G), or null
};

// True when the current device is compute capability 9.0 and this build has the sm_90a kernels.
bool sm90_gemm_supported();

cudaError_t gemm_bf16_tn(const GemmBf16Params& p, cudaStream_t stream);

// The LM head's logits (sm_90a): Y f32 [M, N] = softcap(alpha * X @ W^T), X [M, K], W [N, K] bf16 row-major,
// with kernels/matmul's epilogue (v *= alpha; softcap > 0: v = softcap * tanhf(v / softcap); 0: none).
// K, N multiples of 8, pointers 16-byte aligned. 128x256 tiles in 2x1 clusters for M = one canvas of
// 256 positions against N = the vocabulary (sm90_gemm_bf16_logits.cu).
struct GemmLogitsParams {
  const __nv_bfloat16* x = nullptr;  // [M, K]
  const __nv_bfloat16* w = nullptr;  // [N, K]
  float* y = nullptr;                // [M, N]
  int M = 0, N = 0, K = 0;
  float alpha = 1.f, softcap = 0.f;
  ParamsCache* cache = nullptr;      // prepared launches (alpha and softcap are part of the key), or null
};
cudaError_t gemm_bf16_tn_logits(const GemmLogitsParams& p, cudaStream_t stream);

// FP8 dense layers (W8A8, sm_90a): Y[M, N] = (Xq @ Wq^T) * x_scale[m] * w_scale[n], E4M3 codes in,
// fp32 accumulation (promoted periodically), bf16 out. K % 16 == 0, N % 8 == 0, pointers 16-byte
// aligned. x_scale: one per token (kernels/fp8 quantize_rows_fp8), w_scale: one per output channel.
struct GemmFp8Params {
  const uint8_t* x = nullptr;      // [M, K] E4M3
  const float* x_scale = nullptr;  // [M]
  const uint8_t* w = nullptr;      // [N, K] E4M3
  const float* w_scale = nullptr;  // [N]
  __nv_bfloat16* y = nullptr;      // [M, N]
  int M = 0, N = 0, K = 0;
  ParamsCache* cache = nullptr;    // prepared launches, or null
};
cudaError_t gemm_fp8_tn(const GemmFp8Params& p, cudaStream_t stream);

// Device workspace of the grouped GEMM for G groups on the current device (depends on its SM count):
// per-group problem sizes, pointers and strides plus CUTLASS's per-SM TMA descriptors.
size_t grouped_gemm_bf16_tn_workspace_size(int G);

cudaError_t grouped_gemm_bf16_tn(const GroupedGemmBf16Params& p, cudaStream_t stream);

}  // namespace dgemma::kernels
