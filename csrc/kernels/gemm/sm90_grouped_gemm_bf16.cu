// Grouped D_g = A_g @ W_g^T for the MoE experts, bf16 in and out, fp32 accumulation: one CUTLASS 3.x
// instantiation for sm_90a (pointer-array TMA, warp-specialized ping-pong wgmma, grouped persistent
// scheduler with on-device problem sizes).
//
// Swap AB: CUTLASS computes D_g^T [N, M_g] = W_g [N, K] @ A_g^T, so the weight rows (N = 2*704 or
// 2816) fill 128-row tiles and an expert's few tokens (~16 per denoising step) a 32-wide tile;
// the MoE is bound by the weight bytes, which each (128-row, 32-token) tile reads once. D_g^T
// column-major with leading dimension N is exactly D_g row-major.
#include "kernels/gemm/gemm.cuh"

#include "kernels/gemm/cutlass_launch.cuh"

#include <cute/tensor.hpp>
#include <cutlass/cutlass.h>
#include <cutlass/epilogue/collective/collective_builder.hpp>
#include <cutlass/gemm/collective/collective_builder.hpp>
#include <cutlass/gemm/dispatch_policy.hpp>
#include <cutlass/gemm/group_array_problem_shape.hpp>
#include <cutlass/gemm/kernel/gemm_universal.hpp>

