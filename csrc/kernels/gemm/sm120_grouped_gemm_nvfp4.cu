// NVFP4 x NVFP4 grouped GEMM for the MoE experts on Blackwell workstation/consumer GPUs (sm_120a:
// RTX PRO 6000, RTX 50xx): one CUTLASS 4.2 instantiation of the pointer-array TMA block-scaled
// kernel (warp-level block-scaled MMA, no tensor memory), fp32 accumulation, bf16 out. Host side and
// swap-AB layout: grouped_gemm_nvfp4_cutlass.cuh. Compiled in CI; not yet run on a Blackwell GPU.
#include <cutlass/detail/sm100_blockscaled_layout.hpp>
#include <cutlass/epilogue/collective/collective_builder.hpp>
#include <cutlass/gemm/collective/collective_builder.hpp>
#include <cutlass/gemm/dispatch_policy.hpp>
#include <cutlass/gemm/group_array_problem_shape.hpp>
#include <cutlass/gemm/kernel/gemm_universal.hpp>

#include "kernels/gemm/grouped_gemm_nvfp4_cutlass.cuh"

namespace dgemma::kernels {
namespace {

using namespace cute;

using ElementW = cutlass::nv_float4_t<cutlass::float_e2m1_t>;
using ElementD = cutlass::bfloat16_t;
using ElementAcc = float;
constexpr int kAlignFp4 = 32;
constexpr int kAlignD = 8;

using ProblemShape = cutlass::gemm::GroupProblemShape<Shape<int, int, int>>;  // per group (N, M_g, K)
using TileShape = Shape<_128, _128, _128>;  // the block-scaled sm_120 MMA needs 128-wide scale tiles
using ClusterShape = Shape<_1, _1, _1>;  // sm_120 has no clusters for these kernels

using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
    cutlass::arch::Sm120, cutlass::arch::OpClassBlockScaledTensorOp, TileShape, ClusterShape,
    cutlass::epilogue::collective::EpilogueTileAuto, ElementAcc, ElementAcc,
    void, cutlass::layout::ColumnMajor*, kAlignD,
    ElementD, cutlass::layout::ColumnMajor*, kAlignD,
    cutlass::epilogue::collective::EpilogueScheduleAuto>::CollectiveOp;

using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
    cutlass::arch::Sm120, cutlass::arch::OpClassBlockScaledTensorOp,
    ElementW, cutlass::layout::RowMajor*, kAlignFp4,
    ElementW, cutlass::layout::ColumnMajor*, kAlignFp4,
    ElementAcc, TileShape, ClusterShape,
    cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
        sizeof(typename CollectiveEpilogue::SharedStorage))>,
    cutlass::gemm::collective::KernelScheduleAuto>::CollectiveOp;

using GemmKernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, CollectiveMainloop, CollectiveEpilogue>;
using Runner = nvfp4_cutlass::GroupedGemm<GemmKernel>;

}  // namespace

bool sm120_nvfp4_supported() { return cutlass_launch::built_for(1200) && cutlass_launch::device_is(12, 0); }

size_t grouped_gemm_nvfp4_sm120_workspace_size(int G) { return Runner::workspace_size(G); }

cudaError_t grouped_gemm_nvfp4_sm120(const GroupedGemmNvfp4x4Params& p, cudaStream_t stream, ParamsCache* cache) {
  return Runner::run<1200>(p, sm120_nvfp4_supported(), cache, stream);
}

}  // namespace dgemma::kernels
