#include "model/weights.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <sstream>

#include "common/check.h"
#include "common/nvfp4_format.h"
#include "common/random_weights.h"

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

constexpr int kNvfp4Group = nvfp4::kGroup;

std::string shape_str(const std::vector<int64_t>& s) {
  std::ostringstream o;
  o << "[";
  for (size_t i = 0; i < s.size(); ++i) o << (i ? ", " : "") << s[i];
  o << "]";
  return o.str();
}

// The tensors a config implies: checkpoint name, shape, and the float32 view it fills.
struct Pending {
  std::string name;
  std::vector<int64_t> shape;
  const float** dst;
};

std::vector<Pending> wanted(const ModelConfig& cfg, ModelWeights& wr) {
  ModelWeights* w = &wr;
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
  return todo;
}

}  // namespace

DType model_dtype(const ModelConfig& cfg, DType stored) {
  if (cfg.dtype == "bfloat16") return DType::BF16;
  if (cfg.dtype == "float16") return DType::F16;
  if (cfg.dtype == "float32") return DType::F32;
  return stored;
}

float embedding_scale(int64_t hidden_size, DType dtype) {
  const float s = static_cast<float>(std::sqrt(static_cast<double>(hidden_size)));  // as torch.tensor(H ** 0.5)
  // Significant bits of the dtype; s >= 1 is a normal number in each, so rounding its significand to
  // that many bits (to nearest, ties to even: the default rounding mode) is the dtype's conversion.
  const int bits = dtype == DType::BF16 ? 8 : dtype == DType::F16 ? 11 : 24;
  int e = 0;
  std::frexp(s, &e);  // s = f * 2^e, f in [0.5, 1)
  return static_cast<float>(std::ldexp(std::nearbyint(std::ldexp(static_cast<double>(s), bits - e)), e - bits));
}

int64_t WeightSource::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

void WeightSource::to_f32(int64_t begin, int64_t n, float* out) const {
  DG_CHECK(begin >= 0 && n >= 0 && begin + n <= numel(),
           "elements [" << begin << ", " << begin + n << ") of a weight of " << numel());
  if (synthetic()) {
    if (format == Format::kNvfp4) {
      const float global = amplitude / 6.0f;
      for (int64_t i = 0; i < n; ++i) {
        const uint64_t k = static_cast<uint64_t>(begin + i);
        out[i] = (nvfp4::e2m1_to_float(random_weights::nvfp4_code(seed, k)) *
                  nvfp4::e4m3_to_float(random_weights::nvfp4_scale(seed, k / kNvfp4Group))) *
                 global;
      }
      return;
    }
    for (int64_t i = 0; i < n; ++i)
      out[i] = random_weights::value(seed, static_cast<uint64_t>(begin + i), amplitude, offset);
    return;
  }
  // Called per GEMM tile by the CPU backend: the loops below are kept simple enough to vectorise.
  const uint8_t* data = tensor->data;
  const size_t K = static_cast<size_t>(shape.back());
  switch (format) {
    case Format::kFloat:
      if (tensor->dtype == DType::F32) {
        std::memcpy(out, data + 4 * begin, 4 * static_cast<size_t>(n));
      } else if (tensor->dtype == DType::BF16) {
        const uint8_t* p = data + 2 * begin;
        for (int64_t k = 0; k < n; ++k) {
          uint16_t h;
          std::memcpy(&h, p + 2 * k, 2);
          out[k] = bf16_to_f32(h);
        }
      } else {
        for (int64_t k = 0; k < n; ++k) {
          uint16_t h;
          std::memcpy(&h, data + 2 * (begin + k), 2);
          out[k] = f16_to_f32(h);
        }
      }
      return;
    case Format::kFp8: {
      static const std::array<float, 256> lut = [] {
        std::array<float, 256> t{};
        for (int c = 0; c < 256; ++c) t[c] = nvfp4::e4m3_to_float(static_cast<uint32_t>(c));
        return t;
      }();
      const size_t sn = scale->nbytes / 4;
      bool nan = false;
      for (int64_t i = 0; i < n;) {  // one scale per row (or one in all): a row segment at a time
        const size_t k = static_cast<size_t>(begin + i);
        const int64_t run = std::min<int64_t>(n - i, static_cast<int64_t>(K - k % K));
        float s;
        std::memcpy(&s, scale->data + 4 * (sn == 1 ? 0 : k / K), 4);
        for (int64_t j = 0; j < run; ++j) {
          const float v = lut[data[k + j]];
          nan |= std::isnan(v);
          out[i + j] = v * s;
        }
        i += run;
      }
      DG_REQUIRE(!nan, CheckpointError, "FP8 tensor '" << tensor->name << "' holds NaN");
      return;
    }
    case Format::kNvfp4: {
      static const std::array<float, 16> e2m1 = [] {
        std::array<float, 16> t{};
        for (int c = 0; c < 16; ++c) t[c] = nvfp4::e2m1_to_float(static_cast<uint32_t>(c));
        return t;
      }();
      const size_t gn = global_scale->nbytes / 4;
      const size_t per_lead = static_cast<size_t>(numel() / shape[0]);
      for (int64_t i = 0; i < n;) {  // a (part of a) block of 16 at a time: one block scale, one global
        const size_t k = static_cast<size_t>(begin + i);
        const size_t row = k / K, col = k % K;
        const int64_t run = std::min<int64_t>(n - i, static_cast<int64_t>(kNvfp4Group - col % kNvfp4Group));
        const float s = nvfp4::e4m3_to_float(scale->data[row * (K / kNvfp4Group) + col / kNvfp4Group]);
        DG_REQUIRE(!std::isnan(s), CheckpointError, "NVFP4 block scales '" << scale->name << "' hold NaN");
        float g;
        std::memcpy(&g, global_scale->data + 4 * (gn == 1 ? 0 : k / per_lead), 4);
        if (run == kNvfp4Group) {  // a whole block: 8 bytes, low nibble first
          const uint8_t* b = data + k / 2;
          float* o = out + i;
          for (int j = 0; j < kNvfp4Group / 2; ++j) {
            o[2 * j] = (e2m1[b[j] & 0xF] * s) * g;
            o[2 * j + 1] = (e2m1[b[j] >> 4] * s) * g;
          }
        } else {
          for (int64_t j = 0; j < run; ++j) {
            const size_t kk = k + static_cast<size_t>(j);
            const uint8_t byte = data[kk / 2];
            out[i + j] = (e2m1[(kk % 2) ? (byte >> 4) : (byte & 0xF)] * s) * g;
          }
        }
        i += run;
      }
      return;
    }
  }
}