namespace dgemma::kernels {
namespace {

using namespace cute;

using ElementAB = cutlass::bfloat16_t;
using ElementD = cutlass::bfloat16_t;
using ElementAcc = float;
constexpr int kAlign = 8;  // 16 bytes of bf16: TMA needs 16-byte aligned rows

using ProblemShape = cutlass::gemm::GroupProblemShape<Shape<int, int, int>>;  // per group (N, M_g, K)
using TileShape = Shape<_128, _32, _64>;
using ClusterShape = Shape<_1, _1, _1>;  // 1x1x1: a plain launch, no cluster attribute needed

using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
    cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
    cutlass::epilogue::collective::EpilogueTileAuto, ElementAcc, ElementAcc,
    void, cutlass::layout::ColumnMajor*, kAlign,  // no source C: D = acc
    ElementD, cutlass::layout::ColumnMajor*, kAlign,  // D^T [N, M_g] column-major = D [M_g, N] row-major
    cutlass::epilogue::PtrArrayTmaWarpSpecializedPingpong>::CollectiveOp;

using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
    cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp,
    ElementAB, cutlass::layout::RowMajor*, kAlign,     // W_g [N, K], K contiguous
    ElementAB, cutlass::layout::ColumnMajor*, kAlign,  // A_g^T [K, M_g] column-major = A_g [M_g, K] row-major
    ElementAcc, TileShape, ClusterShape,
    cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
        sizeof(typename CollectiveEpilogue::SharedStorage))>,
    cutlass::gemm::KernelPtrArrayTmaWarpSpecializedPingpong>::CollectiveOp;

using GemmKernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, CollectiveMainloop, CollectiveEpilogue>;

using UnderlyingShape = typename ProblemShape::UnderlyingProblemShape;
using StrideW = typename GemmKernel::InternalStrideA;  // (K, _1, _0)
using StrideX = typename GemmKernel::InternalStrideB;  // (K, _1, _0)
using StrideD = typename GemmKernel::InternalStrideD;  // (_1, N, _0)
static_assert(std::is_same_v<typename GemmKernel::InternalStrideC, StrideD>, "C and D strides share one array");

// Workspace layout: the per-group arrays the kernel reads, then CUTLASS's own workspace.
constexpr size_t kAlignBytes = 256;
constexpr size_t round_up(size_t v) { return (v + kAlignBytes - 1) / kAlignBytes * kAlignBytes; }

struct Layout {
  size_t shapes, ptr_w, ptr_x, ptr_d, stride_w, stride_x, stride_d, cutlass_ws, total;
  explicit Layout(int G, size_t cutlass_bytes) {
    const size_t g = static_cast<size_t>(G);
    size_t o = 0;
    shapes = o, o += round_up(g * sizeof(UnderlyingShape));
    ptr_w = o, o += round_up(g * sizeof(const ElementAB*));
    ptr_x = o, o += round_up(g * sizeof(const ElementAB*));
    ptr_d = o, o += round_up(g * sizeof(ElementD*));
    stride_w = o, o += round_up(g * sizeof(StrideW));
    stride_x = o, o += round_up(g * sizeof(StrideX));
    stride_d = o, o += round_up(g * sizeof(StrideD));
    cutlass_ws = o, o += round_up(cutlass_bytes);
    total = o;
  }
};

struct SetupArgs {
  const int32_t* offsets;
  const ElementAB* a;
  const ElementAB* w;
  ElementD* d;
  int G, N, K;
  UnderlyingShape* shapes;
  const ElementAB** ptr_w;
  const ElementAB** ptr_x;
  ElementD** ptr_d;
  StrideW* stride_w;
  StrideX* stride_x;
  StrideD* stride_d;
};

// One thread per group: the swapped problem (N, M_g, K) and where its operands live.
__global__ void grouped_setup_kernel(SetupArgs s) {
  const int g = blockIdx.x * blockDim.x + threadIdx.x;
  if (g >= s.G) return;
  const int64_t row0 = s.offsets[g];
  const int m = s.offsets[g + 1] - s.offsets[g];
  s.shapes[g] = make_shape(s.N, m, s.K);
  s.ptr_w[g] = s.w + static_cast<int64_t>(g) * s.N * s.K;
  s.ptr_x[g] = s.a + row0 * s.K;
  s.ptr_d[g] = s.d + row0 * s.N;
  StrideW sw{};
  StrideX sx{};
  StrideD sd{};
  get<0>(sw) = s.K;
  get<0>(sx) = s.K;
  get<1>(sd) = s.N;
  s.stride_w[g] = sw;
  s.stride_x[g] = sx;
  s.stride_d[g] = sd;
}

using cutlass_launch::device_sms;

bool aligned16(const void* p) { return cutlass_launch::aligned(p, 16); }

// CUTLASS arguments over the per-group arrays at `base` (laid out by `lay`). Sizing the workspace
// needs only G and the SM count, so it passes base = nullptr.
typename GemmKernel::Arguments make_args(int G, char* base, const Layout& lay, int dev, int sms) {
  auto at = [&](size_t off) { return base ? static_cast<void*>(base + off) : nullptr; };
  typename GemmKernel::Arguments args{};
  args.mode = cutlass::gemm::GemmUniversalMode::kGrouped;
  // No host copy of the problem sizes: they live on the device only.
  args.problem_shape = ProblemShape{G, static_cast<UnderlyingShape*>(at(lay.shapes)), nullptr};
  args.mainloop.ptr_A = static_cast<const ElementAB**>(at(lay.ptr_w));
  args.mainloop.dA = static_cast<StrideW*>(at(lay.stride_w));
  args.mainloop.ptr_B = static_cast<const ElementAB**>(at(lay.ptr_x));
  args.mainloop.dB = static_cast<StrideX*>(at(lay.stride_x));
  args.epilogue.thread.alpha = 1.0f;
  args.epilogue.thread.beta = 0.0f;
  args.epilogue.ptr_C = nullptr;
  args.epilogue.dC = static_cast<StrideD*>(at(lay.stride_d));
  args.epilogue.ptr_D = static_cast<ElementD**>(at(lay.ptr_d));
  args.epilogue.dD = static_cast<StrideD*>(at(lay.stride_d));
  args.hw_info.device_id = dev;
  args.hw_info.sm_count = sms;
  return args;
}

Layout workspace_layout(int G, int dev, int sms) {
  const size_t cutlass_bytes = GemmKernel::get_workspace_size(make_args(G, nullptr, Layout(G, 0), dev, sms));
  return Layout(G, cutlass_bytes);
}

}  // namespace

size_t grouped_gemm_bf16_tn_workspace_size(int G) {
  int dev = 0, sms = 0;
  if (G <= 0 || device_sms(&dev, &sms) != cudaSuccess) return 0;
  return workspace_layout(G, dev, sms).total;
}

