// attention_forward for head_dim 256 (tile shape: AttnTiles<256> in attention_kernel.cuh).
#include "kernels/attention/attention_kernel.cuh"

namespace dgemma::kernels {

template cudaError_t attention_forward_hd<256>(const AttentionParams&, cudaStream_t);

}  // namespace dgemma::kernels
