// oneDNN probe (issue 14, item 1): is a oneDNN matmul with pre-packed BF16 weights batch-invariant
// (row i's output bit-identical whatever M the call has) and faster than our packed micro-kernel
// (csrc/backend/cpu/ops.cpp)? Not part of the package; build and run with bench/onednn_probe/run.sh.
//
// y[M, N] = x[M, K] @ w[N, K]^T with w stored as BF16, x float32. oneDNN: weights reordered once to
// the primitive's preferred layout (format_tag::any); tried as f32 src x bf16 weights, and as bf16 x
// bf16 -> f32 with x rounded to bf16 per call (the rounding is timed). Ours: dgemma::cpu::linear on
// the BF16 tensor as stored.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include <oneapi/dnnl/dnnl.hpp>

#include "backend/cpu/ops.h"
#include "model/safetensors.h"
#include "model/weights.h"

using namespace dnnl;
using dgemma::cpu::WeightMat;

static uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u += 0x7fff + ((u >> 16) & 1);
  return static_cast<uint16_t>(u >> 16);
}

static double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

struct Dnnl {
  engine eng{engine::kind::cpu, 0};
  stream s{eng};
};

// One matmul primitive (M fixed, or DNNL_RUNTIME_DIM_VAL) and its packed weights.
struct DnnlGemm {
  matmul prim;
  memory wpacked;
  memory::desc src_md, dst_md;
  bool bf16_src;
  bool ok = false;
  std::string impl;
};

static DnnlGemm make(Dnnl& d, int M, int N, int K, bool bf16_src, const std::vector<uint16_t>& w_nk,
                     const std::vector<float>* wf32 = nullptr) {
  DnnlGemm g;
  g.bf16_src = bf16_src;
  using dt = memory::data_type;
  const memory::dim m = M;
  g.src_md = memory::desc({m, K}, bf16_src ? dt::bf16 : dt::f32, memory::format_tag::ab);
  memory::desc w_any({K, N}, wf32 ? dt::f32 : dt::bf16, memory::format_tag::any);
  g.dst_md = memory::desc({m, N}, dt::f32, memory::format_tag::ab);
  try {
    matmul::primitive_desc pd(d.eng, g.src_md, w_any, g.dst_md);
    g.impl = pd.impl_info_str();
    g.prim = matmul(pd);
    // Our weights are [N, K] row-major = [K, N] with strides (1, K): format_tag::ba.
    memory wsrc = wf32 ? memory({{K, N}, dt::f32, memory::format_tag::ba}, d.eng, const_cast<float*>(wf32->data()))
                       : memory({{K, N}, dt::bf16, memory::format_tag::ba}, d.eng, const_cast<uint16_t*>(w_nk.data()));
    g.wpacked = memory(pd.weights_desc(), d.eng);
    reorder(wsrc, g.wpacked).execute(d.s, wsrc, g.wpacked);
    d.s.wait();
    g.ok = true;
  } catch (const dnnl::error& e) {
    g.impl = std::string("unsupported: ") + e.what();
  }
  return g;
}

static void run(Dnnl& d, DnnlGemm& g, const float* x, std::vector<uint16_t>& xb, float* y, int M, int N, int K) {
  using dt = memory::data_type;
  memory::desc smd({M, K}, g.bf16_src ? dt::bf16 : dt::f32, memory::format_tag::ab);
  memory::desc dmd({M, N}, dt::f32, memory::format_tag::ab);
  void* sp = const_cast<float*>(x);
  if (g.bf16_src) {
    xb.resize(static_cast<size_t>(M) * K);
    for (size_t i = 0; i < xb.size(); ++i) xb[i] = f32_to_bf16(x[i]);
    sp = xb.data();
  }
  memory src(smd, d.eng, sp), dst(dmd, d.eng, y);
  g.prim.execute(d.s, {{DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, g.wpacked}, {DNNL_ARG_DST, dst}});
  d.s.wait();
}

