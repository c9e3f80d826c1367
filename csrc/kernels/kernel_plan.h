// Occupancy plans of the CUDA kernels: per kernel, the launch shape its launcher uses (threads per CTA,
// dynamic shared memory at the released model's shapes) and the CTAs per SM its design needs. Each
// family's plan is written next to its launcher, from the launcher's own constants, so that the two
// cannot drift; tests/test_machine_code.py holds the compiled sm_90a code (registers, static shared
// memory) to these plans against Hopper's per-SM limits, without a GPU (_core._testing.kernel_plans).
// Plain C++, no CUDA headers: the bindings include it.
#pragma once

#include <string>
#include <vector>

namespace dgemma::kernels {

// The shapes of the released model (DiffusionGemma 26B-A4B) that size dynamic shared memory.
namespace plan_shapes {
constexpr int kHidden = 2816;
constexpr int kExperts = 128;
constexpr int kVocab = 262144;
}  // namespace plan_shapes

struct KernelPlan {
  std::string kernel;         // Python re pattern over the sm_90a kernel names (demangled or mangled)
  int threads = 0;            // per CTA
  long long dynamic_smem = 0; // bytes per CTA at plan_shapes (or the launcher's largest accepted size)
  int ctas_per_sm = 1;        // CTAs that must be resident on one SM at once for the design to work
  std::string why;            // where ctas_per_sm comes from
};
using KernelPlans = std::vector<KernelPlan>;

// One function per kernel family, defined in the .cu file that launches it.
template <int kHeadDim>
void attention_kernel_plans_hd(KernelPlans& out);  // attention_hd256.cu, attention_hd512.cu
void matmul_kernel_plans(KernelPlans& out);
void layer_residual_kernel_plans(KernelPlans& out);  // layer/residual.cu
void moe_router_kernel_plans(KernelPlans& out);
void moe_permute_kernel_plans(KernelPlans& out);
void moe_combine_kernel_plans(KernelPlans& out);
void w4a16_kernel_plans(KernelPlans& out);         // nvfp4/grouped_gemm_nvfp4.cu
void w4a16_wgmma_kernel_plans(KernelPlans& out);   // nvfp4/sm90_grouped_gemm_nvfp4_wgmma.cu
void lm_head_kernel_plans(KernelPlans& out);
void sample_canvas_kernel_plans(KernelPlans& out);
#if defined(DGEMMA_WITH_CUTLASS)
void sm90_gemm_bf16_kernel_plans(KernelPlans& out);
void sm90_gemm_fp8_kernel_plans(KernelPlans& out);
void sm90_gemm_logits_kernel_plans(KernelPlans& out);
void sm90_grouped_gemm_bf16_kernel_plans(KernelPlans& out);
#endif

// Every plan of this build.
KernelPlans kernel_plans();

}  // namespace dgemma::kernels
