// The MoE half of DiffusionGemma's FFN, around the grouped expert GEMMs (kernels/gemm):
//
//   moe_router     x [T, H] (raw residual, fp32 or bf16) -> topk_idx int32 [T, k], topk_w fp32 [T, k]
//                  RMSNorm without scale (eps) -> * router_scale[H] * H^-0.5 -> logits = . router_proj^T
//                  -> softmax (fp32) -> top-k (ties: lower expert first) -> renormalise to sum 1
//                  -> * per_expert_scale[idx]. Slots in descending probability order.
//   moe_permute    stable counting sort of the T*k (token, slot) pairs by expert, then a gather of the
//                  expert input xe [T, H] (fp32 or bf16) into xp [T*k, H] bf16, expert-major:
//                    expert_counts [E], expert_offsets [E+1] (offsets[0] = 0, offsets[E] = T*k),
//                    perm_slot [T*k]: permuted row -> token*k + slot (rows of an expert in (token, slot) order),
//                    inv [T*k]: token*k + slot -> permuted row.
//   (grouped GEMM  xp @ gate_up[e]^T -> h [T*k, 2I] bf16, gate columns first, then up)
//   moe_gelu_gate  h [M, 2I] -> act [M, I] = gelu_tanh(h[:, :I]) * h[:, I:], bf16 in/out, fp32 math
//   (grouped GEMM  act @ down[e]^T -> dn [T*k, H] bf16)
//   moe_combine    out[t, :] = sum over t's k slots in ascending expert order of
//                  topk_w[t, slot] * dn[inv[t*k + slot], :], fp32 accumulation, fp32 or bf16 out.
//
// All deterministic (no float atomics, fixed reduction orders); the combine rounds each weighted row
// before adding it, as the CPU backend (CpuBackend::moe_experts) does. Limits (cudaErrorInvalidValue
// otherwise): 1 <= k <= min(E, 32) for the router and combine; E <= 256 for the permute.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace dgemma::kernels {

template <typename Tx>  // float or __nv_bfloat16
struct MoeRouterParams {
  const Tx* x = nullptr;                         // [T, H]
  const __nv_bfloat16* router_proj = nullptr;    // [E, H]
  const float* router_scale = nullptr;           // [H]
  const float* per_expert_scale = nullptr;       // [E]
  int32_t* topk_idx = nullptr;                   // [T, k] out
  float* topk_w = nullptr;                       // [T, k] out
  // Device scratch of moe_router_workspace_bytes(T, E) bytes, 256-byte aligned, zero-filled once
  // before its first use (each call leaves it ready for the next; calls must not overlap).
  void* workspace = nullptr;
  int T = 0, H = 0, E = 0, k = 0;
  float eps = 1e-6f;
};
size_t moe_router_workspace_bytes(int T, int E);
template <typename Tx>
cudaError_t moe_router(const MoeRouterParams<Tx>& p, cudaStream_t stream);

template <typename Tx>  // float or __nv_bfloat16: the expert input before the bf16 cast
struct MoePermuteParams {
  const int32_t* topk_idx = nullptr;  // [T, k], each in [0, E)
  const Tx* x = nullptr;              // [T, H] expert input (pre_feedforward_layernorm_2(x))
  int32_t* expert_counts = nullptr;   // [E] out
  int32_t* expert_offsets = nullptr;  // [E + 1] out
  int32_t* perm_slot = nullptr;       // [T*k] out
  int32_t* inv = nullptr;             // [T*k] out
  __nv_bfloat16* xp = nullptr;        // [T*k, H] out
  int T = 0, H = 0, E = 0, k = 0;
};
template <typename Tx>
cudaError_t moe_permute(const MoePermuteParams<Tx>& p, cudaStream_t stream);

struct MoeGeluGateParams {
  const __nv_bfloat16* h = nullptr;  // [M, 2I]: gate | up
  __nv_bfloat16* act = nullptr;      // [M, I]
  int M = 0, I = 0;
};
cudaError_t moe_gelu_gate(const MoeGeluGateParams& p, cudaStream_t stream);

template <typename To>  // float or __nv_bfloat16
struct MoeCombineParams {
  const __nv_bfloat16* dn = nullptr;  // [T*k, H] expert outputs in permuted order
  const int32_t* topk_idx = nullptr;  // [T, k] (experts of a token distinct)
  const float* topk_w = nullptr;      // [T, k]
  const int32_t* inv = nullptr;       // [T*k]
  To* out = nullptr;                  // [T, H]
  int T = 0, H = 0, k = 0;
};
template <typename To>
cudaError_t moe_combine(const MoeCombineParams<To>& p, cudaStream_t stream);

}  // namespace dgemma::kernels
