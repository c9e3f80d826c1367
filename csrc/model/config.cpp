#include "model/config.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <map>
#include <nlohmann/json.hpp>

#include "common/check.h"
#include "model/files.h"

namespace dgemma {
namespace {

using json = nlohmann::json;

constexpr int64_t kInt32Max = std::numeric_limits<int32_t>::max();

// Typed field access. Types are exact (an integer field takes a JSON integer: no bools, no
// floats, nothing outside int32), ranges are checked, and messages name the file and the key.
class Fields {
 public:
  Fields(const json& obj, std::string where) : obj_(obj), where_(std::move(where)) {}

  // The value, or null when the key is absent or null.
  const json* find(const char* key) const {
    auto it = obj_.find(key);
    return it == obj_.end() || it->is_null() ? nullptr : &*it;
  }
  bool has(const char* key) const { return find(key) != nullptr; }
  // Refuses a key outside `allowed` (null-valued ones too), naming it and `why`.
  void only(std::initializer_list<const char*> allowed, const char* why) const {
    for (const auto& item : obj_.items())
      DG_REQUIRE(std::any_of(allowed.begin(), allowed.end(), [&](const char* k) { return item.key() == k; }),
                 CheckpointError, where_ << ": unknown key '" << printable(item.key(), 60) << "' (" << why << ")");
  }

  int integer(const char* key, int64_t lo, int64_t hi) const {
    const json* v = find(key);
    DG_REQUIRE(v, CheckpointError, where_ << ": missing field '" << key << "'");
    return integer_value(*v, key, lo, hi);
  }
  int integer(const char* key, int64_t lo, int64_t hi, int fallback) const {
    const json* v = find(key);
    return v ? integer_value(*v, key, lo, hi) : fallback;
  }
  std::optional<int> opt_integer(const char* key, int64_t lo, int64_t hi) const {
    const json* v = find(key);
    if (!v) return std::nullopt;
    return integer_value(*v, key, lo, hi);
  }
  int integer_value(const json& v, const std::string& key, int64_t lo, int64_t hi) const {
    DG_REQUIRE(v.is_number_integer(), CheckpointError,
               where_ << ": '" << key << "' must be an integer, got " << describe(v));
    bool in_range;
    int64_t x = 0;
    if (v.is_number_unsigned()) {
      const uint64_t u = v.get<uint64_t>();
      in_range = u <= static_cast<uint64_t>(hi) && (lo <= 0 || u >= static_cast<uint64_t>(lo));
      x = in_range ? static_cast<int64_t>(u) : 0;
    } else {
      x = v.get<int64_t>();
      in_range = x >= lo && x <= hi;
    }
    DG_REQUIRE(in_range, CheckpointError,
               where_ << ": '" << key << "' is " << v.dump() << ", outside the supported range [" << lo << ", " << hi
                      << "]");
    return static_cast<int>(x);
  }

  // A finite number (JSON integers are numbers too) with lo < v (or lo <= v when lo_closed), v <= hi.
  double number(const char* key, double lo, bool lo_closed, double hi, double fallback) const {
    const json* v = find(key);
    return v ? number_value(*v, key, lo, lo_closed, hi) : fallback;
  }
  std::optional<double> opt_number(const char* key, double lo, bool lo_closed, double hi) const {
    const json* v = find(key);
    if (!v) return std::nullopt;
    return number_value(*v, key, lo, lo_closed, hi);
  }
  double number_value(const json& v, const char* key, double lo, bool lo_closed, double hi) const {
    DG_REQUIRE(v.is_number(), CheckpointError, where_ << ": '" << key << "' must be a number, got " << describe(v));
    const double x = v.get<double>();
    const bool ok = std::isfinite(x) && (lo_closed ? x >= lo : x > lo) && x <= hi;
    DG_REQUIRE(ok, CheckpointError,
               where_ << ": '" << key << "' is " << v.dump() << "; it must be a finite number in "
                      << (lo_closed ? "[" : "(") << lo << ", " << hi << "]");
    return x;
  }

