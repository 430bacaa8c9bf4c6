// Linear layers y = x·Wᵀ + b (W stored [out, in], as PyTorch) and the
// per-channel expert projections of MoE-ViT. Plain loops: `omp simd
// reduction` lets the dot products vectorize without -ffast-math, and each
// output element is owned by one thread, so results do not depend on the
// thread count.
#include <algorithm>
#include "kernels/ops.h"
#include "kernels/cpu/instantiate.h"

namespace prism::ops {
namespace {

template <class T>
inline T dot(const T* a, const T* b, int n) {
    T acc = 0;
    #pragma omp simd reduction(+ : acc)
    for (int i = 0; i < n; i++) acc += a[i] * b[i];
    return acc;
}

template <class T>
inline void axpy(T* y, T a, const T* x, int n) {
    #pragma omp simd
    for (int i = 0; i < n; i++) y[i] += a * x[i];
}

// out[r] = x[r]·Wᵀ + b for `rows` contiguous rows (serial; callers parallelize).
template <class T>
void forward_rows(T* out, const T* x, const T* W, const T* b, int64_t rows, int in, int out_dim) {
    for (int64_t r = 0; r < rows; r++)
        for (int o = 0; o < out_dim; o++)
            out[r * out_dim + o] = (b ? b[o] : T(0)) + dot(x + r * in, W + (int64_t)o * in, in);
}

// dx[r] += dout[r]·W
template <class T>
void backward_input_rows(T* dx, const T* dout, const T* W, int64_t rows, int in, int out_dim) {
    for (int64_t r = 0; r < rows; r++)
        for (int o = 0; o < out_dim; o++) axpy(dx + r * in, dout[r * out_dim + o], W + (int64_t)o * in, in);
}

// dW[o] += Σ_r dout[r,o]·x[r] for o in [o0, o1), rows in ascending order.
template <class T>
void backward_weight_rows(T* dW, const T* dout, const T* x, int64_t rows, int in, int out_dim,
                          int o0, int o1) {
    for (int64_t r = 0; r < rows; r++)
        for (int o = o0; o < o1; o++) axpy(dW + (int64_t)o * in, dout[r * out_dim + o], x + r * in, in);
}

constexpr int kRowBlock = 16;  // rows per parallel task
constexpr int kOutBlock = 8;   // weight rows per task: x rows are reused from L1

}  // namespace

template <class T>
void linear_forward(T* out, const T* x, const T* W, const T* b, int64_t rows, int in_dim,
                    int out_dim) {
    #pragma omp parallel for schedule(static)
    for (int64_t r0 = 0; r0 < rows; r0 += kRowBlock) {
        const int64_t n = std::min<int64_t>(kRowBlock, rows - r0);
        forward_rows(out + r0 * out_dim, x + r0 * in_dim, W, b, n, in_dim, out_dim);
    }
}
PRISM_INSTANTIATE(linear_forward)

template <class T>
void linear_backward(T* dx, T* dW, T* db, const T* dout, const T* x, const T* W,
                     int64_t rows, int in_dim, int out_dim) {
    if (dx) {
        #pragma omp parallel for schedule(static)
        for (int64_t r0 = 0; r0 < rows; r0 += kRowBlock) {
            const int64_t n = std::min<int64_t>(kRowBlock, rows - r0);
            backward_input_rows(dx + r0 * in_dim, dout + r0 * out_dim, W, n, in_dim, out_dim);
        }
    }
    #pragma omp parallel for schedule(static)
    for (int o0 = 0; o0 < out_dim; o0 += kOutBlock)
        backward_weight_rows(dW, dout, x, rows, in_dim, out_dim, o0, std::min(out_dim, o0 + kOutBlock));
    if (db)
        for (int64_t r = 0; r < rows; r++)
            for (int o = 0; o < out_dim; o++) db[o] += dout[r * out_dim + o];
}
PRISM_INSTANTIATE(linear_backward)

template <class T>
void expert_linear_forward(T* out, const T* x, int64_t x_image_stride, const T* W,
                           const T* bias, const int* S, int B, int nS, int N, int in_dim,
                           int out_dim) {
    #pragma omp parallel for collapse(2) schedule(static)
    for (int b = 0; b < B; b++)
        for (int s = 0; s < nS; s++) {
            const int64_t c = S[s];
            forward_rows(out + ((int64_t)b * nS + s) * N * out_dim,
                         x + b * x_image_stride + (int64_t)s * N * in_dim,
                         W + c * out_dim * in_dim, bias + c * out_dim, N, in_dim, out_dim);
        }
}
PRISM_INSTANTIATE(expert_linear_forward)

template <class T>
void expert_linear_backward(T* dx, T* dW, T* dbias, const T* dout, const T* x,
                            int64_t x_image_stride, const T* W, const int* S, int B, int nS,
                            int N, int in_dim, int out_dim) {
    #pragma omp parallel for collapse(2) schedule(static)
    for (int b = 0; b < B; b++)
        for (int s = 0; s < nS; s++)
            backward_input_rows(dx + b * x_image_stride + (int64_t)s * N * in_dim,
                                dout + ((int64_t)b * nS + s) * N * out_dim,
                                W + (int64_t)S[s] * out_dim * in_dim, N, in_dim, out_dim);
    // Each channel's weight gradient sums its images in order; channels are
    // independent, so they run in parallel.
    #pragma omp parallel for schedule(static)
    for (int s = 0; s < nS; s++) {
        const int64_t c = S[s];
        for (int b = 0; b < B; b++) {
            const T* g = dout + ((int64_t)b * nS + s) * N * out_dim;
            backward_weight_rows(dW + c * out_dim * in_dim, g,
                                 x + b * x_image_stride + (int64_t)s * N * in_dim, N, in_dim,
                                 out_dim, 0, out_dim);
            for (int n = 0; n < N; n++)
                for (int o = 0; o < out_dim; o++) dbias[c * out_dim + o] += g[(int64_t)n * out_dim + o];
        }
    }
}
PRISM_INSTANTIATE(expert_linear_backward)

}  // namespace prism::ops
