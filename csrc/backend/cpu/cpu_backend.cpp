#include "backend/cpu/cpu_backend.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>

#include "backend/cpu/ops.h"
#include "common/check.h"

namespace dgemma {

using namespace cpu;

// The rows of one forward pass, their tokens laid out back to back in [T, ...] buffers.
struct CpuBackend::Rows {
  std::vector<int> tok0;       // first token of each row in the concatenated buffers
  std::vector<int> count;      // tokens per row
  std::vector<int> pos0;       // position of each row's first token (its cache length)
  std::vector<const SeqCache*> read;  // caches read by attention
  std::vector<SeqCache*> write;       // encoder only: caches written
  std::vector<int32_t> positions;     // [T]
  int T = 0;
};

CpuBackend::CpuBackend(const ModelConfig& cfg, const ModelWeights& w) : cfg_(cfg), w_(w) {
  for (const auto& l : cfg.layers)
    DG_REQUIRE(l.head_dim <= 2048, CheckpointError, "head_dim " << l.head_dim << " is larger than supported (2048)");
}

namespace {

// One attention head-group over a row: queries q [n, heads, hd] against the cache spans plus
// the row's own new keys (kn/vn [n, kv, hd]). Encoder mode masks causally and by window.
struct AttnArgs {
  const float* q;
  const float* kn;
  const float* vn;
  float* out;  // [n, heads, hd]
  int n;
  int heads, kv_heads, hd;
  int pos0;
  bool causal;
  int window;  // 0 = none
  const std::vector<SeqCache::Span>* spans;
};

void attend_row(const AttnArgs& a) {
  const int group = a.heads / a.kv_heads;
  const size_t kstride = static_cast<size_t>(a.kv_heads) * a.hd;
  int cached = 0;
  for (const auto& s : *a.spans) cached += s.count;
  const long work = static_cast<long>(a.n) * a.heads;
#pragma omp parallel
  {
    std::vector<float> scores(cached + a.n);
    std::vector<float> acc(a.hd);
#pragma omp for schedule(static)
    for (long w = 0; w < work; ++w) {
      const int i = static_cast<int>(w / a.heads), h = static_cast<int>(w % a.heads);
      const int g = h / group;
      const int qpos = a.pos0 + i;
      const float* qv = a.q + (static_cast<size_t>(i) * a.heads + h) * a.hd;
      auto visible = [&](int kpos) {
        if (!a.causal) return true;
        if (kpos > qpos) return false;
        return a.window <= 0 || kpos > qpos - a.window;
      };
      // Scores, in key-position order: cache spans first, then the new tokens.
      int m = 0;
      float mx = -INFINITY;
      for (const auto& s : *a.spans) {
        for (int j = 0; j < s.count; ++j) {
          float sc = -INFINITY;
          if (visible(s.pos + j)) {
            const float* kv = s.k + j * kstride + static_cast<size_t>(g) * a.hd;
            sc = 0;
            for (int d = 0; d < a.hd; ++d) sc += qv[d] * kv[d];
          }
          scores[m++] = sc;
          mx = std::max(mx, sc);
        }
      }
      for (int j = 0; j < a.n; ++j) {
        float sc = -INFINITY;
        if (visible(a.pos0 + j)) {
          const float* kv = a.kn + j * kstride + static_cast<size_t>(g) * a.hd;
          sc = 0;
          for (int d = 0; d < a.hd; ++d) sc += qv[d] * kv[d];
        }
        scores[m++] = sc;
        mx = std::max(mx, sc);
      }
      double sum = 0;
      for (int j = 0; j < m; ++j) {
        scores[j] = scores[j] == -INFINITY ? 0.0f : std::exp(scores[j] - mx);
        sum += scores[j];
      }
      const float inv = 1.0f / static_cast<float>(sum);
      std::fill(acc.begin(), acc.end(), 0.0f);
      m = 0;
      for (const auto& s : *a.spans) {
        for (int j = 0; j < s.count; ++j, ++m) {
          const float p = scores[m] * inv;
          if (p == 0.0f) continue;
          const float* vv = s.v + j * kstride + static_cast<size_t>(g) * a.hd;
          for (int d = 0; d < a.hd; ++d) acc[d] += p * vv[d];
        }
      }
      for (int j = 0; j < a.n; ++j, ++m) {
        const float p = scores[m] * inv;
        if (p == 0.0f) continue;
        const float* vv = a.vn + j * kstride + static_cast<size_t>(g) * a.hd;
        for (int d = 0; d < a.hd; ++d) acc[d] += p * vv[d];
      }
      std::copy(acc.begin(), acc.end(), a.out + (static_cast<size_t>(i) * a.heads + h) * a.hd);
    }
  }
}

}  // namespace

void CpuBackend::moe(const LayerWeights& L, const float* x, float* out, int T) {
  const int H = cfg_.hidden_size, E = cfg_.num_experts, K = cfg_.top_k_experts, Im = cfg_.moe_intermediate_size;
  // Router on the raw residual: RMSNorm without scale, * scale * H^-0.5, softmax, top-k, renormalise.
  std::vector<float> rx(static_cast<size_t>(T) * H);
  rmsnorm(x, nullptr, rx.data(), T, H, static_cast<float>(cfg_.rms_norm_eps));
  const float root = static_cast<float>(std::pow(static_cast<double>(H), -0.5));
  for (size_t i = 0; i < rx.size(); ++i) rx[i] = (rx[i] * L.router_scale[i % H]) * root;
  std::vector<float> probs(static_cast<size_t>(T) * E);
  linear(rx.data(), L.router_proj, probs.data(), T, E, H);
  std::vector<int> top_idx(static_cast<size_t>(T) * K);
  std::vector<float> top_w(static_cast<size_t>(T) * K);
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
      top_idx[t * K + k] = order[k];
      top_w[t * K + k] = (p[order[k]] / s) * L.per_expert_scale[order[k]];
    }
  }
  // Experts on pre_feedforward_layernorm_2(x): gather each expert's tokens, gate_up, GELU gate, down.
  std::vector<float> xe(static_cast<size_t>(T) * H);
  rmsnorm(x, L.pre_feedforward_layernorm_2, xe.data(), T, H, static_cast<float>(cfg_.rms_norm_eps));
  std::vector<std::vector<int>> slots(E);  // (token * K + k) per expert, in token order
  for (int i = 0; i < T * K; ++i) slots[top_idx[i]].push_back(i);
  std::vector<float> slot_out(static_cast<size_t>(T) * K * H);
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
        std::memcpy(&xg[static_cast<size_t>(j) * H], xe.data() + static_cast<size_t>(sl[j] / K) * H, H * sizeof(float));
      linear_serial(xg.data(), L.experts_gate_up + static_cast<size_t>(e) * 2 * Im * H, gu.data(), n, 2 * Im, H);
      for (int j = 0; j < n; ++j)
        for (int c = 0; c < Im; ++c)
          act[static_cast<size_t>(j) * Im + c] =
              gelu_tanh(gu[static_cast<size_t>(j) * 2 * Im + c]) * gu[static_cast<size_t>(j) * 2 * Im + Im + c];
      linear_serial(act.data(), L.experts_down + static_cast<size_t>(e) * H * Im, dn.data(), n, H, Im);
      for (int j = 0; j < n; ++j) {
        const float wgt = top_w[sl[j]];
        float* dst = slot_out.data() + static_cast<size_t>(sl[j]) * H;
        for (int c = 0; c < H; ++c) dst[c] = dn[static_cast<size_t>(j) * H + c] * wgt;
      }
    }
  }
  for (int t = 0; t < T; ++t) {
    float* o = out + static_cast<size_t>(t) * H;
    std::fill(o, o + H, 0.0f);
    // Sum in ascending expert order, as the reference's per-expert index_add does.
    std::vector<int> ks(K);
    std::iota(ks.begin(), ks.end(), 0);
    std::sort(ks.begin(), ks.end(), [&](int a, int b) { return top_idx[t * K + a] < top_idx[t * K + b]; });
    for (int k : ks) {
      const float* src = slot_out.data() + (static_cast<size_t>(t) * K + k) * H;
      for (int c = 0; c < H; ++c) o[c] += src[c];
    }
  }
}