  std::string string(const char* key, const std::string& fallback) const {
    const json* v = find(key);
    if (!v) return fallback;
    DG_REQUIRE(v->is_string(), CheckpointError, where_ << ": '" << key << "' must be a string, got " << describe(*v));
    return v->get<std::string>();
  }
  bool boolean(const char* key, bool fallback) const {
    const json* v = find(key);
    if (!v) return fallback;
    DG_REQUIRE(v->is_boolean(), CheckpointError, where_ << ": '" << key << "' must be true or false, got " << describe(*v));
    return v->get<bool>();
  }
  const std::string& where() const { return where_; }

 private:
  const json& obj_;
  std::string where_;
};

// The supported ranges (README, "Checkpoints: what is accepted"). Sizes that the tensors do not
// pin down (windows, canvas, positions) also bound the memory the engine sets aside; counts bound
// the per-layer loops and tables built before any tensor is read.
constexpr int64_t kMaxVocab = 1 << 24;
constexpr int64_t kMaxHidden = 1 << 16;
constexpr int64_t kMaxIntermediate = 1 << 20;
constexpr int64_t kMaxLayers = 1024;
constexpr int64_t kMaxHeads = 1024;
constexpr int64_t kMaxHeadDim = 8192;
constexpr int64_t kMaxExperts = 4096;
constexpr int64_t kMaxPositions = 1 << 24;
constexpr int64_t kMaxCanvas = 1 << 16;
constexpr size_t kMaxEosIds = 1024;

RopeSpec parse_rope(const json* params, const std::string& layer_type) {
  RopeSpec r;
  if (!params) {
    if (layer_type == "full_attention") {
      r.type = "proportional";
      r.theta = 1e6;
      r.partial_rotary_factor = 0.25;
    }
    return r;
  }
  DG_REQUIRE(params->is_object(), CheckpointError,
             "config.json: rope_parameters['" << layer_type << "'] is not an object (got " << describe(*params) << ")");
  const Fields f(*params, "config.json rope_parameters['" + layer_type + "']");
  const double inf = std::numeric_limits<double>::infinity();
  r.type = f.string("rope_type", f.string("type", "default"));  // "type": the older key, which transformers reads too
  // transformers has no default for a given entry's theta: it fails, or on some paths takes text_config's own
  // rope_theta, so a missing one is refused, never read as 10000.
  DG_REQUIRE(f.has("rope_theta"), CheckpointError, f.where() << ": missing rope_theta");
  r.theta = f.number("rope_theta", 0.0, false, inf, 10000.0);
  r.partial_rotary_factor = f.number("partial_rotary_factor", 0.0, true, 1.0, 1.0);
  r.factor = f.number("factor", 0.0, false, inf, 1.0);
  DG_REQUIRE(r.type == "default" || r.type == "proportional", CheckpointError,
             "config.json: rope_type '" << printable(r.type, 60) << "' for " << layer_type
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
  // Only the proportional initialiser divides by factor; transformers' default one ignores it.
  if (r.type == "proportional")
    for (auto& f : inv) f = f / static_cast<float>(r.factor);
  for (float f : inv)
    DG_REQUIRE(std::isfinite(f), CheckpointError,
               "config.json: rope_parameters for " << layer_type << " give non-finite RoPE frequencies");
  return inv;
}

// "12" -> 12; anything but a short run of decimal digits -> -1.
int layer_index(const std::string& key) {
  if (key.empty() || key.size() > 6) return -1;
  int v = 0;
  for (char ch : key) {
    if (ch < '0' || ch > '9') return -1;
    v = v * 10 + (ch - '0');
  }
  return v;
}

// Messages about a file's contents start with the file's name ("config.json: ..."); the directory is put
// in front of them, so that a user (or a server loading several checkpoints) knows which checkpoint it is.
template <typename Parse>
auto naming_the_checkpoint(const std::string& dir, const std::string& file, Parse&& parse) -> decltype(parse()) {
  try {
    return parse();
  } catch (const CheckpointError& e) {
    const std::string msg = e.what();  // "config.json: ..." or "config.json text_config: ..."
    if (msg.compare(0, file.size(), file) != 0 || msg.size() <= file.size() ||
        (msg[file.size()] != ':' && msg[file.size()] != ' '))
      throw;
    throw CheckpointError(printable(dir, 400) + "/" + msg);
  }
}

}  // namespace

static ModelConfig parse_model_config(const std::string& dir) {
  require_directory(dir);
  const std::string path = dir + "/config.json";
  DG_REQUIRE(path_present(path), CheckpointError, "no config.json in " << printable(dir, 400));
  const json root = read_json_file(path, kMaxConfigBytes);
  DG_REQUIRE(root.is_object(), CheckpointError, "config.json: top level is not an object (got " << describe(root) << ")");
  const Fields top(root, "config.json");
  const std::string model_type = top.string("model_type", "");
  DG_REQUIRE(model_type == "diffusion_gemma", CheckpointError,
             "config.json: model_type is '" << printable(model_type, 60) << "', expected 'diffusion_gemma'");
  const json* tcp = top.find("text_config");
  DG_REQUIRE(tcp && tcp->is_object(), CheckpointError, "config.json: missing text_config");
  const json& tc = *tcp;
  const Fields f(tc, "config.json text_config");

  ModelConfig c;
  c.vocab_size = f.integer("vocab_size", 1, kMaxVocab);
  c.hidden_size = f.integer("hidden_size", 1, kMaxHidden);
  c.intermediate_size = f.integer("intermediate_size", 1, kMaxIntermediate);
  c.num_layers = f.integer("num_hidden_layers", 1, kMaxLayers);
  c.num_heads = f.integer("num_attention_heads", 1, kMaxHeads);
  const int kv_heads = f.integer("num_key_value_heads", 1, c.num_heads);
  const int head_dim = f.integer("head_dim", 2, kMaxHeadDim, 256);  // transformers' default, not hidden / heads
  c.num_experts = f.integer("num_experts", 1, kMaxExperts);
  c.top_k_experts = f.integer("top_k_experts", 1, kMaxExperts);
  DG_REQUIRE(c.top_k_experts <= c.num_experts, CheckpointError,
             "config.json: top_k_experts " << c.top_k_experts << " > num_experts " << c.num_experts);
  c.moe_intermediate_size = f.integer("moe_intermediate_size", 1, kMaxIntermediate);
  c.max_position_embeddings = f.integer("max_position_embeddings", 1, kMaxPositions, 131072);
  // A window longer than the context would only reserve cache no row can fill.
  // At least 2: transformers keeps the last sliding_window - 1 keys as `[-(w - 1):]`, which for a window
  // of 1 is every key, not none (and its own generate then fails on the second encoder call).
  c.sliding_window = f.integer("sliding_window", 2, kMaxPositions, std::min(512, c.max_position_embeddings));
  DG_REQUIRE(c.sliding_window <= c.max_position_embeddings, CheckpointError,
             "config.json text_config: sliding_window " << c.sliding_window << " is longer than max_position_embeddings "
                                                        << c.max_position_embeddings);
  c.rms_norm_eps = f.number("rms_norm_eps", 0.0, false, 1.0, 1e-6);
  if (tc.contains("final_logit_softcapping")) {
    // null would mean no softcap, but transformers 5.23.0 always applies it (and fails on null).
    DG_REQUIRE(!tc["final_logit_softcapping"].is_null(), CheckpointError,
               "config.json text_config: final_logit_softcapping null is not supported (transformers always applies "
               "the final softcap)");
    c.final_logit_softcapping =
        f.number("final_logit_softcapping", 0.0, false, std::numeric_limits<double>::max(), 30.0);
  }
  c.tie_word_embeddings = top.boolean("tie_word_embeddings", f.boolean("tie_word_embeddings", true));
  // false unties every shared weight in transformers (the encoder's layers and norm, lm_head): weights
  // this engine does not read, since it runs the encoder and the LM head on the decoder's.
  DG_REQUIRE(c.tie_word_embeddings, CheckpointError,
             "config.json: tie_word_embeddings false is not supported: transformers then gives the encoder and "
             "lm_head weights of their own (model.encoder.language_model.*, lm_head.weight), while this engine "
             "shares the decoder's as the released model does");
  c.canvas_length = top.integer("canvas_length", 1, kMaxCanvas, 256);  // transformers' default when absent
  DG_REQUIRE(c.canvas_length <= c.max_position_embeddings, CheckpointError,
             "config.json: canvas_length " << c.canvas_length << (top.has("canvas_length") ? "" : " (the default)")
                                           << " is longer than max_position_embeddings " << c.max_position_embeddings);
  c.image_token_id = top.opt_integer("image_token_id", 0, kInt32Max);
  for (const char* key : {"dtype", "torch_dtype"}) {
    const json* v = top.find(key);
    if (v && v->is_string()) {  // anything else is left to the weights (ModelWeights::embed_scale)
      c.dtype = v->get<std::string>();
      break;
    }
  }

  const std::string hidden_act = f.string("hidden_activation", "gelu_pytorch_tanh");
  DG_REQUIRE(hidden_act == "gelu_pytorch_tanh", CheckpointError,
             "config.json: hidden_activation '" << printable(hidden_act, 60)
                                                << "' is not supported (gelu_pytorch_tanh only)");
  DG_REQUIRE(!f.boolean("attention_bias", false), CheckpointError, "config.json: attention_bias=true is not supported");
  DG_REQUIRE(f.boolean("is_causal", true), CheckpointError,
             "config.json text_config: is_causal=false (a bidirectional encoder) is not supported");
  // transformers fails on rope_scaling. rope_theta and partial_rotary_factor outside rope_parameters only fill
  // in what an entry lacks: an entry without rope_theta is refused anyway (parse_rope), and a top-level
  // partial_rotary_factor is refused below where an entry in use (or the defaults) lacks its own.
  DG_REQUIRE(!f.has("rope_scaling"), CheckpointError,
             "config.json text_config: rope_scaling is not supported; give each layer type's RoPE in rope_parameters "
             "({\"sliding_attention\": {\"rope_theta\": ...}, ...})");
  const std::string bidir = f.string("use_bidirectional_attention", "");
  DG_REQUIRE(bidir.empty() || bidir == "vision", CheckpointError,
             "config.json: use_bidirectional_attention='" << printable(bidir, 60)
                 << "' is not supported (text-only engine: the encoder is causal)");

  // Layer types: the reference's default is 5 sliding layers then one full, and the last is always full.
  if (const json* lt = f.find("layer_types")) {
    DG_REQUIRE(lt->is_array(), CheckpointError, "config.json: layer_types must be an array, got " << describe(*lt));
    DG_REQUIRE(static_cast<int64_t>(lt->size()) == c.num_layers, CheckpointError,
               "config.json: layer_types has " << lt->size() << " entries for " << c.num_layers << " layers");
    for (size_t i = 0; i < lt->size(); ++i) {
      const json& t = (*lt)[i];
      DG_REQUIRE(t.is_string() && (t == "sliding_attention" || t == "full_attention"), CheckpointError,
                 "config.json: unknown layer type " << describe(t) << " at layer " << i);
      c.layer_types.push_back(t.get<std::string>());
    }
  } else {
    for (int i = 0; i < c.num_layers; ++i)
      c.layer_types.push_back((i + 1) % 6 ? "sliding_attention" : "full_attention");
  }
  c.layer_types.back() = "full_attention";

  // Per-layer overrides: per_layer_config when saved, else global_head_dim / num_global_key_value_heads.
  std::map<int, std::pair<int, int>> overrides;  // layer -> (head_dim, kv_heads), 0 = not overridden
  // An explicit null is transformers' "no overrides" (global_head_dim is then not applied either).
  const bool plc_given = tc.contains("per_layer_config");
  const json* plc = f.find("per_layer_config");
  DG_REQUIRE(!plc || plc->is_object(), CheckpointError,
             "config.json: per_layer_config must be an object, got " << describe(*plc));
  if (plc_given) {
    if (plc)
      for (const auto& [key, val] : plc->items()) {
        const int idx = layer_index(key);
        // transformers refuses keys that are not layer indices, and attributes other than these two.
        DG_REQUIRE(idx >= 0 && idx < c.num_layers && val.is_object(), CheckpointError,
                   "config.json: bad per_layer_config entry '" << printable(key, 60)
                                                               << "' (keys are layer indices, values objects)");
        const Fields lf(val, "config.json per_layer_config['" + key + "']");
        lf.only({"head_dim", "num_key_value_heads"}, "only head_dim and num_key_value_heads may be overridden");
        overrides[idx] = {lf.integer("head_dim", 0, kMaxHeadDim, 0),
                          lf.integer("num_key_value_heads", 0, kMaxHeads, 0)};
      }
  } else {
    const int global_hd = f.integer("global_head_dim", 2, kMaxHeadDim, 512);
    const int global_kv = f.integer("num_global_key_value_heads", 0, kMaxHeads, 0);
    for (int i = 0; i < c.num_layers; ++i)
      if (c.layer_types[i] == "full_attention") overrides[i] = {global_hd, global_kv};
  }

  const json* rope_params = f.find("rope_parameters");
  if (rope_params && !rope_params->is_null()) {
    DG_REQUIRE(rope_params->is_object(), CheckpointError,
               "config.json: rope_parameters must be an object keyed by layer type, got " << describe(*rope_params));
    for (const char* key : {"rope_type", "rope_theta", "factor", "partial_rotary_factor"})
      DG_REQUIRE(!rope_params->contains(key), CheckpointError,
                 "config.json: rope_parameters holds '" << key << "' at its top level; it must be keyed by layer "
                 "type ({\"sliding_attention\": {...}, \"full_attention\": {...}})");
  }
  const bool has_rope_params = rope_params && rope_params->is_object();
  // Only the layer types in use are read, as transformers does (an all-full model needs no sliding entry).
  auto rope_for = [&](const std::string& type) {
    if (std::find(c.layer_types.begin(), c.layer_types.end(), type) == c.layer_types.end()) return RopeSpec{};
    const json* p = nullptr;
    if (has_rope_params) {
      auto it = rope_params->find(type);
      if (it != rope_params->end() && !it->is_null()) p = &*it;
      // transformers fails on a layer type that rope_parameters leaves out; its defaults apply only when
      // there is no rope_parameters at all.
      DG_REQUIRE(p, CheckpointError, "config.json: rope_parameters has no entry for " << type << " layers");
    }
    DG_REQUIRE(!f.has("partial_rotary_factor") || (p && p->is_object() && p->contains("partial_rotary_factor")),
               CheckpointError,
               "config.json text_config: partial_rotary_factor outside rope_parameters is not supported where "
                   << (p ? "rope_parameters['" + type + "'] has none of its own" : "rope_parameters is absent")
                   << " (transformers may fill it in); put it in rope_parameters['" << type << "']");
    return parse_rope(p, type);
  };
  const RopeSpec rope_sliding = rope_for("sliding_attention");
  const RopeSpec rope_full = rope_for("full_attention");

  for (int i = 0; i < c.num_layers; ++i) {
    const std::string& t = c.layer_types[i];
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
    // transformers builds one attention shape per layer type and refuses overrides that differ within one.
    for (const LayerSpec& prev : c.layers)
      DG_REQUIRE(prev.sliding != l.sliding || (prev.head_dim == l.head_dim && prev.num_kv_heads == l.num_kv_heads),
                 CheckpointError,
                 "config.json: per_layer_config gives " << t << " layers different head_dim / num_key_value_heads "
                 "(layer " << i << ": " << l.head_dim << " / " << l.num_kv_heads << "); they must agree within a type");
    c.layers.push_back(std::move(l));
  }
  return c;
}

static GenerationDefaults parse_generation_defaults(const std::string& dir, int vocab_size) {
  GenerationDefaults g;
  const std::string path = dir + "/generation_config.json";
  if (!path_present(path)) return g;
  const json root = read_json_file(path, kMaxConfigBytes);
  DG_REQUIRE(root.is_object(), CheckpointError,
             "generation_config.json: top level is not an object (got " << describe(root) << ")");
  const Fields f(root, "generation_config.json");
  const double inf = std::numeric_limits<double>::infinity();
  // transformers' DiffusionGemmaGenerationConfig refuses any other key ("Unexpected kwargs"), so a checkpoint
  // that sets, say, temperature or top_k does not load there; here it would be ignored without a word.
  f.only({"max_new_tokens", "max_length", "return_dict_in_generate", "max_denoising_steps", "sampler_config", "t_min",
          "t_max", "stability_threshold", "confidence_threshold", "cache_implementation", "cache_config",
          "disable_compile", "bos_token_id", "pad_token_id", "eos_token_id", "_commit_hash", "_from_model_config",
          "transformers_version"},
         "DiffusionGemma's generation config has no such setting; transformers refuses it too");
  // max_length overrides the default max_new_tokens (256) and stops at that total length in transformers;
  // the engine has only max_new_tokens, so a checkpoint that sets it is refused rather than run longer.
  DG_REQUIRE(!f.has("max_length"), CheckpointError,
             "generation_config.json: max_length is not supported (transformers lets it replace the default "
             "max_new_tokens and cap the total length); remove it and set max_new_tokens");
  // A quantized KV cache changes the numbers; the other implementations only where the cache lives.
  DG_REQUIRE(f.string("cache_implementation", "") != "quantized", CheckpointError,
             "generation_config.json: cache_implementation 'quantized' is not supported (the engine's KV cache "
             "is not quantized)");
  // Token ids must lie in the vocabulary; the counts and the sampler values in the ranges that
  // generate() accepts (each on its own: t_max > t_min is checked when both are in use).
  const int64_t last_id = vocab_size - 1;
  if (const json* e = f.find("eos_token_id")) {
    if (e->is_array()) {
      DG_REQUIRE(e->size() <= kMaxEosIds, CheckpointError,
                 "generation_config.json: eos_token_id lists " << e->size() << " ids, more than " << kMaxEosIds);
      std::vector<int> ids;
      for (size_t i = 0; i < e->size(); ++i)
        ids.push_back(f.integer_value((*e)[i], "eos_token_id[" + std::to_string(i) + "]", 0, last_id));
      g.eos_token_id = ids;
    } else {
      g.eos_token_id = std::vector<int>{f.integer("eos_token_id", 0, last_id)};
    }
  }
  g.pad_token_id = f.opt_integer("pad_token_id", 0, last_id);
  g.bos_token_id = f.opt_integer("bos_token_id", 0, last_id);
  g.max_new_tokens = f.opt_integer("max_new_tokens", 1, kInt32Max);
  g.max_denoising_steps = f.opt_integer("max_denoising_steps", 1, kInt32Max);
  g.t_min = f.opt_number("t_min", 0.0, true, kMaxTemperature);
  g.t_max = f.opt_number("t_max", 0.0, true, kMaxTemperature);
  g.stability_threshold = f.opt_integer("stability_threshold", 0, kInt32Max);
  g.confidence_threshold = f.opt_number("confidence_threshold", 0.0, false, inf);
  if (const json* sc = f.find("sampler_config")) {
    // As transformers loads it: an EntropyBoundSamplerConfig with its bound and nothing else.
    DG_REQUIRE(sc->is_object(), CheckpointError,
               "generation_config.json: sampler_config must be an object, got " << describe(*sc));
    const Fields sf(*sc, "generation_config.json sampler_config");
    DG_REQUIRE(sf.string("_cls_name", "") == "EntropyBoundSamplerConfig", CheckpointError,
               "generation_config.json: sampler_config must name _cls_name 'EntropyBoundSamplerConfig' (the only "
               "sampler DiffusionGemma has)");
    sf.only({"_cls_name", "entropy_bound"}, "an EntropyBoundSamplerConfig holds only its entropy_bound");
    DG_REQUIRE(sf.has("entropy_bound"), CheckpointError, "generation_config.json: sampler_config has no entropy_bound");
    g.entropy_bound = sf.opt_number("entropy_bound", 0.0, false, inf);
  }
  return g;
}

ModelConfig load_model_config(const std::string& dir) {
  return naming_the_checkpoint(dir, "config.json", [&] { return parse_model_config(dir); });
}

GenerationDefaults load_generation_defaults(const std::string& dir, int vocab_size) {
  return naming_the_checkpoint(dir, "generation_config.json",
                               [&] { return parse_generation_defaults(dir, vocab_size); });
}

}  // namespace dgemma
