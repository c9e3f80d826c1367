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
//                  xp is optional (nullptr: no gather; the W4A16 GEMM gathers through perm_slot itself).
//                  Two implementations with the same outputs bit for bit: one block (E <= 256, no scratch;
//                  serial over the slots, right for a decoder step) and a multi-block one (E <= 4096, needs
//                  moe_permute_workspace_bytes of scratch; for prefill). moe_permute picks by T*k.
//   (grouped GEMM  xp @ gate_up[e]^T -> h [T*k, 2I] bf16, gate columns first, then up)
//   moe_gelu_gate  h [M, 2I] -> act [M, I] = gelu_tanh(h[:, :I]) * h[:, I:], bf16 in/out, fp32 math
//   (grouped GEMM  act @ down[e]^T -> dn [T*k, H] bf16)
//   moe_combine    out[t, :] = sum over t's k slots in ascending expert order of
//                  topk_w[t, slot] * dn[inv[t*k + slot], :], fp32 accumulation, fp32 or bf16 out.
//
// All deterministic (no float atomics, fixed reduction orders); the combine rounds each weighted row
// before adding it, as the CPU backend (CpuBackend::moe_experts) does. Limits (cudaErrorInvalidValue
// otherwise): 1 <= k <= min(E, 32) for the router and combine; E <= 256 for the single-block permute,
// E <= 4096 for the multi-block one.
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
  // Device scratch of moe_router_workspace_bytes(T, E) bytes, 256-byte aligned, no initialisation
  // needed (the launch zeroes its counters; calls on one workspace must not overlap).
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
  __nv_bfloat16* xp = nullptr;        // [T*k, H] out, or nullptr: skip the gather (x is then not read)
  // Device scratch of moe_permute_workspace_bytes(T, E, k) bytes for the multi-block path, no
  // initialisation needed (calls on one workspace must not overlap). nullptr: single-block only
  // (and E <= 256); may be nullptr for T = 0 on either path.
  void* workspace = nullptr;
  int T = 0, H = 0, E = 0, k = 0;
};
// Ids outside [0, E) are dropped in both paths: not counted, their inv entries and the rows past
// offsets[E] are left unwritten.
size_t moe_permute_workspace_bytes(int T, int E, int k);
// Multi-block for E > 256, or with a workspace from a T*k threshold on; single-block otherwise.
template <typename Tx>
cudaError_t moe_permute(const MoePermuteParams<Tx>& p, cudaStream_t stream);
// The two paths by name (tests, benchmarks): single_block ignores the workspace; multi_block needs it.
template <typename Tx>
cudaError_t moe_permute_single_block(const MoePermuteParams<Tx>& p, cudaStream_t stream);
template <typename Tx>
cudaError_t moe_permute_multi_block(const MoePermuteParams<Tx>& p, cudaStream_t stream);

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
