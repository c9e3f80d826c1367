// The fused LM head + sampler + self-conditioning pass ("lm_head_sample" on the device): one stream
// of the tied embedding E per step, no [positions, vocab] tensor anywhere.
//
//   x     bf16 [P, H]   final-normed hidden states, P = rows * n (position t belongs to row t / n)
//   emb   bf16 [V, H]   tied embedding = LM head weight
//   temperature f32 [P / n]; uniform f64 [P] in [0, 1)
//   token, argmax i32 [P], entropy f32 [P] out
//   soft  bf16 [S, H]   out: soft[soft_index[t]] = softmax(x_t) @ E * soft_scale (soft_index < 0: skipped)
// with  logit_v = softcap(x_t . E_v) (cap * tanh(l / cap); softcap == 0: none), x_v = logit_v / T_row,
// and the sampling rule of sample_canvas (sampler.cuh): p_v = expf(x_v - M) * (1 / float(sum)),
// q_v = trunc(p_v * 2^62), token = first v with cum_v > min(trunc(u * sum q), sum q - 1);
// argmax = first index of the max; entropy = -sum p_v (x_v - lse). Requires H % 8 == 0, H <= 2816.
//
// Design (H100 numbers for the 26B shape: H = 2816, V = 262144, P = 256 per row):
//
// 1. lm_head_split_kernel: grid (8, P/64, S), clusters of 8 CTAs along H. CTA r of a cluster owns the
//    H slice [r*HC, r*HC + HC) (HC = 352 = H/8) of 64 positions and walks the vocabulary split s in
//    tiles of 64 entries: it streams E[tile, slice] (45 KB, cp.async, double-buffered) into shared
//    memory ONCE and uses it twice: as B of the partial logits X[64, slice] E[tile, slice]^T
//    (mma.sync m16n8k16, fp32) and, after the exchange, as B of the soft accumulation
//    acc[64, slice] += p[64, tile] E[tile, slice] (ldmatrix.trans; acc lives in registers, 88 per
//    thread). The exchange per tile: partials to shared memory, cluster barrier, CTA r sums the 8
//    partials of its 8 positions over DSMEM in rank order (deterministic), applies softcap and
//    temperature and keeps those positions' online statistics (running max, double sum, entropy
//    moment, first argmax, and per 64-entry chunk (m_c, s_c, a_c) for the token step), publishes
//    p = exp(x - m_run) as bf16 plus the rescale factor, cluster barrier, every CTA gathers the
//    64 x 64 p tile. S = max(1, 16 / (P/64)) splits (16 clusters = 128 CTAs; a function of P only,
//    so results do not depend on the device). Shared memory 166 KB, 256 threads, 1 CTA per SM.
// 2. lm_head_resolve_kernel<false>: one CTA per position. Merges the S splits in split order (max,
//    first argmax, sum, entropy, soft = sum_s acc_s exp(m_s - M) / sum * soft_scale as bf16), then
//    draws the token: chunk masses are ESTIMATED from (m_c, s_c), the crossing chunk is found, its 64
//    logits are RECOMPUTED bit for bit (same mma chains, same rank order, same softcap/temperature
//    code) and its q_v are exact. The estimates carry a rigorous error radius (expf ulps, the
//    subtractions, trunc); if the drawn token is the same for every value inside the radius the
//    token is the rule's token, otherwise the position is flagged.
// 3. lm_head_exact_mass_kernel: only for flagged positions (in batches of 16): recomputes every
//    logit of the position bit for bit and writes the EXACT integer mass sum q_v of each chunk.
// 4. lm_head_resolve_kernel<true>: flagged positions only: exact integer scan, recompute the chunk.
//
// What is exact and why. M and argmax are exact (a max over the same fp32 logits in any order).
// sum is a double sum of float terms in a fixed order, so float(sum) equals the one-pass value up
// to an ulp (rounding the sum differently); that is harmless for the token: a common factor on
// every q_v cancels in cum_v / sum q. Per-chunk masses derived after the merge from chunk statistics
// are NOT exact: q_v = trunc(expf(x_v - M) * inv * 2^62) cannot be rebuilt from
// sum_c expf(x_v - m_c), because expf is not exactly multiplicative and trunc is not linear; the
// per-term errors are independent (~2-5e-7 relative), so the estimated cum before the crossing is
// off by up to ~5e-7 of its mass — as large as a whole token's mass in a flat distribution
// (1/V = 3.8e-6). Recomputing the crossing chunk fixes the order inside the chunk but not that
// offset; hence the certificate, and the exact fallback for the positions whose draw lands within
// the radius of a token boundary. How many those are depends on how flat the distribution is: the
// radius grows with the mass before the target (~1.9e-6 of it), and at V = 262144 one token of a
// flat distribution holds 3.8e-6 of the mass. A numpy emulation of this scheme at V = 262144
// flagged, for logits drawn as N(0, s) (standard deviation s) and divided by the temperature:
// 75 % at s = 0.05, T = 0.8; 56 % at s = 1, T = 0.8 (random weights' logits at t_max: x . E with E
// of variance 1 / H, common/random_weights.h); 9.5 % at s = 2, T = 0.6; 8 % for 30 tanh(N(0, 3) / 30)
// at T = 0.8; 0.3 % at s = 4, T = 0.4. A trained model's rate is unmeasured; random-weight
// benchmarks pay the fallback often (see Cost). Every step is deterministic: fixed merge orders,
// integer CDFs, no float atomics.
//
// Cost (P = 256, H100 SXM): bytes = E once from HBM (bf16 262144 x 2816: 1.48 GB, 0.44 ms at
// 3.35 TB/s; each split's tiles are read by P/64 = 4 clusters at the same time, from L2) + x (1.4 MB) + workspace
// (~11.5 MB soft partials, 16 MB chunk statistics). FLOPs = 2 P V H (logits) + 2 P V H (soft)
// = 0.76 TFLOP: compute-bound, 0.77 ms at the 989 TFLOP/s bf16 peak; mma.sync at ~65 % of peak
// plus two cluster barriers per 64-entry tile: ~1.3-1.6 ms expected (today: LM head 1.1-1.4 ms +
// softmax @ E 1.0-1.4 ms + sampler 0.6 ms, and 0.25-2 GB of logits). Resolve: ~10 us. Fallback:
// +~0.25 ms per batch of 16 flagged positions (one more read of E), only when some are flagged: at
// half of 256 positions flagged (random weights) ~2 ms more; bench/kernels_gpu.py times both cases.
// Scales linearly in P (8 rows: ~10-12 ms). wgmma (sm_90a) and overlapping the next tile's
// logits with the exchange are the next steps; sm_120 (99 KB shared memory) needs a smaller tile.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace dgemma::kernels {