void CpuBackend::layers(float* x, const Rows& rows, bool encoder) {
  const int T = rows.T, H = cfg_.hidden_size, nh = cfg_.num_heads, I = cfg_.intermediate_size;
  const float eps = static_cast<float>(cfg_.rms_norm_eps);
  const int R = static_cast<int>(rows.count.size());
  std::vector<float> h(static_cast<size_t>(T) * H), h1(static_cast<size_t>(T) * H), h2(static_cast<size_t>(T) * H);
  std::vector<float> gate(static_cast<size_t>(T) * I), up(static_cast<size_t>(T) * I);
  std::vector<SeqCache::Span> spans;

  for (int l = 0; l < cfg_.num_layers; ++l) {
    const LayerSpec& ls = cfg_.layers[l];
    const LayerWeights& L = w_.layers[l];
    const int hd = ls.head_dim, kvh = ls.num_kv_heads;
    const size_t qw = static_cast<size_t>(nh) * hd, kw = static_cast<size_t>(kvh) * hd;
    const bool last = l == cfg_.num_layers - 1;

    rmsnorm(x, L.input_layernorm, h.data(), T, H, eps);
    std::vector<float> k(T * kw), v(T * kw);
    linear(h.data(), L.k_proj, k.data(), T, static_cast<int>(kw), H);
    if (ls.k_eq_v)
      v = k;  // K=V layers: V is v_norm of the same projection
    else
      linear(h.data(), L.v_proj, v.data(), T, static_cast<int>(kw), H);
    rmsnorm(k.data(), L.k_norm, k.data(), static_cast<size_t>(T) * kvh, hd, eps);
    rope(k.data(), T, kvh, hd, rows.positions.data(), ls.inv_freq.data());
    rmsnorm(v.data(), nullptr, v.data(), static_cast<size_t>(T) * kvh, hd, eps);

    const bool need_output = !(encoder && last);  // the encoder's last layer only feeds the cache
    std::vector<float> q, att;
    if (need_output) {
      q.resize(T * qw);
      att.resize(T * qw);
      linear(h.data(), L.q_proj, q.data(), T, static_cast<int>(qw), H);
      rmsnorm(q.data(), L.q_norm, q.data(), static_cast<size_t>(T) * nh, hd, eps);
      rope(q.data(), T, nh, hd, rows.positions.data(), ls.inv_freq.data());
      for (int r = 0; r < R; ++r) {
        rows.read[r]->spans(l, spans);
        const size_t t0 = rows.tok0[r];
        AttnArgs a{q.data() + t0 * qw, k.data() + t0 * kw, v.data() + t0 * kw, att.data() + t0 * qw,
                   rows.count[r], nh, kvh, hd, rows.pos0[r], encoder,
                   encoder && ls.sliding ? cfg_.sliding_window : 0, &spans};
        attend_row(a);
      }
    }
    if (encoder) {
      for (int r = 0; r < R; ++r) {
        SeqCache* c = rows.write[r];
        for (int j = 0; j < rows.count[r]; ++j) {
          const int pos = rows.pos0[r] + j;
          if (!c->written(l, pos)) continue;
          const size_t t = rows.tok0[r] + j;
          std::memcpy(c->write_k(l, pos), k.data() + t * kw, kw * sizeof(float));
          std::memcpy(c->write_v(l, pos), v.data() + t * kw, kw * sizeof(float));
        }
      }
    }
    if (!need_output) break;

    linear(att.data(), L.o_proj, h.data(), T, H, static_cast<int>(qw));
    rmsnorm(h.data(), L.post_attention_layernorm, h.data(), T, H, eps);
    for (size_t i = 0; i < static_cast<size_t>(T) * H; ++i) x[i] += h[i];

    // Dense MLP and MoE both read the residual x; their normalised sum is added back.
    rmsnorm(x, L.pre_feedforward_layernorm, h.data(), T, H, eps);
    linear(h.data(), L.mlp_gate, gate.data(), T, I, H);
    linear(h.data(), L.mlp_up, up.data(), T, I, H);
    gelu_mul(gate.data(), up.data(), gate.data(), static_cast<size_t>(T) * I);
    linear(gate.data(), L.mlp_down, h1.data(), T, H, I);
    rmsnorm(h1.data(), L.post_feedforward_layernorm_1, h1.data(), T, H, eps);
    moe(L, x, h2.data(), T);
    rmsnorm(h2.data(), L.post_feedforward_layernorm_2, h2.data(), T, H, eps);
    for (size_t i = 0; i < static_cast<size_t>(T) * H; ++i) h1[i] += h2[i];
    rmsnorm(h1.data(), L.post_feedforward_layernorm, h1.data(), T, H, eps);
    const float scalar = encoder ? L.encoder_layer_scalar : L.decoder_layer_scalar;
    for (size_t i = 0; i < static_cast<size_t>(T) * H; ++i) x[i] = (x[i] + h1[i]) * scalar;
  }
}

