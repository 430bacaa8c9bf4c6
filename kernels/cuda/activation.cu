// Elementwise layers: exact (erf) GELU and the residual add with drop path,
// kernels/cpu/activation.cpp on the device; the kernels are in activation.cuh.
#include "kernels/cuda/activation.cuh"
#include "kernels/cuda/common.cuh"

namespace prism::cuda_ops {
using namespace cuda_detail;

namespace {

template <class X>
void gelu_forward_launch(float* out, uint16_t* out_bf16, const X* x, int64_t n, cudaStream_t stream) {
    const activation::GeluForwardParams<X> p{out, out_bf16, x, n};
    PRISM_LAUNCH(activation::element_blocks(n), activation::kElementThreads, 0, stream,
                 activation::gelu_forward_kernel<X>)(p);
    PRISM_LAUNCH_CHECK();
}

template <class G, class X>
void gelu_backward_launch(float* dx, uint16_t* dx_bf16, bool overwrite, const G* dout, const X* x, int64_t n,
                          cudaStream_t stream) {
    const activation::GeluBackwardParams<G, X> p{dx, dx_bf16, overwrite, dout, x, n};
    const unsigned blocks = activation::element_blocks(n);
    PRISM_LAUNCH(blocks, activation::kElementThreads, 0, stream, activation::gelu_backward_kernel<G, X>)(p);
    PRISM_LAUNCH_CHECK();
}

void residual_launch(const activation::ResidualParams& p, cudaStream_t stream) {
    PRISM_LAUNCH(activation::element_blocks(p.n), activation::kElementThreads, 0, stream,
                 activation::residual_kernel)(p);
    PRISM_LAUNCH_CHECK();
}

}  // namespace

void gelu_forward(float* out, uint16_t* out_bf16, const float* x, const uint16_t* x_bf16, int64_t n,
                  cudaStream_t stream) {
    PRISM_CUDA_REQUIRE(out || out_bf16, "gelu_forward: no output");
    PRISM_CUDA_REQUIRE(x || x_bf16, "gelu_forward: no input");
    if (x_bf16) gelu_forward_launch(out, out_bf16, x_bf16, n, stream);
    else gelu_forward_launch(out, out_bf16, x, n, stream);
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
    residual_launch({out, x, branch, scale, per_image, B * per_image}, stream);
}

void residual_backward(float* dbranch, const float* dx, const float* scale, int B,
                       int64_t per_image, cudaStream_t stream) {
    residual_launch({dbranch, dbranch, dx, scale, per_image, B * per_image}, stream);
}

}  // namespace prism::cuda_ops
