// W4A16 NVFP4 grouped GEMM for the MoE experts (contract: nvfp4.cuh; weight layout and decode:
// common/nvfp4_w4a16_layout.h). Marlin-class: weights pre-shuffled at load into the order the MMA
// fragments need, decoded by bit tricks in registers, bf16 mma.sync with fp32 accumulation.
//
// Shapes (26B-A4B): G = 128 experts, ~16 tokens per expert per step at batch 1 (0 .. ~64);
// gate_up K = 2816, N = 2 * 704 (gated: y = gelu_tanh(gate) * up, [tokens, 704]); down K = 704, N = 2816.
//
// Grid (groups(N) = N / 128 rows or I / 64 gated features, G), 256 threads = 8 warps, 2 CTAs per SM.
// Swap-AB: the weights are the M = 16 side of mma.m16n8k16 (warp w owns MMA row block 8 * blockIdx.x + w,
// 16 rows), the expert's tokens the N = 8 side, so a 16-token expert wastes no MMA rows. Per 64-token
// pass (experts with more tokens take several passes, each re-streaming its weights: fine at batch 1),
// a 6-stage cp.async pipeline moves per stage one contiguous 4608-byte unit of weights + re-encoded
// scales (16 bytes per thread, L2 evict-first) and the tokens' 64-column activation slice (bf16 rows in
// shared memory, 16-byte chunks XOR-swizzled by row so ldmatrix is conflict-free; gather mode fetches
// token row gather[r] / gather_div: the MoE permutation is never written). Per k-step and warp: one word
// of 8 codes per lane (a quarter LDS.128), decode (5 LOP3, 2 SHF, 2 IMAD.SHL), 4 HMUL2.BF16 by the
// scales (broadcast halves), one ldmatrix.x4 per 16 tokens and NT = ceil(tokens / 8) HMMAs (NT in
// {1, 2, 4, 8}, one instantiation each). Epilogue: acc * (global * 2^7), bf16; gated: MMA rows 0-7 are
// gate rows and 8-15 the matching up rows, so each lane finishes gelu(gate) * up in registers, each
// rounded to bf16 first (bit-identical to the GEMM followed by moe_gelu_gate). Each output is summed
// by one thread in a fixed k order: deterministic.
//
// Why mma.sync and not wgmma on sm_90a: at batch 1 the GEMM is bound by weight bytes (4.5 bits per
// parameter): one layer reads 285.5 MB (gate_up) + 142.7 MB (down) = 428 MB, 85 + 43 = 128 us at
// 3.35 TB/s. The tensor work at ~16-24 tokens per expert (padded to n8) is ~25-30 GFLOP per layer, ~45 us
// at mma.sync's ~2/3 of the wgmma peak, overlapped with the byte stream; the issue slots go to the
// decode, not to the MMA. wgmma (A = decoded weights from registers, B = tokens from shared memory) pays
// off from ~48 tokens per expert (batch >= 3), where mma.sync's tensor rate nears the byte time: that is
// sm90_grouped_gemm_nvfp4_wgmma.cu, on the same weight layout (wgmma's per-warp register A fragment is
// mma.m16n8k16's) with the loader, decode and epilogue shared (w4a16_common.cuh); grouped_gemm_nvfp4
// picks it from the host's row count (nvfp4.cuh, W4A16Path).
//
// Expected speed (from the sm_90a SASS, tests/test_sass_w4a16.py): a warp spends 116 / 120 / 130 / 161
// instructions per 64-column stage (1024 weights) at 8 / 16 / 32 / 64 tokens, so at ~16 tokens per
// expert one layer issues ~93 M warp instructions: ~90-100 us on 528 schedulers at 1.75-1.98 GHz, under
// the 128 us byte time. With 16 warps per SM and 5 stages (~46 KB of weights per SM) in flight the byte
// stream should set the pace: ~1.1-1.2x the byte time, 140-155 us per layer (4.2-4.6 ms per step for the
// 30 layers) on an H100 SXM, against 1.0-1.3 ms per layer for the first kernel. The activation re-reads
// (tokens x K x 2 bytes per CTA, 0.44x the weight bytes at 16 tokens) come from L2. Not yet run on a GPU.
#include "kernels/nvfp4/w4a16_common.cuh"

