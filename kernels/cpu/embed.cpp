// Patch embedding's data movement (the matmul half is linear_forward), the
// token assembly of the sequence, and selecting the CLS rows for the head.
#include "kernels/ops.h"
#include "kernels/cpu/instantiate.h"

namespace prism::ops {

template <class T>
void patchify_channels(T* out, const float* images, int B, int C, int H, int W, int P,
                       const int* S, int nS) {
    const int gw = W / P, N = (H / P) * gw;
    #pragma omp parallel for collapse(2)
    for (int b = 0; b < B; b++)
        for (int s = 0; s < nS; s++) {
            const float* img = images + ((int64_t)b * C + S[s]) * H * W;
            for (int n = 0; n < N; n++) {
                T* row = out + (((int64_t)b * nS + s) * N + n) * P * P;
                const int y0 = (n / gw) * P, x0 = (n % gw) * P;
                for (int py = 0; py < P; py++)
                    for (int px = 0; px < P; px++)
                        row[py * P + px] = img[(y0 + py) * W + x0 + px];
            }
        }
}
PRISM_INSTANTIATE(patchify_channels)

template <class T>
void patchify_all(T* out, const float* images, int B, int C, int H, int W, int P,
                  const uint8_t* keep, T scale) {
    const int gw = W / P, N = (H / P) * gw;
    #pragma omp parallel for
    for (int b = 0; b < B; b++)
        for (int n = 0; n < N; n++) {
            T* row = out + ((int64_t)b * N + n) * C * P * P;
            const int y0 = (n / gw) * P, x0 = (n % gw) * P;
            for (int c = 0; c < C; c++) {
                const float* img = images + ((int64_t)b * C + c) * H * W;
                for (int py = 0; py < P; py++)
                    for (int px = 0; px < P; px++)
                        row[(c * P + py) * P + px] =
                            keep && !keep[c] ? T(0) : scale * T(img[(y0 + py) * W + x0 + px]);
            }
        }
}
PRISM_INSTANTIATE(patchify_all)

template <class T>
void embed_forward(T* seq, const T* patch, const T* cls, const T* pos, const T* chan,
                   const int* S, int B, int nS, int N, int D) {
    const int64_t L = 1 + (int64_t)nS * N;
    #pragma omp parallel for
    for (int b = 0; b < B; b++) {
        T* img = seq + b * L * D;
        for (int d = 0; d < D; d++) img[d] = cls[d] + pos[d];
        for (int s = 0; s < nS; s++)
            for (int n = 0; n < N; n++) {
                const int64_t r = (int64_t)s * N + n;
                const T* p = patch + ((int64_t)b * nS * N + r) * D;
                const T* e = pos + (int64_t)(1 + n) * D;
                T* o = img + (1 + r) * D;
                if (chan) {
                    const T* ce = chan + (int64_t)S[s] * D;
                    for (int d = 0; d < D; d++) o[d] = p[d] + e[d] + ce[d];
                } else {
                    for (int d = 0; d < D; d++) o[d] = p[d] + e[d];
                }
            }
    }
}
PRISM_INSTANTIATE(embed_forward)

template <class T>
void embed_backward(T* dpatch, T* dcls, T* dpos, T* dchan, const T* dseq, const int* S,
                    int B, int nS, int N, int D) {
    const int64_t L = 1 + (int64_t)nS * N;
    // Parameter gradients sum over images in image order (deterministic).
    for (int b = 0; b < B; b++) {
        const T* img = dseq + b * L * D;
        for (int d = 0; d < D; d++) { dcls[d] += img[d]; dpos[d] += img[d]; }
        for (int s = 0; s < nS; s++)
            for (int n = 0; n < N; n++) {
                const T* g = img + (1 + (int64_t)s * N + n) * D;
                T* dp = dpos + (int64_t)(1 + n) * D;
                T* dx = dpatch + ((int64_t)b * nS * N + (int64_t)s * N + n) * D;
                for (int d = 0; d < D; d++) { dp[d] += g[d]; dx[d] += g[d]; }
                if (dchan) {
                    T* dc = dchan + (int64_t)S[s] * D;
                    for (int d = 0; d < D; d++) dc[d] += g[d];
                }
            }
    }
}
PRISM_INSTANTIATE(embed_backward)

template <class T>
void select_rows(T* out, const T* x, int64_t stride, int B, int D) {
    for (int b = 0; b < B; b++)
        for (int d = 0; d < D; d++) out[(int64_t)b * D + d] = x[b * stride + d];
}
PRISM_INSTANTIATE(select_rows)

template <class T>
void select_rows_backward(T* dx, const T* dout, int64_t stride, int B, int D) {
    for (int b = 0; b < B; b++)
        for (int d = 0; d < D; d++) dx[b * stride + d] += dout[(int64_t)b * D + d];
}
PRISM_INSTANTIATE(select_rows_backward)

}  // namespace prism::ops
