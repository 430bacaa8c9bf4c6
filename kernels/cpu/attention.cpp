// Attention on the CPU, built from one readable piece: a single query row
// attending to M key/value rows, per head softmax(q_h·K_hᵀ/√dh)·V_h. Dense
// self-attention (vit, chvit), MoE-ViT's routed cross-attention and its CLS row
// are loops over that piece; they differ only in which keys each query sees.
//
// For one query row and head h, with dh = D/Hd:
//   s_m   = q_h·K_h[m] / √dh                       (the scaled scores)
//   lse   = log Σ_m exp(s_m)                       (natural log)
//   p_m   = exp(s_m − lse)                         (the softmax)
//   out_h = Σ_m p_m·V_h[m]
// and backward, from dO = ∂loss/∂out_h:
//   dp_m  = dO·V_h[m],   δ = Σ_m p_m·dp_m = dO·out_h
//   ds_m  = p_m·(dp_m − δ) / √dh
//   dq_h += Σ_m ds_m·K_h[m],   dK_h[m] += ds_m·q_h,   dV_h[m] += p_m·dO.
// Dense and routed attention keep only lse and recompute p in backward (the
// contract of the fused device kernels); the CLS row keeps its probabilities.
#include <cmath>
#include <vector>
#include "kernels/ops.h"
#include "kernels/cpu/instantiate.h"