void sm90_grouped_gemm_bf16_kernel_plans(KernelPlans& out) {
  out.push_back(cutlass_launch::kernel_plan<GemmKernel>(
      "cutlass_launch(::|6)kernel.*MainloopSm90ArrayTmaGmmaWarpSpecialized(<|I).*KernelPtrArrayTmaWarpSpecializedPingpong"));
}

cudaError_t grouped_gemm_bf16_tn(const GroupedGemmBf16Params& p, cudaStream_t stream) {
  if (p.G < 0 || p.N < 0 || p.K < 0) return cudaErrorInvalidValue;
  if (p.G == 0 || p.N == 0) return cudaSuccess;
  if (p.K == 0 || p.K % kAlign || p.N % kAlign) return cudaErrorInvalidValue;
  if (!p.offsets || !aligned16(p.a) || !aligned16(p.w) || !aligned16(p.d)) return cudaErrorInvalidValue;
  if (!sm90_gemm_supported()) return cudaErrorNotSupported;

  cutlass_launch::DeviceInfo dev;
  cudaError_t err = cutlass_launch::current_device(&dev);
  if (err != cudaSuccess) return err;
  const Layout lay = workspace_layout(p.G, dev.device, dev.sms);
  if (!p.workspace || p.workspace_bytes < lay.total || (reinterpret_cast<uintptr_t>(p.workspace) % kAlignBytes))
    return cudaErrorInvalidValue;

  // Everything the expert offsets decide (and, in the same thread, the weight pointers and strides:
  // a few bytes per group, so building those at load instead would save no launch) goes into the
  // workspace's per-group arrays, on the device, every call.
  auto* base = static_cast<char*>(p.workspace);
  SetupArgs s{p.offsets,
              reinterpret_cast<const ElementAB*>(p.a),
              reinterpret_cast<const ElementAB*>(p.w),
              reinterpret_cast<ElementD*>(p.d),
              p.G,
              p.N,
              p.K,
              reinterpret_cast<UnderlyingShape*>(base + lay.shapes),
              reinterpret_cast<const ElementAB**>(base + lay.ptr_w),
              reinterpret_cast<const ElementAB**>(base + lay.ptr_x),
              reinterpret_cast<ElementD**>(base + lay.ptr_d),
              reinterpret_cast<StrideW*>(base + lay.stride_w),
              reinterpret_cast<StrideX*>(base + lay.stride_x),
              reinterpret_cast<StrideD*>(base + lay.stride_d)};
  grouped_setup_kernel<<<(p.G + 127) / 128, 128, 0, stream>>>(s);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;

  // The host Params point at those arrays and at CUTLASS's part of the workspace (its per-SM TMA
  // descriptors, written by the kernel itself at each launch), with placeholder shapes for the
  // descriptors (no host copy of the problem sizes): made from G, the workspace and the device
  // only (make_args), so that is their key, one entry for every layer sharing a workspace.
  const typename GemmKernel::Arguments args = make_args(p.G, base, lay, dev.device, dev.sms);
  void* cutlass_ws = base + lay.cutlass_ws;
  const LaunchKey key(cutlass_launch::kernel_id<GemmKernel, 900>(), dev.device, {p.workspace}, {p.G});
  typename GemmKernel::Params params{};
  err = cutlass_launch::prepare<GemmKernel, 900>(p.cache, key, [&](typename GemmKernel::Params* out) {
    if (!GemmKernel::can_implement(args)) return cudaErrorInvalidValue;
    *out = GemmKernel::to_underlying_arguments(args, cutlass_ws);
    return cudaSuccess;
  }, &params);
  if (err != cudaSuccess) return err;
  // Host-cheap (its mainloop, epilogue and group scheduler parts return at once in CUTLASS 4.2), and
  // the step that prepares the workspace's contents: every call, not cached.
  if (GemmKernel::initialize_workspace(args, cutlass_ws, stream) != cutlass::Status::kSuccess) return cudaErrorUnknown;

  return cutlass_launch::launch<GemmKernel, 900>(params, stream);
}

}  // namespace dgemma::kernels
