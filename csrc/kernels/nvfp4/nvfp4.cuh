// NVFP4 weights on the GPU (layout: python/dgemma_rt/nvfp4.py, the reference).
//
//   grouped_gemm_nvfp4   y[o_g : o_g+1] = x[o_g : o_g+1] @ W_g^T for every expert g, where
//                        W_g = (e2m1 * e4m3 block scale) * global_scale[g]: an NVFP4 tensor [G, N, K] (codes
//                        [G, N, K/2], block scales [G, N, K/16], one global scale per expert) that the host
//                        pre-shuffled at load into the kernel's layout (common/nvfp4_w4a16_layout.h:
//                        nvfp4::w4a16::shuffle_expert, or dgemma_rt.nvfp4.shuffle_w4a16): w holds G blocks of
//                        grouped_gemm_nvfp4_weight_bytes(N, K, gated) bytes, codes and re-encoded scales.
//                        x bf16 [Mtot, K] in expert-major order (offsets [G+1], on the device),
//                        y bf16 [Mtot, N]. W4A16: the weights are decoded in registers to bf16 by bit tricks
//                        (e2m1 x e4m3 is exact in bf16) and fed to mma.sync m16n8k16 with fp32 accumulation;
//                        the global scale multiplies the accumulator at the end. Each weight byte is read
//                        once per 64-token pass of its expert: once per step at ~16 tokens per expert.
//                        gated: W is gate_up [G, 2I, K] (gate rows first), shuffled with gated = true (the
//                        layout pairs gate and up rows), and y [Mtot, I] = gelu_tanh(gate) * up, each
//                        rounded to bf16 first: bit-identical to the GEMM followed by moe_gelu_gate, without
//                        writing and re-reading [Mtot, 2I].
//                        gather: row r of the product reads x[gather[r] / gather_div] instead of x[r]:
//                        with moe_permute's perm_slot and top-k, x is the unpermuted expert input
//                        [T, K] and the permuted copy xp [T*k, K] is never written.
//
// Two kernels read the same layout (path): mma.sync m16n8k16 in passes of up to 64 tokens per expert
// (any sm_80+ GPU; grouped_gemm_nvfp4.cu) and, on Hopper, wgmma m64nNk16 with the decoded weights as the
// register A operand in passes of up to 128 tokens (sm90_grouped_gemm_nvfp4_wgmma.cu). kAuto takes the
// wgmma kernel where grouped_gemm_nvfp4_wgmma_supported() and expected_rows >= kW4A16WgmmaMinTokens * G
// (batch >= 3 canvases of the 26B model), the mma.sync kernel otherwise. Both give the exact products
// of the exact tests; on other inputs they may differ in fp32 summation order inside an MMA.
//
// Needs K % 16 == 0, x and w 16-byte aligned, and sm_80 or newer (cudaErrorInvalidValue /
// cudaErrorNoKernelImageForDevice otherwise; path kWgmma where unsupported: cudaErrorNotSupported).
// Design and expected speed: the kernels' headers; not yet run on a GPU.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace dgemma::kernels {

enum class W4A16Path : int { kAuto = 0, kMmaSync = 1, kWgmma = 2 };
// Average tokens per expert from which kAuto takes the wgmma kernel: below it the mma.sync kernel's
// n8 token tiles waste no MMA work and a 64-token pass holds the whole expert.
constexpr int kW4A16WgmmaMinTokens = 48;

struct GroupedGemmNvfp4Params {
  const __nv_bfloat16* x = nullptr;  // [Mtot, K], with gather: [rows, K]
  const uint8_t* w = nullptr;        // [G, grouped_gemm_nvfp4_weight_bytes(N, K, gated)], pre-shuffled
  const float* w_global = nullptr;   // [G]
  const int32_t* offsets = nullptr;  // [G + 1], device memory, non-decreasing, offsets[0] = 0
  __nv_bfloat16* y = nullptr;        // [Mtot, N], gated: [Mtot, N/2]
  int G = 0, N = 0, K = 0;
  bool gated = false;                // N even
  const int32_t* gather = nullptr;   // [Mtot], device: source row (x[gather[r] / gather_div]) of row r
  int gather_div = 1;
  // The host's count of rows (Mtot lives on the device, in offsets[G]), for the kernel choice only.
  int expected_rows = 0;
  W4A16Path path = W4A16Path::kAuto;
};
cudaError_t grouped_gemm_nvfp4(const GroupedGemmNvfp4Params& p, cudaStream_t stream);
// Whether the wgmma kernel can run here: the current device is compute capability 9.0 and this build
// holds its sm_90a code (CUTLASS/CuTe headers and 90a in the architectures).
bool grouped_gemm_nvfp4_wgmma_supported();
// Bytes of one expert's pre-shuffled weights (nvfp4::w4a16::expert_bytes).
size_t grouped_gemm_nvfp4_weight_bytes(int N, int K, bool gated);
// The pre-shuffled layout from the stored form, on the device (shuffle_w4a16.cu): packed E2M1 codes
// [G, N, K/2] and E4M3 block scales [G, N, K/16] (no NaN: check on the host) -> out [G,
// grouped_gemm_nvfp4_weight_bytes(N, K, gated)], byte for byte nvfp4::w4a16::shuffle_expert's.
cudaError_t shuffle_w4a16(const uint8_t* packed, const uint8_t* scales, int G, int N, int K, bool gated, uint8_t* out,
                          cudaStream_t stream);