#include "kernels/kernel_plan.h"
#include "kernels/nvfp4/w4a16_wgmma.h"

namespace dgemma::kernels {
namespace {

using namespace w4a16_detail;
constexpr int kMaxTokens = 64;                 // tokens per pass: 8 n8 tiles
constexpr int kStages = 6;
constexpr int kActRowBytes = L::kActRowBytes;   // 128: one token's 64 bf16 of a stage
constexpr int kActBytes = kMaxTokens * kActRowBytes;
constexpr int kStageBytes = L::kUnitBytes + kActBytes;  // 12800
constexpr int kRowsTableBytes = kMaxTokens * 4;
constexpr int kSmemBytes = kStages * kStageBytes + kRowsTableBytes;  // 77056: 2 CTAs per SM on sm_90/100
constexpr int kCtasPerSm = 2;  // 16 warps per SM keep the weight stream's stages in flight
static_assert(L::kUnitBytes == kThreads * 16 + 32 * 16, "a stage's weights: one 16-byte chunk per thread + the scales");
static_assert(L::kUnitBytes % 128 == 0 && kStageBytes % 128 == 0, "stages keep 128-byte alignment");

using ptx::cp_async_commit;
using ptx::cp_async_wait;
using ptx::ldmatrix_x4;
using ptx::mma_bf16_16816;
using ptx::smem_u32;
__device__ __forceinline__ void ldmatrix_x2(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(addr));
}

// One stage: 4 k-steps of the warp's 16 rows against 8 * NT tokens.
template <int NT>
__device__ __forceinline__ void compute_stage(const uint8_t* st, const uint32_t (&ldsm_off)[L::kKSteps],
                                              float (&acc)[NT][4]) {
  const WarpWeights ww = warp_weights(st);
  const uint32_t act = smem_u32(st + L::kUnitBytes);
#pragma unroll
  for (int j = 0; j < L::kKSteps; ++j) {
    uint32_t a[4];
    decode_kstep(ww, j, a);
    if constexpr (NT == 1) {
      uint32_t b[4];
      ldmatrix_x2(b, act + ldsm_off[j]);
      mma_bf16_16816(acc[0], a, b[0], b[1]);
    } else {
#pragma unroll
      for (int np = 0; np < NT / 2; ++np) {
        uint32_t b[4];
        ldmatrix_x4(b, act + ldsm_off[j] + np * 16 * kActRowBytes);  // = ldsm_offset(lane, j, np)
        mma_bf16_16816(acc[2 * np], a, b[0], b[1]);
        mma_bf16_16816(acc[2 * np + 1], a, b[2], b[3]);
      }
    }
  }
}

// Tokens t0 .. t0 + 8 * NT (those < m_end) of expert g against the CTA's 128 MMA rows, over all of K.
template <bool Gated, int NT>
__device__ __forceinline__ void run_pass(const GroupedGemmNvfp4Params& p, const uint8_t* w_cta, int ktiles,
                                         uint8_t* stages, const int32_t* rows, int g, int t0, int m_end) {
  const int lane = threadIdx.x % 32;
  uint32_t ldsm_off[L::kKSteps];  // per k-step; the next 16 tokens are 16 rows (2048 bytes) further
#pragma unroll
  for (int j = 0; j < L::kKSteps; ++j) ldsm_off[j] = L::ldsm_offset(lane, j, 0);

  float acc[NT][4];
#pragma unroll
  for (int n = 0; n < NT; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.0f;

  StageLoader<8 * NT> loader(p, w_cta, rows);
  auto load = [&](int s) { loader.load(p, stages + s * kStageBytes, smem_u32(stages + s * kStageBytes + L::kUnitBytes)); };
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < ktiles) load(s);
    cp_async_commit();
  }
  int read = 0, write = kStages - 1;
  for (int t = 0; t < ktiles; ++t) {
    cp_async_wait<kStages - 2>();
    __syncthreads();  // stage `read` landed for every thread; stage `write` (read at t - 1) is free
    if (t + kStages - 1 < ktiles) load(write);
    cp_async_commit();
    compute_stage<NT>(stages + read * kStageBytes, ldsm_off, acc);
    read = read + 1 == kStages ? 0 : read + 1;
    write = write + 1 == kStages ? 0 : write + 1;
  }
  cp_async_wait<0>();
  store_outputs<Gated, NT>(p, g, t0, m_end, [&](int n, int i) { return acc[n][i]; });
}

