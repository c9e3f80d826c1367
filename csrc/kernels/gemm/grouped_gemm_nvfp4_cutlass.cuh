// The host side of the CUTLASS block-scaled NVFP4 grouped GEMMs (sm_100a and sm_120a share it):
// per-group problem sizes, pointers, strides, scale-factor layouts and alphas are built on the
// device from the expert offsets by one small setup kernel, so the host never needs the expert
// counts (no sync per step), then the CUTLASS kernel runs over them. The host Params (TMA
// descriptors) are kept in the caller's ParamsCache, keyed by workspace, G and device.
//
// Swap AB, as in the sm_90a BF16 grouped GEMM: CUTLASS computes D_g^T [N, M_g] = W_g [N, K] @ X_g^T,
// so the weight rows fill the 128-row MMA tile and an expert's few tokens the narrow one; D_g^T
// column-major (leading dimension N) is Y_g row-major. alpha_g = w_global[g] * a_global.
//
// Include only from a .cu that instantiates the CUTLASS GemmKernel, and call run<Arch>() there.
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/cutlass.h>

#include <cstddef>
#include <cstdint>

#include "common/nvfp4_format.h"
#include "kernels/gemm/cutlass_launch.cuh"
#include "kernels/nvfp4/nvfp4.cuh"

namespace dgemma::kernels::nvfp4_cutlass {

// One thread per group fills the group's arrays (GroupedGemm::setup).
template <class Runner>
__global__ void setup_kernel(typename Runner::Setup s) {
  Runner::setup(s);
}

template <class GemmKernel>
struct GroupedGemm {
  using ProblemShape = typename GemmKernel::ProblemShape;
  using UnderlyingShape = typename ProblemShape::UnderlyingProblemShape;
  using Mainloop = typename GemmKernel::CollectiveMainloop;
  using StrideW = typename GemmKernel::InternalStrideA;  // (K, _1, _0) in elements
  using StrideX = typename GemmKernel::InternalStrideB;  // (K, _1, _0)
  using StrideD = typename GemmKernel::InternalStrideD;  // (_1, N, _0)
  using LayoutSFA = typename Mainloop::InternalLayoutSFA;
  using LayoutSFB = typename Mainloop::InternalLayoutSFB;
  using SfConfig = typename Mainloop::Sm1xxBlkScaledConfig;
  using Arguments = typename GemmKernel::Arguments;
  using Params = typename GemmKernel::Params;

  static constexpr size_t kAlignBytes = 256;
  static constexpr size_t round_up(size_t v) { return (v + kAlignBytes - 1) / kAlignBytes * kAlignBytes; }

  // The per-group arrays the kernel reads, then CUTLASS's own workspace.
  struct Layout {
    size_t shapes, ptr_w, ptr_x, ptr_sfw, ptr_sfx, ptr_d, stride_w, stride_x, stride_d, layout_sfw, layout_sfx,
        alpha, ptr_alpha, cutlass_ws, total;
    Layout(int G, size_t cutlass_bytes) {
      const size_t g = static_cast<size_t>(G);
      size_t o = 0;
      auto take = [&](size_t bytes) {
        const size_t at = o;
        o += round_up(bytes);
        return at;
      };
      shapes = take(g * sizeof(UnderlyingShape));
      ptr_w = take(g * sizeof(void*));
      ptr_x = take(g * sizeof(void*));
      ptr_sfw = take(g * sizeof(void*));
      ptr_sfx = take(g * sizeof(void*));
      ptr_d = take(g * sizeof(void*));
      stride_w = take(g * sizeof(StrideW));
      stride_x = take(g * sizeof(StrideX));
      stride_d = take(g * sizeof(StrideD));
      layout_sfw = take(g * sizeof(LayoutSFA));
      layout_sfx = take(g * sizeof(LayoutSFB));
      alpha = take(g * sizeof(float));
      ptr_alpha = take(g * sizeof(float*));
      cutlass_ws = take(cutlass_bytes);
      total = o;
    }
  };

  struct Setup {
    GroupedGemmNvfp4x4Params p;
    char* base;
    Layout lay;
  };

  template <class T>
  __host__ __device__ static T* at(char* base, size_t off) {
    return reinterpret_cast<T*>(base + off);
  }

