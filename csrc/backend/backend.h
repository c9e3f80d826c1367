// A backend is an op set plus the memory its ops run on (the ggml pattern). The model's forward is
// written once, in model/forward.cpp, as a sequence of these ops on typed tensor views; the CPU
// backend (backend/cpu) is the reference op set and the ground truth for every other one.
//
// Conventions for every op below:
//   - T is the number of tokens of the pass, H = hidden_size, V = vocab_size, I = intermediate_size.
//   - "act" is the backend's activation dtype (act_dtype(): f32 on the CPU, bf16 on a GPU). The
//     residual stream x is always f32 [T, H]. Index tensors are i32.
//   - Tensors are contiguous and row-major unless an op says otherwise; outputs never alias inputs
//     unless an op says they may.
//   - Weights stay inside the backend, in its own format (float32 on the CPU; bf16, NVFP4 or FP8 on
//     a GPU): ops name them with a WeightRef.
//   - Index tensors hold host-validated values (token ids in [0, V), slots inside the cache): ops
//     need not check them again.
//   - An op a backend does not implement throws Unsupported; supports() says so up front, and the
//     forward checks it before the first pass.
#pragma once

#include <array>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "backend/tensor.h"

namespace dgemma {

// The op set. The order is only for naming.
enum class Op : int {
  kEmbed,
  kRmsNorm,
  kLinear,
  kCopy,
  kHeadNormRope,
  kKvWrite,
  kAttention,
  kResidualNormAdd,
  kMlp,
  kMoeRouter,
  kMoeExperts,
  kFfnCombine,
  kGatherRows,
  kScatterAddRows,
  kLmHeadSample,
  kLmHeadLogits,
  kSoftEmbedding,
  kResidualNormAddNorms,
  kFfnCombineNorm,
  kHeadNormRopeQkv,
  kCount
};
const char* op_name(Op op);

// An op the backend does not implement (or not for this model's weights).
struct Unsupported : Error {
  using Error::Error;
};

// The weights ops refer to. Per-layer ones take WeightRef::layer.
enum class W : uint8_t {
  kNone,
  // global
  kFinalNorm,    // [H]
  kScPreNorm,    // [H] self-conditioning pre_norm
  kScMlp,        // the self-conditioning gated MLP (gate/up [I, H], down [H, I])
  // per layer
  kInputNorm,    // [H]
  kPostAttnNorm,
  kPreFfnNorm,
  kPreFfnNorm2,
  kQNorm,        // [head_dim]
  kKNorm,        // [head_dim]
  kQProj,        // [heads * head_dim, H]
  kKProj,        // [kv_heads * head_dim, H]
  kVProj,        // [kv_heads * head_dim, H] (absent on K=V layers)
  kOProj,        // [H, heads * head_dim]
  kMlp,          // the layer's dense gated MLP (gate/up [I, H], down [H, I])
};
struct WeightRef {
  W id = W::kNone;
  int layer = -1;
};
inline WeightRef weight(W id, int layer = -1) { return WeightRef{id, layer}; }

// A norm a residual op applies to the residual it has just updated: out = rmsnorm(x) * w (out act
// [T, H]), fused into the pass that wrote x. An empty out (data == nullptr) asks for none.
struct NormOut {
  WeightRef w;
  Tensor out;
};

// One tensor of head_norm_rope_qkv: x act [T, heads, head_dim] normed in place with w (kNone: no
// scale), then RoPE'd when rope is set (with the op's positions and inv_freq). An empty x: none.
struct HeadNorm {
  Tensor x;
  WeightRef w;
  bool rope = false;
};

// Attention over one layer for every row of a pass (the CUDA kernel's contract, kernels/attention).
// Row r owns the new tokens [tok0[r], tok0[r] + count[r]) of q / k_new / v_new / out, at positions
// cache_len[r] + j. Its keys, in order: its cached positions [cache_start[r], cache_len[r]) read from
// the paged cache, then its own new tokens (attended from k_new / v_new; the cache does not hold
// them yet). Decoder (causal = false): every query sees every key of its row. Encoder (causal):
// key visible iff key_pos <= query_pos and, when window > 0, key_pos > query_pos - window.
// GQA: query head h reads KV head h / (heads / kv_heads). Scores are q . k * scale, softmax in f32.
struct AttentionArgs {
  Tensor q;            // act [T, heads, head_dim] (normed and rotated)
  Tensor k_new;        // act [T, kv_heads, head_dim]
  Tensor v_new;        // act [T, kv_heads, head_dim]
  Tensor out;          // act [T, heads, head_dim]
  Tensor k_cache;      // kv dtype [num_blocks, block_size, kv_heads, head_dim] (this layer's pool)
  Tensor v_cache;
  // i32 [rows, max_blocks]: cached position p of row r lives in block
  // block_table[r][(p - cache_first_pos[r]) / block_size] at offset (p - cache_first_pos[r]) % block_size.
  // max_blocks may exceed what any row needs (the forward buckets it so that a captured step survives
  // a growing context): entries past a row's blocks are padding, never read for a key.
  Tensor block_table;
  Tensor cache_first_pos;  // i32 [rows]
  Tensor cache_start;      // i32 [rows]
  Tensor cache_len;        // i32 [rows]
  Tensor tok0;             // i32 [rows]
  Tensor count;            // i32 [rows]
  // Host-side upper bounds (they size grids and the split-KV plan, which may be baked into a
  // capture): the result depends only on the device tensors above, and on the bounds no further than
  // a backend's split-KV choice (the same bounds give the same bits).
  int max_count = 0;       // host-side bound of count[r]
  int max_cached = 0;      // host-side bound of cache_len[r] - cache_start[r] (steers split-KV only)
  bool causal = false;
  int window = 0;          // 0: none
  float scale = 1.0f;
};

// The decoder's output head fused with the sampler and the next step's self-conditioning input
// (one pass over the vocabulary per position; no [rows, canvas, vocab] tensor outlives it):
//   logits    = softcap(x[t] @ E^T)                 (softcap: cap * tanh(logits / cap), f32)
//   processed = logits / temperature[row]           (row = t / n)
//   p         = softmax(processed) in f32 (max-subtracted exp, 1 / float(sum in f64))
//   argmax[t] = first index of the max; entropy[t] = -sum p_v * (processed_v - logsumexp), f64 sum
//   token[t]  = inverse CDF: the first v with cdf_v > uniform[t] * cdf_{V-1}, cdf = running f64 sum
//               of the f32 p_v (clamped to V - 1)
//   soft[soft_index[t], :] = (p @ E) * embed_scale  (skipped where soft_index[t] < 0)
// E is the tied embedding (the LM head), embed_scale sqrt(H) rounded to the model's dtype
// (ModelWeights::embed_scale). soft holds every row's self-conditioning state.
struct SampleArgs {
  Tensor x;            // act [T, H]: final-normed hidden states, T = rows * n
  int n = 0;           // positions per row
  Tensor temperature;  // f32 [rows]
  Tensor uniform;      // f64 [T], each in [0, 1)
  Tensor token;        // i32 [T] out
  Tensor argmax;       // i32 [T] out
  Tensor entropy;      // f32 [T] out
  Tensor soft;         // act [S, H] out (rows not named by soft_index are left alone)
  Tensor soft_index;   // i32 [T]: row of soft for position t, or -1 (read on the device)
  // false promises that every soft_index is -1 (no row keeps its state: the last step of every
  // canvas in the pass), so a backend may skip the soft embedding altogether. true: the device-side
  // soft_index alone decides which positions are written.
  bool write_soft = true;
};

// ---- profiling and memory accounting (optional features of a backend; see Backend below)

// One op's time over the calls a profile saw.
struct OpTime {
  Op op = Op::kCount;
  long long calls = 0;
  double seconds = 0;
};

// Per-op totals, filled by a backend while it profiles and handed out by take(). Thread-safe.
class OpProfile {
 public:
  void add(Op op, double seconds) {
    std::lock_guard<std::mutex> lock(mu_);
    auto& t = totals_[static_cast<int>(op)];
    t.calls++;
    t.seconds += seconds;
  }
  // The ops called since the last take, in Op order; resets the totals.
  std::vector<OpTime> take() {
    std::lock_guard<std::mutex> lock(mu_);
    std::vector<OpTime> out;
    for (int i = 0; i < static_cast<int>(Op::kCount); ++i)
      if (totals_[i].calls) out.push_back({static_cast<Op>(i), totals_[i].calls, totals_[i].seconds});
    totals_ = {};
    return out;
  }

