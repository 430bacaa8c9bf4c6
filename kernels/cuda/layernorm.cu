// LayerNorm over the last dimension, eps 1e-6: kernels/cpu/layernorm.cpp on the
// device. One warp per row with fp32 statistics (two passes over the row, as
// the CPU: no cancellation for rows with a large mean); the weight and bias
// gradients are deterministic column sums over the rows. In the bf16 mode the
// normalized rows go out as bf16 (the linear layers' matrix input, DESIGN.md
// §7), as fp32, or both: whichever of `out`, `out_bf16` is not null.
#include "kernels/cuda/common.cuh"

namespace prism::cuda_ops {
using namespace cuda_detail;

namespace {

constexpr int kRowsPerBlock = 8;  // one warp each

// Row r of x normalized into out and/or out_bf16 by one warp (`lane` of it),
// with its statistics; each lane reads only the elements d ≡ lane (mod 32).
__device__ void layernorm_row(float* out, uint16_t* out_bf16, float* mean, float* rstd, const float* xr,
                              const float* w, const float* b, int64_t r, int D, int lane) {
    float s = 0.f;
    for (int d = lane; d < D; d += 32) s += xr[d];
    const float m = warp_sum(s) / D;
    float v = 0.f;
    for (int d = lane; d < D; d += 32) v += (xr[d] - m) * (xr[d] - m);
    const float rs = 1.f / sqrtf(warp_sum(v) / D + 1e-6f);
    for (int d = lane; d < D; d += 32) {
        const float y = (xr[d] - m) * rs * w[d] + b[d];
        if (out) out[r * D + d] = y;
        if (out_bf16) out_bf16[r * D + d] = float_to_bf16(y);
    }
    if (lane == 0) {
        mean[r] = m;
        rstd[r] = rs;
    }
}

__global__ void layernorm_forward_kernel(float* out, uint16_t* out_bf16, float* mean, float* rstd,
                                         const float* x, const float* w, const float* b, int64_t rows,
                                         int D) {
    const int64_t r = (int64_t)blockIdx.x * kRowsPerBlock + threadIdx.x / 32;
    if (r >= rows) return;
    layernorm_row(out, out_bf16, mean, rstd, x + r * D, w, b, r, D, threadIdx.x % 32);
}

// The residual add of the branch before LN2 and that LayerNorm, one warp per
// row: x and branch are read once and the sum written once; each lane reads
// back only what it wrote (L1), so no barrier is needed, and the arithmetic
// is that of residual_forward then layernorm_forward_kernel.
__global__ void residual_layernorm_forward_kernel(float* sum, float* out, uint16_t* out_bf16,
                                                  float* mean, float* rstd,
                                                  const float* x, const float* branch,
                                                  const float* scale, const float* w,
                                                  const float* b, int64_t rows,
                                                  int64_t rows_per_image, int D) {
    const int64_t r = (int64_t)blockIdx.x * kRowsPerBlock + threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    if (r >= rows) return;
    const float sc = scale ? scale[r / rows_per_image] : 1.f;
    const float* xr = x + r * D;
    const float* br = branch + r * D;
    float* sr = sum + r * D;
    for (int d = lane; d < D; d += 32) sr[d] = xr[d] + sc * br[d];
    layernorm_row(out, out_bf16, mean, rstd, sr, w, b, r, D, lane);
}

__global__ void layernorm_dx_kernel(float* dx, const float* dout, const float* x, const float* w,
                                    const float* mean, const float* rstd, int64_t rows, int D) {
    const int64_t r = (int64_t)blockIdx.x * kRowsPerBlock + threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    if (r >= rows) return;
    const float* xr = x + r * D;
    const float* g = dout + r * D;
    const float m = mean[r], rs = rstd[r];
    float dn = 0.f, dn_xhat = 0.f;
    for (int d = lane; d < D; d += 32) {
        const float xhat = (xr[d] - m) * rs;
        dn += g[d] * w[d];
        dn_xhat += g[d] * w[d] * xhat;
    }
    const float mean_dn = warp_sum(dn) / D, mean_dn_xhat = warp_sum(dn_xhat) / D;
    float* dxr = dx + r * D;
    for (int d = lane; d < D; d += 32) {
        const float xhat = (xr[d] - m) * rs;
        dxr[d] += rs * (g[d] * w[d] - mean_dn - xhat * mean_dn_xhat);
    }
}

struct DwTerm {  // dout ⊙ x̂
    const float *dout, *x, *mean, *rstd;
    int D;
    __device__ float operator()(int, int64_t r, int c) const {
        const int64_t i = r * D + c;
        return dout[i] * ((x[i] - mean[r]) * rstd[r]);
    }
};

}  // namespace

void layernorm_forward(float* out, uint16_t* out_bf16, float* mean, float* rstd, const float* x,
                       const float* w, const float* b, int64_t rows, int D, cudaStream_t stream) {
    PRISM_CUDA_REQUIRE(out || out_bf16, "layernorm_forward: no output");
    if (rows <= 0) return;
    const unsigned blocks = (unsigned)((rows + kRowsPerBlock - 1) / kRowsPerBlock);
    layernorm_forward_kernel<<<blocks, kRowsPerBlock * 32, 0, stream>>>(out, out_bf16, mean, rstd, x, w, b,
                                                                        rows, D);
    PRISM_LAUNCH_CHECK();
}

void residual_layernorm_forward(float* sum, float* out, uint16_t* out_bf16, float* mean, float* rstd,
                                const float* x, const float* branch, const float* scale, const float* w,
                                const float* b, int B, int64_t rows_per_image, int D,
                                cudaStream_t stream) {
    PRISM_CUDA_REQUIRE(out || out_bf16, "residual_layernorm_forward: no output");
    const int64_t rows = (int64_t)B * rows_per_image;
    if (rows <= 0) return;
    const unsigned blocks = (unsigned)((rows + kRowsPerBlock - 1) / kRowsPerBlock);
    residual_layernorm_forward_kernel<<<blocks, kRowsPerBlock * 32, 0, stream>>>(
        sum, out, out_bf16, mean, rstd, x, branch, scale, w, b, rows, rows_per_image, D);
    PRISM_LAUNCH_CHECK();
}

void layernorm_backward(float* dx, float* dw, float* db, const float* dout, const float* x,
                        const float* w, const float* mean, const float* rstd, int64_t rows,
                        int D, cudaStream_t stream) {
    if (rows <= 0) return;
    const unsigned blocks = (unsigned)((rows + kRowsPerBlock - 1) / kRowsPerBlock);
    layernorm_dx_kernel<<<blocks, kRowsPerBlock * 32, 0, stream>>>(dx, dout, x, w, mean, rstd, rows, D);
    PRISM_LAUNCH_CHECK();
    column_sum(1, rows, D, DwTerm{dout, x, mean, rstd, D}, AddTo{dw, D, nullptr}, stream);
    column_sum(1, rows, D, RowMajor{dout, rows, D}, AddTo{db, D, nullptr}, stream);
}

}  // namespace prism::cuda_ops
