// Dense Y = (Xq @ Wq^T) * x_scale[m] * w_scale[n] for FP8 dense layers (W8A8): E4M3 activations with
// one scale per token (kernels/fp8: quantize_rows_fp8) times E4M3 weights with one scale per output
// channel (dgemma-quantize --dense fp8), bf16 out. One CUTLASS 3.x instantiation for sm_90a: TMA,
// warp-specialized cooperative FP8 wgmma with CUTLASS's periodic promotion of the accumulator to fp32
// (not the "fast accumulation" schedule: K reaches 2816), and both scales applied by an epilogue
// visitor tree (a column broadcast of x_scale, a row broadcast of w_scale). Tiled as the BF16 GEMM
// (sm90_gemm_bf16.cu): 128x64x128 tiles in 2x1 clusters, the weight tile multicast to both M tiles
// of a 256-token canvas, cooperative schedule. Compiled in CI; not yet run on a GPU.
#include "kernels/gemm/gemm.cuh"

#include "kernels/gemm/cutlass_launch.cuh"
#include "kernels/gemm/sm90_dense_tn.cuh"

#include <cutlass/epilogue/fusion/sm90_visitor_compute_tma_warpspecialized.hpp>
#include <cutlass/epilogue/fusion/sm90_visitor_load_tma_warpspecialized.hpp>
#include <cutlass/epilogue/fusion/sm90_visitor_tma_warpspecialized.hpp>

namespace dgemma::kernels {
namespace {

using namespace cute;

using ElementAB = cutlass::float_e4m3_t;
using ElementD = cutlass::bfloat16_t;
constexpr int kAlignAB = 16;  // 16 bytes of E4M3
constexpr int kAlignD = 8;

using TileShape = Shape<_128, _64, _128>;
using ClusterShape = Shape<_2, _1, _1>;  // two M tiles share (multicast) each weight tile

// D = x_scale[m] * (w_scale[n] * acc), fp32 math, rounded to bf16 once at the end.
using namespace cutlass::epilogue::fusion;
using XScale = Sm90ColBroadcast<0, TileShape, float, float, Stride<_1, _0, int64_t>>;  // varies along M
using WScale = Sm90RowBroadcast<0, TileShape, float, float, Stride<_0, _1, int64_t>>;  // varies along N
using ScaleByW = Sm90EVT<Sm90Compute<cutlass::multiplies, float, float, cutlass::FloatRoundStyle::round_to_nearest>,
                         WScale, Sm90AccFetch>;
using Fusion = Sm90EVT<Sm90Compute<cutlass::multiplies, ElementD, float, cutlass::FloatRoundStyle::round_to_nearest>,
                       XScale, ScaleByW>;

using GemmKernel =
    cutlass_launch::Sm90DenseTn<ElementAB, kAlignAB, ElementD, kAlignD, TileShape, ClusterShape, Fusion>::Kernel;

}  // namespace

void sm90_gemm_fp8_kernel_plans(KernelPlans& out) {
  out.push_back(cutlass_launch::kernel_plan<GemmKernel>(
      "cutlass_launch(::|6)kernel.*MainloopSm90TmaGmmaWarpSpecializedFP8(<|I).*KernelTmaWarpSpecializedCooperative"));
}

cudaError_t gemm_fp8_tn(const GemmFp8Params& p, cudaStream_t stream) {
  bool empty = false;
  const cudaError_t err = cutlass_launch::check_sm90_dense_tn(p.M, p.N, p.K, kAlignAB, kAlignD, p.x, p.w, p.y, &empty);
  if (err != cudaSuccess || empty) return err;
  if (!p.x_scale || !p.w_scale) return cudaErrorInvalidValue;

  typename GemmKernel::Arguments args{};
  args.mainloop.ptr_A = reinterpret_cast<const ElementAB*>(p.x);
  args.mainloop.ptr_B = reinterpret_cast<const ElementAB*>(p.w);
  // Fusion arguments mirror the tree: {x_scale, {w_scale, acc, op}, op}
  args.epilogue.thread = {
      {p.x_scale, 0.0f, {}},            // XScale
      {{p.w_scale, 0.0f, {}}, {}, {}},  // ScaleByW: WScale, AccFetch, multiplies
      {}};                              // multiplies
  args.epilogue.ptr_D = reinterpret_cast<ElementD*>(p.y);
  return cutlass_launch::launch_dense_tn<GemmKernel, 900>(args, {p.x_scale, p.w_scale}, p.M, p.N, p.K, p.cache,
                                                         stream);
}

}  // namespace dgemma::kernels
