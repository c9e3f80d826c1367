// attention_forward for head_dim 512 (tile shape: AttnTiles<512> in attention_kernel.cuh).
#include "kernels/attention/attention_kernel.cuh"

namespace dgemma::kernels {

template cudaError_t attention_forward_hd<512>(const AttentionParams&, cudaStream_t);

}  // namespace dgemma::kernels