namespace prism::ops {
namespace {

// s[m] = q_h·K_h[m] / √dh for the M key rows; row m of K is K + m*kv_stride,
// head h is columns [h*dh, (h+1)*dh).
template <class T>
void head_scores(T* s, const T* q, const T* K, int64_t kv_stride, int M, int h, int dh) {
    const T scale = T(1) / std::sqrt(T(dh));
    const T* qh = q + h * dh;
    for (int m = 0; m < M; m++) {
        const T* kh = K + m * kv_stride + h * dh;
        T dot = 0;
        for (int d = 0; d < dh; d++) dot += qh[d] * kh[d];
        s[m] = dot * scale;
    }
}

// log Σ_m exp(s[m]), the maximum taken out first so that no exp overflows.
template <class T>
T logsumexp(const T* s, int M) {
    T mx = -INFINITY;
    for (int m = 0; m < M; m++) mx = std::max(mx, s[m]);
    T sum = 0;
    for (int m = 0; m < M; m++) sum += std::exp(s[m] - mx);
    return mx + std::log(sum);
}

// Forward of one query row, every head. p (head h at p + h*p_head_stride, M
// entries) receives the probabilities: the caller's probs, or scratch with
// stride 0. lse (head h at lse[h*lse_stride]) is written unless null.
template <class T>
void attend_forward(T* out, T* lse, int64_t lse_stride, T* p, int64_t p_head_stride, const T* q,
                    const T* K, const T* V, int64_t kv_stride, int M, int D, int Hd) {
    const int dh = D / Hd;
    for (int h = 0; h < Hd; h++) {
        T* ph = p + h * p_head_stride;
        head_scores(ph, q, K, kv_stride, M, h, dh);
        const T l = logsumexp(ph, M);
        if (lse) lse[h * lse_stride] = l;
        for (int m = 0; m < M; m++) ph[m] = std::exp(ph[m] - l);
        T* oh = out + h * dh;
        for (int d = 0; d < dh; d++) oh[d] = 0;
        for (int m = 0; m < M; m++) {
            const T* vh = V + m * kv_stride + h * dh;
            for (int d = 0; d < dh; d++) oh[d] += ph[m] * vh[d];
        }
    }
}

// dp_m = dO_h·V_h[m].
template <class T>
T head_dp(const T* dout, const T* V, int64_t kv_stride, int m, int h, int dh) {
    const T* vh = V + m * kv_stride + h * dh;
    T s = 0;
    for (int d = 0; d < dh; d++) s += dout[h * dh + d] * vh[d];
    return s;
}

// Backward of one query row, head h, given its probabilities p [M] and δ.
// Every gradient is accumulated.
template <class T>
void attend_backward_head(T* dq, T* dK, T* dV, const T* dout, const T* q, const T* K, const T* V,
                          int64_t kv_stride, const T* p, T delta, int M, int h, int dh) {
    const T scale = T(1) / std::sqrt(T(dh));
    const T* gh = dout + h * dh;
    const T* qh = q + h * dh;
    for (int m = 0; m < M; m++) {
        const T ds = p[m] * (head_dp(dout, V, kv_stride, m, h, dh) - delta) * scale;
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

// Backward of one query row from the forward's out and lse (head h at
// lse[h*lse_stride]): p recomputed from the scores, δ = dO·out.
template <class T>
void attend_backward(T* dq, T* dK, T* dV, const T* dout, const T* q, const T* K, const T* V,
                     int64_t kv_stride, const T* out, const T* lse, int64_t lse_stride, int M, int D,
                     int Hd, T* p /* scratch [M] */) {
    const int dh = D / Hd;
    for (int h = 0; h < Hd; h++) {
        head_scores(p, q, K, kv_stride, M, h, dh);
        for (int m = 0; m < M; m++) p[m] = std::exp(p[m] - lse[h * lse_stride]);
        T delta = 0;
        for (int d = 0; d < dh; d++) delta += dout[h * dh + d] * out[h * dh + d];
        attend_backward_head(dq, dK, dV, dout, q, K, V, kv_stride, p, delta, M, h, dh);
    }
}

}  // namespace

// lse of (image b, head h, query i) at lse[(b*Hd + h)*L + i].
template <class T>
void attention_forward(T* out, T* lse, const T* qkv, int B, int L, int D, int Hd) {
    #pragma omp parallel
    {
        std::vector<T> p(L);
        #pragma omp for collapse(2)
        for (int b = 0; b < B; b++)
            for (int i = 0; i < L; i++) {
                const T* base = qkv + (int64_t)b * L * 3 * D;
                attend_forward(out + ((int64_t)b * L + i) * D, lse + (int64_t)b * Hd * L + i, L, p.data(),
                               0, base + (int64_t)i * 3 * D, base + D, base + 2 * D, 3 * D, L, D, Hd);
            }
    }
}
PRISM_INSTANTIATE(attention_forward)

template <class T>
void attention_backward(T* dqkv, const T* dout, const T* qkv, const T* out, const T* lse, int B,
                        int L, int D, int Hd) {
    // One image per thread: its key/value gradients are summed over its
    // queries in order, so the result is independent of the thread count.
    #pragma omp parallel for
    for (int b = 0; b < B; b++) {
        std::vector<T> p(L);
        const T* base = qkv + (int64_t)b * L * 3 * D;
        T* dbase = dqkv + (int64_t)b * L * 3 * D;
        for (int i = 0; i < L; i++) {
            const int64_t row = (int64_t)b * L + i;
            attend_backward(dbase + (int64_t)i * 3 * D, dbase + D, dbase + 2 * D, dout + row * D,
                            base + (int64_t)i * 3 * D, base + D, base + 2 * D, 3 * D, out + row * D,
                            lse + (int64_t)b * Hd * L + i, L, L, D, Hd, p.data());
        }
    }
}
PRISM_INSTANTIATE(attention_backward)

// lse of (gathered row i, head h) at lse[i*Hd + h].
template <class T>
void routed_attention_forward(T* og, T* lse, const T* qg, const T* k, const T* v,
                              const int* offsets, int B, int nS, int N, int D, int Hd) {
    #pragma omp parallel
    {
        std::vector<T> p(N);
        #pragma omp for schedule(dynamic, 1)
        for (int g = 0; g < B * nS; g++)
            for (int i = offsets[g]; i < offsets[g + 1]; i++)
                attend_forward(og + (int64_t)i * D, lse + (int64_t)i * Hd, 1, p.data(), 0,
                               qg + (int64_t)i * D, k + (int64_t)g * N * D, v + (int64_t)g * N * D, D,
                               N, D, Hd);
    }
}
PRISM_INSTANTIATE(routed_attention_forward)

template <class T>
void routed_attention_backward(T* dqg, T* dk, T* dv, const T* dog, const T* qg, const T* k,
                               const T* v, const T* og, const T* lse, const int* offsets, int B,
                               int nS, int N, int D, int Hd) {
    // A group owns its keys' and values' gradients: no two threads write the same row.
    #pragma omp parallel for schedule(dynamic, 1)
    for (int g = 0; g < B * nS; g++) {
        std::vector<T> p(N);
        for (int i = offsets[g]; i < offsets[g + 1]; i++)
            attend_backward(dqg + (int64_t)i * D, dk + (int64_t)g * N * D, dv + (int64_t)g * N * D,
                            dog + (int64_t)i * D, qg + (int64_t)i * D, k + (int64_t)g * N * D,
                            v + (int64_t)g * N * D, D, og + (int64_t)i * D, lse + (int64_t)i * Hd, 1,
                            N, D, Hd, p.data());
    }
}
PRISM_INSTANTIATE(routed_attention_backward)

template <class T>
void cls_attention_forward(T* out, int64_t out_image_stride, T* probs, const T* q,
                           int64_t q_image_stride, const T* k, const T* v, int B, int M, int D,
                           int Hd) {
    #pragma omp parallel for
    for (int b = 0; b < B; b++)
        attend_forward(out + b * out_image_stride, (T*)nullptr, 0, probs + (int64_t)b * Hd * M, M,
                       q + b * q_image_stride, k + (int64_t)b * M * D, v + (int64_t)b * M * D, D, M,
                       D, Hd);
}
PRISM_INSTANTIATE(cls_attention_forward)

// The CLS row has its probabilities: δ = Σ_m p_m·dp_m from them.
template <class T>
void cls_attention_backward(T* dq, int64_t dq_image_stride, T* dk, T* dv, const T* dout,
                            int64_t dout_image_stride, const T* q, int64_t q_image_stride,
                            const T* k, const T* v, const T* probs, int B, int M, int D,
                            int Hd) {
    const int dh = D / Hd;
    #pragma omp parallel for
    for (int b = 0; b < B; b++) {
        const T* g = dout + b * dout_image_stride;
        const T* K = k + (int64_t)b * M * D;
        const T* V = v + (int64_t)b * M * D;
        for (int h = 0; h < Hd; h++) {
            const T* p = probs + ((int64_t)b * Hd + h) * M;
            T delta = 0;
            for (int m = 0; m < M; m++) delta += p[m] * head_dp(g, V, D, m, h, dh);
            attend_backward_head(dq + b * dq_image_stride, dk + (int64_t)b * M * D,
                                 dv + (int64_t)b * M * D, g, q + b * q_image_stride, K, V, D, p, delta,
                                 M, h, dh);
        }
    }
}
PRISM_INSTANTIATE(cls_attention_backward)

}  // namespace prism::ops