 private:
  struct Total {
    long long calls = 0;
    double seconds = 0;
  };
  std::mutex mu_;
  std::array<Total, static_cast<size_t>(Op::kCount)> totals_{};
};

// The memory a backend has allocated (allocate()), live and at its peak, in bytes. device_free /
// device_total: what the device itself reports (all processes; 0 where the backend has no device).
struct MemoryStats {
  size_t live_bytes = 0, peak_bytes = 0;
  long long allocations = 0;  // allocate() calls so far
  size_t device_free = 0, device_total = 0;
};

// Counts a backend's allocations. Its buffers hold it by shared_ptr and give their bytes back when
// they go, which may be after the backend (a KV cache copied out after its engine is gone).
class MemoryCounter {
 public:
  void add(size_t bytes) {
    allocations_++;
    const size_t live = live_.fetch_add(bytes) + bytes;
    size_t peak = peak_.load();
    while (live > peak && !peak_.compare_exchange_weak(peak, live)) {
    }
  }
  void sub(size_t bytes) { live_.fetch_sub(bytes); }
  MemoryStats stats() const {
    MemoryStats s;
    s.live_bytes = live_.load(), s.peak_bytes = peak_.load(), s.allocations = allocations_.load();
    return s;
  }

 private:
  std::atomic<size_t> live_{0}, peak_{0};
  std::atomic<long long> allocations_{0};
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual std::string name() const = 0;
  virtual bool supports(Op op) const = 0;

