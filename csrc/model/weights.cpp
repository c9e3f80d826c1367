#include "model/weights.h"

#include <cstdint>
#include <cstring>
#include <sstream>

#include "common/check.h"

namespace dgemma {
namespace {

float bf16_to_f32(uint16_t h) {
  uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

float f16_to_f32(uint16_t h) {
  const uint32_t sign = (h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1f;
  uint32_t mant = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal: renormalise
      exp = 127 - 15 + 1;
      while (!(mant & 0x400u)) {
        mant <<= 1;
        --exp;
      }
      mant &= 0x3ffu;
      bits = sign | (exp << 23) | (mant << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

std::string shape_str(const std::vector<int64_t>& s) {
  std::ostringstream o;
  o << "[";
  for (size_t i = 0; i < s.size(); ++i) o << (i ? ", " : "") << s[i];
  o << "]";
  return o.str();
}

}  // namespace

std::unique_ptr<ModelWeights> ModelWeights::load(const std::string& dir, const ModelConfig& cfg,
                                                  const Progress& progress) {
  auto w = std::unique_ptr<ModelWeights>(new ModelWeights());
  w->ckpt_ = Checkpoint::open(dir);
  const Checkpoint& ck = *w->ckpt_;

  struct Pending {
    std::string name;
    std::vector<int64_t> shape;
    const float** dst;
  };
  std::vector<Pending> todo;
  auto want = [&](std::string name, std::vector<int64_t> shape, const float** dst) {
    todo.push_back({std::move(name), std::move(shape), dst});
  };

  const int64_t H = cfg.hidden_size, V = cfg.vocab_size, I = cfg.intermediate_size;
  const int64_t E = cfg.num_experts, Im = cfg.moe_intermediate_size, nh = cfg.num_heads;
  const std::string p = "model.decoder.";
  want(p + "embed_tokens.weight", {V, H}, &w->embed_tokens);
  want(p + "norm.weight", {H}, &w->final_norm);
  want(p + "self_conditioning.pre_norm.weight", {H}, &w->sc_pre_norm);
  want(p + "self_conditioning.gate_proj.weight", {I, H}, &w->sc_gate);
  want(p + "self_conditioning.up_proj.weight", {I, H}, &w->sc_up);
  want(p + "self_conditioning.down_proj.weight", {H, I}, &w->sc_down);
  if (!cfg.tie_word_embeddings) want("lm_head.weight", {V, H}, &w->lm_head);

  w->layers.resize(cfg.num_layers);
  for (int i = 0; i < cfg.num_layers; ++i) {
    const LayerSpec& ls = cfg.layers[i];
    LayerWeights& L = w->layers[i];
    const std::string lp = p + "layers." + std::to_string(i) + ".";
    const int64_t hd = ls.head_dim, kv = ls.num_kv_heads;
    want(lp + "self_attn.q_proj.weight", {nh * hd, H}, &L.q_proj);
    want(lp + "self_attn.k_proj.weight", {kv * hd, H}, &L.k_proj);
    if (!ls.k_eq_v) want(lp + "self_attn.v_proj.weight", {kv * hd, H}, &L.v_proj);
    want(lp + "self_attn.o_proj.weight", {H, nh * hd}, &L.o_proj);
    want(lp + "self_attn.q_norm.weight", {hd}, &L.q_norm);
    want(lp + "self_attn.k_norm.weight", {hd}, &L.k_norm);
    want(lp + "input_layernorm.weight", {H}, &L.input_layernorm);
    want(lp + "post_attention_layernorm.weight", {H}, &L.post_attention_layernorm);
    want(lp + "pre_feedforward_layernorm.weight", {H}, &L.pre_feedforward_layernorm);
    want(lp + "post_feedforward_layernorm.weight", {H}, &L.post_feedforward_layernorm);
    want(lp + "post_feedforward_layernorm_1.weight", {H}, &L.post_feedforward_layernorm_1);
    want(lp + "post_feedforward_layernorm_2.weight", {H}, &L.post_feedforward_layernorm_2);
    want(lp + "pre_feedforward_layernorm_2.weight", {H}, &L.pre_feedforward_layernorm_2);
    want(lp + "mlp.gate_proj.weight", {I, H}, &L.mlp_gate);
    want(lp + "mlp.up_proj.weight", {I, H}, &L.mlp_up);
    want(lp + "mlp.down_proj.weight", {H, I}, &L.mlp_down);
    want(lp + "router.proj.weight", {E, H}, &L.router_proj);
    want(lp + "router.scale", {H}, &L.router_scale);
    want(lp + "router.per_expert_scale", {E}, &L.per_expert_scale);
    want(lp + "experts.gate_up_proj", {E, 2 * Im, H}, &L.experts_gate_up);
    want(lp + "experts.down_proj", {E, H, Im}, &L.experts_down);
  }

  // Validate everything before converting anything, so a bad checkpoint fails fast.
  std::vector<const TensorRef*> refs;
  for (const auto& t : todo) {
    const TensorRef* r = ck.find(t.name);
    DG_REQUIRE(r, CheckpointError, "checkpoint " << dir << " is missing tensor '" << t.name << "'");
    DG_REQUIRE(r->dtype != DType::Other, CheckpointError,
               "tensor '" << t.name << "' has dtype " << r->dtype_str << "; supported: F32, BF16, F16");
    DG_REQUIRE(r->shape == t.shape, CheckpointError,
               "tensor '" << t.name << "' has shape " << shape_str(r->shape) << " but config.json implies "
                          << shape_str(t.shape));
    refs.push_back(r);
  }

  const int total = static_cast<int>(todo.size()) + 2 * cfg.num_layers;
  int done = 0;
  for (size_t i = 0; i < todo.size(); ++i) {
    const TensorRef& r = *refs[i];
    const size_t n = r.nbytes / dtype_size(r.dtype);
    w->num_parameters += n;
    if (r.dtype == DType::F32 && reinterpret_cast<uintptr_t>(r.data) % alignof(float) == 0) {
      *todo[i].dst = reinterpret_cast<const float*>(r.data);  // no copy: the map is the weight
    } else {
      std::unique_ptr<float[]> buf(new float[n]);
      if (r.dtype == DType::F32) {
        std::memcpy(buf.get(), r.data, r.nbytes);
      } else {
        const bool bf = r.dtype == DType::BF16;
        for (size_t k = 0; k < n; ++k) {
          uint16_t h;
          std::memcpy(&h, r.data + 2 * k, 2);
          buf[k] = bf ? bf16_to_f32(h) : f16_to_f32(h);
        }
      }
      *todo[i].dst = buf.get();
      w->owned_.push_back(std::move(buf));
    }
    if (progress) progress(++done, total);
  }
  if (cfg.tie_word_embeddings) w->lm_head = w->embed_tokens;

  // Scalars: one value each. They are not tied between encoder and decoder; a missing one keeps
  // its initial value 1, as in the reference.
  auto scalar = [&](const std::string& name, float fallback, bool required) -> float {
    const TensorRef* r = ck.find(name);
    if (!r) {
      DG_REQUIRE(!required, CheckpointError, "checkpoint " << dir << " is missing tensor '" << name << "'");
      return fallback;
    }
    DG_REQUIRE(r->dtype != DType::Other && r->nbytes == dtype_size(r->dtype), CheckpointError,
               "tensor '" << name << "' must be a single F32/BF16/F16 value");
    uint32_t bits32 = 0;
    uint16_t bits16 = 0;
    if (r->dtype == DType::F32) {
      std::memcpy(&bits32, r->data, 4);
      float f;
      std::memcpy(&f, &bits32, 4);
      return f;
    }
    std::memcpy(&bits16, r->data, 2);
    return r->dtype == DType::BF16 ? bf16_to_f32(bits16) : f16_to_f32(bits16);
  };
  for (int i = 0; i < cfg.num_layers; ++i) {
    LayerWeights& L = w->layers[i];
    L.decoder_layer_scalar = scalar(p + "layers." + std::to_string(i) + ".layer_scalar", 1.0f, false);
    if (progress) progress(++done, total);
    L.encoder_layer_scalar = scalar("model.encoder.language_model.layers." + std::to_string(i) + ".layer_scalar",
                                    1.0f, false);
    if (progress) progress(++done, total);
  }
  return w;
}

}  // namespace dgemma
