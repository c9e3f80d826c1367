#include "backend/cpu/cpu_backend.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <new>
#include <numeric>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "backend/cpu/ops.h"
#include "common/check.h"

namespace dgemma {

using namespace cpu;

namespace {

int thread_index() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

int thread_count() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

// Host memory, 64-byte aligned, not zero-filled (untouched pages cost no resident memory).
class HostBuffer final : public Buffer {
 public:
  HostBuffer(void* p, size_t bytes, size_t held, std::shared_ptr<MemoryCounter> counter)
      : Buffer(p, bytes), held_(held), counter_(std::move(counter)) {
    counter_->add(held_);
  }
  ~HostBuffer() override {
    std::free(data());
    counter_->sub(held_);
  }
  void read(size_t offset, size_t n, void* dst) const override {
    check_range(offset, n);
    std::memcpy(dst, static_cast<const char*>(data()) + offset, n);
  }
  void write(size_t offset, size_t n, const void* src) override {
    check_range(offset, n);
    std::memcpy(static_cast<char*>(data()) + offset, src, n);
  }

 private:
  size_t held_;  // bytes taken from the allocator (rounded up)
  std::shared_ptr<MemoryCounter> counter_;
};

void check_f32(const Tensor& t, const char* op, const char* what) {
  DG_CHECK(t.dtype == ScalarType::kF32 && t.contiguous(),
           op << ": " << what << " must be contiguous f32 (got " << scalar_name(t.dtype) << ")");
}

void check_i32(const Tensor& t, const char* op, const char* what) {
  DG_CHECK(t.dtype == ScalarType::kI32 && t.contiguous(),
           op << ": " << what << " must be contiguous i32 (got " << scalar_name(t.dtype) << ")");
}

// One row's attention on one layer: queries q [n, heads, hd] against its cached keys (kp/vp: one
// pointer per cached position, positions cache_start ...) and its own new keys kn/vn [n, kv, hd].
struct AttnRow {
  const float* q;
  const float* kn;
  const float* vn;
  float* out;  // [n, heads, hd]
  int n;
  int heads, kv_heads, hd;
  int pos0;         // position of the first new token
  int cache_start;  // position of the first cached key
  bool causal;
  int window;  // 0 = none
  float scale;
  const std::vector<const float*>* kp;
  const std::vector<const float*>* vp;
};

// One query head of one token: scores against its visible keys (the cached ones first, then the row's
// new tokens), softmax in f32, weighted sum of the values into out [hd]. keys/vals: one pointer per key,
// already offset to the query's KV head; visible[j] == 0 masks key j. The dot products keep 16 partial
// sums in a fixed order (vectorisable and deterministic); the clones differ only in vector width and
// FMA contraction (DG_CPU_CLONES, ops.h).
DG_CPU_CLONES
void attend_head(const float* __restrict q, const float* const* keys, const float* const* vals, const uint8_t* visible,
                 int m, int hd, float scale, float* __restrict scores, float* __restrict out) {
  constexpr int L = 16;
  float mx = -INFINITY;
  for (int j = 0; j < m; ++j) {
    float sc = -INFINITY;
    if (visible[j]) {
      const float* __restrict k = keys[j];
      float acc[L] = {};
      int d = 0;
      for (; d + L <= hd; d += L)
        for (int l = 0; l < L; ++l) acc[l] += q[d + l] * k[d + l];
      float s = 0;
      for (int l = 0; l < L; ++l) s += acc[l];
      for (; d < hd; ++d) s += q[d] * k[d];
      sc = scale == 1.0f ? s : s * scale;
    }
    scores[j] = sc;
    mx = std::max(mx, sc);
  }
  double sum = 0;
  for (int j = 0; j < m; ++j) {
    scores[j] = scores[j] == -INFINITY ? 0.0f : std::exp(scores[j] - mx);
    sum += scores[j];
  }
  const float inv = 1.0f / static_cast<float>(sum);
  for (int d = 0; d < hd; ++d) out[d] = 0.0f;
  for (int j = 0; j < m; ++j) {
    const float p = scores[j] * inv;
    if (p == 0.0f) continue;
    const float* __restrict v = vals[j];
    for (int d = 0; d < hd; ++d) out[d] += p * v[d];
  }
}

void attend_row(const AttnRow& a) {
  const int group = a.heads / a.kv_heads;
  const size_t kstride = static_cast<size_t>(a.kv_heads) * a.hd;
  const int cached = static_cast<int>(a.kp->size());
  const int m = cached + a.n;
  const long work = static_cast<long>(a.n) * a.heads;
#pragma omp parallel
  {
    std::vector<float> scores(m);
    std::vector<const float*> keys(m), vals(m);
    std::vector<uint8_t> visible(m);
    int have_g = -1;
#pragma omp for schedule(static)
    for (long w = 0; w < work; ++w) {
      const int i = static_cast<int>(w / a.heads), h = static_cast<int>(w % a.heads);
      const int g = h / group;
      if (g != have_g) {  // this KV head's key and value pointers
        for (int j = 0; j < cached; ++j) keys[j] = (*a.kp)[j] + g * a.hd, vals[j] = (*a.vp)[j] + g * a.hd;
        for (int j = 0; j < a.n; ++j)
          keys[cached + j] = a.kn + j * kstride + g * a.hd, vals[cached + j] = a.vn + j * kstride + g * a.hd;
        have_g = g;
      }
      const int qpos = a.pos0 + i;
      for (int j = 0; j < m; ++j) {
        const int kpos = j < cached ? a.cache_start + j : a.pos0 + (j - cached);
        visible[j] = !a.causal || (kpos <= qpos && (a.window <= 0 || kpos > qpos - a.window));
      }
      attend_head(a.q + (static_cast<size_t>(i) * a.heads + h) * a.hd, keys.data(), vals.data(), visible.data(), m,
                  a.hd, a.scale, scores.data(), a.out + (static_cast<size_t>(i) * a.heads + h) * a.hd);
    }
  }
}

}  // namespace

class CpuBackend::OpTimer {
 public:
  OpTimer(CpuBackend& be, Op op) : be_(be.profiling_ ? &be : nullptr), op_(op) {
    if (be_) start_ = std::chrono::steady_clock::now();
  }
  ~OpTimer() {
    if (be_) be_->profile_.add(op_, std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count());
  }
  OpTimer(const OpTimer&) = delete;
  OpTimer& operator=(const OpTimer&) = delete;

