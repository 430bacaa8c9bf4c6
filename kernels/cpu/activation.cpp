// Elementwise layers: exact GELU, and the residual add with drop path.
#include <cmath>
#include "kernels/ops.h"
#include "kernels/cpu/instantiate.h"

namespace prism::ops {

template <class T>
void gelu_forward(T* out, const T* x, int64_t n) {
    #pragma omp parallel for simd
    for (int64_t i = 0; i < n; i++) out[i] = T(0.5) * x[i] * (T(1) + std::erf(x[i] * T(M_SQRT1_2)));
}
PRISM_INSTANTIATE(gelu_forward)

template <class T>
void gelu_backward(T* dx, const T* dout, const T* x, int64_t n) {
    const T inv_sqrt_2pi = T(0.5 * M_2_SQRTPI * M_SQRT1_2);
    #pragma omp parallel for simd
    for (int64_t i = 0; i < n; i++) {
        const T cdf = T(0.5) * (T(1) + std::erf(x[i] * T(M_SQRT1_2)));
        const T pdf = inv_sqrt_2pi * std::exp(T(-0.5) * x[i] * x[i]);
        dx[i] += dout[i] * (cdf + x[i] * pdf);
    }
}
PRISM_INSTANTIATE(gelu_backward)

template <class T>
void residual_forward(T* out, const T* x, const T* branch, const T* scale, int B,
                      int64_t per_image) {
    #pragma omp parallel for
    for (int b = 0; b < B; b++) {
        const T s = scale ? scale[b] : T(1);
        for (int64_t i = 0; i < per_image; i++)
            out[b * per_image + i] = x[b * per_image + i] + s * branch[b * per_image + i];
    }
}
PRISM_INSTANTIATE(residual_forward)

template <class T>
void residual_backward(T* dbranch, const T* dx, const T* scale, int B, int64_t per_image) {
    #pragma omp parallel for
    for (int b = 0; b < B; b++) {
        const T s = scale ? scale[b] : T(1);
        for (int64_t i = 0; i < per_image; i++) dbranch[b * per_image + i] += s * dx[b * per_image + i];
    }
}
PRISM_INSTANTIATE(residual_backward)

}  // namespace prism::ops
