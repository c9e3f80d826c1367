// CPU reference backend: float32 activations, KV cache and arithmetic, host memory. The ground truth
// for every other backend; each op is deterministic (each output element computed by one thread in
// a fixed order), so results do not depend on the thread count. Weight matrices are read from the
// float32 host views where ModelWeights has them, else as stored in the checkpoint's memory map
// (BF16/F16, NVFP4, FP8), converted per tile inside the GEMMs (cpu::WeightMat): the same results.
#pragma once

#include <atomic>
#include <memory>
#include <mutex>
#include <vector>

#include "backend/backend.h"
#include "backend/cpu/ops.h"
#include "model/config.h"
#include "model/weights.h"

namespace dgemma {

class CpuBackend : public Backend {
 public:
  // bf16_dot: BF16 matrices read in place (not the router's) multiply with BF16 dot products where the
  // CPU has them (cpu::WeightMat::bf16_dot).
  CpuBackend(const ModelConfig& cfg, const ModelWeights& w, bool bf16_dot = false);
  std::string name() const override { return "cpu"; }
  bool supports(Op op) const override { return op != Op::kCount; }

  ScalarType act_dtype() const override { return ScalarType::kF32; }
  ScalarType kv_dtype() const override { return ScalarType::kF32; }
  std::shared_ptr<Buffer> allocate(size_t bytes, const char* what) override;
  void upload(const Tensor& dst, const void* src) override;
  void download(void* dst, const Tensor& src) override;

  void embed(const Tensor& ids, const Tensor& out) override;
  void rmsnorm(const Tensor& x, WeightRef w, const Tensor& out, float eps) override;
  void linear(WeightRef w, const Tensor& x, const Tensor& y) override;
  void copy(const Tensor& src, const Tensor& dst) override;
  void head_norm_rope(const Tensor& x, WeightRef w, const Tensor& positions, const Tensor& inv_freq,
                      float eps) override;
  void kv_write(const Tensor& k, const Tensor& v, const Tensor& slot, const Tensor& k_cache,
                const Tensor& v_cache) override;
  void attention(const AttentionArgs& a) override;
  void residual_norm_add(const Tensor& x, const Tensor& h, WeightRef w, float eps) override;
  void mlp(WeightRef mlp, const Tensor& x, const Tensor& out, const Tensor& scratch) override;
  void moe_router(int layer, const Tensor& x, const Tensor& topk_idx, const Tensor& topk_w, float eps) override;
  size_t moe_workspace_bytes(int tokens) const override;
  void moe_experts(int layer, const Tensor& x, const Tensor& topk_idx, const Tensor& topk_w, const Tensor& out,
                   const Tensor& workspace) override;
  void ffn_combine(int layer, bool encoder, const Tensor& x, const Tensor& dense, const Tensor& moe,
                   float eps) override;
  void gather_rows(const Tensor& src, const Tensor& index, const Tensor& dst) override;
  void scatter_add_rows(const Tensor& dst, const Tensor& src, const Tensor& index) override;
  // Works through the positions in chunks of kHeadChunk: the chunk's logits [kHeadChunk, V] are the
  // only vocabulary-sized buffer, so its memory is bounded by the chunk and the threads, not the rows.
  void lm_head_sample(const SampleArgs& a) override;
  void lm_head_logits(const Tensor& x, const Tensor& logits) override;
  void soft_embedding(const Tensor& logits, const Tensor& out) override;

  // Profiling: the host time of each op call (steady_clock around the call).
  bool can_profile() const override { return true; }
  void set_profiling(bool on) override { profiling_ = on; }
  bool profiling() const override { return profiling_; }
  std::vector<OpTime> take_profile() override { return profile_.take(); }
  // Host memory from allocate() (KV cache, workspaces); the float32 weights belong to ModelWeights.
  MemoryStats memory_stats() const override { return memory_->stats(); }

  static constexpr int kHeadChunk = 64;

 protected:
  // Times one op call while profiling (a local at the top of each op).
  class OpTimer;

 private:
  const float* norm_weight(WeightRef w) const;  // null for kNone
  const cpu::WeightMat& matrix(WeightRef w) const;

  struct LayerMats {
    cpu::WeightMat q, k, v, o, mlp_gate, mlp_up, mlp_down, router, experts_gate_up, experts_down;
  };

  const ModelConfig& cfg_;
  const ModelWeights& w_;
  cpu::WeightMat embed_, lm_head_, sc_gate_, sc_up_, sc_down_;
  std::vector<LayerMats> mats_;
  std::mutex head_mu_;              // one head pass at a time: guards the buffers below
  std::vector<float> head_logits_;  // [kHeadChunk, V]
  std::vector<float> head_probs_;   // [kHeadChunk, V]
  std::vector<float> head_soft_;    // [kHeadChunk, H]
  // Per thread, [V] each: processed logits, CDF.
  std::vector<std::vector<float>> head_processed_;
  std::vector<std::vector<double>> head_cdf_;
  std::atomic<bool> profiling_{false};
  OpProfile profile_;
  std::shared_ptr<MemoryCounter> memory_ = std::make_shared<MemoryCounter>();
};

}  // namespace dgemma
