// attention_forward for head_dim 512: the sm_90a wgmma kernel (Sm90Config<512>), the mma.sync fallback
// (Sm80Tiles<512>) and the split-KV combine; designs in their headers.
#include "kernels/attention/attention_launch.cuh"

namespace dgemma::kernels {

template cudaError_t attention_forward_hd<512>(const AttentionParams&, cudaStream_t);
template cudaError_t attention_launch_plan_hd<512>(const AttentionParams&, AttentionLaunchPlan*);
template void attention_kernel_plans_hd<512>(KernelPlans&);

}  // namespace dgemma::kernels
