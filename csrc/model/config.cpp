#include "model/config.h"

#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>

#include "common/check.h"

namespace dgemma {
namespace {

using json = nlohmann::json;
namespace fs = std::filesystem;

json read_json(const fs::path& path) {
  std::ifstream in(path);
  DG_REQUIRE(in.good(), CheckpointError, "cannot open " << path.string());
  try {
    return json::parse(in);
  } catch (const json::exception& e) {
    DG_THROW(CheckpointError, path.string() << " is not valid JSON: " << e.what());
  }
}

// Typed field access with messages that name the file and key.
template <typename T>
T get_or(const json& obj, const char* key, T fallback, const char* where) {
  auto it = obj.find(key);
  if (it == obj.end() || it->is_null()) return fallback;
  try {
    return it->get<T>();
  } catch (const json::exception&) {
    DG_THROW(CheckpointError, where << ": field '" << key << "' has the wrong type (" << it->dump() << ")");
  }
}

template <typename T>
T require(const json& obj, const char* key, const char* where) {
  auto it = obj.find(key);
  DG_REQUIRE(it != obj.end() && !it->is_null(), CheckpointError, where << ": missing field '" << key << "'");
  return get_or<T>(obj, key, T{}, where);
}

int positive(int v, const char* key) {
  DG_REQUIRE(v > 0, CheckpointError, "config.json: '" << key << "' must be positive, got " << v);
  return v;
}

RopeSpec parse_rope(const json& params, const std::string& layer_type) {
  RopeSpec r;
  if (params.is_null()) {
    if (layer_type == "full_attention") {
      r.type = "proportional";
      r.theta = 1e6;
      r.partial_rotary_factor = 0.25;
    }
    return r;
  }
  DG_REQUIRE(params.is_object(), CheckpointError, "config.json: rope_parameters['" << layer_type << "'] is not an object");
  const char* where = "config.json rope_parameters";
  r.type = get_or<std::string>(params, "rope_type", "default", where);
  r.theta = get_or<double>(params, "rope_theta", 10000.0, where);
  r.partial_rotary_factor = get_or<double>(params, "partial_rotary_factor", 1.0, where);
  r.factor = get_or<double>(params, "factor", 1.0, where);
  DG_REQUIRE(r.type == "default" || r.type == "proportional", CheckpointError,
             "config.json: rope_type '" << r.type << "' for " << layer_type
                                        << " is not supported (only 'default' and 'proportional')");
  return r;
}

// Mirrors transformers' default and proportional RoPE initialisers, in float32 as they compute.
std::vector<float> inv_freq_for(const RopeSpec& r, int head_dim, const std::string& layer_type) {
  std::vector<float> inv(head_dim / 2, 0.0f);
  const float base = static_cast<float>(r.theta);
  if (r.type == "default") {
    const int dim = static_cast<int>(head_dim * r.partial_rotary_factor);
    DG_REQUIRE(dim == head_dim, CheckpointError,
               "config.json: default RoPE with partial_rotary_factor " << r.partial_rotary_factor << " on "
                   << layer_type << " layers is not supported (the reference requires the full head dim)");
    for (int i = 0; i < head_dim / 2; ++i) {
      const float e = static_cast<float>(2 * i) / static_cast<float>(dim);
      inv[i] = 1.0f / std::pow(base, e);
    }
  } else {
    const int angles = static_cast<int>(std::floor(r.partial_rotary_factor * head_dim / 2.0));
    DG_REQUIRE(angles >= 0 && angles <= head_dim / 2, CheckpointError,
               "config.json: bad partial_rotary_factor " << r.partial_rotary_factor);
    for (int i = 0; i < angles; ++i) {
      const float e = static_cast<float>(2 * i) / static_cast<float>(head_dim);
      inv[i] = 1.0f / std::pow(base, e);
    }
  }
  for (auto& f : inv) f = f / static_cast<float>(r.factor);
  return inv;
}

}  // namespace

ModelConfig load_model_config(const std::string& dir) {
  const fs::path path = fs::path(dir) / "config.json";
  DG_REQUIRE(fs::is_directory(dir), CheckpointError, "checkpoint directory " << dir << " does not exist");
  DG_REQUIRE(fs::exists(path), CheckpointError, "no config.json in " << dir);
  const json root = read_json(path);
  DG_REQUIRE(root.is_object(), CheckpointError, "config.json: top level is not an object");
  const std::string model_type = get_or<std::string>(root, "model_type", "", "config.json");
  DG_REQUIRE(model_type == "diffusion_gemma", CheckpointError,
             "config.json: model_type is '" << model_type << "', expected 'diffusion_gemma'");
  DG_REQUIRE(root.contains("text_config") && root["text_config"].is_object(), CheckpointError,
             "config.json: missing text_config");
  const json& tc = root["text_config"];
  const char* where = "config.json text_config";

  ModelConfig c;
  c.vocab_size = positive(require<int>(tc, "vocab_size", where), "vocab_size");
  c.hidden_size = positive(require<int>(tc, "hidden_size", where), "hidden_size");
  c.intermediate_size = positive(require<int>(tc, "intermediate_size", where), "intermediate_size");
  c.num_layers = positive(require<int>(tc, "num_hidden_layers", where), "num_hidden_layers");
  c.num_heads = positive(require<int>(tc, "num_attention_heads", where), "num_attention_heads");
  const int kv_heads = positive(require<int>(tc, "num_key_value_heads", where), "num_key_value_heads");
  const int head_dim = positive(get_or<int>(tc, "head_dim", c.hidden_size / c.num_heads, where), "head_dim");
  c.num_experts = positive(require<int>(tc, "num_experts", where), "num_experts");
  c.top_k_experts = positive(require<int>(tc, "top_k_experts", where), "top_k_experts");
  DG_REQUIRE(c.top_k_experts <= c.num_experts, CheckpointError,
             "config.json: top_k_experts " << c.top_k_experts << " > num_experts " << c.num_experts);
  c.moe_intermediate_size = positive(require<int>(tc, "moe_intermediate_size", where), "moe_intermediate_size");
  c.sliding_window = positive(get_or<int>(tc, "sliding_window", 512, where), "sliding_window");
  c.max_position_embeddings = positive(get_or<int>(tc, "max_position_embeddings", 131072, where), "max_position_embeddings");
  c.rms_norm_eps = get_or<double>(tc, "rms_norm_eps", 1e-6, where);
  if (tc.contains("final_logit_softcapping")) {
    if (tc["final_logit_softcapping"].is_null())
      c.final_logit_softcapping.reset();
    else
      c.final_logit_softcapping = get_or<double>(tc, "final_logit_softcapping", 30.0, where);
  }
  c.tie_word_embeddings = get_or<bool>(root, "tie_word_embeddings", get_or<bool>(tc, "tie_word_embeddings", true, where), "config.json");
  c.canvas_length = positive(get_or<int>(root, "canvas_length", 256, "config.json"), "canvas_length");
  if (root.contains("image_token_id") && !root["image_token_id"].is_null())
    c.image_token_id = get_or<int>(root, "image_token_id", 0, "config.json");

  const std::string hidden_act = get_or<std::string>(tc, "hidden_activation", "gelu_pytorch_tanh", where);
  DG_REQUIRE(hidden_act == "gelu_pytorch_tanh", CheckpointError,
             "config.json: hidden_activation '" << hidden_act << "' is not supported (gelu_pytorch_tanh only)");
  DG_REQUIRE(!get_or<bool>(tc, "attention_bias", false, where), CheckpointError,
             "config.json: attention_bias=true is not supported");
  const std::string bidir = get_or<std::string>(tc, "use_bidirectional_attention", "", where);
  DG_REQUIRE(bidir.empty() || bidir == "vision", CheckpointError,
             "config.json: use_bidirectional_attention='" << bidir
                 << "' is not supported (text-only engine: the encoder is causal)");

  // Layer types: the reference's default is 5 sliding layers then one full, and the last is always full.
  if (tc.contains("layer_types") && !tc["layer_types"].is_null()) {
    c.layer_types = get_or<std::vector<std::string>>(tc, "layer_types", {}, where);
    DG_REQUIRE(static_cast<int>(c.layer_types.size()) == c.num_layers, CheckpointError,
               "config.json: layer_types has " << c.layer_types.size() << " entries for " << c.num_layers << " layers");
  } else {
    for (int i = 0; i < c.num_layers; ++i)
      c.layer_types.push_back((i + 1) % 6 ? "sliding_attention" : "full_attention");
  }
  c.layer_types.back() = "full_attention";

  // Per-layer overrides: per_layer_config when saved, else global_head_dim / num_global_key_value_heads.
  std::map<int, std::pair<int, int>> overrides;  // layer -> (head_dim, kv_heads), 0 = not overridden
  if (tc.contains("per_layer_config") && tc["per_layer_config"].is_object()) {
    for (const auto& [key, val] : tc["per_layer_config"].items()) {
      int idx = -1;
      try {
        idx = std::stoi(key);
      } catch (...) {
        continue;  // keyed by layer type: resolved from the indexed entries
      }
      DG_REQUIRE(idx >= 0 && idx < c.num_layers && val.is_object(), CheckpointError,
                 "config.json: bad per_layer_config entry '" << key << "'");
      overrides[idx] = {get_or<int>(val, "head_dim", 0, where), get_or<int>(val, "num_key_value_heads", 0, where)};
    }
  } else {
    const int global_hd = get_or<int>(tc, "global_head_dim", 512, where);
    const int global_kv = get_or<int>(tc, "num_global_key_value_heads", 0, where);
    for (int i = 0; i < c.num_layers; ++i)
      if (c.layer_types[i] == "full_attention") overrides[i] = {global_hd, global_kv};
  }

  json rope_params = tc.contains("rope_parameters") ? tc["rope_parameters"] : json();
  auto rope_for = [&](const std::string& type) {
    json p = (rope_params.is_object() && rope_params.contains(type)) ? rope_params[type] : json();
    return parse_rope(p, type);
  };
  const RopeSpec rope_sliding = rope_for("sliding_attention");
  const RopeSpec rope_full = rope_for("full_attention");

  for (int i = 0; i < c.num_layers; ++i) {
    const std::string& t = c.layer_types[i];
    DG_REQUIRE(t == "sliding_attention" || t == "full_attention", CheckpointError,
               "config.json: unknown layer type '" << t << "' at layer " << i);
    LayerSpec l;
    l.sliding = t == "sliding_attention";
    l.k_eq_v = !l.sliding;
    l.head_dim = head_dim;
    l.num_kv_heads = kv_heads;
    if (auto it = overrides.find(i); it != overrides.end()) {
      if (it->second.first > 0) l.head_dim = it->second.first;
      if (it->second.second > 0) l.num_kv_heads = it->second.second;
    }
    DG_REQUIRE(l.head_dim > 0 && l.head_dim % 2 == 0, CheckpointError,
               "config.json: layer " << i << " head_dim " << l.head_dim << " must be positive and even");
    DG_REQUIRE(l.num_kv_heads > 0 && c.num_heads % l.num_kv_heads == 0, CheckpointError,
               "config.json: layer " << i << " has " << l.num_kv_heads << " KV heads, which does not divide "
                                      << c.num_heads << " attention heads");
    l.inv_freq = inv_freq_for(l.sliding ? rope_sliding : rope_full, l.head_dim, t);
    c.layers.push_back(std::move(l));
  }
  return c;
}

GenerationDefaults load_generation_defaults(const std::string& dir) {
  GenerationDefaults g;
  const fs::path path = fs::path(dir) / "generation_config.json";
  if (!fs::exists(path)) return g;
  const json root = read_json(path);
  DG_REQUIRE(root.is_object(), CheckpointError, "generation_config.json: top level is not an object");
  const char* where = "generation_config.json";
  auto opt_int = [&](const char* key) -> std::optional<int> {
    if (!root.contains(key) || root[key].is_null()) return std::nullopt;
    return get_or<int>(root, key, 0, where);
  };
  auto opt_double = [&](const char* key) -> std::optional<double> {
    if (!root.contains(key) || root[key].is_null()) return std::nullopt;
    return get_or<double>(root, key, 0.0, where);
  };
  if (root.contains("eos_token_id") && !root["eos_token_id"].is_null()) {
    const json& e = root["eos_token_id"];
    if (e.is_array())
      g.eos_token_id = get_or<std::vector<int>>(root, "eos_token_id", {}, where);
    else
      g.eos_token_id = std::vector<int>{get_or<int>(root, "eos_token_id", 0, where)};
  }
  g.pad_token_id = opt_int("pad_token_id");
  g.bos_token_id = opt_int("bos_token_id");
  g.max_new_tokens = opt_int("max_new_tokens");
  g.max_denoising_steps = opt_int("max_denoising_steps");
  g.t_min = opt_double("t_min");
  g.t_max = opt_double("t_max");
  g.stability_threshold = opt_int("stability_threshold");
  g.confidence_threshold = opt_double("confidence_threshold");
  if (root.contains("sampler_config") && root["sampler_config"].is_object())
    if (root["sampler_config"].contains("entropy_bound") && !root["sampler_config"]["entropy_bound"].is_null())
      g.entropy_bound = get_or<double>(root["sampler_config"], "entropy_bound", 0.1, where);
  return g;
}

}  // namespace dgemma
