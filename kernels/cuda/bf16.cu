// Conversions between float32 and bf16 (stored as uint16_t bits): the bf16
// copies of activations and weights that the bf16 GEMMs read.
#include "kernels/cuda/common.cuh"

namespace prism::cuda_ops {
using namespace cuda_detail;

namespace {

__global__ void to_bf16_kernel(uint16_t* out, const float* x, int64_t n) {
    PRISM_GRID_STRIDE(i, n) out[i] = float_to_bf16(x[i]);
}

__global__ void from_bf16_kernel(float* out, const uint16_t* x, int64_t n) {
    PRISM_GRID_STRIDE(i, n) out[i] = bf16_to_float(x[i]);
}

}  // namespace

void to_bf16(uint16_t* out, const float* x, int64_t n, cudaStream_t stream) {
    to_bf16_kernel<<<grid_for(n), kThreads, 0, stream>>>(out, x, n);
    PRISM_LAUNCH_CHECK();
}

void from_bf16(float* out, const uint16_t* x, int64_t n, cudaStream_t stream) {
    from_bf16_kernel<<<grid_for(n), kThreads, 0, stream>>>(out, x, n);
    PRISM_LAUNCH_CHECK();
}

}  // namespace prism::cuda_ops
