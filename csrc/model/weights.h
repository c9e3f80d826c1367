// The model's weights as float32 views for the CPU backend. F32 tensors are used in place from the
// memory map when aligned; BF16/F16 are converted once at load.
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "model/config.h"
#include "model/safetensors.h"

namespace dgemma {

struct LayerWeights {
  // attention
  const float* q_proj = nullptr;  // [heads*hd, H]
  const float* k_proj = nullptr;  // [kv*hd, H]
  const float* v_proj = nullptr;  // [kv*hd, H], null on K=V layers
  const float* o_proj = nullptr;  // [H, heads*hd]
  const float* q_norm = nullptr;  // [hd]
  const float* k_norm = nullptr;  // [hd]
  // norms [H]
  const float* input_layernorm = nullptr;
  const float* post_attention_layernorm = nullptr;
  const float* pre_feedforward_layernorm = nullptr;
  const float* post_feedforward_layernorm = nullptr;
  const float* post_feedforward_layernorm_1 = nullptr;
  const float* post_feedforward_layernorm_2 = nullptr;
  const float* pre_feedforward_layernorm_2 = nullptr;
  // dense MLP
  const float* mlp_gate = nullptr;  // [I, H]
  const float* mlp_up = nullptr;    // [I, H]
  const float* mlp_down = nullptr;  // [H, I]
  // MoE
  const float* router_proj = nullptr;       // [E, H]
  const float* router_scale = nullptr;      // [H]
  const float* per_expert_scale = nullptr;  // [E]
  const float* experts_gate_up = nullptr;   // [E, 2*Im, H]
  const float* experts_down = nullptr;      // [E, H, Im]
  // The encoder's and decoder's layer scalars are separate buffers in the checkpoint.
  float encoder_layer_scalar = 1.0f;
  float decoder_layer_scalar = 1.0f;
};

struct ModelWeights {
  const float* embed_tokens = nullptr;  // [V, H]
  const float* lm_head = nullptr;       // [V, H] (tied to embed_tokens by default)
  const float* final_norm = nullptr;    // [H]
  const float* sc_pre_norm = nullptr;   // [H]
  const float* sc_gate = nullptr;       // [I, H]
  const float* sc_up = nullptr;         // [I, H]
  const float* sc_down = nullptr;       // [H, I]
  std::vector<LayerWeights> layers;
  size_t num_parameters = 0;

  // Called with (tensors done, tensors total) while loading.
  using Progress = std::function<void(int, int)>;
  static std::unique_ptr<ModelWeights> load(const std::string& dir, const ModelConfig& cfg, const Progress& progress);
  // Everything load() checks before it converts a tensor: the files are regular, every safetensors
  // header is valid, and every tensor the config implies is present with its dtype and shape.
  // Reads the headers only (the data is mapped, never touched). Throws CheckpointError.
  static void check(const std::string& dir, const ModelConfig& cfg);

 private:
  static std::unique_ptr<ModelWeights> load_impl(const std::string& dir, const ModelConfig& cfg,
                                                 const Progress& progress, bool check_only);

 public:

 private:
  std::unique_ptr<Checkpoint> ckpt_;
  std::vector<std::unique_ptr<float[]>> owned_;
};

}  // namespace dgemma
