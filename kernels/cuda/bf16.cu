// Conversions between float32 and bf16 (stored as uint16_t bits): the bf16
// copies of activations and weights that the bf16 GEMMs read.
#include <string.h>

#include "kernels/cuda/common.cuh"

namespace prism::cuda_ops {
using namespace cuda_detail;

namespace {

// bf16 as its 16 bits (the upper half of a float): exact widening, and
// rounding to nearest even (NaN stays NaN, as the quiet NaN 0x7fc0).
PRISM_DEVICE float bf16_to_float(uint16_t b) {
    const uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}
PRISM_DEVICE uint16_t float_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

PRISM_KERNEL(kThreads) to_bf16_kernel(uint16_t* out, const float* x, int64_t n) {
    PRISM_GRID_STRIDE(i, n) out[i] = float_to_bf16(x[i]);
}

PRISM_KERNEL(kThreads) from_bf16_kernel(float* out, const uint16_t* x, int64_t n) {
    PRISM_GRID_STRIDE(i, n) out[i] = bf16_to_float(x[i]);
}

}  // namespace

void to_bf16(uint16_t* out, const float* x, int64_t n, cudaStream_t stream) {
    PRISM_LAUNCH(grid_for(n), kThreads, 0, stream, to_bf16_kernel)(out, x, n);
    PRISM_LAUNCH_CHECK();
}

void from_bf16(float* out, const uint16_t* x, int64_t n, cudaStream_t stream) {
    PRISM_LAUNCH(grid_for(n), kThreads, 0, stream, from_bf16_kernel)(out, x, n);
    PRISM_LAUNCH_CHECK();
}

}  // namespace prism::cuda_ops
