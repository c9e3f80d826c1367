// DiffusionGemma's denoising sampler on the device, so a step needs no host round trip. Mirrors
// csrc/backend/cpu/sample.cpp (sample_position) and csrc/runtime/scheduler.cpp (the acceptance and
// stopping code of Job::end_step).
//
// sample_canvas: one CTA of 512 threads per canvas position (rows * canvas_length positions).
//   logits     f32  [P, V]  raw (already soft-capped) logits, P = rows * canvas_length
//   processed  f32  [P, V]  out: logits / temperature[row] (IEEE division); may equal `logits`
//   probs      bf16 [P, V]  out, optional (nullptr skips): softmax(processed), the self-conditioning
//                           soft-embedding GEMM's input
//   temperature f32 [rows]; uniform f64 [P] in [0, 1); active i32 [rows] (nullptr: all rows)
//   token, argmax i32 [P], entropy f32 [P] out
// Position i belongs to row i / canvas_length. Rows with active[row] == 0 are skipped: none of
// their outputs are written. V <= kSampleMaxVocab.
//   p_v = float(exp(x_v - max) * (1 / float(sum_v exp(x_v - max)))), x = processed;
//   argmax = first index of the max; entropy = -sum over p_v != 0 of p_v * (x_v - (max + log(float(sum))));
//   token = first v with cum_v > T, where cum is the running sum of p quantised to 2^-62
//   (q_v = trunc(p_v * 2^62), 0 for NaN; exact uint64 sums: any summation order gives the same
//   bits, so the search is deterministic and consistent across the block) and
//   T = min(trunc(u * sum q), sum q - 1).
// The quantisation moves a CDF value by at most V * 2^-62 (< 3e-13 at V = 2^20), below the float32
// noise of p itself. Tokens with p < 2^-62 are never drawn: where they lead the row, u = 0 (one
// value in 2^53 of the engine's noise) draws the first token of p >= 2^-62, the CPU's float64 CDF
// the first of p > 0. Giving them one unit each would trade that for draws of such tokens at every
// u below their count times 2^-62, where the CPU draws none.
// One CTA per position, not a cluster: a step has rows * 256 positions, enough CTAs to fill the
// GPU, and a single CTA keeps the reductions and the CDF search in one shared memory.
//
// accept_canvas: one CTA per row, canvas_length L <= 1024.
//   entropy f32, sampled / fresh / argmax i32: [rows, L]; active i32 [rows] (nullptr: all rows)
//   canvas i32 [rows, L] out: sampled where accepted, else fresh
//   history i32 [stability_threshold, rows, L] in/out, oldest first (read and written only when
//     adaptive_stopping and stability_threshold > 0; may be nullptr otherwise)
//   finished i32 [rows]: set to 1 when stable and confident (adaptive_stopping), never cleared
// Inactive rows are not touched at all. Acceptance: positions sorted by (entropy, index) ascending,
// cum = running float64 sum of their entropies, accepted iff float(cum) - e <= float(entropy_bound).
// Stable: argmax equals every history entry (always, when stability_threshold == 0); then the
// history shifts by one and the argmax becomes its newest entry. Confident: float32 sequential sum
// of the row's entropies / L < confidence_threshold (compared in double, as the CPU does).
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace dgemma::kernels {

constexpr int kSampleMaxVocab = 1 << 20;
constexpr int kAcceptMaxCanvas = 1024;

struct SampleCanvasParams {
  const float* logits = nullptr;
  float* processed = nullptr;
  __nv_bfloat16* probs = nullptr;
  const float* temperature = nullptr;
  const double* uniform = nullptr;
  const int32_t* active = nullptr;
  int32_t* token = nullptr;
  int32_t* argmax = nullptr;
  float* entropy = nullptr;
  int rows = 0;
  int canvas_length = 0;
  int vocab = 0;
};

cudaError_t sample_canvas(const SampleCanvasParams& p, cudaStream_t stream);

struct AcceptCanvasParams {
  const float* entropy = nullptr;
  const int32_t* sampled = nullptr;
  const int32_t* fresh = nullptr;
  const int32_t* argmax = nullptr;
  const int32_t* active = nullptr;
  int32_t* canvas = nullptr;
  int32_t* history = nullptr;
  int32_t* finished = nullptr;
  int rows = 0;
  int canvas_length = 0;
  double entropy_bound = 0.1;
  int stability_threshold = 1;
  double confidence_threshold = 0.005;
  bool adaptive_stopping = true;
};

cudaError_t accept_canvas(const AcceptCanvasParams& p, cudaStream_t stream);

}  // namespace dgemma::kernels
