// A test backend with CUDA-graph semantics on the CPU: the CPU backend's ops, plus capture and replay
// hooks (backend.h) that RECORD. Between begin_capture and end_capture an op does not run: its call
// is kept as a closure holding copies of its arguments (tensor views, i.e. pointers and shapes,
// weight refs, scalars such as SampleArgs::write_soft, and copies of any host arrays it reads);
// replay(key) runs the closures again in order, on whatever the memory holds by then. upload,
// download and allocate throw while recording, as anything the forward leaves inside a captured
// sequence would be lost or stale in a real graph. Each op also checks at run time the host-side
// promises a GPU kernel relies on without checking (attention's max_count / max_cached bounds and
// block-table width, write_soft), which catches a stale value baked into a replayed capture.
#pragma once

#include <algorithm>
#include <atomic>
#include <functional>
#include <map>
#include <memory>
#include <utility>
#include <vector>

#include "backend/cpu/cpu_backend.h"
#include "common/check.h"

namespace dgemma::bindings {

struct GraphCounters {
  std::atomic<long long> captures{0};       // end_capture calls
  std::atomic<long long> aborted{0};        // abort_capture calls that discarded a recording
  std::atomic<long long> replays{0};        // replay calls that ran a capture
  std::atomic<long long> replay_misses{0};  // replay calls without a capture for the key
  std::atomic<long long> replayed_ops{0};   // op calls run by replays
  std::atomic<long long> direct_steps{0};   // lm_head_sample calls run outside any replay
  std::atomic<long long> dropped{0};        // captures dropped (one by one or all at once)
  std::atomic<long long> held{0};           // captures held now
  std::atomic<int> fail_captures{0};        // end_capture fails this many more times (as a CUDA capture can)
};

class GraphRecordingBackend final : public CpuBackend {
 public:
  GraphRecordingBackend(const ModelConfig& cfg, const ModelWeights& w, std::shared_ptr<GraphCounters> counters)
      : CpuBackend(cfg, w), n_(std::move(counters)) {}
  std::string name() const override { return "cpu-graph"; }

  // ---- capture and replay
  bool can_capture() const override { return true; }
  void begin_capture() override {
    DG_CHECK(!recording_, "internal error: begin_capture while capturing");
    DG_CHECK(!replaying_, "internal error: begin_capture inside a replay");
    recording_ = true;
    tape_.clear();
  }
  void end_capture(uint64_t key) override {
    DG_CHECK(recording_, "internal error: end_capture without begin_capture");
    if (n_->fail_captures > 0) {  // still recording: the caller aborts, as after cudaStreamEndCapture fails
      n_->fail_captures--;
      DG_THROW(Unsupported, "injected capture failure (the test's fail_next_captures)");
    }
    recording_ = false;
    DG_CHECK(!tape_.empty(), "internal error: an empty capture");
    if (graphs_.count(key) == 0) n_->held++;
    graphs_[key] = std::move(tape_);
    tape_.clear();
    n_->captures++;
  }
  void abort_capture() override {
    if (!recording_) return;
    recording_ = false;
    tape_.clear();
    n_->aborted++;
  }
  bool replay(uint64_t key) override {
    DG_CHECK(!recording_, "internal error: replay while capturing");
    auto it = graphs_.find(key);
    if (it == graphs_.end()) {
      n_->replay_misses++;
      return false;
    }
    replaying_ = true;
    try {
      for (const auto& op : it->second) op();
    } catch (...) {
      replaying_ = false;
      throw;
    }
    replaying_ = false;
    n_->replays++;
    n_->replayed_ops += static_cast<long long>(it->second.size());
    return true;
  }
  void drop_capture(uint64_t key) override {
    if (graphs_.erase(key)) n_->dropped++, n_->held--;
  }
  void drop_captures() override {
    n_->dropped += static_cast<long long>(graphs_.size());
    n_->held -= static_cast<long long>(graphs_.size());
    graphs_.clear();
  }

  // ---- memory: never while recording
  std::shared_ptr<Buffer> allocate(size_t bytes, const char* what) override {
    not_recording("allocate");
    return CpuBackend::allocate(bytes, what);
  }
  void upload(const Tensor& dst, const void* src) override {
    not_recording("upload");
    CpuBackend::upload(dst, src);
  }
  void download(void* dst, const Tensor& src) override {
    not_recording("download");
    CpuBackend::download(dst, src);
  }

