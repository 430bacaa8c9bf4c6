// The optimizer's elementwise pieces: gradient norm, clipping, AdamW.
#include <algorithm>
#include <cmath>
#include <vector>
#include "kernels/ops.h"
#include "kernels/cpu/instantiate.h"

namespace prism::ops {

template <class T>
double sum_squares(const T* x, int64_t n) {
    // Fixed-size chunks summed in order: the same answer for any thread count.
    constexpr int64_t kChunk = 1 << 14;
    const int64_t chunks = (n + kChunk - 1) / kChunk;
    std::vector<double> partial(chunks);
    #pragma omp parallel for
    for (int64_t c = 0; c < chunks; c++) {
        double s = 0;
        for (int64_t i = c * kChunk; i < std::min(n, (c + 1) * kChunk); i++) s += double(x[i]) * x[i];
        partial[c] = s;
    }
    double total = 0;
    for (double s : partial) total += s;
    return total;
}
PRISM_INSTANTIATE(sum_squares)

template <class T>
void scale_inplace(T* x, int64_t n, T s) {
    #pragma omp parallel for simd
    for (int64_t i = 0; i < n; i++) x[i] *= s;
}
PRISM_INSTANTIATE(scale_inplace)

template <class T>
void adamw_update(T* param, const T* grad, T* m, T* v, int64_t n, double lr, double beta1,
                  double beta2, double eps, double weight_decay, const DecayTiles& decay, int64_t t) {
    const double bc1 = 1.0 - std::pow(beta1, double(t)), bc2 = 1.0 - std::pow(beta2, double(t));
    #pragma omp parallel for simd
    for (int64_t i = 0; i < n; i++) {
        const double wd = !decay.decays || decay.decays[(decay.first + i) / decay.tile] ? weight_decay : 0.0;
        m[i] = T(beta1 * m[i] + (1.0 - beta1) * grad[i]);
        v[i] = T(beta2 * v[i] + (1.0 - beta2) * double(grad[i]) * grad[i]);
        const double update = (m[i] / bc1) / (std::sqrt(v[i] / bc2) + eps);
        param[i] = T(param[i] - lr * (update + wd * param[i]));
    }
}
PRISM_INSTANTIATE(adamw_update)

}  // namespace prism::ops