void CpuBackend::encode(const std::vector<SeqCache*>& caches, const std::vector<std::vector<int32_t>>& tokens) {
  DG_CHECK(caches.size() == tokens.size(), "rows");
  Rows rows;
  for (size_t r = 0; r < caches.size(); ++r) {
    rows.tok0.push_back(rows.T);
    rows.count.push_back(static_cast<int>(tokens[r].size()));
    rows.pos0.push_back(caches[r]->length());
    rows.read.push_back(caches[r]);
    rows.write.push_back(caches[r]);
    for (size_t j = 0; j < tokens[r].size(); ++j) rows.positions.push_back(caches[r]->length() + static_cast<int>(j));
    rows.T += static_cast<int>(tokens[r].size());
  }
  const int H = cfg_.hidden_size;
  const float scale = static_cast<float>(std::sqrt(static_cast<double>(H)));
  std::vector<float> x(static_cast<size_t>(rows.T) * H);
  size_t t = 0;
  for (const auto& row : tokens)
    for (int32_t id : row) {
      const float* e = w_.embed_tokens + static_cast<size_t>(id) * H;
      for (int c = 0; c < H; ++c) x[t * H + c] = e[c] * scale;
      ++t;
    }

  size_t prepared = 0;
  try {
    for (; prepared < caches.size(); ++prepared) caches[prepared]->prepare(rows.count[prepared]);
    layers(x.data(), rows, /*encoder=*/true);
  } catch (...) {
    for (size_t r = 0; r < prepared; ++r) caches[r]->abort();
    throw;
  }
  for (auto* c : caches) c->commit();
}

