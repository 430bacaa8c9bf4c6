// Attention on the CPU, built from one readable piece: a single query row
// attending to M key/value rows, per head softmax(q_h·K_hᵀ/√dh)·V_h. Dense
// self-attention (vit, chvit), MoE-ViT's routed cross-attention and its CLS row
// are loops over that piece; they differ only in which keys each query sees.
#include <cmath>
#include <vector>
#include "kernels/ops.h"
#include "kernels/cpu/instantiate.h"

namespace prism::ops {
namespace {

// out [D] and probs (head h at probs + h*probs_head_stride, M entries).
// Row m of K is K + m*kv_stride (V likewise); head h is columns [h*dh, (h+1)*dh).
template <class T>
void attend_forward(T* out, T* probs, int64_t probs_head_stride, const T* q, const T* K,
                    const T* V, int64_t kv_stride, int M, int D, int Hd) {
    const int dh = D / Hd;
    const T scale = T(1) / std::sqrt(T(dh));
    for (int h = 0; h < Hd; h++) {
        T* p = probs + h * probs_head_stride;
        const T* qh = q + h * dh;
        T mx = -INFINITY;
        for (int m = 0; m < M; m++) {
            const T* kh = K + m * kv_stride + h * dh;
            T s = 0;
            for (int d = 0; d < dh; d++) s += qh[d] * kh[d];
            p[m] = s * scale;
            mx = std::max(mx, p[m]);
        }
        T sum = 0;
        for (int m = 0; m < M; m++) { p[m] = std::exp(p[m] - mx); sum += p[m]; }
        for (int m = 0; m < M; m++) p[m] /= sum;
        T* oh = out + h * dh;
        for (int d = 0; d < dh; d++) oh[d] = 0;
        for (int m = 0; m < M; m++) {
            const T* vh = V + m * kv_stride + h * dh;
            for (int d = 0; d < dh; d++) oh[d] += p[m] * vh[d];
        }
    }
}

// The matching backward; every gradient is accumulated.
template <class T>
void attend_backward(T* dq, T* dK, T* dV, const T* dout, const T* q, const T* K, const T* V,
                     int64_t kv_stride, const T* probs, int64_t probs_head_stride, int M, int D,
                     int Hd, T* scratch /* M */) {
    const int dh = D / Hd;
    const T scale = T(1) / std::sqrt(T(dh));
    for (int h = 0; h < Hd; h++) {
        const T* p = probs + h * probs_head_stride;
        const T* gh = dout + h * dh;
        const T* qh = q + h * dh;
        T* dp = scratch;
        T p_dot_dp = 0;
        for (int m = 0; m < M; m++) {
            const T* vh = V + m * kv_stride + h * dh;
            T s = 0;
            for (int d = 0; d < dh; d++) s += gh[d] * vh[d];
            dp[m] = s;
            p_dot_dp += p[m] * s;
        }
        for (int m = 0; m < M; m++) {
            const T ds = p[m] * (dp[m] - p_dot_dp) * scale;  // d(score before scaling)
            const T* kh = K + m * kv_stride + h * dh;
            T* dkh = dK + m * kv_stride + h * dh;
            T* dvh = dV + m * kv_stride + h * dh;
            for (int d = 0; d < dh; d++) {
                dq[h * dh + d] += ds * kh[d];
                dkh[d] += ds * qh[d];
                dvh[d] += p[m] * gh[d];
            }
        }
    }
}

}  // namespace

template <class T>
void attention_forward(T* out, T* probs, const T* qkv, int B, int L, int D, int Hd) {
    #pragma omp parallel for collapse(2)
    for (int b = 0; b < B; b++)
        for (int i = 0; i < L; i++) {
            const T* base = qkv + (int64_t)b * L * 3 * D;
            attend_forward(out + ((int64_t)b * L + i) * D, probs + ((int64_t)b * Hd * L + i) * L,
                           (int64_t)L * L, base + (int64_t)i * 3 * D, base + D, base + 2 * D,
                           3 * D, L, D, Hd);
        }
}
PRISM_INSTANTIATE(attention_forward)

template <class T>
void attention_backward(T* dqkv, const T* dout, const T* qkv, const T* probs, int B, int L,
                        int D, int Hd) {
    // One image per thread: its key/value gradients are summed over its
    // queries in order, so the result is independent of the thread count.
    #pragma omp parallel for
    for (int b = 0; b < B; b++) {
        std::vector<T> scratch(L);
        const T* base = qkv + (int64_t)b * L * 3 * D;
        T* dbase = dqkv + (int64_t)b * L * 3 * D;
        for (int i = 0; i < L; i++)
            attend_backward(dbase + (int64_t)i * 3 * D, dbase + D, dbase + 2 * D,
                            dout + ((int64_t)b * L + i) * D, base + (int64_t)i * 3 * D, base + D,
                            base + 2 * D, 3 * D, probs + ((int64_t)b * Hd * L + i) * L,
                            (int64_t)L * L, L, D, Hd, scratch.data());
    }
}
PRISM_INSTANTIATE(attention_backward)

template <class T>
void routed_attention_forward(T* og, T* probs, const T* qg, const T* k, const T* v,
                              const int* offsets, int B, int nS, int N, int D, int Hd) {
    #pragma omp parallel for schedule(dynamic, 1)
    for (int g = 0; g < B * nS; g++)
        for (int i = offsets[g]; i < offsets[g + 1]; i++)
            attend_forward(og + (int64_t)i * D, probs + (int64_t)i * Hd * N, N, qg + (int64_t)i * D,
                           k + (int64_t)g * N * D, v + (int64_t)g * N * D, D, N, D, Hd);
}
PRISM_INSTANTIATE(routed_attention_forward)

template <class T>
void routed_attention_backward(T* dqg, T* dk, T* dv, const T* dog, const T* qg, const T* k,
                               const T* v, const T* probs, const int* offsets, int B, int nS,
                               int N, int D, int Hd) {
    // A group owns its keys' and values' gradients: no two threads write the same row.
    #pragma omp parallel for schedule(dynamic, 1)
    for (int g = 0; g < B * nS; g++) {
        std::vector<T> scratch(N);
        for (int i = offsets[g]; i < offsets[g + 1]; i++)
            attend_backward(dqg + (int64_t)i * D, dk + (int64_t)g * N * D, dv + (int64_t)g * N * D,
                            dog + (int64_t)i * D, qg + (int64_t)i * D, k + (int64_t)g * N * D,
                            v + (int64_t)g * N * D, D, probs + (int64_t)i * Hd * N, N, N, D, Hd,
                            scratch.data());
    }
}
PRISM_INSTANTIATE(routed_attention_backward)

template <class T>
void cls_attention_forward(T* out, int64_t out_image_stride, T* probs, const T* q,
                           int64_t q_image_stride, const T* k, const T* v, int B, int M, int D,
                           int Hd) {
    #pragma omp parallel for
    for (int b = 0; b < B; b++)
        attend_forward(out + b * out_image_stride, probs + (int64_t)b * Hd * M, M,
                       q + b * q_image_stride, k + (int64_t)b * M * D, v + (int64_t)b * M * D, D,
                       M, D, Hd);
}
PRISM_INSTANTIATE(cls_attention_forward)

template <class T>
void cls_attention_backward(T* dq, int64_t dq_image_stride, T* dk, T* dv, const T* dout,
                            int64_t dout_image_stride, const T* q, int64_t q_image_stride,
                            const T* k, const T* v, const T* probs, int B, int M, int D,
                            int Hd) {
    #pragma omp parallel for
    for (int b = 0; b < B; b++) {
        std::vector<T> scratch(M);
        attend_backward(dq + b * dq_image_stride, dk + (int64_t)b * M * D, dv + (int64_t)b * M * D,
                        dout + b * dout_image_stride, q + b * q_image_stride,
                        k + (int64_t)b * M * D, v + (int64_t)b * M * D, D,
                        probs + (int64_t)b * Hd * M, M, M, D, Hd, scratch.data());
    }
}
PRISM_INSTANTIATE(cls_attention_backward)

}  // namespace prism::ops
