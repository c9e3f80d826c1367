// attention_forward for head_dim 256: the sm_90a wgmma kernel (Sm90Config<256>), the mma.sync fallback
// (Sm80Tiles<256>) and the split-KV combine; designs in their headers.
#include "kernels/attention/attention_launch.cuh"

namespace dgemma::kernels {

template cudaError_t attention_forward_hd<256>(const AttentionParams&, cudaStream_t);
template cudaError_t attention_launch_plan_hd<256>(const AttentionParams&, AttentionLaunchPlan*);
template void attention_kernel_plans_hd<256>(KernelPlans&);

}  // namespace dgemma::kernels
