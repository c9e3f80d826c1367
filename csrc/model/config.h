// DiffusionGemma configuration as read from a Hugging Face checkpoint directory
// (config.json + generation_config.json), resolved per layer.
#pragma once

#include <optional>
#include <string>
#include <vector>

namespace dgemma {

struct RopeSpec {
  std::string type = "default";  // "default" or "proportional"
  double theta = 10000.0;
  double partial_rotary_factor = 1.0;
  double factor = 1.0;
};

struct LayerSpec {
  bool sliding = true;
  int head_dim = 0;
  int num_kv_heads = 0;
  // Full-attention layers have no v_proj: V = v_norm(k_proj(x)).
  bool k_eq_v = false;
  // Inverse RoPE frequencies, head_dim / 2 of them (zeros for the non-rotated pairs).
  std::vector<float> inv_freq;
};

struct ModelConfig {
  int vocab_size = 0;
  int hidden_size = 0;
  int intermediate_size = 0;
  int num_layers = 0;
  int num_heads = 0;
  int num_experts = 0;
  int top_k_experts = 0;
  int moe_intermediate_size = 0;
  int sliding_window = 0;
  int max_position_embeddings = 0;
  int canvas_length = 256;
  double rms_norm_eps = 1e-6;
  std::optional<double> final_logit_softcapping = 30.0;
  bool tie_word_embeddings = true;
  std::optional<int> image_token_id;
  // config.json's "dtype" (or the older "torch_dtype"), e.g. "bfloat16": the dtype transformers loads the
  // model in by default (dtype "auto"); empty when absent. Only the embedding scale depends on it.
  std::string dtype;
  std::vector<LayerSpec> layers;
  std::vector<std::string> layer_types;
};

// Sampling temperatures are float32, as the reference computes them: t_min and t_max must be finite
// there (generation_config.json and generate() alike). The lowest temperature a canvas uses (its last
// step's) must also keep logits / T finite in float32; generate() checks it against kMinTemperature.
constexpr double kMaxTemperature = 3.4028234663852886e38;  // FLT_MAX
constexpr double kMinTemperature = 1e-30;

// generation_config.json values; absent keys stay empty and the caller's defaults apply.
struct GenerationDefaults {
  std::optional<std::vector<int>> eos_token_id;
  std::optional<int> pad_token_id;
  std::optional<int> bos_token_id;
  std::optional<int> max_new_tokens;
  std::optional<int> max_denoising_steps;
  std::optional<double> entropy_bound;
  std::optional<double> t_min;
  std::optional<double> t_max;
  std::optional<int> stability_threshold;
  std::optional<double> confidence_threshold;
};

// Throws CheckpointError with a readable message on anything missing, inconsistent, of the wrong
// JSON type or outside the supported ranges (see config.cpp), before anything is allocated.
ModelConfig load_model_config(const std::string& dir);
// Token ids are checked against vocab_size.
GenerationDefaults load_generation_defaults(const std::string& dir, int vocab_size);

}  // namespace dgemma