// grid (groups(N, gated), G): CTA (c, g) computes MMA row blocks 8c .. 8c+7 of expert g for all its tokens.
template <bool Gated>
__global__ void __launch_bounds__(kThreads, kCtasPerSm) grouped_gemm_nvfp4_kernel(GroupedGemmNvfp4Params p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  extern __shared__ __align__(128) uint8_t smem[];
  const int g = blockIdx.y;
  const int m_begin = p.offsets[g], m_end = p.offsets[g + 1];
  if (m_begin >= m_end) return;  // an expert without tokens reads no weights
  const int ktiles = L::k_tiles(p.K);
  const uint8_t* w_cta = cta_weights(p, Gated, g);
  int32_t* rows = reinterpret_cast<int32_t*>(smem + kStages * kStageBytes);
  for (int t0 = m_begin; t0 < m_end; t0 += kMaxTokens) {
    __syncthreads();  // a previous pass is done with the rows table and the stages (one barrier: no live m_begin)
    fill_rows<kMaxTokens>(p, t0, m_end, rows);
    __syncthreads();
    const int n = m_end - t0;
    if (n <= 8) run_pass<Gated, 1>(p, w_cta, ktiles, smem, rows, g, t0, m_end);
    else if (n <= 16) run_pass<Gated, 2>(p, w_cta, ktiles, smem, rows, g, t0, m_end);
    else if (n <= 32) run_pass<Gated, 4>(p, w_cta, ktiles, smem, rows, g, t0, m_end);
    else run_pass<Gated, 8>(p, w_cta, ktiles, smem, rows, g, t0, m_end);
  }
#endif
}

bool aligned16(const void* q) { return reinterpret_cast<uintptr_t>(q) % 16 == 0; }

}  // namespace

void w4a16_kernel_plans(KernelPlans& out) {
  out.push_back({"grouped_gemm_nvfp4_kernel<", kThreads, kSmemBytes, kCtasPerSm,
                 "kCtasPerSm (__launch_bounds__): 16 warps per SM hide the weight stream's latency"});
}

size_t grouped_gemm_nvfp4_weight_bytes(int N, int K, bool gated) { return L::expert_bytes(N, K, gated); }

cudaError_t grouped_gemm_nvfp4(const GroupedGemmNvfp4Params& p, cudaStream_t stream) {
  if (p.G <= 0 || p.G > 65535 || p.N <= 0 || p.K <= 0 || p.K % 16 != 0 || !p.x || !p.w || !p.w_global ||
      !p.offsets || !p.y)  // G is the grid's y
    return cudaErrorInvalidValue;
  if (!aligned16(p.x) || !aligned16(p.w)) return cudaErrorInvalidValue;  // 16-byte cp.async
  if (p.gather && p.gather_div <= 0) return cudaErrorInvalidValue;
  if (p.gated && p.N % 2) return cudaErrorInvalidValue;
  const bool wgmma = p.path == W4A16Path::kWgmma ||
                     (p.path == W4A16Path::kAuto && p.expected_rows >= kW4A16WgmmaMinTokens * p.G &&
                      grouped_gemm_nvfp4_wgmma_supported());
  if (wgmma) return w4a16_detail::launch_wgmma(p, stream);
  const dim3 grid(L::groups(p.N, p.gated), p.G);
  const auto kernel = p.gated ? grouped_gemm_nvfp4_kernel<true> : grouped_gemm_nvfp4_kernel<false>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes);
  if (err != cudaSuccess) return err;
  kernel<<<grid, kThreads, kSmemBytes, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace dgemma::kernels
