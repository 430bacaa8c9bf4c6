// Patch embedding's data movement (the matmul half is linear_forward), the
// token assembly of the sequence, and selecting the CLS rows for the head:
// kernels/cpu/embed.cpp on the device. One thread per output element; the
// parameter gradients give each element to one thread, which sums images
// (and channels or patches) in a fixed order.
#include "kernels/cuda/common.cuh"

namespace prism::cuda_ops {
using namespace cuda_detail;

namespace {

__global__ void patchify_channels_kernel(float* out, const float* images, int B, int C, int H,
                                         int W, int P, const int* S, int nS) {
    const int gw = W / P, N = (H / P) * gw, PP = P * P;
    PRISM_GRID_STRIDE(i, (int64_t)B * nS * N * PP) {
        const int px = (int)(i % PP);
        const int64_t row = i / PP;  // (b*nS + s)*N + n
        const int n = (int)(row % N);
        const int64_t bs = row / N;
        const int s = (int)(bs % nS), b = (int)(bs / nS);
        const int y = (n / gw) * P + px / P, x = (n % gw) * P + px % P;
        out[i] = images[(((int64_t)b * C + S[s]) * H + y) * W + x];
    }
}

__global__ void patchify_all_kernel(float* out, const float* images, int B, int C, int H, int W,
                                    int P, const uint8_t* keep, float scale) {
    const int gw = W / P, N = (H / P) * gw, PP = P * P;
    PRISM_GRID_STRIDE(i, (int64_t)B * N * C * PP) {
        const int e = (int)(i % ((int64_t)C * PP));  // (c*P + py)*P + px
        const int64_t row = i / ((int64_t)C * PP);   // b*N + n
        const int n = (int)(row % N), b = (int)(row / N);
        const int c = e / PP, py = (e % PP) / P, px = e % P;
        const int y = (n / gw) * P + py, x = (n % gw) * P + px;
        out[i] = keep && !keep[c] ? 0.f : scale * images[(((int64_t)b * C + c) * H + y) * W + x];
    }
}

__global__ void embed_forward_kernel(float* seq, const float* patch, const float* cls,
                                     const float* pos, const float* chan, const int* S, int B,
                                     int nS, int N, int D) {
    const int64_t L = 1 + (int64_t)nS * N;
    PRISM_GRID_STRIDE(i, B * L * D) {
        const int d = (int)(i % D);
        const int64_t row = (i / D) % L, b = i / D / L;
        if (row == 0) {
            seq[i] = cls[d] + pos[d];
        } else {
            const int64_t r = row - 1;
            const int s = (int)(r / N), n = (int)(r % N);
            const float v = patch[(b * nS * N + r) * D + d] + pos[(int64_t)(1 + n) * D + d];
            seq[i] = chan ? v + chan[(int64_t)S[s] * D + d] : v;
        }
    }
}

// dpatch += dseq's patch rows.
__global__ void embed_dpatch_kernel(float* dpatch, const float* dseq, int B, int nS, int N, int D) {
    const int64_t R = (int64_t)nS * N, L = 1 + R;
    PRISM_GRID_STRIDE(i, B * R * D) {
        const int64_t b = i / (R * D), rd = i % (R * D);
        dpatch[i] += dseq[b * L * D + D + rd];
    }
}

// One thread per (row of pos, d): dpos[0] and dcls sum the CLS rows over
// images; dpos[1+n] sums patch n over images and channels, in (b, s) order.
__global__ void embed_dpos_kernel(float* dcls, float* dpos, const float* dseq, int B, int nS,
                                  int N, int D) {
    const int64_t L = 1 + (int64_t)nS * N;
    PRISM_GRID_STRIDE(i, (int64_t)(1 + N) * D) {
        const int d = (int)(i % D), p = (int)(i / D);
        float acc = 0.f;
        for (int b = 0; b < B; b++) {
            const float* img = dseq + b * L * D;
            if (p == 0) {
                acc += img[d];
            } else {
                for (int s = 0; s < nS; s++) acc += img[(1 + (int64_t)s * N + (p - 1)) * D + d];
            }
        }
        dpos[i] += acc;
        if (p == 0) dcls[d] += acc;
    }
}

// One thread per (position s, d): channel S[s] sums its patches over images.
__global__ void embed_dchan_kernel(float* dchan, const float* dseq, const int* S, int B, int nS,
                                   int N, int D) {
    const int64_t L = 1 + (int64_t)nS * N;
    PRISM_GRID_STRIDE(i, (int64_t)nS * D) {
        const int d = (int)(i % D), s = (int)(i / D);
        float acc = 0.f;
        for (int b = 0; b < B; b++)
            for (int n = 0; n < N; n++) acc += dseq[(b * L + 1 + (int64_t)s * N + n) * D + d];
        dchan[(int64_t)S[s] * D + d] += acc;
    }
}

__global__ void select_rows_kernel(float* out, const float* x, int64_t stride, int B, int D) {
    PRISM_GRID_STRIDE(i, (int64_t)B * D) out[i] = x[(i / D) * stride + i % D];
}

__global__ void select_rows_backward_kernel(float* dx, const float* dout, int64_t stride, int B,
                                            int D) {
    PRISM_GRID_STRIDE(i, (int64_t)B * D) dx[(i / D) * stride + i % D] += dout[i];
}

}  // namespace

void patchify_channels(float* out, const float* images, int B, int C, int H, int W, int P,
                       const int* S, int nS, cudaStream_t stream) {
    const int64_t n = (int64_t)B * nS * (H / P) * (W / P) * P * P;
    patchify_channels_kernel<<<grid_for(n), kThreads, 0, stream>>>(out, images, B, C, H, W, P, S, nS);
    PRISM_LAUNCH_CHECK();
}

void patchify_all(float* out, const float* images, int B, int C, int H, int W, int P,
                  const uint8_t* keep, float scale, cudaStream_t stream) {
    const int64_t n = (int64_t)B * (H / P) * (W / P) * C * P * P;
    patchify_all_kernel<<<grid_for(n), kThreads, 0, stream>>>(out, images, B, C, H, W, P, keep, scale);
    PRISM_LAUNCH_CHECK();
}

void embed_forward(float* seq, const float* patch, const float* cls, const float* pos,
                   const float* chan, const int* S, int B, int nS, int N, int D,
                   cudaStream_t stream) {
    const int64_t n = (int64_t)B * (1 + (int64_t)nS * N) * D;
    embed_forward_kernel<<<grid_for(n), kThreads, 0, stream>>>(seq, patch, cls, pos, chan, S, B, nS, N, D);
    PRISM_LAUNCH_CHECK();
}

void embed_backward(float* dpatch, float* dcls, float* dpos, float* dchan, const float* dseq,
                    const int* S, int B, int nS, int N, int D, cudaStream_t stream) {
    embed_dpatch_kernel<<<grid_for((int64_t)B * nS * N * D), kThreads, 0, stream>>>(
        dpatch, dseq, B, nS, N, D);
    PRISM_LAUNCH_CHECK();
    embed_dpos_kernel<<<grid_for((int64_t)(1 + N) * D), kThreads, 0, stream>>>(
        dcls, dpos, dseq, B, nS, N, D);
    PRISM_LAUNCH_CHECK();
    if (dchan) {
        embed_dchan_kernel<<<grid_for((int64_t)nS * D), kThreads, 0, stream>>>(
            dchan, dseq, S, B, nS, N, D);
        PRISM_LAUNCH_CHECK();
    }
}

void select_rows(float* out, const float* x, int64_t stride, int B, int D, cudaStream_t stream) {
    select_rows_kernel<<<grid_for((int64_t)B * D), kThreads, 0, stream>>>(out, x, stride, B, D);
    PRISM_LAUNCH_CHECK();
}

void select_rows_backward(float* dx, const float* dout, int64_t stride, int B, int D,
                          cudaStream_t stream) {
    select_rows_backward_kernel<<<grid_for((int64_t)B * D), kThreads, 0, stream>>>(dx, dout, stride, B, D);
    PRISM_LAUNCH_CHECK();
}

}  // namespace prism::cuda_ops
