// LayerNorm over the last dimension, eps 1e-6: kernels/cpu/layernorm.cpp on the
// device; the kernels are in layernorm.cuh. In the bf16 mode the normalized
// rows go out as bf16 (the linear layers' matrix input, DESIGN.md §7), as
// fp32, or both: whichever of `out`, `out_bf16` is not null.
#include "kernels/cuda/common.cuh"
#include "kernels/cuda/layernorm.cuh"

namespace prism::cuda_ops {
using namespace cuda_detail;

namespace {

void launch_forward(const layernorm::ForwardParams& p, cudaStream_t stream) {
    PRISM_CUDA_REQUIRE(p.out || p.out_bf16, "layernorm_forward: no output");
    if (p.rows <= 0) return;
    PRISM_LAUNCH(layernorm::row_blocks(p.rows), layernorm::kThreads, 0, stream, layernorm::forward_kernel)(p);
    PRISM_LAUNCH_CHECK();
}

}  // namespace

void layernorm_forward(float* out, uint16_t* out_bf16, float* mean, float* rstd, const float* x,
                       const float* w, const float* b, int64_t rows, int D, cudaStream_t stream) {
    launch_forward({out, out_bf16, mean, rstd, x, w, b, nullptr, nullptr, nullptr, rows, rows, D}, stream);
}

void residual_layernorm_forward(float* sum, float* out, uint16_t* out_bf16, float* mean, float* rstd,
                                const float* x, const float* branch, const float* scale, const float* w,
                                const float* b, int B, int64_t rows_per_image, int D,
                                cudaStream_t stream) {
    PRISM_CUDA_REQUIRE(sum && branch, "residual_layernorm_forward: no sum or branch");
    launch_forward({out, out_bf16, mean, rstd, x, w, b, sum, branch, scale, (int64_t)B * rows_per_image,
                    rows_per_image, D},
                   stream);
}

void layernorm_backward(float* dx, float* dw, float* db, const float* dout, const float* x,
                        const float* w, const float* mean, const float* rstd, int64_t rows,
                        int D, cudaStream_t stream) {
    if (rows <= 0) return;
    const layernorm::BackwardParams p{dx, dout, x, w, mean, rstd, rows, D};
    PRISM_LAUNCH(layernorm::row_blocks(rows), layernorm::kThreads, 0, stream, layernorm::dx_kernel)(p);
    PRISM_LAUNCH_CHECK();
    column_sum(1, rows, D, layernorm::DwTerm{dout, x, mean, rstd, D}, AddTo{dw, D, nullptr}, stream);
    column_sum(1, rows, D, RowMajor{dout, rows, D}, AddTo{db, D, nullptr}, stream);
}

}  // namespace prism::cuda_ops
