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
// off from ~48 tokens per expert (batch >= 3), where mma.sync's tensor rate nears the byte time; the
// weight layout stays (wgmma's per-warp register A fragment is mma.m16n8k16's), so it can be added as an
// sm_90a variant without a new load-time format.
//
// Expected speed (from the sm_90a SASS, tests/test_sass_w4a16.py): a warp spends 117 / 121 / 131 / 163
// instructions per 64-column stage (1024 weights) at 8 / 16 / 32 / 64 tokens, so at ~16 tokens per
// expert one layer issues ~93 M warp instructions: ~90-100 us on 528 schedulers at 1.75-1.98 GHz, under
// the 128 us byte time. With 16 warps per SM and 5 stages (~46 KB of weights per SM) in flight the byte
// stream should set the pace: ~1.1-1.2x the byte time, 140-155 us per layer (4.2-4.6 ms per step for the
// 30 layers) on an H100 SXM, against 1.0-1.3 ms per layer for the first kernel. The activation re-reads
// (tokens x K x 2 bytes per CTA, 0.44x the weight bytes at 16 tokens) come from L2. Not yet run on a GPU.
#include "kernels/common/ptx.cuh"
#include "kernels/nvfp4/nvfp4.cuh"

#include "common/nvfp4_w4a16_layout.h"
#include "kernels/common/bf16.cuh"
#include "kernels/kernel_plan.h"

namespace dgemma::kernels {
namespace {

namespace L = nvfp4::w4a16;

constexpr int kThreads = L::kWarps * 32;
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

using ptx::cp_async16;
using ptx::cp_async_commit;
using ptx::cp_async_wait;
using ptx::ldmatrix_x4;
using ptx::mma_bf16_16816;
using ptx::smem_u32;
__device__ __forceinline__ void cp_async16_evict_first(uint32_t dst, const void* src, uint64_t policy) {
  asm volatile("cp.async.cg.shared.global.L2::cache_hint [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "l"(policy));
}
__device__ __forceinline__ void ldmatrix_x2(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(addr));
}


// a * (the low or high half of s, broadcast): HMUL2.BF16 with an operand selector, no extra instruction.
template <int Half>
__device__ __forceinline__ uint32_t scale_by(uint32_t a, uint32_t s) {
  const __nv_bfloat162 av = *reinterpret_cast<const __nv_bfloat162*>(&a);
  const __nv_bfloat162 sv = *reinterpret_cast<const __nv_bfloat162*>(&s);
  const __nv_bfloat162 r = __hmul2(av, Half ? __high2bfloat162(sv) : __low2bfloat162(sv));
  return *reinterpret_cast<const uint32_t*>(&r);
}

// Issues the copies of one stage after another (k-tiles in order 0, 1, 2, ...): the weight unit
// (16 bytes per thread, the scales on warp 0) and the activation chunks of 8 * NT tokens, with the
// per-thread source rows, destinations and columns fixed for the whole pass.
template <int NT>
struct StageLoader {
  static constexpr int kChunks = 8 * NT * 8;  // tokens x 8 chunks of 16 bytes
  static constexpr int kPer = (kChunks + kThreads - 1) / kThreads;
  const uint8_t* w;                       // the next unit of this CTA's weights
  const __nv_bfloat16* src[kPer];         // the next chunk of each of this thread's activation chunks
  uint32_t dst[kPer];                     // its offset in a stage's activation tile (swizzled)
  int col[kPer];                          // its first column in the next k-tile; K for padding tokens
  uint64_t policy;                        // L2 evict-first for the weights: each byte is read once

  __device__ __forceinline__ StageLoader(const GroupedGemmNvfp4Params& p, const uint8_t* w_cta,
                                         const int32_t* rows) : w(w_cta) {
    asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n" : "=l"(policy));
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      const int q = static_cast<int>(threadIdx.x) + i * kThreads;
      const int row = q / 8, ch = q % 8;
      const int srow = q < kChunks ? rows[row] : -1;
      src[i] = p.x + (srow >= 0 ? static_cast<size_t>(srow) * p.K + 8 * ch : 0);
      dst[i] = L::act_chunk_offset(row, ch);
      col[i] = srow >= 0 ? 8 * ch : p.K;
    }
  }

  __device__ __forceinline__ void load(const GroupedGemmNvfp4Params& p, uint8_t* st) {
    const int tid = threadIdx.x;
    cp_async16_evict_first(smem_u32(st + 16 * tid), w + 16 * tid, policy);
    if (tid < 32) cp_async16_evict_first(smem_u32(st + 16 * (kThreads + tid)), w + 16 * (kThreads + tid), policy);
    w += L::kUnitBytes;
    const uint32_t act = smem_u32(st + L::kUnitBytes);
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      if (kChunks % kThreads == 0 || tid + i * kThreads < kChunks) {
        const bool ok = col[i] < p.K;  // past K, or a padding token: zero-fill
        cp_async16(act + dst[i], ok ? static_cast<const void*>(src[i]) : static_cast<const void*>(p.x), ok ? 16u : 0u);
      }
      src[i] += L::kKTile;
      col[i] += L::kKTile;
    }
  }
};

