// LayerNorm over the last dimension, eps 1e-6 (timm's ViT).
#include <cmath>
#include "kernels/ops.h"
#include "kernels/cpu/instantiate.h"

namespace prism::ops {

template <class T>
void layernorm_forward(T* out, T* mean, T* rstd, const T* x, const T* w, const T* b,
                       int64_t rows, int D) {
    #pragma omp parallel for
    for (int64_t r = 0; r < rows; r++) {
        const T* xr = x + r * D;
        T m = 0;
        for (int d = 0; d < D; d++) m += xr[d];
        m /= D;
        T var = 0;  // two-pass: no cancellation for rows with a large mean
        for (int d = 0; d < D; d++) var += (xr[d] - m) * (xr[d] - m);
        var /= D;
        const T rs = T(1) / std::sqrt(var + T(1e-6));
        T* o = out + r * D;
        for (int d = 0; d < D; d++) o[d] = (xr[d] - m) * rs * w[d] + b[d];
        mean[r] = m;
        rstd[r] = rs;
    }
}
PRISM_INSTANTIATE(layernorm_forward)

template <class T>
void residual_layernorm_forward(T* sum, T* out, T* mean, T* rstd, const T* x, const T* branch,
                                const T* scale, const T* w, const T* b, int B,
                                int64_t rows_per_image, int D) {
    residual_forward(sum, x, branch, scale, B, rows_per_image * D);
    layernorm_forward(out, mean, rstd, sum, w, b, B * rows_per_image, D);
}
PRISM_INSTANTIATE(residual_layernorm_forward)

template <class T>
void layernorm_backward(T* dx, T* dw, T* db, const T* dout, const T* x, const T* w,
                        const T* mean, const T* rstd, int64_t rows, int D) {
    #pragma omp parallel for
    for (int64_t r = 0; r < rows; r++) {
        const T* xr = x + r * D;
        const T* g = dout + r * D;
        T mean_dn = 0, mean_dn_xhat = 0;
        for (int d = 0; d < D; d++) {
            const T xhat = (xr[d] - mean[r]) * rstd[r];
            mean_dn += g[d] * w[d];
            mean_dn_xhat += g[d] * w[d] * xhat;
        }
        mean_dn /= D;
        mean_dn_xhat /= D;
        T* dxr = dx + r * D;
        for (int d = 0; d < D; d++) {
            const T xhat = (xr[d] - mean[r]) * rstd[r];
            dxr[d] += rstd[r] * (g[d] * w[d] - mean_dn - xhat * mean_dn_xhat);
        }
    }
    // Parameter gradients: rows summed in order, one thread, bit-reproducible.
    for (int64_t r = 0; r < rows; r++) {
        const T* xr = x + r * D;
        const T* g = dout + r * D;
        for (int d = 0; d < D; d++) {
            dw[d] += g[d] * (xr[d] - mean[r]) * rstd[r];
            db[d] += g[d];
        }
    }
}
PRISM_INSTANTIATE(layernorm_backward)

}  // namespace prism::ops