constexpr int kLmHeadMaxHidden = 2816;  // 8 cluster ranks x 352

struct LmHeadSampleParams {
  const __nv_bfloat16* x = nullptr;    // [P, H]
  const __nv_bfloat16* emb = nullptr;  // [V, H]
  int P = 0, H = 0, V = 0;
  int n = 0;                           // positions per row
  float softcap = 0.f;                 // 0: none
  const float* temperature = nullptr;  // [P / n]
  const double* uniform = nullptr;     // [P]
  int32_t* token = nullptr;            // [P]
  int32_t* argmax = nullptr;           // [P]
  float* entropy = nullptr;            // [P]
  __nv_bfloat16* soft = nullptr;       // [S, H]
  const int32_t* soft_index = nullptr; // [P], -1 skip
  float soft_scale = 1.f;              // the embedding scale: sqrt(H) in the model's dtype
  void* workspace = nullptr;
  size_t workspace_bytes = 0;
  // Optional, for tests: int32 [P], 1 where the token needed the exact fallback (steps 3-4).
  int32_t* fallback = nullptr;
};

size_t lm_head_sample_workspace_bytes(int P, int H, int V);
// Number of vocabulary splits the first kernel uses (a function of P and V only).
int lm_head_sample_splits(int P, int V);
cudaError_t lm_head_sample_fused(const LmHeadSampleParams& p, cudaStream_t stream);

}  // namespace dgemma::kernels