void CpuBackend::decode(const std::vector<const SeqCache*>& caches, const int32_t* canvas, int n,
                        const std::vector<const float*>& sc_logits, float* logits) {
  const int R = static_cast<int>(caches.size());
  const int H = cfg_.hidden_size, V = cfg_.vocab_size, I = cfg_.intermediate_size;
  const float eps = static_cast<float>(cfg_.rms_norm_eps);
  Rows rows;
  for (int r = 0; r < R; ++r) {
    rows.tok0.push_back(rows.T);
    rows.count.push_back(n);
    rows.pos0.push_back(caches[r]->length());
    rows.read.push_back(caches[r]);
    for (int j = 0; j < n; ++j) rows.positions.push_back(caches[r]->length() + j);
    rows.T += n;
  }
  const int T = rows.T;
  const float scale = static_cast<float>(std::sqrt(static_cast<double>(H)));
  std::vector<float> x(static_cast<size_t>(T) * H);
  for (int t = 0; t < T; ++t) {
    const float* e = w_.embed_tokens + static_cast<size_t>(canvas[t]) * H;
    for (int c = 0; c < H; ++c) x[static_cast<size_t>(t) * H + c] = e[c] * scale;
  }

  // Self-conditioning: softmax(previous logits) @ E * sqrt(H) -> pre_norm -> gated MLP, added to the
  // embeddings, then RMSNorm without scale. A row with no previous logits gets exactly zero.
  DG_CHECK(sc_logits.empty() || static_cast<int>(sc_logits.size()) == R, "one self-conditioning pointer per row");
  std::vector<int> sc_rows;
  for (int r = 0; r < static_cast<int>(sc_logits.size()); ++r)
    if (sc_logits[r]) sc_rows.push_back(r);
  if (!sc_rows.empty()) {
    const int S = static_cast<int>(sc_rows.size()) * n;  // tokens that get a signal, packed
    std::vector<float> probs(static_cast<size_t>(S) * V);
    for (size_t i = 0; i < sc_rows.size(); ++i)
      std::copy_n(sc_logits[sc_rows[i]], static_cast<size_t>(n) * V, probs.begin() + i * n * V);
#pragma omp parallel for schedule(static)
    for (int t = 0; t < S; ++t) softmax_inplace(probs.data() + static_cast<size_t>(t) * V, V);
    std::vector<float> soft(static_cast<size_t>(S) * H);
    matmul_nn(probs.data(), w_.embed_tokens, soft.data(), S, H, V);
    for (auto& s : soft) s *= scale;
    rmsnorm(soft.data(), w_.sc_pre_norm, soft.data(), S, H, eps);
    std::vector<float> gate(static_cast<size_t>(S) * I), up(static_cast<size_t>(S) * I), sig(static_cast<size_t>(S) * H);
    linear(soft.data(), w_.sc_gate, gate.data(), S, I, H);
    linear(soft.data(), w_.sc_up, up.data(), S, I, H);
    gelu_mul(gate.data(), up.data(), gate.data(), static_cast<size_t>(S) * I);
    linear(gate.data(), w_.sc_down, sig.data(), S, H, I);
    for (size_t i = 0; i < sc_rows.size(); ++i) {
      float* xr = x.data() + static_cast<size_t>(rows.tok0[sc_rows[i]]) * H;
      const float* sr = sig.data() + i * n * H;
      for (size_t k = 0; k < static_cast<size_t>(n) * H; ++k) xr[k] += sr[k];
    }
  }
  rmsnorm(x.data(), nullptr, x.data(), T, H, eps);

  layers(x.data(), rows, /*encoder=*/false);

  rmsnorm(x.data(), w_.final_norm, x.data(), T, H, eps);
  linear(x.data(), w_.lm_head, logits, T, V, H);
  if (cfg_.final_logit_softcapping) {
    const float cap = static_cast<float>(*cfg_.final_logit_softcapping);
    const size_t total = static_cast<size_t>(T) * V;
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < total; ++i) logits[i] = std::tanh(logits[i] / cap) * cap;
  }
}

}  // namespace dgemma