  // One thread per group: the swapped problem (N, M_g, K), where its operands and scales live.
  static __device__ void setup(const Setup& s) {
    const int g = blockIdx.x * blockDim.x + threadIdx.x;
    const GroupedGemmNvfp4x4Params& p = s.p;
    if (g >= p.G) return;
    const int64_t row0 = p.offsets[g];
    const int m = p.offsets[g + 1] - p.offsets[g];
    const int kblocks = p.K / nvfp4::kGroup;
    at<UnderlyingShape>(s.base, s.lay.shapes)[g] = cute::make_shape(p.N, m, p.K);
    at<const void*>(s.base, s.lay.ptr_w)[g] = p.w + static_cast<int64_t>(g) * p.N * (p.K / 2);
    at<const void*>(s.base, s.lay.ptr_x)[g] = p.a + row0 * (p.K / 2);
    at<const void*>(s.base, s.lay.ptr_sfw)[g] = p.w_sf + static_cast<int64_t>(g) * nvfp4::sf_bytes(p.N, kblocks);
    at<const void*>(s.base, s.lay.ptr_sfx)[g] =
        p.a_sf + static_cast<int64_t>(p.a_sf_starts[g]) * 128 * nvfp4::sf_padded_kblocks(kblocks);
    at<void*>(s.base, s.lay.ptr_d)[g] = p.y + row0 * p.N;
    StrideW sw{};
    StrideX sx{};
    StrideD sd{};
    cute::get<0>(sw) = p.K;
    cute::get<0>(sx) = p.K;
    cute::get<1>(sd) = p.N;
    at<StrideW>(s.base, s.lay.stride_w)[g] = sw;
    at<StrideX>(s.base, s.lay.stride_x)[g] = sx;
    at<StrideD>(s.base, s.lay.stride_d)[g] = sd;
    const auto mnkl = cute::make_shape(p.N, m, p.K, 1);
    at<LayoutSFA>(s.base, s.lay.layout_sfw)[g] = SfConfig::tile_atom_to_shape_SFA(mnkl);
    at<LayoutSFB>(s.base, s.lay.layout_sfx)[g] = SfConfig::tile_atom_to_shape_SFB(mnkl);
    float* alpha = at<float>(s.base, s.lay.alpha);
    alpha[g] = p.w_global[g] * p.a_global[0];
    at<const float*>(s.base, s.lay.ptr_alpha)[g] = alpha + g;
  }

  // CUTLASS arguments over the per-group arrays at `base`; sizing the workspace passes base = nullptr.
  static Arguments make_args(int G, char* base, const Layout& lay, int dev, int sms) {
    auto ptr = [&](size_t off) { return base ? static_cast<void*>(base + off) : nullptr; };
    Arguments args{};
    args.mode = cutlass::gemm::GemmUniversalMode::kGrouped;
    args.problem_shape = ProblemShape{G, static_cast<UnderlyingShape*>(ptr(lay.shapes)), nullptr};
    args.mainloop.ptr_A = static_cast<decltype(args.mainloop.ptr_A)>(ptr(lay.ptr_w));
    args.mainloop.dA = static_cast<StrideW*>(ptr(lay.stride_w));
    args.mainloop.ptr_B = static_cast<decltype(args.mainloop.ptr_B)>(ptr(lay.ptr_x));
    args.mainloop.dB = static_cast<StrideX*>(ptr(lay.stride_x));
    args.mainloop.ptr_SFA = static_cast<decltype(args.mainloop.ptr_SFA)>(ptr(lay.ptr_sfw));
    args.mainloop.layout_SFA = static_cast<LayoutSFA*>(ptr(lay.layout_sfw));
    args.mainloop.ptr_SFB = static_cast<decltype(args.mainloop.ptr_SFB)>(ptr(lay.ptr_sfx));
    args.mainloop.layout_SFB = static_cast<LayoutSFB*>(ptr(lay.layout_sfx));
    auto& fusion = args.epilogue.thread;
    fusion.alpha = 0.0f;
    fusion.alpha_ptr_array = static_cast<const float* const*>(ptr(lay.ptr_alpha));
    fusion.dAlpha = {cute::_0{}, cute::_0{}, 1};  // one alpha per group
    fusion.beta = 0.0f;
    args.epilogue.ptr_C = nullptr;
    args.epilogue.dC = static_cast<StrideD*>(ptr(lay.stride_d));
    args.epilogue.ptr_D = static_cast<decltype(args.epilogue.ptr_D)>(ptr(lay.ptr_d));
    args.epilogue.dD = static_cast<StrideD*>(ptr(lay.stride_d));
    args.hw_info.device_id = dev;
    args.hw_info.sm_count = sms;
    return args;
  }

