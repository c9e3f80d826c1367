// The CPU GEMM alone (csrc/backend/cpu/ops.cpp) on BF16 weights as stored, at the shapes of the cpu-small
// and cpu-medium presets, few rows to many: ms per call (best of reps, one thread as the MoE experts
// run it, or all threads), and whether row r's output is bit-identical whatever the call's M and the
// row's place in it. Not part of the package; build and run with bench/cpu_gemm/run.sh.
//
//   gemm_bench [reps] [mode]   mode: bf16 (BF16 dot products, default), f32 (float32 path), both
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "backend/cpu/ops.h"
#include "model/safetensors.h"
#include "model/weights.h"

using dgemma::cpu::WeightMat;

static uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u += 0x7fff + ((u >> 16) & 1);
  return static_cast<uint16_t>(u >> 16);
}

static double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

int main(int argc, char** argv) {
  const int reps = argc > 1 ? std::atoi(argv[1]) : 20;
  const std::string mode = argc > 2 ? argv[2] : "bf16";
  const bool serial = !std::getenv("GEMM_PARALLEL");
  struct Shape {
    const char* name;
    int N, K;
  };
  const Shape shapes[] = {{"small expert gate_up", 256, 256}, {"small expert down", 256, 128},
                          {"medium expert gate_up", 256, 1024}, {"medium expert down", 1024, 128},
                          {"medium mlp gate", 512, 1024}, {"odd K", 96, 333}};
  const int Ms[] = {1, 4, 7, 8, 9, 16, 33, 64, 256};
  constexpr int Mmax = 256;
  std::mt19937 rng(1);
  std::normal_distribution<float> nd(0.f, 1.f);
  int bad = 0;
  for (const Shape& sh : shapes) {
    const int N = sh.N, K = sh.K;
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
    for (const bool dot : {true, false}) {
      if ((mode == "bf16" && !dot) || (mode == "f32" && dot)) continue;
      WeightMat wm{nullptr, &src, 0};
      wm.bf16_dot = dot;
      auto gemm = [&](const float* xs, float* y, int M) {
        if (serial)
          dgemma::cpu::linear_serial(xs, wm, y, M, N, K);
        else
          dgemma::cpu::linear(xs, wm, y, M, N, K);
      };
      // Every row alone: what each row of every call must equal, bit for bit.
      std::vector<float> alone(static_cast<size_t>(Mmax) * N);
      for (int r = 0; r < Mmax; ++r) gemm(x.data() + static_cast<size_t>(r) * K, alone.data() + static_cast<size_t>(r) * N, 1);
      std::printf("== %s N=%d K=%d %s\n", sh.name, N, K, dot ? "bf16 dot" : "float32");
      for (int M : Ms) {
        std::vector<float> y(static_cast<size_t>(M) * N);
        // Rows from an offset that moves with M, so a row sits at different places in different calls.
        const int off = (M * 37) % (Mmax - M + 1);
        const float* xs = x.data() + static_cast<size_t>(off) * K;
        gemm(xs, y.data(), M);
        const bool same = std::memcmp(y.data(), alone.data() + static_cast<size_t>(off) * N, y.size() * 4) == 0;
        bad += !same;
        double best = 1e30;
        for (int r = 0; r < reps; ++r) {
          const double t0 = now();
          gemm(xs, y.data(), M);
          best = std::min(best, now() - t0);
        }
        uint64_t h = 1469598103934665603ull;
        for (int r = 0; r < M; ++r)
          for (int c = 0; c < N; ++c) {
            uint32_t u;
            std::memcpy(&u, &y[static_cast<size_t>(r) * N + c], 4);
            h = (h ^ u) * 1099511628211ull;
          }
        std::printf("  M=%3d %9.4f ms %7.1f GFLOP/s  rows == alone: %s  hash %016llx\n", M, best * 1e3,
                    2.0 * M * N * K / best / 1e9, same ? "yes" : "NO", static_cast<unsigned long long>(h));
      }
    }
  }
  std::printf(bad ? "BATCH-VARIANT: %d calls differ from their rows alone\n" : "batch-invariant: every row of every call == the row alone\n", bad);
  return bad ? 1 : 0;
}