int main(int argc, char** argv) {
  const int reps = argc > 1 ? std::atoi(argv[1]) : 5;
  Dnnl d;
  struct Shape {
    const char* name;
    int N, K;
  };
  const Shape shapes[] = {{"medium mlp gate/up", 512, 1024}, {"medium mlp down", 1024, 512},
                          {"medium q/o-ish", 1024, 1024},    {"medium lm_head", 32768, 1024},
                          {"26b dense gate", 2112, 2816},    {"26b expert gate", 704, 2816}};
  const int Ms[] = {1, 7, 64, 256};
  std::mt19937 rng(1);
  std::normal_distribution<float> nd(0.f, 1.f);
  for (const Shape& sh : shapes) {
    const int N = sh.N, K = sh.K, Mmax = 256;
    std::vector<uint16_t> w(static_cast<size_t>(N) * K);
    for (auto& v : w) v = f32_to_bf16(nd(rng) * 0.03f);
    std::vector<float> x(static_cast<size_t>(Mmax) * K);
    for (auto& v : x) v = nd(rng);
    dgemma::TensorRef t;
    t.dtype = dgemma::DType::BF16;
    t.shape = {N, K};
    t.data = reinterpret_cast<const uint8_t*>(w.data());
    t.nbytes = w.size() * 2;
    dgemma::WeightSource src;
    src.tensor = &t;
    src.shape = {N, K};
    const WeightMat wm{nullptr, &src, 0};

    std::printf("== %s N=%d K=%d\n", sh.name, N, K);
    std::vector<float> wf(w.size());
    src.to_f32(0, static_cast<int64_t>(w.size()), wf.data());
    for (int variant = 0; variant < 5; ++variant) {
      if (std::getenv("PROBE_OURS") && variant != 0 && variant != 4 && variant != 2) continue;
      // 0: ours; 1: oneDNN f32 x bf16; 2: oneDNN bf16 x bf16 (x rounded); 3: oneDNN f32 x f32 (w widened)
      std::vector<std::vector<float>> outs;
      std::vector<uint16_t> xb;
      const char* vname = variant == 0   ? "ours f32(bf16 w)"
                          : variant == 1 ? "dnnl f32 x bf16"
                          : variant == 2 ? "dnnl bf16 x bf16"
                          : variant == 4 ? "ours bf16 dot"
                                         : "dnnl f32 x f32";
      for (int M : Ms) {
        std::vector<float> y(static_cast<size_t>(M) * N);
        DnnlGemm g;
        if (variant && variant != 4) {
          g = make(d, M, N, K, variant == 2, w, variant == 3 ? &wf : nullptr);
          if (!g.ok) {
            std::printf("  %-18s M=%3d %s\n", vname, M, g.impl.c_str());
            break;
          }
        }
        auto call = [&] {
          if (variant == 0 || variant == 4) {
            WeightMat wv = wm;
            wv.bf16_dot = variant == 4;
            dgemma::cpu::linear(x.data(), wv, y.data(), M, N, K);
          }
          else
            run(d, g, x.data(), xb, y.data(), M, N, K);
        };
        call();  // warm
        double best = 1e30;
        for (int r = 0; r < reps; ++r) {
          const double t0 = now();
          call();
          best = std::min(best, now() - t0);
        }
        const double gflops = 2.0 * M * N * K / best / 1e9;
        std::printf("  %-18s M=%3d %9.3f ms %7.1f GFLOP/s  %s\n", vname, M, best * 1e3, gflops,
                    variant && variant != 4 ? g.impl.c_str() : "");
        uint64_t h = 1469598103934665603ull;  // FNV-1a of the output bits: compare across thread counts
        for (size_t i = 0; i < y.size() * 4; ++i) h = (h ^ reinterpret_cast<const uint8_t*>(y.data())[i]) * 1099511628211ull;
        if (std::getenv("PROBE_HASH")) std::printf("    hash %s N=%d K=%d M=%d %016llx\n", vname, N, K, M, (unsigned long long)h);
        outs.push_back(y);
      }
      // Batch invariance: row r of every call equals row r of the M=1/7/64 calls (first rows shared).
      if (outs.size() == 4) {
        int mism = 0;
        for (size_t a = 0; a < outs.size(); ++a)
          for (size_t b = a + 1; b < outs.size(); ++b) {
            const int rows = std::min(Ms[a], Ms[b]);
            if (std::memcmp(outs[a].data(), outs[b].data(), sizeof(float) * rows * N) != 0) {
              ++mism;
              std::printf("    batch-variant: M=%d vs M=%d differ in the first %d rows\n", Ms[a], Ms[b], rows);
            }
          }
        if (!mism) std::printf("    batch-invariant over M=1,7,64,256\n");
      }
    }
  }
  return 0;
}
