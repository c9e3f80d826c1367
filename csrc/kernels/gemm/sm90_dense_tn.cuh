// The CUTLASS 3.x type of a dense "TN" GEMM for sm_90a (X [M, K] row-major @ W [N, K]^T -> D [M, N]
// row-major), as the dense GEMMs here build it: TMA loads, warp-specialized cooperative wgmma with a
// persistent scheduler, a TMA-store epilogue without a source C, fp32 accumulation; the stage count
// fills what the epilogue leaves of shared memory. What differs between them is a parameter: operand
// and output types and alignments, the tile and cluster shapes, and the epilogue's fusion (none: D =
// alpha * acc, CUTLASS's default). Include only from a .cu that instantiates CUTLASS kernels.
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/cutlass.h>
#include <cutlass/epilogue/collective/collective_builder.hpp>
#include <cutlass/gemm/collective/collective_builder.hpp>
#include <cutlass/gemm/dispatch_policy.hpp>
#include <cutlass/gemm/kernel/gemm_universal.hpp>

#include "kernels/gemm/cutlass_launch.cuh"

namespace dgemma::kernels::cutlass_launch {

template <class ElementAB, int kAlignAB, class ElementD, int kAlignD, class TileShape, class ClusterShape,
          class... Fusion>
struct Sm90DenseTn {
  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float,
      void, cutlass::layout::RowMajor, kAlignD,  // no source C
      ElementD, cutlass::layout::RowMajor, kAlignD, cutlass::epilogue::TmaWarpSpecializedCooperative,
      Fusion...>::CollectiveOp;

  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp,
      ElementAB, cutlass::layout::RowMajor, kAlignAB,     // X [M, K], K contiguous
      ElementAB, cutlass::layout::ColumnMajor, kAlignAB,  // W as B [K, N] column-major = W [N, K] row-major
      float, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename CollectiveEpilogue::SharedStorage))>,
      cutlass::gemm::KernelTmaWarpSpecializedCooperative>::CollectiveOp;

  using Kernel = cutlass::gemm::kernel::GemmUniversal<cute::Shape<int, int, int, int>, CollectiveMainloop,
                                                      CollectiveEpilogue>;
};

// The checks of a dense TN launcher before it builds its arguments: sizes (K % align_k, N % align_n: TMA's
// 16-byte rows), 16-byte aligned operands, a Hopper device with this build's sm_90a code. cudaSuccess
// with *empty set when there is nothing to compute (M or N zero).
inline cudaError_t check_sm90_dense_tn(int M, int N, int K, int align_k, int align_n, const void* x, const void* w,
                                       const void* y, bool* empty) {
  *empty = false;
  if (M < 0 || N < 0 || K < 0) return cudaErrorInvalidValue;
  if (M == 0 || N == 0) {
    *empty = true;
    return cudaSuccess;
  }
  if (K == 0 || K % align_k || N % align_n) return cudaErrorInvalidValue;
  if (!aligned(x, 16) || !aligned(w, 16) || !aligned(y, 16)) return cudaErrorInvalidValue;
  if (!(built_for(900) && device_is(9, 0))) return cudaErrorNotSupported;
  return cudaSuccess;
}

}  // namespace dgemma::kernels::cutlass_launch
