// The optimizer's elementwise pieces (kernels/cpu/adamw.cpp) on the device:
// the gradient norm as a deterministic two-pass sum in double, clipping's
// scale, and AdamW; the kernels are in adamw.cuh.
#include <cmath>

#include "kernels/cuda/adamw.cuh"
#include "kernels/cuda/common.cuh"

namespace prism::cuda_ops {
using namespace cuda_detail;

void sum_squares(double* out, const float* x, int64_t n, cudaStream_t stream) {
    device_sum(n, adamw::Square{x}, adamw::StoreDouble{out}, stream);
}

void scale_inplace(float* x, int64_t n, float s, cudaStream_t stream) {
    const adamw::ScaleParams p{x, n, s};
    PRISM_LAUNCH(adamw::element_blocks(n), adamw::kElementThreads, 0, stream, adamw::scale_kernel)(p);
    PRISM_LAUNCH_CHECK();
}

void adamw_update(float* param, const float* grad, float* m, float* v, int64_t n, double lr,
                  double beta1, double beta2, double eps, double weight_decay, const ops::DecayTiles& decay,
                  int64_t t, cudaStream_t stream) {
    const double bc1 = 1.0 - std::pow(beta1, double(t)), bc2 = 1.0 - std::pow(beta2, double(t));
    const adamw::UpdateParams p{param, m, v, grad, n, lr, beta1, beta2, eps, weight_decay,
                                bc1, bc2, decay.decays, decay.first, decay.tile};
    PRISM_LAUNCH(adamw::element_blocks(n), adamw::kElementThreads, 0, stream, adamw::update_kernel)(p);
    PRISM_LAUNCH_CHECK();
}

}  // namespace prism::cuda_ops
