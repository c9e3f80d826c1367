// NVFP4 x NVFP4 grouped GEMM for the MoE experts on Blackwell datacenter GPUs (sm_100a: B200,
// GB200): one CUTLASS 4.2 instantiation of the pointer-array, TMA, warp-specialized block-scaled
// UMMA kernel (1 SM per tile, scales in tensor memory), fp32 accumulation, bf16 out. Host side and
// swap-AB layout: grouped_gemm_nvfp4_cutlass.cuh. Compiled in CI; not yet run on a Blackwell GPU.
//
// Tile 128 (weight rows) x 64 (tokens) x 256 (K): at the released model's ~16 tokens per expert
// per step one token tile covers an expert, so every weight byte is read once per step.
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

using ElementW = cutlass::nv_float4_t<cutlass::float_e2m1_t>;  // E2M1 data + E4M3 scale per 16
using ElementD = cutlass::bfloat16_t;
using ElementAcc = float;
constexpr int kAlignFp4 = 32;  // 16 bytes
constexpr int kAlignD = 8;

using ProblemShape = cutlass::gemm::GroupProblemShape<Shape<int, int, int>>;  // per group (N, M_g, K)
using TileShape = Shape<_128, _64, _256>;
using ClusterShape = Shape<_1, _1, _1>;

using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
    cutlass::arch::Sm100, cutlass::arch::OpClassBlockScaledTensorOp, TileShape, ClusterShape,
    cutlass::epilogue::collective::EpilogueTileAuto, ElementAcc, ElementAcc,
    void, cutlass::layout::ColumnMajor*, kAlignD,      // no source C
    ElementD, cutlass::layout::ColumnMajor*, kAlignD,  // D^T [N, M_g] column-major = Y_g row-major
    cutlass::epilogue::PtrArrayTmaWarpSpecialized1Sm>::CollectiveOp;

using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
    cutlass::arch::Sm100, cutlass::arch::OpClassBlockScaledTensorOp,
    ElementW, cutlass::layout::RowMajor*, kAlignFp4,     // W_g [N, K], K-major
    ElementW, cutlass::layout::ColumnMajor*, kAlignFp4,  // X_g^T [K, M_g] column-major = X_g row-major
    ElementAcc, TileShape, ClusterShape,
    cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
        sizeof(typename CollectiveEpilogue::SharedStorage))>,
    cutlass::gemm::KernelPtrArrayTmaWarpSpecialized1SmNvf4Sm100>::CollectiveOp;

using GemmKernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, CollectiveMainloop, CollectiveEpilogue>;
using Runner = nvfp4_cutlass::GroupedGemm<GemmKernel>;

}  // namespace

bool sm100_nvfp4_supported() { return cutlass_launch::built_for(1000) && cutlass_launch::device_is(10, 0); }

size_t grouped_gemm_nvfp4_sm100_workspace_size(int G) { return Runner::workspace_size(G); }

cudaError_t grouped_gemm_nvfp4_sm100(const GroupedGemmNvfp4x4Params& p, cudaStream_t stream, ParamsCache* cache) {
  return Runner::run<1000>(p, sm100_nvfp4_supported(), cache, stream);
}

void cutlass_nvfp4_sf_offsets(int rows, int K, int64_t* out) {
  using Config = cutlass::detail::Sm1xxBlockScaledConfig<nvfp4::kGroup>;
  const auto layout = Config::tile_atom_to_shape_SFA(make_shape(rows, 1, K, 1));
  const int kblocks = K / nvfp4::kGroup;
  for (int r = 0; r < rows; ++r)
    for (int kb = 0; kb < kblocks; ++kb) out[static_cast<size_t>(r) * kblocks + kb] = layout(r, kb * nvfp4::kGroup, 0);
}

}  // namespace dgemma::kernels