const WeightSource& ModelWeights::source(const std::string& name) const {
  auto it = sources_.find(name);
  DG_REQUIRE(it != sources_.end(), CheckpointError, "the model has no weight '" << printable(name) << "'");
  return it->second;
}

std::unique_ptr<ModelWeights> ModelWeights::random(const ModelConfig& cfg, uint64_t seed, HostF32 host,
                                                    bool nvfp4_experts) {
  auto w = std::unique_ptr<ModelWeights>(new ModelWeights());
  const bool host_f32 = host != HostF32::kNone;
  w->host_f32_ = host_f32 ? HostF32::kAll : HostF32::kNone;
  const std::vector<Pending> todo = wanted(cfg, *w);
  for (const Pending& t : todo) {
    WeightSource src;
    src.shape = t.shape;
    src.seed = random_weights::tensor_seed(seed, t.name.c_str());
    if (t.shape.size() == 1) {  // norm weights, router scales: near 1
      src.amplitude = 0.1f, src.offset = 1.0f;
    } else {  // matrices: variance 1 / fan_in (uniform on [-a, a] has variance a^2 / 3)
      src.amplitude = static_cast<float>(std::sqrt(3.0 / static_cast<double>(t.shape.back())));
    }
    const bool expert = t.name.find(".experts.") != std::string::npos;
    if (nvfp4_experts && expert && t.shape.back() % kNvfp4Group == 0) src.format = WeightSource::Format::kNvfp4;
    const WeightSource& stored = w->sources_[t.name] = std::move(src);
    const int64_t n = stored.numel();
    w->num_parameters += static_cast<size_t>(n);
    if (host_f32) {
      std::unique_ptr<float[]> buf(new float[static_cast<size_t>(n)]);
      stored.to_f32(0, n, buf.get());
      *t.dst = buf.get();
      w->owned_.push_back(std::move(buf));
    }
  }
  w->embed_scale = embedding_scale(cfg.hidden_size, model_dtype(cfg, DType::BF16));
  return w;
}

std::unique_ptr<ModelWeights> ModelWeights::load(const std::string& dir, const ModelConfig& cfg,
                                                  const Progress& progress, HostF32 host) {
  return load_impl(dir, cfg, progress, host, false);
}

void ModelWeights::check(const std::string& dir, const ModelConfig& cfg) {
  load_impl(dir, cfg, {}, HostF32::kNone, true);
}