// One stage: 4 k-steps of the warp's 16 rows against 8 * NT tokens.
template <int NT>
__device__ __forceinline__ void compute_stage(const uint8_t* st, const uint32_t (&ldsm_off)[L::kKSteps],
                                              float (&acc)[NT][4]) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const uint4 wq = *reinterpret_cast<const uint4*>(st + warp * L::kTileWeightBytes + 16 * lane);
  const uint2 sq = *reinterpret_cast<const uint2*>(st + L::kScaleOffset + warp * L::kTileScaleBytes + 8 * (lane / 4));
  const uint32_t words[L::kKSteps] = {wq.x, wq.y, wq.z, wq.w};
  const uint32_t act = smem_u32(st + L::kUnitBytes);
#pragma unroll
  for (int j = 0; j < L::kKSteps; ++j) {
    uint32_t a[4];
    L::decode_word(words[j], a);
    const uint32_t s = L::scale_pair(j < 2 ? sq.x : sq.y, j);
    a[0] = scale_by<0>(a[0], s);  // rows gid
    a[1] = scale_by<1>(a[1], s);  // rows gid + 8
    a[2] = scale_by<0>(a[2], s);
    a[3] = scale_by<1>(a[3], s);
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
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int gid = lane / 4;
  uint32_t ldsm_off[L::kKSteps];  // per k-step; the next 16 tokens are 16 rows (2048 bytes) further
#pragma unroll
  for (int j = 0; j < L::kKSteps; ++j) ldsm_off[j] = L::ldsm_offset(lane, j, 0);

  float acc[NT][4];
#pragma unroll
  for (int n = 0; n < NT; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.0f;

  StageLoader<NT> loader(p, w_cta, rows);
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < ktiles) loader.load(p, stages + s * kStageBytes);
    cp_async_commit();
  }
  int read = 0, write = kStages - 1;
  for (int t = 0; t < ktiles; ++t) {
    cp_async_wait<kStages - 2>();
    __syncthreads();  // stage `read` landed for every thread; stage `write` (read at t - 1) is free
    if (t + kStages - 1 < ktiles) loader.load(p, stages + write * kStageBytes);
    cp_async_commit();
    compute_stage<NT>(stages + read * kStageBytes, ldsm_off, acc);
    read = read + 1 == kStages ? 0 : read + 1;
    write = write + 1 == kStages ? 0 : write + 1;
  }
  cp_async_wait<0>();

  // acc[n][i]: MMA row acc_row(lane, i) (gid, or gid + 8 for i >= 2), token 8n + acc_col(lane, i).
  const float gs = p.w_global[g] * L::kAccScale;
  const int b = L::kWarps * blockIdx.x + warp;
  if constexpr (Gated) {
    // MMA row gid is gate feature f, row gid + 8 its up row: acc[n][i] and acc[n][i + 2] pair up
    const int f = 8 * b + gid;
    if (f >= p.N / 2) return;
#pragma unroll
    for (int n = 0; n < NT; ++n)
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int tok = t0 + 8 * n + L::acc_col(lane, i);
        if (tok < m_end) {
          // rounded to bf16 first, as the unfused GEMM's output is: bit-identical to moe_gelu_gate
          const float gate = __bfloat162float(__float2bfloat16_rn(acc[n][i] * gs));
          const float up = __bfloat162float(__float2bfloat16_rn(acc[n][i + 2] * gs));
          p.y[static_cast<size_t>(tok) * (p.N / 2) + f] = __float2bfloat16_rn(gelu_tanh(gate) * up);
        }
      }
  } else {
#pragma unroll
    for (int n = 0; n < NT; ++n)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int tok = t0 + 8 * n + L::acc_col(lane, i);
        const int row = L::weight_row(b, L::acc_row(lane, i), p.N, false);
        if (tok < m_end && row >= 0) p.y[static_cast<size_t>(tok) * p.N + row] = __float2bfloat16_rn(acc[n][i] * gs);
      }
  }
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
  const uint8_t* w_cta = p.w + static_cast<size_t>(g) * L::expert_bytes(p.N, p.K, Gated) +
                         static_cast<size_t>(blockIdx.x) * ktiles * L::kUnitBytes;
  int32_t* rows = reinterpret_cast<int32_t*>(smem + kStages * kStageBytes);
  for (int t0 = m_begin; t0 < m_end; t0 += kMaxTokens) {
    if (t0 != m_begin) __syncthreads();  // the previous pass is done with the rows table and the stages
    if (threadIdx.x < kMaxTokens) {
      const int tok = t0 + threadIdx.x;
      rows[threadIdx.x] = tok < m_end ? (p.gather ? p.gather[tok] / p.gather_div : tok) : -1;
    }
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
  if (p.G <= 0 || p.N <= 0 || p.K <= 0 || p.K % 16 != 0 || !p.x || !p.w || !p.w_global || !p.offsets || !p.y)
    return cudaErrorInvalidValue;
  if (!aligned16(p.x) || !aligned16(p.w)) return cudaErrorInvalidValue;  // 16-byte cp.async
  if (p.gather && p.gather_div <= 0) return cudaErrorInvalidValue;
  if (p.gated && p.N % 2) return cudaErrorInvalidValue;
  const dim3 grid(L::groups(p.N, p.gated), p.G);
  const auto kernel = p.gated ? grouped_gemm_nvfp4_kernel<true> : grouped_gemm_nvfp4_kernel<false>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes);
  if (err != cudaSuccess) return err;
  kernel<<<grid, kThreads, kSmemBytes, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace dgemma::kernels
