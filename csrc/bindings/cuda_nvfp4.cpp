// Test entry point for kernels/nvfp4 (bf16 travels as uint16 bit patterns, E4M3 as uint8 codes).
#include <cuda_bf16.h>

#include <cmath>
#include <cstring>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include <pybind11/stl.h>

#include "bindings/cuda_ops.h"
#include "backend/backend.h"
#include "common/nvfp4_format.h"
#include "common/nvfp4_w4a16_layout.h"
#include "kernels/nvfp4/nvfp4.cuh"
#include "kernels/nvfp4/w4a16_wgmma.h"

namespace py = pybind11;

namespace dgemma::bindings {
namespace {

void check_offsets(const I32Array& offsets, int G, int Mtot) {
  DG_REQUIRE(offsets.ndim() == 1 && offsets.shape(0) == G + 1, InvalidArgument, "offsets must be [G + 1]");
  const int32_t* o = offsets.data();
  DG_REQUIRE(o[0] == 0 && o[G] == Mtot, InvalidArgument, "offsets must start at 0 and end at Mtot");
  for (int g = 0; g < G; ++g) DG_REQUIRE(o[g] <= o[g + 1], InvalidArgument, "offsets must be non-decreasing");
}

// packed [G, N, K/2] and scales [G, N, K/16] -> the W4A16 kernel's pre-shuffled layout [G, expert_bytes].
U8Array shuffle_w4a16(const U8Array& w, const U8Array& w_scale, bool gated) {
  DG_REQUIRE(w.ndim() == 3 && w_scale.ndim() == 3, InvalidArgument, "w must be [G, N, K/2] and w_scale [G, N, K/16]");
  const int G = static_cast<int>(w.shape(0)), N = static_cast<int>(w.shape(1)), K = static_cast<int>(w.shape(2)) * 2;
  DG_REQUIRE(K > 0 && K % 16 == 0, InvalidArgument, "K must be a positive multiple of 16, got " << K);
  DG_REQUIRE(w_scale.shape(0) == G && w_scale.shape(1) == N && w_scale.shape(2) == K / 16, InvalidArgument,
             "w_scale must be [" << G << ", " << N << ", " << K / 16 << "]");
  DG_REQUIRE(!gated || N % 2 == 0, InvalidArgument, "gated needs an even N (gate rows, then up rows), got " << N);
  const size_t bytes = nvfp4::w4a16::expert_bytes(N, K, gated);
  U8Array out({static_cast<py::ssize_t>(G), static_cast<py::ssize_t>(bytes)});
  for (int g = 0; g < G; ++g)
    DG_REQUIRE(nvfp4::w4a16::shuffle_expert(w.data() + static_cast<size_t>(g) * N * (K / 2),
                                            w_scale.data() + static_cast<size_t>(g) * N * (K / 16), N, K, gated,
                                            out.mutable_data() + g * bytes),
               InvalidArgument, "expert " << g << " has a NaN block scale");
  return out;
}

// The same layout made on the device (kernels::shuffle_w4a16, what the CUDA backend runs at load).
U8Array shuffle_w4a16_device(const U8Array& w, const U8Array& w_scale, bool gated) {
  const U8Array host = shuffle_w4a16(w, w_scale, gated);  // the argument checks, and NaN scales refused
  const int G = static_cast<int>(w.shape(0)), N = static_cast<int>(w.shape(1)), K = static_cast<int>(w.shape(2)) * 2;
  auto dw = DeviceBuffer<uint8_t>::from(w);
  auto ds = DeviceBuffer<uint8_t>::from(w_scale);
  DeviceBuffer<uint8_t> dout(static_cast<size_t>(host.size()));
  DG_CUDA_CHECK(kernels::shuffle_w4a16(dw.get(), ds.get(), G, N, K, gated, dout.get(), nullptr));
  DG_CUDA_CHECK(cudaDeviceSynchronize());
  U8Array out({host.shape(0), host.shape(1)});
  dout.copy_to(out.mutable_data());
  return out;
}

}  // namespace

kernels::W4A16Path parse_w4a16_path(const std::string& path) {
  if (path == "auto") return kernels::W4A16Path::kAuto;
  if (path == "mma") return kernels::W4A16Path::kMmaSync;
  if (path == "wgmma") return kernels::W4A16Path::kWgmma;
  DG_THROW(InvalidArgument, "path must be 'auto', 'mma' or 'wgmma', got '" << path << "'");
}

namespace {

U16Array grouped_gemm_nvfp4(U16Array x, U8Array w, U8Array w_scale, F32Array w_global, I32Array offsets, bool gated,
                            std::optional<I32Array> gather, int gather_div, const std::string& path) {
  const kernels::W4A16Path kernel = parse_w4a16_path(path);
  DG_REQUIRE(kernel != kernels::W4A16Path::kWgmma || kernels::grouped_gemm_nvfp4_wgmma_supported(), Unsupported,
             "the wgmma W4A16 kernel needs a compute capability 9.0 GPU and a build with sm_90a and CUTLASS");
  DG_REQUIRE(x.ndim() == 2 && w.ndim() == 3 && w_scale.ndim() == 3 && w_global.ndim() == 1 && offsets.ndim() == 1,
             InvalidArgument, "x must be [Mtot, K], w [G, N, K/2], w_scale [G, N, K/16], w_global [G], offsets [G+1]");
  const int K = static_cast<int>(x.shape(1));
  const int Mtot = gather ? static_cast<int>(gather->size()) : static_cast<int>(x.shape(0));
  const int G = static_cast<int>(w.shape(0)), N = static_cast<int>(w.shape(1));
  DG_REQUIRE(K % 16 == 0 && K > 0, InvalidArgument, "K must be a positive multiple of 16, got " << K);
  if (gather) {
    DG_REQUIRE(gather->ndim() == 1 && gather_div >= 1, InvalidArgument, "gather must be [Mtot] and gather_div >= 1");
    for (py::ssize_t r = 0; r < gather->size(); ++r)
      DG_REQUIRE(gather->data()[r] >= 0 && gather->data()[r] / gather_div < x.shape(0), InvalidArgument,
                 "gather[" << r << "] = " << gather->data()[r] << " is outside x's " << x.shape(0) << " rows");
  }
  DG_REQUIRE(w.shape(2) == K / 2, InvalidArgument, "w must be [G, N, " << K / 2 << "]");
  DG_REQUIRE(w_global.shape(0) == G, InvalidArgument, "w_global must be [G]");
  check_offsets(offsets, G, Mtot);
  DG_REQUIRE(!gated || N % 2 == 0, InvalidArgument, "gated needs an even N (gate rows, then up rows), got " << N);
  const U8Array shuffled = shuffle_w4a16(w, w_scale, gated);  // what a loader does once, at load
  auto dx = DeviceBuffer<__nv_bfloat16>::from(x);
  auto dw = DeviceBuffer<uint8_t>::from(shuffled);
  auto dg = DeviceBuffer<float>::from(w_global);
  auto doff = DeviceBuffer<int32_t>::from(offsets);
  DeviceBuffer<int32_t> dgather;
  if (gather) dgather = DeviceBuffer<int32_t>::from(*gather);
  const int Nout = gated ? N / 2 : N;
  DeviceBuffer<__nv_bfloat16> dy(static_cast<size_t>(Mtot) * Nout);
  kernels::GroupedGemmNvfp4Params p;
  p.x = dx.get(), p.w = dw.get(), p.w_global = dg.get(), p.offsets = doff.get();
  p.y = dy.get(), p.G = G, p.N = N, p.K = K, p.gated = gated;
  p.gather = gather ? dgather.get() : nullptr, p.gather_div = gather_div;
  p.expected_rows = Mtot, p.path = kernel;
  if (Mtot > 0) {
    DG_CUDA_CHECK(kernels::grouped_gemm_nvfp4(p, nullptr));
    DG_CUDA_CHECK(cudaDeviceSynchronize());
  }
  U16Array y({Mtot, Nout});
  dy.copy_to(y.mutable_data());
  return y;
}

// The kernel's side of the layout run on the host: for every CTA, stage, warp, lane and k-step, the
// words and scale bytes it reads (same offsets), the same decode_word / scale_pair, the bf16 product
// HMUL2.BF16 makes (checked exact), placed by the mma.m16n8k16 A-fragment map and the row map, times
// 2^7 (the epilogue's factor). Returns W = e2m1 * scale [G, N, K] (no global scale); every element must
// be written exactly once and every padding element must decode to zero, else it throws.
py::array_t<float> emulate_w4a16(const U8Array& shuffled, int N, int K, bool gated) {
  namespace L = nvfp4::w4a16;
  DG_REQUIRE(shuffled.ndim() == 2 && K > 0 && K % 16 == 0 && N > 0 && (!gated || N % 2 == 0), InvalidArgument,
             "need shuffled [G, bytes], K % 16 == 0, N > 0 (even when gated)");
  const size_t bytes = L::expert_bytes(N, K, gated);
  DG_REQUIRE(static_cast<size_t>(shuffled.shape(1)) == bytes, InvalidArgument, "shuffled must be [G, " << bytes << "]");
  const int G = static_cast<int>(shuffled.shape(0)), KT = L::k_tiles(K);
  py::array_t<float> out({G, N, K});
  float* o = out.mutable_data();
  std::vector<uint8_t> seen(static_cast<size_t>(G) * N * K, 0);
  auto bf16 = [](uint32_t bits) { uint32_t f = bits << 16; float v; std::memcpy(&v, &f, 4); return v; };
  for (int g = 0; g < G; ++g)
    for (int c = 0; c < L::groups(N, gated); ++c)
      for (int t = 0; t < KT; ++t) {
        const uint8_t* st = shuffled.data() + g * bytes + (static_cast<size_t>(c) * KT + t) * L::kUnitBytes;
        for (int warp = 0; warp < L::kWarps; ++warp)
          for (int lane = 0; lane < 32; ++lane) {
            uint32_t wq[4], sq[2];
            std::memcpy(wq, st + warp * L::kTileWeightBytes + 16 * lane, 16);                              // LDS.128
            std::memcpy(sq, st + L::kScaleOffset + warp * L::kTileScaleBytes + 8 * (lane / 4), 8);         // LDS.64
            for (int j = 0; j < L::kKSteps; ++j) {
              uint32_t a[4];
              L::decode_word(wq[j], a);
              const uint32_t s = L::scale_pair(j < 2 ? sq[0] : sq[1], j);
              for (int i = 0; i < 4; ++i)
                for (int h = 0; h < 2; ++h) {
                  const float v = bf16((a[i] >> (16 * h)) & 0xFFFF), sc = bf16((s >> (16 * (i & 1))) & 0xFFFF);
                  const float prod = v * sc;  // exact in fp32 (2 x 4 significant bits); must also be a bf16
                  uint32_t pb;
                  std::memcpy(&pb, &prod, 4);
                  DG_REQUIRE((pb & 0xFFFF) == 0, Error, "decoded product is not exact in bf16");
                  const float w = prod * L::kAccScale;
                  const int n = L::weight_row(L::kWarps * c + warp, L::frag_row(lane, i), N, gated);
                  const int k = L::kKTile * t + 16 * j + L::frag_k(lane, i, h);
                  if (n < 0 || k >= K) {
                    DG_REQUIRE(w == 0.0f, Error, "padding decodes to " << w << " (expert " << g << ")");
                    continue;
                  }
                  const size_t idx = (static_cast<size_t>(g) * N + n) * K + k;
                  DG_REQUIRE(!seen[idx]++, Error, "element (" << g << ", " << n << ", " << k << ") read twice");
                  o[idx] = w;
                }
            }
          }
      }
  for (size_t i = 0; i < seen.size(); ++i) DG_REQUIRE(seen[i], Error, "element " << i << " never read");
  return out;
}

namespace {
float bf16_to_float(uint32_t bits) {
  const uint32_t f = bits << 16;
  float v;
  std::memcpy(&v, &f, 4);
  return v;
}
uint16_t float_to_bf16(float v) {  // round to nearest even (finite values)
  uint32_t u;
  std::memcpy(&u, &v, 4);
  return static_cast<uint16_t>((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
}
uint16_t mul_bf16(uint32_t a, uint32_t b) {  // HMUL2.BF16 on one half; exact for the decode's products
  return float_to_bf16(bf16_to_float(a) * bf16_to_float(b));
}
}  // namespace

// The whole warp program of the W4A16 kernel run on the host, one CTA (c, g) and one 64-token pass at a
// time, with the kernel's own index functions (nvfp4_w4a16_layout.h): the token rows table (gather), each
// stage's activation tile written at act_chunk_offset (zero-filled where cp.async's source size is 0,
// NaN bytes where the kernel never writes), every warp's A fragments (decode_word, scale_pair, HMUL2) and
// B fragments as ldmatrix returns them from the row addresses ldsm_offset gives (lane l gets row l / 4,
// bytes 4 (l % 4) of each matrix), the m16n8k16 products assembled from those fragments with fp32 sums in
// k order, and the epilogue's map (acc_row, acc_col, weight_row, gated pairing, bf16 rounding). Every
// output must be written exactly once.
U16Array emulate_w4a16_gemm(U16Array x, U8Array shuffled, F32Array w_global, I32Array offsets, int N, int K, bool gated,
                            std::optional<I32Array> gather, int gather_div) {
  namespace L = nvfp4::w4a16;
  DG_REQUIRE(x.ndim() == 2 && x.shape(1) == K && K % 16 == 0 && shuffled.ndim() == 2 && N > 0 &&
                 (!gated || N % 2 == 0) && gather_div >= 1,
             InvalidArgument, "need x [rows, K], K % 16 == 0, shuffled [G, bytes], even N when gated");
  const int G = static_cast<int>(shuffled.shape(0)), KT = L::k_tiles(K);
  const size_t bytes = L::expert_bytes(N, K, gated);
  DG_REQUIRE(static_cast<size_t>(shuffled.shape(1)) == bytes && w_global.shape(0) == G, InvalidArgument,
             "shuffled must be [G, " << bytes << "] and w_global [G]");
  const int Mtot = gather ? static_cast<int>(gather->size()) : static_cast<int>(x.shape(0));
  check_offsets(offsets, G, Mtot);
  const int Nout = gated ? N / 2 : N;
  U16Array y({Mtot, Nout});
  uint16_t* yo = y.mutable_data();
  std::vector<uint8_t> written(static_cast<size_t>(Mtot) * Nout, 0);
  const uint16_t* xb = x.data();
  const int32_t* off = offsets.data();
  std::vector<uint8_t> act(L::kKTile * 2 * 64);
  for (int g = 0; g < G; ++g)
    for (int c = 0; c < L::groups(N, gated); ++c)
      for (int t0 = off[g]; t0 < off[g + 1]; t0 += 64) {
        const int n = off[g + 1] - t0, m_end = off[g + 1];
        const int NT = n <= 8 ? 1 : n <= 16 ? 2 : n <= 32 ? 4 : 8;
        int rows[64];
        for (int i = 0; i < 64; ++i) {
          const int tok = t0 + i;
          rows[i] = tok < m_end ? (gather ? gather->data()[tok] / gather_div : tok) : -1;
        }
        std::vector<float> acc(static_cast<size_t>(L::kWarps) * 32 * NT * 4, 0.0f);  // [warp][lane][n][i]
        for (int t = 0; t < KT; ++t) {
          std::fill(act.begin(), act.end(), 0xFF);  // bf16 NaN: what a wrong ldmatrix address would read
          for (int q = 0; q < 64 * NT; ++q) {
            const int row = q / 8, ch = q % 8, col = L::kKTile * t + 8 * ch;
            const bool ok = rows[row] >= 0 && col < K;
            uint8_t* d = act.data() + L::act_chunk_offset(row, ch);
            if (ok) std::memcpy(d, xb + static_cast<size_t>(rows[row]) * K + col, 16);
            else std::memset(d, 0, 16);
          }
          const uint8_t* st = shuffled.data() + g * bytes + (static_cast<size_t>(c) * KT + t) * L::kUnitBytes;
          for (int warp = 0; warp < L::kWarps; ++warp)
            for (int j = 0; j < L::kKSteps; ++j) {
              float A[16][16];
              for (int lane = 0; lane < 32; ++lane) {
                uint32_t wq[4], sq[2], a[4];
                std::memcpy(wq, st + warp * L::kTileWeightBytes + 16 * lane, 16);
                std::memcpy(sq, st + L::kScaleOffset + warp * L::kTileScaleBytes + 8 * (lane / 4), 8);
                L::decode_word(wq[j], a);
                const uint32_t s = L::scale_pair(j < 2 ? sq[0] : sq[1], j);
                for (int i = 0; i < 4; ++i)
                  for (int h = 0; h < 2; ++h)
                    A[L::frag_row(lane, i)][L::frag_k(lane, i, h)] =
                        bf16_to_float(mul_bf16((a[i] >> (16 * h)) & 0xFFFF, (s >> (16 * (i & 1))) & 0xFFFF));
              }
              for (int np = 0; np < (NT + 1) / 2; ++np) {
                const int mats = NT == 1 ? 2 : 4;  // ldmatrix .x2 or .x4
                uint32_t reg[32][4];
                for (int lane = 0; lane < 32; ++lane)
                  for (int q = 0; q < mats; ++q) {
                    const int addr = L::ldsm_offset(8 * q + lane / 4, j, np);  // row lane / 4 of matrix q
                    std::memcpy(&reg[lane][q], act.data() + addr + 4 * (lane % 4), 4);
                  }
                for (int half_tile = 0; half_tile < mats / 2; ++half_tile) {
                  const int nn = 2 * np + half_tile;  // n8 tile
                  float B[16][8];
                  for (int lane = 0; lane < 32; ++lane)
                    for (int h = 0; h < 2; ++h) {  // b0: k = 2 (lane % 4) + h, b1: k + 8; token lane / 4
                      B[2 * (lane % 4) + h][lane / 4] = bf16_to_float((reg[lane][2 * half_tile] >> (16 * h)) & 0xFFFF);
                      B[8 + 2 * (lane % 4) + h][lane / 4] = bf16_to_float((reg[lane][2 * half_tile + 1] >> (16 * h)) & 0xFFFF);
                    }
                  for (int lane = 0; lane < 32; ++lane)
                    for (int i = 0; i < 4; ++i) {
                      float d = 0.0f;
                      for (int k = 0; k < 16; ++k) d += A[L::acc_row(lane, i)][k] * B[k][L::acc_col(lane, i)];
                      acc[((static_cast<size_t>(warp) * 32 + lane) * NT + nn) * 4 + i] += d;
                    }
                }
              }
            }
        }
        const float gs = w_global.data()[g] * L::kAccScale;
        for (int warp = 0; warp < L::kWarps; ++warp)
          for (int lane = 0; lane < 32; ++lane) {
            const int b = L::kWarps * c + warp;
            const float* ac = acc.data() + (static_cast<size_t>(warp) * 32 + lane) * NT * 4;
            for (int nn = 0; nn < NT; ++nn)
              for (int i = 0; i < (gated ? 2 : 4); ++i) {
                const int tok = t0 + 8 * nn + L::acc_col(lane, i);
                int col;
                uint16_t v;
                if (gated) {
                  col = 8 * b + lane / 4;
                  if (col >= N / 2 || tok >= m_end) continue;
                  const float gate = bf16_to_float(float_to_bf16(ac[nn * 4 + i] * gs));
                  const float up = bf16_to_float(float_to_bf16(ac[nn * 4 + i + 2] * gs));
                  const float k0 = 0.7978845608028654f;
                  v = float_to_bf16(0.5f * gate * (1.0f + std::tanh(k0 * (gate + 0.044715f * gate * gate * gate))) * up);
                } else {
                  col = L::weight_row(b, L::acc_row(lane, i), N, false);
                  if (col < 0 || tok >= m_end) continue;
                  v = float_to_bf16(ac[nn * 4 + i] * gs);
                }
                const size_t idx = static_cast<size_t>(tok) * Nout + col;
                DG_REQUIRE(!written[idx]++, Error, "output (" << tok << ", " << col << ") written twice");
                yo[idx] = v;
              }
          }
      }
  for (size_t i = 0; i < written.size(); ++i) DG_REQUIRE(written[i], Error, "output " << i << " never written");
  return y;
}

// ---- host side: the arithmetic and the scale layout the kernels use, checked without a GPU
std::tuple<U8Array, U8Array> quantize_host(F32Array x, float global) {
  DG_REQUIRE(x.ndim() == 2 && x.shape(1) % nvfp4::kGroup == 0, InvalidArgument, "x must be [R, K], K % 16 == 0");
  const py::ssize_t R = x.shape(0), K = x.shape(1);
  U8Array packed({R, K / 2}), scales({R, K / nvfp4::kGroup});
  const float* src = x.data();
  uint8_t* q = packed.mutable_data();
  uint8_t* sc = scales.mutable_data();
  for (py::ssize_t b = 0; b < R * K / nvfp4::kGroup; ++b) {
    float v[nvfp4::kGroup];
    uint8_t pk[nvfp4::kGroup / 2];
    std::memcpy(v, src + b * nvfp4::kGroup, sizeof(v));
    sc[b] = static_cast<uint8_t>(nvfp4::quantize_block(v, global, pk));
    std::memcpy(q + b * (nvfp4::kGroup / 2), pk, sizeof(pk));
  }
  return {packed, scales};
}

// Element-wise codecs: "e4m3" (scales: x >= 0) or "e2m1" (values) to codes.
U8Array encode_host(F32Array x, const std::string& kind) {
  DG_REQUIRE(kind == "e4m3" || kind == "e2m1", InvalidArgument, "kind must be 'e4m3' or 'e2m1', got '" << kind << "'");
  U8Array out(std::vector<py::ssize_t>(x.shape(), x.shape() + x.ndim()));
  const float* src = x.data();
  uint8_t* o = out.mutable_data();
  for (py::ssize_t i = 0; i < x.size(); ++i) {
    if (kind == "e4m3") {
      DG_REQUIRE(std::isfinite(src[i]) && src[i] >= 0, InvalidArgument, "E4M3 scales must be finite and >= 0");
      o[i] = static_cast<uint8_t>(nvfp4::e4m3_from_float(src[i]));
    } else {
      o[i] = static_cast<uint8_t>(nvfp4::e2m1_from_float(src[i]));
    }
  }
  return out;
}

py::array_t<int64_t> sf_offsets(int rows, int K, bool cutlass_layout) {
  DG_REQUIRE(rows >= 0 && K > 0 && K % nvfp4::kGroup == 0, InvalidArgument, "need rows >= 0 and K % 16 == 0");
  const int kb = K / nvfp4::kGroup;
  py::array_t<int64_t> out({rows, kb});
  int64_t* o = out.mutable_data();
  if (cutlass_layout) {
#if defined(DGEMMA_WITH_CUTLASS)
    kernels::cutlass_nvfp4_sf_offsets(rows, K, o);
#else
    DG_THROW(Error, "this build has no CUTLASS headers");
#endif
  } else {
    for (int r = 0; r < rows; ++r)
      for (int c = 0; c < kb; ++c) o[static_cast<size_t>(r) * kb + c] = static_cast<int64_t>(nvfp4::sf_offset(r, c, kb));
  }
  return out;
}

// Row-major block scales [G, rows, kblocks] -> [G, sf_bytes] in the MMA layout, by the device kernel's
// per-thread step (nvfp4::swizzle_scale) run on the host for every t of every matrix, or by the kernel.
U8Array swizzle_scales(const U8Array& scales, bool device) {
  DG_REQUIRE(scales.ndim() == 3 && scales.shape(2) > 0, InvalidArgument, "scales must be [G, rows, K/16]");
  const int G = static_cast<int>(scales.shape(0)), rows = static_cast<int>(scales.shape(1));
  const int kb = static_cast<int>(scales.shape(2));
  const size_t per = nvfp4::sf_bytes(rows, kb);
  U8Array out({static_cast<py::ssize_t>(G), static_cast<py::ssize_t>(per)});
  if (device) {
    auto ds = DeviceBuffer<uint8_t>::from(scales);
    DeviceBuffer<uint8_t> dout(static_cast<size_t>(G) * per);
    if (dout.size()) DG_CUDA_CHECK(cudaMemset(dout.get(), 0xAB, dout.size()));  // bytes never written show up
    DG_CUDA_CHECK(kernels::swizzle_scales_nvfp4(ds.get(), G, rows, kb, dout.get(), nullptr));
    DG_CUDA_CHECK(cudaDeviceSynchronize());
    dout.copy_to(out.mutable_data());
    return out;
  }
  std::vector<uint8_t> seen(per);
  for (int g = 0; g < G; ++g) {
    std::fill(seen.begin(), seen.end(), 0);
    uint8_t* o = out.mutable_data() + static_cast<size_t>(g) * per;
    const uint8_t* in = scales.data() + static_cast<size_t>(g) * rows * kb;
    for (size_t t = 0; t < per; ++t) {
      const size_t at = nvfp4::sf_offset(static_cast<int>(t / nvfp4::sf_padded_kblocks(kb)),
                                         static_cast<int>(t % nvfp4::sf_padded_kblocks(kb)), kb);
      DG_REQUIRE(at < per && !seen[at]++, Error, "step " << t << " writes byte " << at << " twice or out of range");
      nvfp4::swizzle_scale(in, rows, kb, t, o);
    }
  }
  return out;
}

// ---- GPU: activation quantization and the Blackwell NVFP4 x NVFP4 grouped GEMM
// -> (packed [Mtot, K/2], scales in the MMA layout (bytes), sf_starts [G + 1], global scale)
// gather: row r quantizes x[gather[r] // gather_div] (the backend's gate_up input); the global scale
// from the data is then x's (the gathered rows are copies of its rows).
std::tuple<U8Array, U8Array, I32Array, float> quantize_act(U16Array x, I32Array offsets, std::optional<float> global,
                                                           std::optional<I32Array> gather, int gather_div) {
  DG_REQUIRE(x.ndim() == 2 && x.shape(1) > 0 && x.shape(1) % nvfp4::kGroup == 0, InvalidArgument,
             "x must be [Mtot, K], K a positive multiple of 16");
  const int Mtot = gather ? static_cast<int>(gather->size()) : static_cast<int>(x.shape(0));
  const int K = static_cast<int>(x.shape(1));
  const int G = static_cast<int>(offsets.shape(0)) - 1;
  DG_REQUIRE(G >= 1, InvalidArgument, "offsets must be [G + 1], G >= 1");
  check_offsets(offsets, G, Mtot);
  if (gather) {
    DG_REQUIRE(gather->ndim() == 1 && gather_div >= 1, InvalidArgument, "gather must be [Mtot] and gather_div >= 1");
    for (py::ssize_t r = 0; r < gather->size(); ++r)
      DG_REQUIRE(gather->data()[r] >= 0 && gather->data()[r] / gather_div < x.shape(0), InvalidArgument,
                 "gather[" << r << "] = " << gather->data()[r] << " is outside x's " << x.shape(0) << " rows");
  }
  auto dx = DeviceBuffer<__nv_bfloat16>::from(x);
  auto doff = DeviceBuffer<int32_t>::from(offsets);
  DeviceBuffer<int32_t> dgather;
  if (gather) dgather = DeviceBuffer<int32_t>::from(*gather);
  DeviceBuffer<float> dglobal(1);
  if (global) {
    DG_REQUIRE(std::isfinite(*global) && *global > 0, InvalidArgument, "global scale must be finite and > 0");
    DG_CUDA_CHECK(cudaMemcpy(dglobal.get(), &*global, sizeof(float), cudaMemcpyHostToDevice));
  } else {
    DG_CUDA_CHECK(kernels::act_global_scale_nvfp4(dx.get(), dx.size(), dglobal.get(), nullptr));
  }
  const size_t sf_n = kernels::quantize_act_nvfp4_sf_bytes(Mtot, G, K);
  DeviceBuffer<uint8_t> dq(static_cast<size_t>(Mtot) * K / 2), dsf(sf_n);
  DeviceBuffer<int32_t> dstarts(static_cast<size_t>(G) + 1);
  DG_CUDA_CHECK(cudaMemset(dsf.get(), 0xFF, sf_n));  // garbage (NaN scales): the launch must zero the padding
  kernels::QuantizeActNvfp4Params p;
  p.x = dx.get(), p.offsets = doff.get(), p.global = dglobal.get(), p.q = dq.get(), p.sf = dsf.get();
  p.sf_starts = dstarts.get(), p.Mtot = Mtot, p.G = G, p.K = K;
  p.gather = gather ? dgather.get() : nullptr, p.gather_div = gather_div;
  DG_CUDA_CHECK(kernels::quantize_act_nvfp4(p, nullptr));
  DG_CUDA_CHECK(cudaDeviceSynchronize());
  U8Array q({Mtot, K / 2}), sf({static_cast<py::ssize_t>(sf_n)});
  I32Array starts({G + 1});
  dq.copy_to(q.mutable_data());
  dsf.copy_to(sf.mutable_data());
  dstarts.copy_to(starts.mutable_data());
  float g = 0;
  DG_CUDA_CHECK(cudaMemcpy(&g, dglobal.get(), sizeof(float), cudaMemcpyDeviceToHost));
  return {q, sf, starts, g};
}

std::optional<std::string> blackwell_arch() {
#if defined(DGEMMA_WITH_CUTLASS)
  if (kernels::sm100_nvfp4_supported()) return std::string("sm_100a");
  if (kernels::sm120_nvfp4_supported()) return std::string("sm_120a");
#endif
  return std::nullopt;
}

#if defined(DGEMMA_WITH_CUTLASS)
// y = dequant(a) @ dequant(W_g)^T per group, a already quantized (quantize_act_nvfp4's outputs),
// w_sf in the MMA layout (dgemma_rt.nvfp4.swizzle_scales).
U16Array grouped_gemm_nvfp4x4(U8Array a, U8Array a_sf, I32Array a_sf_starts, float a_global, U8Array w,
                              U8Array w_sf, F32Array w_global, I32Array offsets) {
  DG_REQUIRE(a.ndim() == 2 && w.ndim() == 3 && w_sf.ndim() == 2 && w_global.ndim() == 1, InvalidArgument,
             "a must be [Mtot, K/2], w [G, N, K/2], w_sf [G, sf_bytes], w_global [G]");
  const int Mtot = static_cast<int>(a.shape(0)), K = static_cast<int>(a.shape(1)) * 2;
  const int G = static_cast<int>(w.shape(0)), N = static_cast<int>(w.shape(1));
  DG_REQUIRE(w.shape(2) == K / 2 && K % 32 == 0 && N % 8 == 0, InvalidArgument,
             "need w [G, N, K/2] with K % 32 == 0 and N % 8 == 0");
  DG_REQUIRE(w_sf.shape(0) == G && static_cast<size_t>(w_sf.shape(1)) == nvfp4::sf_bytes(N, K / nvfp4::kGroup),
             InvalidArgument, "w_sf must be [G, " << nvfp4::sf_bytes(N, K / nvfp4::kGroup) << "]");
  DG_REQUIRE(w_global.shape(0) == G && a_sf_starts.ndim() == 1 && a_sf_starts.shape(0) == G + 1, InvalidArgument,
             "w_global must be [G] and a_sf_starts [G + 1]");
  check_offsets(offsets, G, Mtot);
  const auto arch = blackwell_arch();
  DG_REQUIRE(arch.has_value(), Error, "the NVFP4 x NVFP4 grouped GEMM needs an sm_100a or sm_120a GPU");
  const bool sm100 = *arch == "sm_100a";
  auto da = DeviceBuffer<uint8_t>::from(a);
  auto dasf = DeviceBuffer<uint8_t>::from(a_sf);
  auto dstarts = DeviceBuffer<int32_t>::from(a_sf_starts);
  auto dw = DeviceBuffer<uint8_t>::from(w);
  auto dwsf = DeviceBuffer<uint8_t>::from(w_sf);
  auto dwg = DeviceBuffer<float>::from(w_global);
  auto doff = DeviceBuffer<int32_t>::from(offsets);
  DeviceBuffer<float> dag(1);
  DG_CUDA_CHECK(cudaMemcpy(dag.get(), &a_global, sizeof(float), cudaMemcpyHostToDevice));
  DeviceBuffer<__nv_bfloat16> dy(static_cast<size_t>(Mtot) * N);
  const size_t ws = sm100 ? kernels::grouped_gemm_nvfp4_sm100_workspace_size(G)
                          : kernels::grouped_gemm_nvfp4_sm120_workspace_size(G);
  DeviceBuffer<uint8_t> dws(ws);
  kernels::GroupedGemmNvfp4x4Params p;
  p.a = da.get(), p.a_sf = dasf.get(), p.a_sf_starts = dstarts.get(), p.a_global = dag.get();
  p.w = dw.get(), p.w_sf = dwsf.get(), p.w_global = dwg.get(), p.offsets = doff.get(), p.y = dy.get();
  p.G = G, p.N = N, p.K = K, p.workspace = dws.get(), p.workspace_bytes = ws;
  if (Mtot > 0) {
    DG_CUDA_CHECK(sm100 ? kernels::grouped_gemm_nvfp4_sm100(p, nullptr) : kernels::grouped_gemm_nvfp4_sm120(p, nullptr));
    DG_CUDA_CHECK(cudaDeviceSynchronize());
  }
  U16Array y({Mtot, N});
  dy.copy_to(y.mutable_data());
  return y;
}
#endif

RegisterCudaOps reg([](py::module_& m) {
  m.def("grouped_gemm_nvfp4", &grouped_gemm_nvfp4, py::arg("x"), py::arg("w"), py::arg("w_scale"),
        py::arg("w_global"), py::arg("offsets"), py::arg("gated") = false, py::arg("gather") = py::none(),
        py::arg("gather_div") = 1, py::arg("path") = "auto",
        "y[o_g:o_g+1] = x[o_g:o_g+1] @ dequant(W_g)^T: NVFP4 weights, bf16 activations (uint16) in and out; "
        "gated: W is gate_up and y = gelu_tanh(gate) * up [Mtot, N/2]; gather: row r reads "
        "x[gather[r] // gather_div]; path: 'auto', 'mma' (mma.sync, 64-token passes) or 'wgmma' (sm_90a, "
        "128-token passes)");
  m.def("grouped_gemm_nvfp4_wgmma_supported", &kernels::grouped_gemm_nvfp4_wgmma_supported,
        "whether the wgmma W4A16 kernel runs here (a compute capability 9.0 GPU, a build with sm_90a and CUTLASS)");
  m.def("w4a16_wgmma_layout_mismatch", &kernels::w4a16_detail::wgmma_layout_mismatch,
        "CuTe's wgmma A/C fragment and swizzled B tile layouts against what the wgmma W4A16 kernel writes and "
        "reads, on the host: '' when they agree");
  m.def("nvfp4_shuffle_w4a16_device", &shuffle_w4a16_device, py::arg("w"), py::arg("w_scale"),
        py::arg("gated") = false, "nvfp4_shuffle_w4a16 computed by the device kernel (the CUDA backend's load path)");
  m.def("nvfp4_shuffle_w4a16", &shuffle_w4a16, py::arg("w"), py::arg("w_scale"), py::arg("gated") = false,
        "the W4A16 kernel's pre-shuffled weight layout [G, bytes] of NVFP4 codes [G, N, K/2] and E4M3 scales "
        "[G, N, K/16] (common/nvfp4_w4a16_layout.h, run on the host)");
  m.def("nvfp4_emulate_w4a16", &emulate_w4a16, py::arg("shuffled"), py::arg("N"), py::arg("K"),
        py::arg("gated") = false,
        "the W4A16 kernel's reads, decode and fragment map run on the host: e2m1 * scale [G, N, K] as the "
        "kernel's MMAs see it (times 2^7)");
  m.def("nvfp4_emulate_w4a16_gemm", &emulate_w4a16_gemm, py::arg("x"), py::arg("shuffled"), py::arg("w_global"),
        py::arg("offsets"), py::arg("N"), py::arg("K"), py::arg("gated") = false, py::arg("gather") = py::none(),
        py::arg("gather_div") = 1,
        "the W4A16 kernel's whole warp program (tiles, fragments, ldmatrix addresses, MMAs, epilogue) run on "
        "the host with its index functions: bf16 (uint16) y like grouped_gemm_nvfp4's");
  m.def("nvfp4_w4a16_smem_offsets", [] {
    namespace L = nvfp4::w4a16;
    py::array_t<int32_t> chunks({64, 8}), ldsm({L::kKSteps, 4, 32});
    for (int r = 0; r < 64; ++r)
      for (int c = 0; c < 8; ++c) chunks.mutable_data()[r * 8 + c] = L::act_chunk_offset(r, c);
    for (int j = 0; j < L::kKSteps; ++j)
      for (int np = 0; np < 4; ++np)
        for (int l = 0; l < 32; ++l) ldsm.mutable_data()[(j * 4 + np) * 32 + l] = L::ldsm_offset(l, j, np);
    return py::make_tuple(chunks, ldsm);
  }, "the W4A16 kernel's activation-tile chunk offsets [64 tokens, 8 chunks] and ldmatrix row addresses "
     "[k-step, 16-token pair, lane], in bytes");
  m.def("nvfp4_quantize_host", &quantize_host, py::arg("x"), py::arg("global_scale"),
        "the kernels' NVFP4 block quantization run on the host: (packed [R, K/2], E4M3 codes [R, K/16])");
  m.def("nvfp4_encode_host", &encode_host, py::arg("x"), py::arg("kind"),
        "the kernels' E4M3 ('e4m3') or E2M1 ('e2m1') rounding run on the host");
  m.def("nvfp4_global_scale", [](float amax) { return nvfp4::global_scale(amax); }, py::arg("amax"));
  m.def("nvfp4_sf_offsets", &sf_offsets, py::arg("rows"), py::arg("K"), py::arg("cutlass_layout") = false,
        "byte offsets [rows, K/16] of the block scales in the MMA layout: the kernels' formula, or CUTLASS's "
        "layout evaluated by CuTe (cutlass_layout=True)");
  m.def("quantize_act_nvfp4", &quantize_act, py::arg("x"), py::arg("offsets"), py::arg("global_scale") = py::none(),
        py::arg("gather") = py::none(), py::arg("gather_div") = 1,
        "bf16 activations (uint16) [Mtot, K] to NVFP4 on the GPU: (packed, scales in the MMA layout, "
        "per-group first scale tile [G + 1], global scale); the global scale from the data when None; "
        "gather: row r is x[gather[r] // gather_div]");
  m.def("nvfp4_swizzle_scales", &swizzle_scales, py::arg("scales"), py::arg("device") = false,
        "row-major E4M3 block scales [G, rows, K/16] to the MMA layout [G, sf_bytes]: the device kernel "
        "swizzle_scales_nvfp4 (device=True, the CUDA backend's load path) or its per-thread step run on the host");
  m.def("nvfp4_blackwell_arch", &blackwell_arch,
        "'sm_100a' / 'sm_120a' when the NVFP4 x NVFP4 grouped GEMM runs on this device, else None");
#if defined(DGEMMA_WITH_CUTLASS)
  m.def("grouped_gemm_nvfp4x4", &grouped_gemm_nvfp4x4, py::arg("a"), py::arg("a_sf"), py::arg("a_sf_starts"),
        py::arg("a_global"), py::arg("w"), py::arg("w_sf"), py::arg("w_global"), py::arg("offsets"),
        "Blackwell block-scaled grouped GEMM: NVFP4 activations x NVFP4 weights, bf16 (uint16) out");
#endif
});

}  // namespace
}  // namespace dgemma::bindings