 private:
  CpuBackend* be_;
  Op op_;
  std::chrono::steady_clock::time_point start_;
};

CpuBackend::CpuBackend(const ModelConfig& cfg, const ModelWeights& w, bool bf16_dot) : cfg_(cfg), w_(w) {
  for (const auto& l : cfg.layers)
    DG_REQUIRE(l.head_dim <= 2048, CheckpointError, "head_dim " << l.head_dim << " is larger than supported (2048)");
  DG_CHECK(w.host_f32() != HostF32::kNone, "the CPU backend needs the weights loaded with host views");
  // A matrix without a float32 view is read through its source, as stored.
  auto mat = [&](const float* f32, const std::string& name) {
    return f32 ? WeightMat{f32, nullptr, 0} : WeightMat{nullptr, &w.source(name), 0, bf16_dot};
  };
  auto g = [](const char* s) { return ModelWeights::global_name(s); };
  embed_ = mat(w.embed_tokens, g("embed_tokens.weight"));
  lm_head_ = embed_;  // tied (config.cpp refuses untied checkpoints)
  sc_gate_ = mat(w.sc_gate, g("self_conditioning.gate_proj.weight"));
  sc_up_ = mat(w.sc_up, g("self_conditioning.up_proj.weight"));
  sc_down_ = mat(w.sc_down, g("self_conditioning.down_proj.weight"));
  for (int i = 0; i < cfg.num_layers; ++i) {
    const LayerWeights& L = w.layers.at(i);
    auto n = [&](const char* s) { return ModelWeights::layer_name(i, s); };
    LayerMats m;
    m.q = mat(L.q_proj, n("self_attn.q_proj.weight"));
    m.k = mat(L.k_proj, n("self_attn.k_proj.weight"));
    if (!cfg.layers[i].k_eq_v) m.v = mat(L.v_proj, n("self_attn.v_proj.weight"));
    m.o = mat(L.o_proj, n("self_attn.o_proj.weight"));
    m.mlp_gate = mat(L.mlp_gate, n("mlp.gate_proj.weight"));
    m.mlp_up = mat(L.mlp_up, n("mlp.up_proj.weight"));
    m.mlp_down = mat(L.mlp_down, n("mlp.down_proj.weight"));
    m.router = mat(L.router_proj, n("router.proj.weight"));
    m.router.bf16_dot = false;  // float32: the top-k choice stays the reference's
    m.experts_gate_up = mat(L.experts_gate_up, n("experts.gate_up_proj"));
    m.experts_down = mat(L.experts_down, n("experts.down_proj"));
    mats_.push_back(m);
  }
}

// ---- memory

std::shared_ptr<Buffer> CpuBackend::allocate(size_t bytes, const char* what) {
  const size_t rounded = (std::max<size_t>(bytes, 1) + 63) / 64 * 64;
  void* p = std::aligned_alloc(64, rounded);
  DG_REQUIRE(p, ResourceError, "out of host memory: " << bytes << " bytes for the " << what);
  return std::make_shared<HostBuffer>(p, bytes, rounded, memory_);
}

void CpuBackend::upload(const Tensor& dst, const void* src) {
  DG_CHECK(dst.contiguous(), "upload to a strided tensor");
  if (dst.bytes()) std::memcpy(dst.data, src, dst.bytes());
}

void CpuBackend::download(void* dst, const Tensor& src) {
  DG_CHECK(src.contiguous(), "download of a strided tensor");
  if (src.bytes()) std::memcpy(dst, src.data, src.bytes());
}

// ---- weights

const float* CpuBackend::norm_weight(WeightRef w) const {
  const LayerWeights* L = w.layer >= 0 ? &w_.layers.at(w.layer) : nullptr;
  switch (w.id) {
    case W::kNone: return nullptr;
    case W::kFinalNorm: return w_.final_norm;
    case W::kScPreNorm: return w_.sc_pre_norm;
    case W::kInputNorm: return L->input_layernorm;
    case W::kPostAttnNorm: return L->post_attention_layernorm;
    case W::kPreFfnNorm: return L->pre_feedforward_layernorm;
    case W::kPreFfnNorm2: return L->pre_feedforward_layernorm_2;
    case W::kQNorm: return L->q_norm;
    case W::kKNorm: return L->k_norm;
    default: break;
  }
  DG_THROW(Error, "weight " << static_cast<int>(w.id) << " is not a norm");
}

const WeightMat& CpuBackend::matrix(WeightRef w) const {
  const LayerMats& L = mats_.at(w.layer);
  switch (w.id) {
    case W::kQProj: return L.q;
    case W::kKProj: return L.k;
    case W::kVProj:
      DG_CHECK(L.v.f32 || L.v.src, "layer " << w.layer << " has no v_proj");
      return L.v;
    case W::kOProj: return L.o;
    default: break;
  }
  DG_THROW(Error, "weight " << static_cast<int>(w.id) << " is not a projection");
}

// ---- ops

void CpuBackend::embed(const Tensor& ids, const Tensor& out) {
  const OpTimer timer(*this, Op::kEmbed);
  check_i32(ids, "embed", "ids");
  check_f32(out, "embed", "out");
  const int H = cfg_.hidden_size;
  const int64_t T = ids.numel();
  DG_CHECK(out.rows() == T && out.cols() == H, "embed: out shape");
  const float scale = w_.embed_scale;
  const int32_t* id = ids.ptr<int32_t>();
  float* x = out.ptr<float>();
  for (int64_t t = 0; t < T; ++t) {
    float* xt = x + t * H;
    embed_.to_f32(static_cast<int64_t>(id[t]) * H, H, xt);
    for (int c = 0; c < H; ++c) xt[c] *= scale;
  }
}

void CpuBackend::rmsnorm(const Tensor& x, WeightRef w, const Tensor& out, float eps) {
  const OpTimer timer(*this, Op::kRmsNorm);
  check_f32(x, "rmsnorm", "x");
  check_f32(out, "rmsnorm", "out");
  DG_CHECK(x.numel() == out.numel() && x.cols() == out.cols(), "rmsnorm: shapes");
  cpu::rmsnorm(x.ptr<float>(), norm_weight(w), out.ptr<float>(), static_cast<size_t>(x.rows()),
               static_cast<int>(x.cols()), eps);
}

void CpuBackend::linear(WeightRef w, const Tensor& x, const Tensor& y) {
  const OpTimer timer(*this, Op::kLinear);
  check_f32(x, "linear", "x");
  check_f32(y, "linear", "y");
  DG_CHECK(x.rows() == y.rows(), "linear: " << x.rows() << " vs " << y.rows() << " rows");
  cpu::linear(x.ptr<float>(), matrix(w), y.ptr<float>(), static_cast<int>(x.rows()), static_cast<int>(y.cols()),
              static_cast<int>(x.cols()));
}

void CpuBackend::copy(const Tensor& src, const Tensor& dst) {
  const OpTimer timer(*this, Op::kCopy);
  DG_CHECK(src.dtype == dst.dtype && src.numel() == dst.numel() && src.contiguous() && dst.contiguous(),
           "copy: tensors differ");
  if (src.bytes()) std::memmove(dst.data, src.data, src.bytes());
}

void CpuBackend::head_norm_rope(const Tensor& x, WeightRef w, const Tensor& positions, const Tensor& inv_freq,
                                float eps) {
  const OpTimer timer(*this, Op::kHeadNormRope);
  check_f32(x, "head_norm_rope", "x");
  DG_CHECK(x.ndim == 3, "head_norm_rope: x must be [tokens, heads, head_dim]");
  const int T = static_cast<int>(x.dim(0)), heads = static_cast<int>(x.dim(1)), hd = static_cast<int>(x.dim(2));
  cpu::rmsnorm(x.ptr<float>(), norm_weight(w), x.ptr<float>(), static_cast<size_t>(T) * heads, hd, eps);
  if (positions.empty()) return;
  check_i32(positions, "head_norm_rope", "positions");
  check_f32(inv_freq, "head_norm_rope", "inv_freq");
  DG_CHECK(positions.numel() == T && inv_freq.numel() == hd / 2, "head_norm_rope: positions / inv_freq shapes");
  cpu::rope(x.ptr<float>(), T, heads, hd, positions.ptr<int32_t>(), inv_freq.ptr<float>());
}

void CpuBackend::kv_write(const Tensor& k, const Tensor& v, const Tensor& slot, const Tensor& k_cache,
                          const Tensor& v_cache) {
  const OpTimer timer(*this, Op::kKvWrite);
  check_f32(k, "kv_write", "k");
  check_f32(v, "kv_write", "v");
  check_i32(slot, "kv_write", "slot");
  check_f32(k_cache, "kv_write", "k_cache");
  check_f32(v_cache, "kv_write", "v_cache");
  const int64_t T = k.dim(0);
  const size_t tf = static_cast<size_t>(k.numel() / std::max<int64_t>(T, 1));
  const int64_t slots = k_cache.dim(0) * k_cache.dim(1);
  DG_CHECK(slot.numel() == T && k_cache.numel() == slots * static_cast<int64_t>(tf), "kv_write: shapes");
  const int32_t* s = slot.ptr<int32_t>();
  for (int64_t t = 0; t < T; ++t) {
    if (s[t] < 0) continue;
    DG_CHECK(s[t] < slots, "kv_write: slot " << s[t] << " of " << slots);
    std::memcpy(k_cache.ptr<float>() + s[t] * tf, k.ptr<float>() + t * tf, tf * sizeof(float));
    std::memcpy(v_cache.ptr<float>() + s[t] * tf, v.ptr<float>() + t * tf, tf * sizeof(float));
  }
}

void CpuBackend::attention(const AttentionArgs& a) {
  const OpTimer timer(*this, Op::kAttention);
  for (const Tensor* t : {&a.q, &a.k_new, &a.v_new, &a.out, &a.k_cache, &a.v_cache}) check_f32(*t, "attention", "q/k/v/out/cache");
  for (const Tensor* t : {&a.block_table, &a.cache_first_pos, &a.cache_start, &a.cache_len, &a.tok0, &a.count})
    check_i32(*t, "attention", "row tables");
  const int nh = static_cast<int>(a.q.dim(1)), hd = static_cast<int>(a.q.dim(2)), kvh = static_cast<int>(a.k_new.dim(1));
  DG_CHECK(a.k_new.dim(2) == hd && nh % kvh == 0 && a.k_cache.dim(2) == kvh && a.k_cache.dim(3) == hd,
           "attention: head shapes");
  const int R = static_cast<int>(a.tok0.numel()), B = static_cast<int>(a.k_cache.dim(1));
  const int maxb = static_cast<int>(a.block_table.dim(1));
  const size_t qw = static_cast<size_t>(nh) * hd, kw = static_cast<size_t>(kvh) * hd;
  const int32_t* table = a.block_table.ptr<int32_t>();
  std::vector<const float*> kp, vp;
  for (int r = 0; r < R; ++r) {
    const int first = a.cache_first_pos.ptr<int32_t>()[r], start = a.cache_start.ptr<int32_t>()[r];
    const int len = a.cache_len.ptr<int32_t>()[r];
    const size_t t0 = static_cast<size_t>(a.tok0.ptr<int32_t>()[r]);
    kp.clear();
    vp.clear();
    for (int pos = start; pos < len; ++pos) {
      const int rel = pos - first;
      DG_CHECK(rel >= 0 && rel / B < maxb, "attention: position " << pos << " outside row " << r << "'s block table");
      const size_t slot = static_cast<size_t>(table[static_cast<size_t>(r) * maxb + rel / B]) * B + rel % B;
      kp.push_back(a.k_cache.ptr<float>() + slot * kw);
      vp.push_back(a.v_cache.ptr<float>() + slot * kw);
    }
    AttnRow row{a.q.ptr<float>() + t0 * qw, a.k_new.ptr<float>() + t0 * kw, a.v_new.ptr<float>() + t0 * kw,
                a.out.ptr<float>() + t0 * qw, a.count.ptr<int32_t>()[r], nh, kvh, hd, len, start, a.causal,
                a.window, a.scale, &kp, &vp};
    attend_row(row);
  }
}

void CpuBackend::residual_norm_add(const Tensor& x, const Tensor& h, WeightRef w, float eps) {
  const OpTimer timer(*this, Op::kResidualNormAdd);
  check_f32(x, "residual_norm_add", "x");
  check_f32(h, "residual_norm_add", "h");
  DG_CHECK(x.numel() == h.numel(), "residual_norm_add: shapes");
  float* xp = x.ptr<float>();
  float* hp = h.ptr<float>();
  cpu::rmsnorm(hp, norm_weight(w), hp, static_cast<size_t>(h.rows()), static_cast<int>(h.cols()), eps);
  const size_t n = static_cast<size_t>(x.numel());
  for (size_t i = 0; i < n; ++i) xp[i] += hp[i];
}

void CpuBackend::mlp(WeightRef mlp, const Tensor& x, const Tensor& out, const Tensor& scratch) {
  const OpTimer timer(*this, Op::kMlp);
  check_f32(x, "mlp", "x");
  check_f32(out, "mlp", "out");
  check_f32(scratch, "mlp", "scratch");
  const WeightMat *gate_w, *up_w, *down_w;
  if (mlp.id == W::kScMlp) {
    gate_w = &sc_gate_, up_w = &sc_up_, down_w = &sc_down_;
  } else {
    DG_CHECK(mlp.id == W::kMlp, "mlp: weight " << static_cast<int>(mlp.id));
    const LayerMats& L = mats_.at(mlp.layer);
    gate_w = &L.mlp_gate, up_w = &L.mlp_up, down_w = &L.mlp_down;
  }
  const int T = static_cast<int>(x.rows()), H = cfg_.hidden_size, I = cfg_.intermediate_size;
  DG_CHECK(x.cols() == H && out.rows() == T && out.cols() == H && scratch.numel() >= 2L * T * I, "mlp: shapes");
  float* gate = scratch.ptr<float>();
  float* up = gate + static_cast<size_t>(T) * I;
  cpu::linear(x.ptr<float>(), *gate_w, gate, T, I, H);
  cpu::linear(x.ptr<float>(), *up_w, up, T, I, H);
  gelu_mul(gate, up, gate, static_cast<size_t>(T) * I);
  cpu::linear(gate, *down_w, out.ptr<float>(), T, H, I);
}

void CpuBackend::moe_router(int layer, const Tensor& x, const Tensor& topk_idx, const Tensor& topk_w, float eps) {
  const OpTimer timer(*this, Op::kMoeRouter);
  check_f32(x, "moe_router", "x");
  check_i32(topk_idx, "moe_router", "topk_idx");
  check_f32(topk_w, "moe_router", "topk_w");
  const LayerWeights& L = w_.layers.at(layer);
  const int T = static_cast<int>(x.rows()), H = cfg_.hidden_size, E = cfg_.num_experts, K = cfg_.top_k_experts;
  DG_CHECK(x.cols() == H && topk_idx.numel() == static_cast<int64_t>(T) * K && topk_w.numel() == topk_idx.numel(),
           "moe_router: shapes");
  // RMSNorm without scale, * scale * H^-0.5, softmax, top-k, renormalise.
  std::vector<float> rx(static_cast<size_t>(T) * H);
  cpu::rmsnorm(x.ptr<float>(), nullptr, rx.data(), T, H, eps);
  const float root = static_cast<float>(std::pow(static_cast<double>(H), -0.5));
  for (size_t i = 0; i < rx.size(); ++i) rx[i] = (rx[i] * L.router_scale[i % H]) * root;
  std::vector<float> probs(static_cast<size_t>(T) * E);
  cpu::linear(rx.data(), mats_.at(layer).router, probs.data(), T, E, H);
  int32_t* idx = topk_idx.ptr<int32_t>();
  float* wt = topk_w.ptr<float>();
  std::vector<int> order(E);
  for (int t = 0; t < T; ++t) {
    float* p = probs.data() + static_cast<size_t>(t) * E;
    softmax_inplace(p, E);
    std::iota(order.begin(), order.end(), 0);
    std::partial_sort(order.begin(), order.begin() + K, order.end(),
                      [&](int a, int b) { return p[a] > p[b] || (p[a] == p[b] && a < b); });
    float s = 0;
    for (int k = 0; k < K; ++k) s += p[order[k]];
    for (int k = 0; k < K; ++k) {
      idx[t * K + k] = order[k];
      wt[t * K + k] = (p[order[k]] / s) * L.per_expert_scale[order[k]];
    }
  }
}

size_t CpuBackend::moe_workspace_bytes(int tokens) const {
  // slot_out: every (token, slot)'s weighted expert output, f32 [T * k, H]
  return static_cast<size_t>(tokens) * cfg_.top_k_experts * cfg_.hidden_size * sizeof(float);
}

void CpuBackend::moe_experts(int layer, const Tensor& x, const Tensor& topk_idx, const Tensor& topk_w,
                             const Tensor& out, const Tensor& workspace) {
  const OpTimer timer(*this, Op::kMoeExperts);
  check_f32(x, "moe_experts", "x");
  check_f32(out, "moe_experts", "out");
  const LayerMats& L = mats_.at(layer);
  const int T = static_cast<int>(x.rows()), H = cfg_.hidden_size, E = cfg_.num_experts, K = cfg_.top_k_experts;
  const int Im = cfg_.moe_intermediate_size;
  DG_CHECK(x.cols() == H && out.numel() == x.numel() && workspace.bytes() >= moe_workspace_bytes(T),
           "moe_experts: shapes");
  const int32_t* top_idx = topk_idx.ptr<int32_t>();
  const float* top_w = topk_w.ptr<float>();
  const float* xe = x.ptr<float>();
  // Gather each expert's tokens, gate_up, GELU gate, down.
  std::vector<std::vector<int>> slots(E);  // (token * K + k) per expert, in token order
  for (int i = 0; i < T * K; ++i) slots[top_idx[i]].push_back(i);
  float* slot_out = static_cast<float*>(workspace.data);
#pragma omp parallel
  {
    std::vector<float> xg, gu, act, dn;
#pragma omp for schedule(dynamic, 1)
    for (int e = 0; e < E; ++e) {
      const auto& sl = slots[e];
      const int n = static_cast<int>(sl.size());
      if (n == 0) continue;
      xg.resize(static_cast<size_t>(n) * H);
      gu.resize(static_cast<size_t>(n) * 2 * Im);
      act.resize(static_cast<size_t>(n) * Im);
      dn.resize(static_cast<size_t>(n) * H);
      for (int j = 0; j < n; ++j)
        std::memcpy(&xg[static_cast<size_t>(j) * H], xe + static_cast<size_t>(sl[j] / K) * H, H * sizeof(float));
      linear_serial(xg.data(), L.experts_gate_up.at(static_cast<int64_t>(e) * 2 * Im * H), gu.data(), n, 2 * Im, H);
      for (int j = 0; j < n; ++j) {
        const float* g = gu.data() + static_cast<size_t>(j) * 2 * Im;
        gelu_mul(g, g + Im, act.data() + static_cast<size_t>(j) * Im, Im);
      }
      linear_serial(act.data(), L.experts_down.at(static_cast<int64_t>(e) * H * Im), dn.data(), n, H, Im);
      for (int j = 0; j < n; ++j) {
        const float wgt = top_w[sl[j]];
        float* dst = slot_out + static_cast<size_t>(sl[j]) * H;
        for (int c = 0; c < H; ++c) dst[c] = dn[static_cast<size_t>(j) * H + c] * wgt;
      }
    }
  }
  float* o = out.ptr<float>();
  std::vector<int> ks(K);
  for (int t = 0; t < T; ++t) {
    float* ot = o + static_cast<size_t>(t) * H;
    std::fill(ot, ot + H, 0.0f);
    // Sum in ascending expert order, as the reference's per-expert index_add does.
    std::iota(ks.begin(), ks.end(), 0);
    std::sort(ks.begin(), ks.end(), [&](int a, int b) { return top_idx[t * K + a] < top_idx[t * K + b]; });
    for (int k : ks) {
      const float* src = slot_out + (static_cast<size_t>(t) * K + k) * H;
      for (int c = 0; c < H; ++c) ot[c] += src[c];
    }
  }
}

void CpuBackend::ffn_combine(int layer, bool encoder, const Tensor& x, const Tensor& dense, const Tensor& moe,
                             float eps) {
  const OpTimer timer(*this, Op::kFfnCombine);
  check_f32(x, "ffn_combine", "x");
  check_f32(dense, "ffn_combine", "dense");
  check_f32(moe, "ffn_combine", "moe");
  const LayerWeights& L = w_.layers.at(layer);
  const size_t T = static_cast<size_t>(x.rows()), H = static_cast<size_t>(x.cols());
  DG_CHECK(dense.numel() == x.numel() && moe.numel() == x.numel(), "ffn_combine: shapes");
  float* xp = x.ptr<float>();
  float* h1 = dense.ptr<float>();
  float* h2 = moe.ptr<float>();
  cpu::rmsnorm(h1, L.post_feedforward_layernorm_1, h1, T, static_cast<int>(H), eps);
  cpu::rmsnorm(h2, L.post_feedforward_layernorm_2, h2, T, static_cast<int>(H), eps);
  for (size_t i = 0; i < T * H; ++i) h1[i] += h2[i];
  cpu::rmsnorm(h1, L.post_feedforward_layernorm, h1, T, static_cast<int>(H), eps);
  const float scalar = encoder ? L.encoder_layer_scalar : L.decoder_layer_scalar;
  for (size_t i = 0; i < T * H; ++i) xp[i] = (xp[i] + h1[i]) * scalar;
}

void CpuBackend::gather_rows(const Tensor& src, const Tensor& index, const Tensor& dst) {
  const OpTimer timer(*this, Op::kGatherRows);
  check_i32(index, "gather_rows", "index");
  DG_CHECK(src.dtype == dst.dtype && src.contiguous() && dst.contiguous() && src.cols() == dst.cols() &&
               dst.rows() == index.numel(),
           "gather_rows: shapes");
  const size_t row = static_cast<size_t>(src.cols()) * scalar_size(src.dtype);
  const int32_t* idx = index.ptr<int32_t>();
  for (int64_t i = 0; i < index.numel(); ++i) {
    char* d = static_cast<char*>(dst.data) + i * row;
    if (idx[i] < 0) {  // nothing to gather: a zero row (all-zero bytes are 0 in every dtype here)
      std::memset(d, 0, row);
      continue;
    }
    DG_CHECK(idx[i] < src.rows(), "gather_rows: index " << idx[i] << " of " << src.rows());
    std::memcpy(d, static_cast<const char*>(src.data) + idx[i] * row, row);
  }
}

void CpuBackend::scatter_add_rows(const Tensor& dst, const Tensor& src, const Tensor& index) {
  const OpTimer timer(*this, Op::kScatterAddRows);
  check_f32(dst, "scatter_add_rows", "dst");
  check_f32(src, "scatter_add_rows", "src");
  check_i32(index, "scatter_add_rows", "index");
  DG_CHECK(src.cols() == dst.cols() && src.rows() == index.numel(), "scatter_add_rows: shapes");
  const int64_t D = dst.cols();
  const int32_t* idx = index.ptr<int32_t>();
  for (int64_t i = 0; i < index.numel(); ++i) {
    if (idx[i] < 0) continue;
    DG_CHECK(idx[i] < dst.rows(), "scatter_add_rows: index " << idx[i] << " of " << dst.rows());
    float* d = dst.ptr<float>() + idx[i] * D;
    const float* s = src.ptr<float>() + i * D;
    for (int64_t c = 0; c < D; ++c) d[c] += s[c];
  }
}

void CpuBackend::lm_head_sample(const SampleArgs& a) {
  const OpTimer timer(*this, Op::kLmHeadSample);
  check_f32(a.x, "lm_head_sample", "x");
  check_f32(a.temperature, "lm_head_sample", "temperature");
  check_i32(a.token, "lm_head_sample", "token");
  check_i32(a.argmax, "lm_head_sample", "argmax");
  check_f32(a.entropy, "lm_head_sample", "entropy");
  check_f32(a.soft, "lm_head_sample", "soft");
  check_i32(a.soft_index, "lm_head_sample", "soft_index");
  DG_CHECK(a.uniform.dtype == ScalarType::kF64, "lm_head_sample: uniform must be f64");
  const int T = static_cast<int>(a.x.rows()), H = cfg_.hidden_size, V = cfg_.vocab_size;
  DG_CHECK(a.x.cols() == H && a.n > 0 && T % a.n == 0 && a.temperature.numel() == T / a.n && a.uniform.numel() == T &&
               a.token.numel() == T && a.argmax.numel() == T && a.entropy.numel() == T && a.soft_index.numel() == T &&
               a.soft.cols() == H,
           "lm_head_sample: shapes");
  const float scale = w_.embed_scale;
  const float* temp = a.temperature.ptr<float>();
  const double* uni = a.uniform.ptr<double>();
  const int32_t* sidx = a.soft_index.ptr<int32_t>();
  for (int t = 0; t < T; ++t)
    DG_CHECK(sidx[t] < a.soft.rows(), "lm_head_sample: soft_index " << sidx[t] << " of " << a.soft.rows());

  std::lock_guard<std::mutex> lock(head_mu_);
  head_logits_.resize(static_cast<size_t>(kHeadChunk) * V);
  head_probs_.resize(static_cast<size_t>(kHeadChunk) * V);
  head_soft_.resize(static_cast<size_t>(kHeadChunk) * H);
  const int threads = thread_count();
  if (static_cast<int>(head_cdf_.size()) < threads) head_processed_.resize(threads), head_cdf_.resize(threads);
  for (int c0 = 0; c0 < T; c0 += kHeadChunk) {
    const int m = std::min(kHeadChunk, T - c0);
    float* logits = head_logits_.data();
    float* probs = head_probs_.data();
    cpu::linear(a.x.ptr<float>() + static_cast<size_t>(c0) * H, lm_head_, logits, m, V, H);
    if (cfg_.final_logit_softcapping) {
      const float cap = static_cast<float>(*cfg_.final_logit_softcapping);
#pragma omp parallel for schedule(static)
      for (int i = 0; i < m; ++i) softcap_inplace(logits + static_cast<size_t>(i) * V, static_cast<size_t>(V), cap);
    }
    int soft_rows = 0;
#pragma omp parallel reduction(+ : soft_rows)
    {
      const int me = thread_index();
      std::vector<float>& pr = head_processed_[me];
      std::vector<double>& cd = head_cdf_[me];
#pragma omp for schedule(dynamic, 1)
      for (int i = 0; i < m; ++i) {
        const int t = c0 + i;
        pr.resize(V), cd.resize(V);
        const Sampled s = sample_position(logits + static_cast<size_t>(i) * V, V, temp[t / a.n], uni[t], pr.data(),
                                          probs + static_cast<size_t>(i) * V, cd.data());
        a.token.ptr<int32_t>()[t] = s.token;
        a.argmax.ptr<int32_t>()[t] = s.argmax;
        a.entropy.ptr<float>()[t] = s.entropy;
        soft_rows += sidx[t] >= 0;
      }
    }
    if (soft_rows == 0) continue;
    // The next step's self-conditioning input: softmax(processed) @ E * embed_scale, one GEMM for the chunk.
    cpu::matmul_nn(probs, embed_, head_soft_.data(), m, H, V);
    for (int i = 0; i < m; ++i) {
      if (sidx[c0 + i] < 0) continue;
      const float* src = head_soft_.data() + static_cast<size_t>(i) * H;
      float* soft = a.soft.ptr<float>() + static_cast<size_t>(sidx[c0 + i]) * H;
      for (int c = 0; c < H; ++c) soft[c] = src[c] * scale;
    }
  }
}

void CpuBackend::lm_head_logits(const Tensor& x, const Tensor& logits) {
  const OpTimer timer(*this, Op::kLmHeadLogits);
  check_f32(x, "lm_head_logits", "x");
  check_f32(logits, "lm_head_logits", "logits");
  const int T = static_cast<int>(x.rows()), H = cfg_.hidden_size, V = cfg_.vocab_size;
  DG_CHECK(x.cols() == H && logits.rows() == T && logits.cols() == V, "lm_head_logits: shapes");
  float* out = logits.ptr<float>();
  cpu::linear(x.ptr<float>(), lm_head_, out, T, V, H);
  if (cfg_.final_logit_softcapping) {
    const float cap = static_cast<float>(*cfg_.final_logit_softcapping);
#pragma omp parallel for schedule(static)
    for (int i = 0; i < T; ++i) softcap_inplace(out + static_cast<size_t>(i) * V, static_cast<size_t>(V), cap);
  }
}

void CpuBackend::soft_embedding(const Tensor& logits, const Tensor& out) {
  const OpTimer timer(*this, Op::kSoftEmbedding);
  check_f32(logits, "soft_embedding", "logits");
  check_f32(out, "soft_embedding", "out");
  const int S = static_cast<int>(logits.rows()), H = cfg_.hidden_size, V = cfg_.vocab_size;
  DG_CHECK(logits.cols() == V && out.rows() == S && out.cols() == H, "soft_embedding: shapes");
  float* probs = logits.ptr<float>();  // softmax in place: the contract lets the op clobber its input
#pragma omp parallel for schedule(static)
  for (int t = 0; t < S; ++t) softmax_inplace(probs + static_cast<size_t>(t) * V, V);
  float* soft = out.ptr<float>();
  matmul_nn(probs, embed_, soft, S, H, V);
  const float scale = w_.embed_scale;
  for (size_t i = 0; i < static_cast<size_t>(S) * H; ++i) soft[i] *= scale;
}

}  // namespace dgemma
