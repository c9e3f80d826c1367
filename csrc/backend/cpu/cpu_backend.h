// CPU reference backend: float32 throughout, the ground truth for every other backend.
#pragma once

#include "backend/backend.h"
#include "model/config.h"
#include "model/weights.h"

namespace dgemma {

class CpuBackend final : public Backend {
 public:
  CpuBackend(const ModelConfig& cfg, const ModelWeights& w);
  std::string name() const override { return "cpu"; }
  void encode(const std::vector<SeqCache*>& caches, const std::vector<std::vector<int32_t>>& tokens) override;
  void decode(const std::vector<const SeqCache*>& caches, const int32_t* canvas, int n, const std::vector<const float*>& sc_logits,
              float* logits) override;

 private:
  struct Rows;
  // Runs the layer stack on x [T, H] in place. Encoder mode writes the caches.
  void layers(float* x, const Rows& rows, bool encoder);
  void moe(const LayerWeights& L, const float* x, float* out, int T);

  const ModelConfig& cfg_;
  const ModelWeights& w_;
};

}  // namespace dgemma
