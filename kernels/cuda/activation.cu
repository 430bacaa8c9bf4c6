// Elementwise layers: exact (erf) GELU and the residual add with drop path,
// kernels/cpu/activation.cpp on the device.
#include "kernels/cuda/common.cuh"

namespace prism::cuda_ops {
using namespace cuda_detail;

namespace {

constexpr float kSqrtHalf = 0.70710678118654752440f;     // 1/√2
constexpr float kInvSqrt2Pi = 0.39894228040143267794f;   // 1/√(2π)

// x: fp32, or the bf16 mode's stored fc1 output. out and/or out_bf16 (the
// bf16 mode's input of the second MLP product).
template <class X>
__global__ void gelu_forward_kernel(float* out, uint16_t* out_bf16, const X* x, int64_t n) {
    PRISM_GRID_STRIDE(i, n) {
        const float xi = load_as(&x[i]);
        const float y = 0.5f * xi * (1.f + erff(xi * kSqrtHalf));
        if (out) out[i] = y;
        if (out_bf16) out_bf16[i] = float_to_bf16(y);
    }
}

// dx fp32 (added into, or overwritten) or dx_bf16 (written); dout and x fp32
// or the bf16 mode's stored ones.
template <class G, class X>
__global__ void gelu_backward_kernel(float* dx, uint16_t* dx_bf16, bool overwrite, const G* dout, const X* x,
                                     int64_t n) {
    PRISM_GRID_STRIDE(i, n) {
        const float xi = load_as(&x[i]);
        const float cdf = 0.5f * (1.f + erff(xi * kSqrtHalf));
        const float pdf = kInvSqrt2Pi * expf(-0.5f * xi * xi);
        const float g = load_as(&dout[i]) * (cdf + xi * pdf);
        if (dx_bf16) dx_bf16[i] = float_to_bf16(g);
        else dx[i] = overwrite ? g : dx[i] + g;
    }
}

template <class G, class X>
void gelu_backward_launch(float* dx, uint16_t* dx_bf16, bool overwrite, const G* dout, const X* x, int64_t n,
                          cudaStream_t stream) {
    gelu_backward_kernel<<<grid_for(n), kThreads, 0, stream>>>(dx, dx_bf16, overwrite, dout, x, n);
    PRISM_LAUNCH_CHECK();
}

// out[b] = x[b] + scale[b] · branch[b] (out may be x): the forward, and with
// out = x = dbranch, branch = dx the backward's dbranch[b] += scale[b] · dx[b].
__global__ void residual_kernel(float* out, const float* x, const float* branch, const float* scale,
                                int64_t per_image, int64_t n) {
    PRISM_GRID_STRIDE(i, n) out[i] = x[i] + (scale ? scale[i / per_image] : 1.f) * branch[i];
}

}  // namespace

void gelu_forward(float* out, uint16_t* out_bf16, const float* x, const uint16_t* x_bf16, int64_t n,
                  cudaStream_t stream) {
    PRISM_CUDA_REQUIRE(out || out_bf16, "gelu_forward: no output");
    PRISM_CUDA_REQUIRE(x || x_bf16, "gelu_forward: no input");
    if (x_bf16)
        gelu_forward_kernel<<<grid_for(n), kThreads, 0, stream>>>(out, out_bf16, x_bf16, n);
    else
        gelu_forward_kernel<<<grid_for(n), kThreads, 0, stream>>>(out, out_bf16, x, n);
    PRISM_LAUNCH_CHECK();
}

void gelu_backward(float* dx, uint16_t* dx_bf16, bool overwrite_dx, const float* dout, const uint16_t* dout_bf16,
                   const float* x, const uint16_t* x_bf16, int64_t n, cudaStream_t stream) {
    PRISM_CUDA_REQUIRE((x || x_bf16) && (dout || dout_bf16), "gelu_backward: no input");
    PRISM_CUDA_REQUIRE(!(dx && dx_bf16) && (dx || dx_bf16) && (!dx_bf16 || overwrite_dx),
                       "gelu_backward: dx is fp32 or, overwritten, bf16");
    if (dout_bf16 && x_bf16) gelu_backward_launch(dx, dx_bf16, overwrite_dx, dout_bf16, x_bf16, n, stream);
    else if (dout_bf16) gelu_backward_launch(dx, dx_bf16, overwrite_dx, dout_bf16, x, n, stream);
    else if (x_bf16) gelu_backward_launch(dx, dx_bf16, overwrite_dx, dout, x_bf16, n, stream);
    else gelu_backward_launch(dx, dx_bf16, overwrite_dx, dout, x, n, stream);
}

void residual_forward(float* out, const float* x, const float* branch, const float* scale, int B,
                      int64_t per_image, cudaStream_t stream) {
    residual_kernel<<<grid_for(B * per_image), kThreads, 0, stream>>>(out, x, branch, scale, per_image,
                                                                      B * per_image);
    PRISM_LAUNCH_CHECK();
}

void residual_backward(float* dbranch, const float* dx, const float* scale, int B,
                       int64_t per_image, cudaStream_t stream) {
    residual_kernel<<<grid_for(B * per_image), kThreads, 0, stream>>>(dbranch, dbranch, dx, scale,
                                                                      per_image, B * per_image);
    PRISM_LAUNCH_CHECK();
}

}  // namespace prism::cuda_ops
