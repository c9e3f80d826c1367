// The block-diffusion generate loop (the reference's DiffusionGemmaGenerationMixin.generate), native:
// encode what is not cached, denoise a canvas with the linear temperature schedule, entropy-bound
// acceptance, renoising and stable-and-confident stopping, commit the argmax canvas, repeat.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <vector>

#include "backend/backend.h"
#include "model/config.h"
#include "runtime/kv_cache.h"

namespace dgemma {

struct SamplerParams {
  int max_new_tokens = 256;
  int max_denoising_steps = 48;
  double entropy_bound = 0.1;
  double t_min = 0.4;
  double t_max = 0.8;
  int stability_threshold = 1;
  double confidence_threshold = 0.005;
  std::vector<int> eos_token_id;  // empty: no EOS stopping
  std::optional<int> pad_token_id;
  uint64_t seed = 0;
  bool adaptive_stopping = true;
};

// Throws InvalidArgument for what the reference's validate() rejects (and a bit more).
void validate(const SamplerParams& p, const ModelConfig& cfg);

// Randomness of the sampler. The default is counter-based (keyed by seed, canvas, step, row and
// position), so a seed gives the same output on every run and from any thread.
class NoiseSource {
 public:
  virtual ~NoiseSource() = default;
  // New canvas / renoise ids in [0, vocab): out[batch * length].
  virtual void canvas(int canvas_index, int step, int batch, int length, int32_t* out) = 0;
  // Uniforms in [0, 1) for inverse-CDF sampling: out[batch * length].
  virtual void uniform(int canvas_index, int step, int batch, int length, double* out) = 0;
};

class SeededNoise final : public NoiseSource {
 public:
  SeededNoise(uint64_t seed, int vocab) : seed_(seed), vocab_(vocab) {}
  void canvas(int canvas_index, int step, int batch, int length, int32_t* out) override;
  void uniform(int canvas_index, int step, int batch, int length, double* out) override;

 private:
  uint64_t seed_;
  int vocab_;
};

struct GenerateCallbacks {
  // Each denoising step's argmax canvas [batch, canvas_length].
  std::function<void(const int32_t*, int, int)> on_step;
  // Each committed canvas after EOS/pad handling [batch, canvas_length].
  std::function<void(const int32_t*, int, int)> on_block;
};

struct GenerateResult {
  std::vector<std::vector<int32_t>> new_tokens;     // per row: the committed canvases
  std::vector<double> tokens_per_forward;           // per row
  std::vector<std::vector<int>> steps_per_canvas;   // per row: decoder passes for each canvas it was live in
  double prefill_s = 0, denoise_s = 0, total_s = 0;
  int decoder_forwards = 0, encoder_forwards = 0;
};

// caches: one per row, already holding any previous turns; input_ids: the uncached tokens per row.
GenerateResult generate(Backend& backend, const ModelConfig& cfg, const std::vector<SeqCache*>& caches,
                        const std::vector<std::vector<int32_t>>& input_ids, const SamplerParams& params,
                        NoiseSource& noise, const GenerateCallbacks& callbacks);

}  // namespace dgemma