// ---------------------------------------------------------------------------------------------
// Blackwell (sm_100a, sm_120a): both operands NVFP4 on the block-scaled tensor cores. The
// activations are quantized per call (quantize_act_nvfp4), their block scales written straight
// into the MMA's scale layout (common/nvfp4_format.h: sf_offset), each expert's rows starting on
// a fresh 128-row scale tile. Compiled in CI; not yet run on a Blackwell GPU.

// Device-side global scale of n bf16 activations: *global = amax / (6 * 448) (1 if all zero).
// `global` is device memory; it also serves as the scratch of the reduction.
cudaError_t act_global_scale_nvfp4(const __nv_bfloat16* x, size_t n, float* global, cudaStream_t stream);

struct QuantizeActNvfp4Params {
  const __nv_bfloat16* x = nullptr;  // [Mtot, K], with gather: [rows, K], 16-byte aligned
  const int32_t* offsets = nullptr;  // [G + 1], device
  const float* global = nullptr;     // [1], device: a static input_scale or act_global_scale_nvfp4's
  uint8_t* q = nullptr;              // [Mtot, K/2] packed E2M1
  uint8_t* sf = nullptr;             // >= quantize_act_nvfp4_sf_bytes(Mtot, G, K): block scales
  int32_t* sf_starts = nullptr;      // [G + 1], device, written: first 128-row scale tile of group g
  int Mtot = 0, G = 0, K = 0;
  // gather: row r is x[gather[r] / gather_div] (moe_permute's perm_slot and top-k: the unpermuted
  // expert input [T, K], so the permuted bf16 copy is never written); null: row r is x[r].
  const int32_t* gather = nullptr;   // [Mtot], device
  int gather_div = 1;
};
// Scale bytes for Mtot rows in G groups: every group rounded up to 128 rows (an upper bound).
size_t quantize_act_nvfp4_sf_bytes(int Mtot, int G, int K);
cudaError_t quantize_act_nvfp4(const QuantizeActNvfp4Params& p, cudaStream_t stream);

class ParamsCache;  // kernels/gemm/params_cache.h

struct GroupedGemmNvfp4x4Params {
  const uint8_t* a = nullptr;            // [Mtot, K/2] activations, packed E2M1
  const uint8_t* a_sf = nullptr;         // their block scales (quantize_act_nvfp4), 128-byte aligned
  const int32_t* a_sf_starts = nullptr;  // [G + 1], device (quantize_act_nvfp4)
  const float* a_global = nullptr;       // [1], device
  const uint8_t* w = nullptr;            // [G, N, K/2] packed E2M1
  const uint8_t* w_sf = nullptr;         // [G, sf_bytes(N, K/16)] block scales in the MMA layout, 128-byte aligned
  const float* w_global = nullptr;       // [G]
  const int32_t* offsets = nullptr;      // [G + 1], device
  __nv_bfloat16* y = nullptr;            // [Mtot, N]
  int G = 0, N = 0, K = 0;               // K % 32 == 0, N % 8 == 0
  void* workspace = nullptr;             // device, >= the workspace size below, 256-byte aligned
  size_t workspace_bytes = 0;
};
// Only in builds with the CUTLASS headers (DGEMMA_WITH_CUTLASS). *_supported(): the current device
// is compute capability 10.0 / 12.0 and this build holds sm_100a / sm_120a code; otherwise the
// GEMMs return cudaErrorNotSupported.
bool sm100_nvfp4_supported();
bool sm120_nvfp4_supported();
size_t grouped_gemm_nvfp4_sm100_workspace_size(int G);
size_t grouped_gemm_nvfp4_sm120_workspace_size(int G);
// cache: prepared launches (keyed by workspace and G), or null. An argument of its own, not a field:
// the params struct is also the setup kernel's argument, whose device code a host pointer would change.
cudaError_t grouped_gemm_nvfp4_sm100(const GroupedGemmNvfp4x4Params& p, cudaStream_t stream,
                                     ParamsCache* cache = nullptr);
cudaError_t grouped_gemm_nvfp4_sm120(const GroupedGemmNvfp4x4Params& p, cudaStream_t stream,
                                     ParamsCache* cache = nullptr);
// Row-major E4M3 block scales [G, rows, kblocks] -> [G, sf_bytes(rows, kblocks)] in the MMA layout,
// padding zero (swizzle_scales.cu): the weights' w_sf of the GEMMs above, made at load; byte for byte
// dgemma_rt.nvfp4.swizzle_scales (index math: nvfp4::swizzle_scale). Any architecture.
cudaError_t swizzle_scales_nvfp4(const uint8_t* scales, int G, int rows, int kblocks, uint8_t* out,
                                 cudaStream_t stream);

// The block-scale byte offsets CUTLASS's Sm1xxBlockScaledConfig layout gives a rows x K matrix
// (out[r * K/16 + kb]), evaluated on the host: the check of nvfp4::sf_offset.
void cutlass_nvfp4_sf_offsets(int rows, int K, int64_t* out);

}  // namespace dgemma::kernels