  // ---- ops: recorded while capturing, run otherwise
  void embed(const Tensor& ids, const Tensor& out) override {
    op([this, ids, out] { CpuBackend::embed(ids, out); });
  }
  void rmsnorm(const Tensor& x, WeightRef w, const Tensor& out, float eps) override {
    op([this, x, w, out, eps] { CpuBackend::rmsnorm(x, w, out, eps); });
  }
  void linear(WeightRef w, const Tensor& x, const Tensor& y) override {
    op([this, w, x, y] { CpuBackend::linear(w, x, y); });
  }
  void copy(const Tensor& src, const Tensor& dst) override {
    op([this, src, dst] { CpuBackend::copy(src, dst); });
  }
  void head_norm_rope(const Tensor& x, WeightRef w, const Tensor& positions, const Tensor& inv_freq,
                      float eps) override {
    op([this, x, w, positions, inv_freq, eps] { CpuBackend::head_norm_rope(x, w, positions, inv_freq, eps); });
  }
  void kv_write(const Tensor& k, const Tensor& v, const Tensor& slot, const Tensor& k_cache,
                const Tensor& v_cache) override {
    op([this, k, v, slot, k_cache, v_cache] { CpuBackend::kv_write(k, v, slot, k_cache, v_cache); });
  }
  void attention(const AttentionArgs& a) override {
    op([this, a] {
      check_attention_bounds(a);
      CpuBackend::attention(a);
    });
  }
  void residual_norm_add(const Tensor& x, const Tensor& h, WeightRef w, float eps) override {
    op([this, x, h, w, eps] { CpuBackend::residual_norm_add(x, h, w, eps); });
  }
  void mlp(WeightRef w, const Tensor& x, const Tensor& out, const Tensor& scratch) override {
    op([this, w, x, out, scratch] { CpuBackend::mlp(w, x, out, scratch); });
  }
  void moe_router(int layer, const Tensor& x, const Tensor& topk_idx, const Tensor& topk_w, float eps) override {
    op([this, layer, x, topk_idx, topk_w, eps] { CpuBackend::moe_router(layer, x, topk_idx, topk_w, eps); });
  }
  void moe_experts(int layer, const Tensor& x, const Tensor& topk_idx, const Tensor& topk_w, const Tensor& out,
                   const Tensor& ws) override {
    op([this, layer, x, topk_idx, topk_w, out, ws] { CpuBackend::moe_experts(layer, x, topk_idx, topk_w, out, ws); });
  }
  void ffn_combine(int layer, bool encoder, const Tensor& x, const Tensor& dense, const Tensor& moe,
                   float eps) override {
    op([this, layer, encoder, x, dense, moe, eps] { CpuBackend::ffn_combine(layer, encoder, x, dense, moe, eps); });
  }
  void gather_rows(const Tensor& src, const Tensor& index, const Tensor& dst) override {
    op([this, src, index, dst] { CpuBackend::gather_rows(src, index, dst); });
  }
  void scatter_add_rows(const Tensor& dst, const Tensor& src, const Tensor& index) override {
    op([this, dst, src, index] { CpuBackend::scatter_add_rows(dst, src, index); });
  }
  void lm_head_sample(const SampleArgs& a) override {
    op([this, a] {
      check_write_soft(a);
      if (!replaying_) n_->direct_steps++;
      CpuBackend::lm_head_sample(a);
    });
  }
  void lm_head_logits(const Tensor& x, const Tensor& logits) override {
    op([this, x, logits] { CpuBackend::lm_head_logits(x, logits); });
  }
  void soft_embedding(const Tensor& logits, const Tensor& out) override {
    op([this, logits, out] { CpuBackend::soft_embedding(logits, out); });
  }

 private:
  template <typename F>
  void op(F&& f) {
    if (recording_)
      tape_.emplace_back(std::forward<F>(f));
    else
      f();
  }
  void not_recording(const char* what) const {
    DG_CHECK(!recording_, "internal error: " << what << " while capturing an op sequence (a replay would not repeat "
                                                        "it, or would read host memory that is gone by then)");
  }
  // The GPU kernels size their grid, split-KV plan and workspace from these host-side bounds and
  // do not check them: a replay with a bound smaller than the data would be wrong there. (The block
  // table's width the CPU op checks itself.)
  static void check_attention_bounds(const AttentionArgs& a) {
    const int64_t rows = a.tok0.numel();
    const int32_t* count = a.count.ptr<int32_t>();
    const int32_t* start = a.cache_start.ptr<int32_t>();
    const int32_t* len = a.cache_len.ptr<int32_t>();
    for (int64_t r = 0; r < rows; ++r) {
      DG_CHECK(count[r] <= a.max_count, "internal error: attention row " << r << " has " << count[r]
                                                                         << " new tokens but max_count is " << a.max_count);
      DG_CHECK(len[r] - start[r] <= a.max_cached, "internal error: attention row " << r << " has " << len[r] - start[r]
                                                                                    << " cached keys but max_cached is "
                                                                                    << a.max_cached);
    }
  }
  // write_soft == false promises that every soft_index is -1 (a backend may skip the soft embedding).
  static void check_write_soft(const SampleArgs& a) {
    if (a.write_soft) return;
    const int32_t* idx = a.soft_index.ptr<int32_t>();
    for (int64_t t = 0; t < a.soft_index.numel(); ++t)
      DG_CHECK(idx[t] < 0, "internal error: write_soft is false but position " << t << " keeps its self-conditioning state");
  }

  std::shared_ptr<GraphCounters> n_;
  bool recording_ = false, replaying_ = false;
  std::vector<std::function<void()>> tape_;
  std::map<uint64_t, std::vector<std::function<void()>>> graphs_;
};

}  // namespace dgemma::bindings