  // ---- memory
  virtual ScalarType act_dtype() const = 0;
  virtual ScalarType kv_dtype() const = 0;
  // Persistent memory; contents undefined until written. `what` names it in an out-of-memory error.
  virtual std::shared_ptr<Buffer> allocate(size_t bytes, const char* what) = 0;
  // Host <-> backend copies of a contiguous tensor.
  virtual void upload(const Tensor& dst, const void* src) = 0;
  virtual void download(void* dst, const Tensor& src) = 0;

  // ---- ops (contracts above each)

  // out[t, :] = E[ids[t], :] * embed_scale (f32).  ids i32 [T], out f32 [T, H].
  virtual void embed(const Tensor& ids, const Tensor& out);
  // out = x * (mean(x^2) + eps)^-0.5 * w per row of D (w: a norm weight [D], or kNone for no scale),
  // statistics in f32. x, out: [rows, D], f32 or act (may differ, may alias).
  virtual void rmsnorm(const Tensor& x, WeightRef w, const Tensor& out, float eps);
  // y [T, N] = x [T, K] @ W^T (nn.Linear), act in and out.
  virtual void linear(WeightRef w, const Tensor& x, const Tensor& y);
  // dst = src, same dtype and shape.
  virtual void copy(const Tensor& src, const Tensor& dst);
  // In place on x act [T, heads, head_dim], per (token, head): RMSNorm with w (kNone: no scale), then
  // rotate-half RoPE when positions (i32 [T]) is given: angle_i = positions[t] * inv_freq[i]
  // (f32 [head_dim / 2]; zero frequencies leave their pair unrotated).
  virtual void head_norm_rope(const Tensor& x, WeightRef w, const Tensor& positions, const Tensor& inv_freq,
                              float eps);
  // head_norm_rope on a layer's q, k and v at once (one launch where a backend fuses; the default runs
  // one head_norm_rope per tensor, so both give the same numbers). The tensors do not overlap.
  virtual void head_norm_rope_qkv(const HeadNorm& q, const HeadNorm& k, const HeadNorm& v, const Tensor& positions,
                                  const Tensor& inv_freq, float eps);
  // k_cache[slot[t]] = k[t], v_cache[slot[t]] = v[t] with the caches viewed as
  // [num_blocks * block_size, kv_heads * head_dim]; slot[t] < 0 skips token t. k, v act [T, kv_heads,
  // head_dim]; slot i32 [T], distinct where >= 0.
  virtual void kv_write(const Tensor& k, const Tensor& v, const Tensor& slot, const Tensor& k_cache,
                        const Tensor& v_cache);
  virtual void attention(const AttentionArgs& a);
  // x += rmsnorm(h) * w (post_attention_layernorm and the residual add). x f32 [T, H], h act [T, H]
  // (clobbered).
  virtual void residual_norm_add(const Tensor& x, const Tensor& h, WeightRef w, float eps);
  // out = down(gelu_tanh(gate(x)) * up(x)) for mlp = {kMlp, layer} or {kScMlp}. x, out act [T, H];
  // scratch act [T, 3 * I] (gate | up, then the activation).
  virtual void mlp(WeightRef mlp, const Tensor& x, const Tensor& out, const Tensor& scratch);
  // The router on the raw residual x f32 [T, H]: RMSNorm without scale, * router_scale * H^-0.5,
  // linear to the experts, softmax (f32), top-k (ties: lower expert first), renormalised to sum 1,
  // * per_expert_scale. topk_idx i32 [T, k], topk_w f32 [T, k], slots in descending probability.
  virtual void moe_router(int layer, const Tensor& x, const Tensor& topk_idx, const Tensor& topk_w, float eps);
  // Bytes of scratch moe_experts needs for T tokens.
  virtual size_t moe_workspace_bytes(int tokens) const;
  // out[t] = sum over t's k slots, in ascending expert order, of
  //          topk_w[t, s] * down_e(gelu_tanh(gate_e(x[t])) * up_e(x[t])),   e = topk_idx[t, s]
  // (each weighted expert output rounded before the sum). x act [T, H] (pre_feedforward_layernorm_2
  // of the residual), out act [T, H], workspace >= moe_workspace_bytes(T) bytes (dtype ignored).
  virtual void moe_experts(int layer, const Tensor& x, const Tensor& topk_idx, const Tensor& topk_w,
                           const Tensor& out, const Tensor& workspace);
  // The end of a layer: x = (x + rmsnorm(rmsnorm(dense) * w1 + rmsnorm(moe) * w2) * w) * scalar with
  // w1/w2/w the post_feedforward_layernorm_1/_2/ weights and scalar the layer's encoder or decoder
  // layer_scalar. x f32 [T, H]; dense, moe act [T, H] (both clobbered).
  virtual void ffn_combine(int layer, bool encoder, const Tensor& x, const Tensor& dense, const Tensor& moe,
                           float eps);
  // Fused forms (one pass over the residual instead of several; a backend overrides them where it
  // fuses, and the defaults here run the ops they stand for, so both give the same numbers):
  //   residual_norm_add_norms: residual_norm_add(x, h, w), then a.out = rmsnorm(x) * a.w and
  //     b.out = rmsnorm(x) * b.w (the two pre-FFN norms). a.out may alias h; b.out aliases nothing.
  //   ffn_combine_norm: ffn_combine(...), then next.out = rmsnorm(x) * next.w (the next layer's input
  //     norm, or the final norm). next.out aliases nothing.
  virtual void residual_norm_add_norms(const Tensor& x, const Tensor& h, WeightRef w, float eps, const NormOut& a,
                                       const NormOut& b);
  virtual void ffn_combine_norm(int layer, bool encoder, const Tensor& x, const Tensor& dense, const Tensor& moe,
                                float eps, const NormOut& next);
  // dst[i, :] = src[index[i], :], or zeros where index[i] < 0 (a row with nothing to gather: the
  // decoder's rows without a self-conditioning signal). src, dst: [rows, D] of one dtype; index i32 [M].
  virtual void gather_rows(const Tensor& src, const Tensor& index, const Tensor& dst);
  // dst[index[i], :] += src[i, :] for every i with index[i] >= 0; index[i] < 0 skips row i (dst's rows
  // not named are left exactly as they are). dst f32 [rows, D], src act [M, D], index i32 [M],
  // distinct where >= 0.
  virtual void scatter_add_rows(const Tensor& dst, const Tensor& src, const Tensor& index);
  virtual void lm_head_sample(const SampleArgs& a);
  // logits f32 [T, V] = softcap(x @ E^T), x act [T, H]. For denoise_logits and tests.
  virtual void lm_head_logits(const Tensor& x, const Tensor& logits);
  // out act [S, H] = softmax(logits) @ E * embed_scale, logits f32 [S, V] (processed logits from the
  // caller, for denoise_logits' self-conditioning input; clobbered).
  virtual void soft_embedding(const Tensor& logits, const Tensor& out);

