// The list of every kernel family's occupancy plan (kernel_plan.h).
#include "kernels/kernel_plan.h"

namespace dgemma::kernels {

KernelPlans kernel_plans() {
  KernelPlans out;
  attention_kernel_plans_hd<256>(out);
  attention_kernel_plans_hd<512>(out);
  matmul_kernel_plans(out);
  layer_residual_kernel_plans(out);
  moe_router_kernel_plans(out);
  moe_permute_kernel_plans(out);
  moe_combine_kernel_plans(out);
  w4a16_kernel_plans(out);
  w4a16_wgmma_kernel_plans(out);
  lm_head_kernel_plans(out);
  sample_canvas_kernel_plans(out);
#if defined(DGEMMA_WITH_CUTLASS)
  sm90_gemm_bf16_kernel_plans(out);
  sm90_gemm_fp8_kernel_plans(out);
  sm90_gemm_logits_kernel_plans(out);
  sm90_grouped_gemm_bf16_kernel_plans(out);
#endif
  return out;
}

}  // namespace dgemma::kernels
