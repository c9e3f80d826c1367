// The model's weights: for every weight its source in the checkpoint (read as stored: bf16, NVFP4,
// FP8 on a GPU; converted per tile inside the CPU GEMMs), and float32 host views where asked for
// (HostF32): F32 tensors are used in place from the memory map when aligned, others converted once
// at load (NVFP4/FP8 dequantized). A 26B-A4B checkpoint is ~101 GB in float32, ~17.7 GB as stored.
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <unordered_map>
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

// Where one weight lives in the checkpoint, validated against the config (shape, dtype, scales).
struct WeightSource {
  enum class Format : uint8_t { kFloat, kNvfp4, kFp8 };
  const TensorRef* tensor = nullptr;        // F32/BF16/F16; NVFP4: U8 codes [.., K/2]; FP8: F8_E4M3
  Format format = Format::kFloat;
  const TensorRef* scale = nullptr;         // NVFP4: E4M3 block scales [.., K/16]; FP8: F32, 1 or one per row
  const TensorRef* global_scale = nullptr;  // NVFP4: F32, 1 or one per expert
  std::vector<int64_t> shape;               // the logical (unpacked) shape the config implies
  // Synthetic (ModelWeights::random; tensor is null): value i = common/random_weights.h value(seed, i,
  // amplitude, offset), the same on the host and on a GPU; with format kNvfp4, e2m1(nvfp4_code(seed,
  // i)) * e4m3(nvfp4_scale(seed, i / 16)) * amplitude / 6.
  uint64_t seed = 0;
  float amplitude = 0.f, offset = 0.f;
  bool synthetic() const { return tensor == nullptr; }
  int64_t numel() const;
  // The values as float32 (dequantized), elements [begin, begin + n) in row-major order.
  void to_f32(int64_t begin, int64_t n, float* out) const;
};

// Which float32 host views load() fills (the sources and the layer scalars are always filled).
enum class HostF32 : uint8_t {
  kNone,       // none (a GPU backend keeps its own copy)
  kWhereFree,  // F32 tensors in place from the map, and the 1-D ones (norms, scales: small); every
               // other matrix stays null and is read through its source as stored (the CPU backend)
  kAll,        // every tensor (the CPU backend's float32 mode: BF16 and quantized weights expanded)
};

// sqrt(hidden_size) rounded to `dtype`, by which the token embedding and the self-conditioning product are
// scaled. transformers multiplies by `embed_scale.to(weight.dtype)` (vLLM's Gemma too: the normalizer is
// downcast to the model's dtype), so a model run in BF16 scales by bf16(sqrt(H)): 53.0 for H = 2816, not
// 53.07. F32 (and FP8 / NVFP4, never used for the embedding): unrounded.
float embedding_scale(int64_t hidden_size, DType dtype);
// The dtype transformers runs a checkpoint in by default (dtype "auto"): config.json's dtype where it names
// bfloat16, float16 or float32, else `stored` (the embedding's, as transformers then infers it from the weights).
DType model_dtype(const ModelConfig& cfg, DType stored);

struct ModelWeights {
  const float* embed_tokens = nullptr;  // [V, H]
  // embedding_scale(H, model_dtype(config, the embedding's stored dtype)); random weights: stored as BF16,
  // as the released checkpoint is and as a GPU holds them.
  float embed_scale = 1.0f;
  const float* final_norm = nullptr;    // [H]
  const float* sc_pre_norm = nullptr;   // [H]
  const float* sc_gate = nullptr;       // [I, H]
  const float* sc_up = nullptr;         // [I, H]
  const float* sc_down = nullptr;       // [H, I]
  std::vector<LayerWeights> layers;
  size_t num_parameters = 0;

  // Called with (phase, tensors done, tensors total) while loading: kRead while load() reads the
  // checkpoint, then kUpload while a backend that keeps its own copy (a GPU) uploads the weights.
  enum class Phase { kRead, kUpload };
  using Progress = std::function<void(Phase, int, int)>;
  // The engine's callback while its backend is made (for the upload phase; null otherwise).
  Progress progress;
  static std::unique_ptr<ModelWeights> load(const std::string& dir, const ModelConfig& cfg, const Progress& progress,
                                            HostF32 host = HostF32::kAll);
  // Everything load() checks before it converts a tensor: the files are regular, every safetensors
  // header is valid, and every tensor the config implies is present with its dtype and shape.
  // Reads the headers only (the data is mapped, never touched). Throws CheckpointError.
  static void check(const std::string& dir, const ModelConfig& cfg);

  // Random weights at the config's shape, no checkpoint read (benchmarks at a real shape): matrices
  // uniform with variance 1 / fan_in, norm weights and scales 1 +- 0.1, layer scalars 1. With any
  // host mode but kNone every float32 view is filled (made once: a synthetic source is slow to read).
  // nvfp4_experts: the MoE experts are synthetic NVFP4 (codes, block scales and a global scale per
  // expert, common/random_weights.h), as a quantized checkpoint stores them.
  static std::unique_ptr<ModelWeights> random(const ModelConfig& cfg, uint64_t seed, HostF32 host = HostF32::kAll,
                                              bool nvfp4_experts = false);

  HostF32 host_f32() const { return host_f32_; }
  const std::unordered_map<std::string, WeightSource>& sources() const { return sources_; }
  // The source of a weight by its checkpoint name, e.g. "model.decoder.layers.3.mlp.up_proj.weight"
  // (layer_name(3, "mlp.up_proj.weight")); throws CheckpointError for a name the model does not use.
  const WeightSource& source(const std::string& name) const;
  static std::string global_name(const std::string& suffix) { return "model.decoder." + suffix; }
  static std::string layer_name(int layer, const std::string& suffix) {
    return "model.decoder.layers." + std::to_string(layer) + "." + suffix;
  }

 private:
  static std::unique_ptr<ModelWeights> load_impl(const std::string& dir, const ModelConfig& cfg,
                                                 const Progress& progress, HostF32 host, bool check_only);

  std::unique_ptr<Checkpoint> ckpt_;
  std::vector<std::unique_ptr<float[]>> owned_;
  std::unordered_map<std::string, WeightSource> sources_;
  HostF32 host_f32_ = HostF32::kAll;
};

}  // namespace dgemma