  // ---- capture and replay (CUDA graphs; optional)
  //
  // A backend that can record a sequence of op calls and run it again later says so in
  // can_capture(). Between begin_capture() and end_capture(key) the ops are recorded, not run: a
  // replay(key) later runs exactly those calls again with the arguments they were recorded with,
  // the same pointers and shapes and the same host-side scalars and host arrays (AttentionArgs'
  // max_count / max_cached, SampleArgs' write_soft, n, eps ...), reading whatever the memory behind
  // the pointers holds at replay time. So, while capturing:
  //   - only ops may be called: no upload, download or allocate (they would not be recorded, or
  //     would be recorded as copies from host memory that is gone by the replay); a backend throws
  //     Error when one is called;
  //   - every op's inputs must already be in backend memory at fixed addresses, and the caller
  //     must rewrite that memory (upload) before each replay rather than pass new host values;
  //   - an op must not need memory the backend does not hold yet: the same op sequence (the same
  //     shapes and host-side values) must have run uncaptured at least once since the backend's
  //     scratch last grew, so that every scratch buffer it uses is already large enough. A
  //     backend throws Error instead of growing scratch during a capture.
  // Everything a recorded sequence points at must outlive its replays: the caller drops the
  // captures (drop_capture / drop_captures) before it frees or moves memory a capture reads; a
  // backend drops its own captures when it reallocates its own scratch (replay then returns false
  // and the caller captures again). Captures and replays run on the backend's one stream, so work
  // queued before a replay (uploads) is ordered before it, and a download after it waits for it.
  virtual bool can_capture() const { return false; }
  // Starts recording (throws Unsupported where can_capture() is false).
  virtual void begin_capture();
  // Ends the recording and keeps it under key (replacing any capture held under that key).
  virtual void end_capture(uint64_t key);
  // Ends a recording without keeping it (an op threw while capturing); a no-op when none runs.
  virtual void abort_capture() {}
  // Runs the capture held under key and returns true, or returns false when there is none.
  virtual bool replay(uint64_t) { return false; }
  virtual void drop_capture(uint64_t) {}
  virtual void drop_captures() {}

