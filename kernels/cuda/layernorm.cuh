// The LayerNorm kernels of kernels/cuda/layernorm.cu (kernels/cpu/layernorm.cpp
// is their reference): one warp per row with fp32 statistics, two passes over
// the row as the CPU (no cancellation for rows with a large mean), eps 1e-6.
// The weight and bias gradients are column sums (reduce.cuh) of DwTerm and
// of dout. Written against primitives.cuh only, so that
// tests/test_reduce_emulated.cpp runs them on the CPU.
#pragma once
#include "kernels/cuda/primitives.cuh"

namespace prism::layernorm {
#ifdef PRISM_EMULATION
inline namespace emulated {
#endif

using primitives::store_elem;
using primitives::warp_sum;

constexpr int kRowsPerBlock = 8, kThreads = kRowsPerBlock * 32;  // one warp per row
PRISM_HOST_DEVICE unsigned row_blocks(int64_t rows) { return (unsigned)((rows + kRowsPerBlock - 1) / kRowsPerBlock); }
PRISM_DEVICE int64_t warp_row() { return (int64_t)blockIdx.x * kRowsPerBlock + threadIdx.x / 32; }

struct ForwardParams {
    float* out;          // [rows, D] or nullptr
    uint16_t* out_bf16;  // the same rounded to bf16 (the linear layers' input), or nullptr
    float *mean, *rstd;  // [rows]
    const float *x, *w, *b;
    // The residual add before LN2 in the same pass, when branch != nullptr:
    // sum = x + scale[image]·branch is written and normalized (scale may be nullptr: 1).
    float* sum;
    const float *branch, *scale;
    int64_t rows, rows_per_image;
    int D;
};

// row_blocks(rows) blocks of kThreads. Each lane touches only the elements
// d ≡ lane (mod 32) of its row, and reads back the sum only where it wrote
// it, so no barrier is needed; the arithmetic is residual_forward's then
// layernorm_forward's, as on the CPU.
PRISM_KERNEL(kThreads) forward_kernel(ForwardParams p) {
    const int64_t r = warp_row();
    const int lane = threadIdx.x % 32, D = p.D;
    if (r >= p.rows) return;  // whole warps
    const float* xr = p.x + r * D;
    if (p.branch) {
        const float sc = p.scale ? p.scale[r / p.rows_per_image] : 1.f;
        const float* br = p.branch + r * D;
        float* sr = p.sum + r * D;
        for (int d = lane; d < D; d += 32) sr[d] = xr[d] + sc * br[d];
        xr = sr;
    }
    float s = 0.f;
    for (int d = lane; d < D; d += 32) s += xr[d];
    const float m = warp_sum(s) / D;
    float v = 0.f;
    for (int d = lane; d < D; d += 32) v += (xr[d] - m) * (xr[d] - m);
    const float rs = 1.f / sqrtf(warp_sum(v) / D + 1e-6f);
    for (int d = lane; d < D; d += 32) {
        const float y = (xr[d] - m) * rs * p.w[d] + p.b[d];
        if (p.out) p.out[r * D + d] = y;
        if (p.out_bf16) store_elem(&p.out_bf16[r * D + d], y);
    }
    if (lane == 0) {
        p.mean[r] = m;
        p.rstd[r] = rs;
    }
}

struct BackwardParams {
    float* dx;  // += ∂loss/∂x
    const float *dout, *x, *w, *mean, *rstd;
    int64_t rows;
    int D;
};

// row_blocks(rows) blocks of kThreads.
PRISM_KERNEL(kThreads) dx_kernel(BackwardParams p) {
    const int64_t r = warp_row();
    const int lane = threadIdx.x % 32, D = p.D;
    if (r >= p.rows) return;
    const float* xr = p.x + r * D;
    const float* g = p.dout + r * D;
    const float m = p.mean[r], rs = p.rstd[r];
    float dn = 0.f, dn_xhat = 0.f;
    for (int d = lane; d < D; d += 32) {
        const float xhat = (xr[d] - m) * rs;
        dn += g[d] * p.w[d];
        dn_xhat += g[d] * p.w[d] * xhat;
    }
    const float mean_dn = warp_sum(dn) / D, mean_dn_xhat = warp_sum(dn_xhat) / D;
    float* dxr = p.dx + r * D;
    for (int d = lane; d < D; d += 32) {
        const float xhat = (xr[d] - m) * rs;
        dxr[d] += rs * (g[d] * p.w[d] - mean_dn - xhat * mean_dn_xhat);
    }
}

// The weight gradient's column-sum term: dout ⊙ x̂.
struct DwTerm {
    const float *dout, *x, *mean, *rstd;
    int D;
    PRISM_DEVICE float operator()(int, int64_t r, int c) const {
        const int64_t i = r * D + c;
        return dout[i] * ((x[i] - mean[r]) * rstd[r]);
    }
};

#ifdef PRISM_EMULATION
}  // inline namespace emulated
#endif
}  // namespace prism::layernorm