  static Layout workspace_layout(int G, int dev, int sms) {
    const size_t cutlass_bytes = GemmKernel::get_workspace_size(make_args(G, nullptr, Layout(G, 0), dev, sms));
    return Layout(G, cutlass_bytes);
  }

  static size_t workspace_size(int G) {
    int dev = 0, sms = 0;
    if (G <= 0 || cutlass_launch::device_sms(&dev, &sms) != cudaSuccess) return 0;
    return workspace_layout(G, dev, sms).total;
  }

  // `supported`: the device is the one this instantiation was built for (Arch: 1000, 1200); `cache`:
  // prepared launches, or null.
  template <int Arch>
  static cudaError_t run(const GroupedGemmNvfp4x4Params& p, bool supported, ParamsCache* cache, cudaStream_t stream) {
    using cutlass_launch::aligned;
    if (p.G < 0 || p.N < 0 || p.K < 0) return cudaErrorInvalidValue;
    if (p.G == 0 || p.N == 0) return cudaSuccess;
    // 16-byte TMA rows: K % 32 (packed E2M1), N % 8 (bf16 output)
    if (p.K == 0 || p.K % 32 || p.N % 8) return cudaErrorInvalidValue;
    if (!p.a || !p.a_sf || !p.a_sf_starts || !p.a_global || !p.w || !p.w_sf || !p.w_global || !p.offsets || !p.y)
      return cudaErrorInvalidValue;
    if (!aligned(p.a, 16) || !aligned(p.w, 16) || !aligned(p.y, 16) || !aligned(p.a_sf, 128) || !aligned(p.w_sf, 128))
      return cudaErrorInvalidValue;
    if (!supported) return cudaErrorNotSupported;

    cutlass_launch::DeviceInfo dev;
    cudaError_t err = cutlass_launch::current_device(&dev);
    if (err != cudaSuccess) return err;
    const Layout lay = workspace_layout(p.G, dev.device, dev.sms);
    if (!p.workspace || p.workspace_bytes < lay.total || !aligned(p.workspace, kAlignBytes)) return cudaErrorInvalidValue;

    // The per-group arrays, every call: the offsets (and the activations' scale starts and global
    // scale) are known only on the device. The weight-only entries (pointers, scale pointers,
    // strides) come from the same thread for a few bytes each, so building them at load would save
    // no launch and would tie the host Params to a layer.
    auto* base = static_cast<char*>(p.workspace);
    setup_kernel<GroupedGemm><<<(p.G + 127) / 128, 128, 0, stream>>>(Setup{p, base, lay});
    if ((err = cudaGetLastError()) != cudaSuccess) return err;

    // Host Params over those arrays and CUTLASS's per-SM TMA descriptors in the workspace, with
    // placeholder descriptor shapes: made from G, the workspace and the device only (make_args),
    // so that is their key.
    const Arguments args = make_args(p.G, base, lay, dev.device, dev.sms);
    void* cutlass_ws = base + lay.cutlass_ws;
    const LaunchKey key(cutlass_launch::kernel_id<GemmKernel, Arch>(), dev.device, {p.workspace}, {p.G});
    Params params{};
    err = cutlass_launch::prepare<GemmKernel, Arch>(cache, key, [&](Params* out) {
      if (!GemmKernel::can_implement(args)) return cudaErrorInvalidValue;
      *out = GemmKernel::to_underlying_arguments(args, cutlass_ws);
      return cudaSuccess;
    }, &params);
    if (err != cudaSuccess) return err;
    // The step that prepares the workspace's contents (host-cheap): every call, not cached.
    if (GemmKernel::initialize_workspace(args, cutlass_ws, stream) != cutlass::Status::kSuccess) return cudaErrorUnknown;

    constexpr int smem = GemmKernel::SharedStorageSize;
    const auto kernel = cutlass_launch::kernel<GemmKernel, Arch>;  // 1x1x1 clusters: a plain launch
    kernel<<<GemmKernel::get_grid_shape(params), GemmKernel::get_block_shape(), smem, stream>>>(params);
    return cudaGetLastError();
  }
};

}  // namespace dgemma::kernels::nvfp4_cutlass
