// The optimizer's elementwise pieces (kernels/cpu/adamw.cpp): the gradient
// norm as a deterministic two-pass sum in double, clipping's scale, and AdamW
// with the CPU's double-precision update.
#include <cmath>

#include "kernels/cuda/common.cuh"

namespace prism::cuda_ops {
using namespace cuda_detail;

namespace {

struct Square {
    const float* x;
    __device__ double operator()(int64_t i) const { return (double)x[i] * x[i]; }
};
struct StoreDouble {
    double* out;
    __device__ void operator()(double v) const { *out = v; }
};

__global__ void scale_kernel(float* x, int64_t n, float s) {
    PRISM_GRID_STRIDE(i, n) x[i] *= s;
}

__global__ void adamw_kernel(float* param, const float* grad, float* m, float* v, int64_t n,
                             double lr, double beta1, double beta2, double eps,
                             double weight_decay, double bc1, double bc2) {
    PRISM_GRID_STRIDE(i, n) {
        const float mi = (float)(beta1 * m[i] + (1.0 - beta1) * grad[i]);
        const float vi = (float)(beta2 * v[i] + (1.0 - beta2) * (double)grad[i] * grad[i]);
        m[i] = mi;
        v[i] = vi;
        const double update = (mi / bc1) / (sqrt(vi / bc2) + eps);
        param[i] = (float)(param[i] - lr * (update + weight_decay * param[i]));
    }
}

}  // namespace

void sum_squares(double* out, const float* x, int64_t n, cudaStream_t stream) {
    device_sum(n, Square{x}, StoreDouble{out}, stream);
}

void scale_inplace(float* x, int64_t n, float s, cudaStream_t stream) {
    scale_kernel<<<grid_for(n), kThreads, 0, stream>>>(x, n, s);
    PRISM_LAUNCH_CHECK();
}

void adamw_update(float* param, const float* grad, float* m, float* v, int64_t n, double lr,
                  double beta1, double beta2, double eps, double weight_decay, int64_t t,
                  cudaStream_t stream) {
    const double bc1 = 1.0 - std::pow(beta1, double(t)), bc2 = 1.0 - std::pow(beta2, double(t));
    adamw_kernel<<<grid_for(n), kThreads, 0, stream>>>(param, grad, m, v, n, lr, beta1, beta2, eps,
                                                       weight_decay, bc1, bc2);
    PRISM_LAUNCH_CHECK();
}

}  // namespace prism::cuda_ops
