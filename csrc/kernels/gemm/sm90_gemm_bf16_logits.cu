// The LM head's logits on CUTLASS: Y f32 [M, N] = softcap(alpha * X @ W^T) with X, W bf16 ([M, K], [N, K]
// row-major), fp32 accumulation, and the epilogue of kernels/matmul's finish() (v *= alpha; softcap > 0:
// v = softcap * tanhf(v / softcap), the division as a product by 1 / softcap) as an epilogue visitor node. One CUTLASS 3.x instantiation for
// sm_90a: TMA, warp-specialized cooperative wgmma, persistent tile scheduler.
//
// The shape is one canvas of the decoder against the tied embedding: M = 256 positions, N = V = 262,144,
// K = H = 2,816 (378 GFLOP, 1.48 GB of E). The mma.sync matmul (128x128 tiles, 4,096 CTAs) pulls x and an
// E tile through L2 for every output tile: ~5.9 GB of L2 traffic, ~0.9 ms on an H100. Here 128x256 tiles
// in 2x1 clusters: both M tiles of the canvas share each E tile by TMA multicast, so a cluster moves
// 2 x 0.72 MB of x + 1.44 MB of E, 1,024 clusters ~2.9 GB from L2, and each E byte comes from HBM once
// (0.44 ms at 3.35 TB/s); the wgmma tensor time at ~75% of peak is ~0.5 ms, so the two overlap at
// ~0.55-0.65 ms. Compiled in CI; not yet run on a GPU.
#include "kernels/gemm/gemm.cuh"

#include "kernels/gemm/cutlass_launch.cuh"
#include "kernels/gemm/sm90_dense_tn.cuh"

#include <cutlass/epilogue/fusion/sm90_visitor_compute_tma_warpspecialized.hpp>
#include <cutlass/epilogue/fusion/sm90_visitor_tma_warpspecialized.hpp>

#include <cstring>

namespace dgemma::kernels {
namespace {

using namespace cute;

using ElementAB = cutlass::bfloat16_t;
using ElementD = float;
constexpr int kAlignAB = 8;  // 16 bytes of bf16
constexpr int kAlignD = 4;   // 16 bytes of f32

using TileShape = Shape<_128, _256, _64>;
using ClusterShape = Shape<_2, _1, _1>;  // the canvas's two M tiles share (multicast) each E tile

// finish() of kernels/matmul as a visitor node with runtime arguments (CUTLASS's activation pattern).
// The division by softcap is a multiplication by its reciprocal (made on the host): an IEEE division's
// slow path is a subroutine call, and any call in the kernel makes ptxas serialize every wgmma
// (warning C7510). v * (1 / cap) is within 1.5 ulp of v / cap, inside tanh.
template <class T>
struct Finish {
  struct Arguments {
    float alpha = 1.f;
    float softcap = 0.f;      // 0: none
    float inv_softcap = 0.f;  // 1 / softcap
  };
  CUTLASS_HOST_DEVICE T operator()(T const& acc, Arguments const& a) const {
    float v = static_cast<float>(acc) * a.alpha;
    if (a.softcap > 0.f) v = a.softcap * tanhf(v * a.inv_softcap);
    return static_cast<T>(v);
  }
};
template <class T, int N>
struct Finish<cutlass::Array<T, N>> {
  using Arguments = typename Finish<T>::Arguments;
  CUTLASS_HOST_DEVICE cutlass::Array<T, N> operator()(cutlass::Array<T, N> const& acc, Arguments const& a) const {
    cutlass::Array<T, N> out;
    Finish<T> f;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < N; ++i) out[i] = f(acc[i], a);
    return out;
  }
};

using namespace cutlass::epilogue::fusion;
using Fusion = Sm90EVT<Sm90Compute<Finish, ElementD, float, cutlass::FloatRoundStyle::round_to_nearest>, Sm90AccFetch>;

using GemmKernel =
    cutlass_launch::Sm90DenseTn<ElementAB, kAlignAB, ElementD, kAlignD, TileShape, ClusterShape, Fusion>::Kernel;

}  // namespace

void sm90_gemm_logits_kernel_plans(KernelPlans& out) {
  out.push_back(cutlass_launch::kernel_plan<GemmKernel>(
      "cutlass_launch(::|6)kernel.*MainloopSm90TmaGmmaWarpSpecialized(<|I).*KernelTmaWarpSpecializedCooperative.*"
      "Finish"));
}

cudaError_t gemm_bf16_tn_logits(const GemmLogitsParams& p, cudaStream_t stream) {
  if (!(p.softcap >= 0.f)) return cudaErrorInvalidValue;
  bool empty = false;
  const cudaError_t err = cutlass_launch::check_sm90_dense_tn(p.M, p.N, p.K, kAlignAB, kAlignAB, p.x, p.w, p.y, &empty);
  if (err != cudaSuccess || empty) return err;

  typename GemmKernel::Arguments args{};
  args.mainloop.ptr_A = reinterpret_cast<const ElementAB*>(p.x);
  args.mainloop.ptr_B = reinterpret_cast<const ElementAB*>(p.w);
  args.epilogue.thread = {{}, {p.alpha, p.softcap, p.softcap > 0.f ? 1.f / p.softcap : 0.f}};  // {AccFetch, Finish}
  args.epilogue.ptr_D = p.y;
  uint32_t a = 0, c = 0;  // the scalars the Params bake in join the cache key
  std::memcpy(&a, &p.alpha, 4);
  std::memcpy(&c, &p.softcap, 4);
  return cutlass_launch::launch_dense_tn<GemmKernel, 900>(args, {}, p.M, p.N, p.K, p.cache, stream,
                                                         static_cast<int64_t>((static_cast<uint64_t>(a) << 32) | c));
}

}  // namespace dgemma::kernels