  // ---- per-op profiling (optional)
  //
  // A backend that can time its ops says so in can_profile(). While set_profiling(true) holds, every
  // op call it runs adds its time to per-op totals (OpProfile) that take_profile() hands out and
  // resets: on the CPU the host time of the call; on a GPU the device time between events recorded
  // on the backend's stream before and after the op's kernels, read back at the next point where
  // the host waits for the stream anyway (a download) or in take_profile(), never by a wait per op.
  // Profiling off costs nothing but a flag test per op. Captures and profiles do not mix: the
  // Forward neither captures nor replays while its backend profiles (a replayed graph would give one
  // time for the whole step), and a backend need not time ops it records into a capture.
  // set_profiling(false) is a no-op on a backend that cannot profile; set_profiling(true) throws
  // Unsupported there. Ops time only their own work: no op calls another op.
  virtual bool can_profile() const { return false; }
  virtual void set_profiling(bool on);
  virtual bool profiling() const { return false; }
  // Totals per op since the last take (ops never called are left out), in Op order.
  virtual std::vector<OpTime> take_profile() { return {}; }

  // ---- memory accounting: what allocate() handed out, live and at its peak (all zero where a
  // backend does not count).
  virtual MemoryStats memory_stats() const { return {}; }

 protected:
  [[noreturn]] void unsupported(Op op) const;
};

}  // namespace dgemma
