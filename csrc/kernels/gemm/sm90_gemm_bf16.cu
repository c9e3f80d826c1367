// Dense Y = X @ W^T, bf16 in and out, fp32 accumulation: one CUTLASS 3.x instantiation for sm_90a
// (TMA loads, warp-specialized cooperative wgmma, TMA-store epilogue, persistent tile scheduler).
//
// Tiling for the engine's shapes: M is 256 canvas tokens per row (a prefill chunk in the encoder), N
// and K 704..8192 (262,144 for the LM head). At M = 256 the GEMM is bound by reading W once. The old
// 64x128 tiles made 4 M-tiles each read every weight tile through L2 (L2-bound: ~97 us per layer
// against ~35 us of HBM floor). Now 128x64 tiles in 2x1 clusters: the two CTAs of a cluster cover
// M = 256 and the weight tile is loaded once and multicast to both by TMA, so L2 delivers each weight
// byte once per 256 tokens; N = 64 keeps 2 * N / 64 CTAs busy (128 for N = 4096, 88 for 2816) and the
// persistent scheduler walks the LM head's 8,192 tiles. Expected ~70% of HBM bandwidth at M = 256
// (the roofline model, dgemma_rt/roofline.py). Not yet run on a GPU.
#include "kernels/gemm/gemm.cuh"

#include "kernels/gemm/cutlass_launch.cuh"
#include "kernels/gemm/sm90_dense_tn.cuh"

namespace dgemma::kernels {
namespace {

using namespace cute;

using ElementAB = cutlass::bfloat16_t;
using ElementD = cutlass::bfloat16_t;
constexpr int kAlign = 8;  // 16 bytes of bf16: TMA needs 16-byte aligned rows

using TileShape = Shape<_128, _64, _64>;
using ClusterShape = Shape<_2, _1, _1>;  // two M tiles share (multicast) each weight tile

using GemmKernel = cutlass_launch::Sm90DenseTn<ElementAB, kAlign, ElementD, kAlign, TileShape, ClusterShape>::Kernel;

}  // namespace

bool sm90_gemm_supported() { return cutlass_launch::built_for(900) && cutlass_launch::device_is(9, 0); }

void sm90_gemm_bf16_kernel_plans(KernelPlans& out) {
  out.push_back(cutlass_launch::kernel_plan<GemmKernel>(
      "cutlass_launch(::|6)kernel(?!.*Finish).*MainloopSm90TmaGmmaWarpSpecialized(<|I).*"
      "KernelTmaWarpSpecializedCooperative"));  // not the logits GEMM (its epilogue node: Finish)
}

cudaError_t gemm_bf16_tn(const GemmBf16Params& p, cudaStream_t stream) {
  bool empty = false;
  const cudaError_t err = cutlass_launch::check_sm90_dense_tn(p.M, p.N, p.K, kAlign, kAlign, p.x, p.w, p.y, &empty);
  if (err != cudaSuccess || empty) return err;

  typename GemmKernel::Arguments args{};
  args.mainloop.ptr_A = reinterpret_cast<const ElementAB*>(p.x);
  args.mainloop.ptr_B = reinterpret_cast<const ElementAB*>(p.w);
  args.epilogue.thread.alpha = 1.0f;
  args.epilogue.thread.beta = 0.0f;
  args.epilogue.ptr_D = reinterpret_cast<ElementD*>(p.y);
  return cutlass_launch::launch_dense_tn<GemmKernel, 900>(args, {}, p.M, p.N, p.K, p.cache, stream);
}

}  // namespace dgemma::kernels