std::unique_ptr<ModelWeights> ModelWeights::load_impl(const std::string& dir, const ModelConfig& cfg,
                                                       const Progress& progress, HostF32 host, bool check_only) {
  auto w = std::unique_ptr<ModelWeights>(new ModelWeights());
  w->ckpt_ = Checkpoint::open(dir);
  const Checkpoint& ck = *w->ckpt_;

  std::vector<Pending> todo = wanted(cfg, *w);

  // Validate everything before converting anything, so a bad checkpoint fails fast.
  // Quantized tensors are dequantized to float32 here: the CPU backend is the reference that the
  // GPU's kernels are checked against (formats: python/dgemma_rt/nvfp4.py).
  //  - NVFP4: packed U8 plus "<name>_scale" E4M3 block scales and "<name>_scale_2" F32 global scales;
  //  - FP8: F8_E4M3 values plus "<name>_scale" F32, one per tensor or one per row (output channel).
  enum class Quant { None, Nvfp4, Fp8 };
  struct QuantRefs {
    Quant kind = Quant::None;
    const TensorRef* scale = nullptr;
    const TensorRef* global = nullptr;
  };
  std::vector<const TensorRef*> refs;
  std::vector<QuantRefs> quant(todo.size());
  for (size_t i = 0; i < todo.size(); ++i) {
    const auto& t = todo[i];
    const TensorRef* r = ck.find(t.name);
    DG_REQUIRE(r, CheckpointError, "checkpoint " << printable(dir, 400) << " is missing tensor '" << t.name << "'");
    const TensorRef* scale = ck.find(t.name + "_scale");
    if (r->dtype == DType::U8 && scale) {
      const int64_t K = t.shape.back();
      std::vector<int64_t> packed = t.shape, blocks = t.shape;
      packed.back() = K / 2;
      blocks.back() = K / kNvfp4Group;
      DG_REQUIRE(K % kNvfp4Group == 0, CheckpointError,
                 "tensor '" << t.name << "' is NVFP4 but its last dimension " << K << " is not a multiple of 16");
      DG_REQUIRE(r->shape == packed, CheckpointError,
                 "NVFP4 tensor '" << t.name << "' has shape " << shape_str(r->shape) << " but config.json implies "
                                  << shape_str(packed) << " packed bytes");
      DG_REQUIRE(scale->dtype == DType::F8_E4M3 || scale->dtype == DType::U8, CheckpointError,
                 "NVFP4 block scales '" << scale->name << "' must be F8_E4M3, got " << scale->dtype_str);
      DG_REQUIRE(scale->shape == blocks, CheckpointError,
                 "NVFP4 block scales '" << scale->name << "' have shape " << shape_str(scale->shape) << ", expected "
                                        << shape_str(blocks));
      const TensorRef* g = ck.find(t.name + "_scale_2");
      DG_REQUIRE(g, CheckpointError, "NVFP4 tensor '" << t.name << "' has no global scale '" << t.name << "_scale_2'");
      const size_t gn = g->nbytes / 4;
      DG_REQUIRE(g->dtype == DType::F32 && (gn == 1 || (t.shape.size() == 3 && gn == static_cast<size_t>(t.shape[0]))),
                 CheckpointError,
                 "NVFP4 global scale '" << g->name << "' must be F32 with 1 value or one per expert, got "
                                        << g->dtype_str << " " << shape_str(g->shape));
      quant[i] = {Quant::Nvfp4, scale, g};
    } else if (r->dtype == DType::F8_E4M3) {
      DG_REQUIRE(r->shape == t.shape, CheckpointError,
                 "FP8 tensor '" << t.name << "' has shape " << shape_str(r->shape) << " but config.json implies "
                                << shape_str(t.shape));
      DG_REQUIRE(scale, CheckpointError, "FP8 tensor '" << t.name << "' has no scale '" << t.name << "_scale'");
      // one scale ([] or [1]), or one per row: the weight's leading dimensions, optionally with a trailing 1
      std::vector<int64_t> rows(t.shape.begin(), t.shape.end() - 1), rows1 = rows;
      rows1.push_back(1);
      const bool per_tensor = scale->shape.empty() || scale->shape == std::vector<int64_t>{1};
      DG_REQUIRE(scale->dtype == DType::F32 && (per_tensor || scale->shape == rows || scale->shape == rows1),
                 CheckpointError,
                 "FP8 scale '" << scale->name << "' must be F32 with one value or one per row " << shape_str(rows)
                               << ", got " << scale->dtype_str << " " << shape_str(scale->shape));
      quant[i] = {Quant::Fp8, scale, nullptr};
    } else {
      DG_REQUIRE(is_float(r->dtype), CheckpointError,
                 "tensor '" << t.name << "' has dtype " << r->dtype_str
                            << "; supported: F32, BF16, F16, NVFP4 (U8 with '_scale' / '_scale_2' tensors) and FP8 "
                               "(F8_E4M3 with a '_scale' tensor)");
      DG_REQUIRE(r->shape == t.shape, CheckpointError,
                 "tensor '" << t.name << "' has shape " << shape_str(r->shape) << " but config.json implies "
                            << shape_str(t.shape));
    }
    refs.push_back(r);
  }
  if (check_only) return nullptr;

  // Small scale tensors are checked here, once; NaN codes inside the big ones when they are read.
  for (size_t i = 0; i < todo.size(); ++i) {
    const TensorRef* checked = quant[i].kind == Quant::Fp8 ? quant[i].scale
                               : quant[i].kind == Quant::Nvfp4 ? quant[i].global
                                                               : nullptr;
    if (!checked) continue;
    for (size_t k = 0; k < checked->nbytes / 4; ++k) {
      float v;
      std::memcpy(&v, checked->data + 4 * k, 4);
      DG_REQUIRE(std::isfinite(v), CheckpointError,
                 (quant[i].kind == Quant::Fp8 ? "FP8 scale '" : "NVFP4 global scale '") << checked->name
                                                                                         << "' is not finite");
    }
  }

  // Weights not converted here are read as stored: inside the CPU GEMMs, where nothing may throw, or
  // by a GPU backend in its own format. Their NaN codes are looked for here, once for every backend
  // (NaN is 0x7F / 0xFF in E4M3); to_f32 finds them in what is converted at load.
  if (host != HostF32::kAll) {
    auto has_nan = [](const TensorRef& t) {
      bool nan = false;
      for (size_t k = 0; k < t.nbytes; ++k) nan |= (t.data[k] & 0x7F) == 0x7F;
      return nan;
    };
    for (size_t i = 0; i < todo.size(); ++i) {
      if (quant[i].kind == Quant::Nvfp4)
        DG_REQUIRE(!has_nan(*quant[i].scale), CheckpointError,
                   "NVFP4 block scales '" << quant[i].scale->name << "' hold NaN");
      if (quant[i].kind == Quant::Fp8)
        DG_REQUIRE(!has_nan(*refs[i]), CheckpointError, "FP8 tensor '" << refs[i]->name << "' holds NaN");
    }
  }

  w->host_f32_ = host;
  const int total = static_cast<int>(todo.size()) + 2 * cfg.num_layers;
  int done = 0;
  for (size_t i = 0; i < todo.size(); ++i) {
    WeightSource src;
    src.tensor = refs[i];
    src.format = quant[i].kind == Quant::Nvfp4 ? WeightSource::Format::kNvfp4
                 : quant[i].kind == Quant::Fp8 ? WeightSource::Format::kFp8
                                               : WeightSource::Format::kFloat;
    src.scale = quant[i].scale;
    src.global_scale = quant[i].global;
    src.shape = todo[i].shape;
    const WeightSource& stored = w->sources_[todo[i].name] = std::move(src);
    const int64_t n = stored.numel();
    w->num_parameters += static_cast<size_t>(n);
    if (host != HostF32::kNone) {
      const TensorRef& r = *refs[i];
      if (stored.format == WeightSource::Format::kFloat && r.dtype == DType::F32 &&
          reinterpret_cast<uintptr_t>(r.data) % alignof(float) == 0) {
        *todo[i].dst = reinterpret_cast<const float*>(r.data);  // no copy: the map is the weight
      } else if (host == HostF32::kAll || stored.shape.size() == 1) {
        std::unique_ptr<float[]> buf(new float[static_cast<size_t>(n)]);
        stored.to_f32(0, n, buf.get());
        *todo[i].dst = buf.get();
        w->owned_.push_back(std::move(buf));
      }
    }
    if (progress) progress(Phase::kRead, ++done, total);
  }
  w->embed_scale =
      embedding_scale(cfg.hidden_size, model_dtype(cfg, w->source(global_name("embed_tokens.weight")).tensor->dtype));

  // Scalars: one value each. They are not tied between encoder and decoder; a missing one keeps
  // its initial value 1, as in the reference.
  auto scalar = [&](const std::string& name, float fallback, bool required) -> float {
    const TensorRef* r = ck.find(name);
    if (!r) {
      DG_REQUIRE(!required, CheckpointError, "checkpoint " << printable(dir, 400) << " is missing tensor '" << name << "'");
      return fallback;
    }
    DG_REQUIRE(is_float(r->dtype) && r->nbytes == dtype_size(r->dtype), CheckpointError,
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
    L.decoder_layer_scalar = scalar(layer_name(i, "layer_scalar"), 1.0f, false);
    if (progress) progress(Phase::kRead, ++done, total);
    L.encoder_layer_scalar = scalar("model.encoder.language_model.layers." + std::to_string(i) + ".layer_scalar",
                                    1.0f, false);
    if (progress) progress(Phase::kRead, ++done, total);
  }
  return w;
}

}  // namespace dgemma
