// Patch embedding's data movement (the matmul half is linear_forward), the
// token assembly of the sequence, and selecting the CLS rows for the head:
// kernels/cpu/embed.cpp on the device; the kernels are in embed.cuh.
#include "kernels/cuda/common.cuh"
#include "kernels/cuda/embed.cuh"

namespace prism::cuda_ops {
using namespace cuda_detail;

void patchify_channels(float* out, const float* images, int B, int C, int H, int W, int P,
                       const int* S, int nS, cudaStream_t stream) {
    const int64_t n = (int64_t)B * nS * (H / P) * (W / P) * P * P;
    const embed::PatchifyParams p{out, images, B, C, H, W, P, S, nS, nullptr, 1.f};
    PRISM_LAUNCH(embed::element_blocks(n), embed::kElementThreads, 0, stream, embed::patchify_channels_kernel)(p);
    PRISM_LAUNCH_CHECK();
}

void patchify_all(float* out, const float* images, int B, int C, int H, int W, int P,
                  const uint8_t* keep, float scale, cudaStream_t stream) {
    const int64_t n = (int64_t)B * (H / P) * (W / P) * C * P * P;
    const embed::PatchifyParams p{out, images, B, C, H, W, P, nullptr, 0, keep, scale};
    PRISM_LAUNCH(embed::element_blocks(n), embed::kElementThreads, 0, stream, embed::patchify_all_kernel)(p);
    PRISM_LAUNCH_CHECK();
}

void embed_forward(float* seq, const float* patch, const float* cls, const float* pos,
                   const float* chan, const int* S, int B, int nS, int N, int D,
                   cudaStream_t stream) {
    const int64_t n = (int64_t)B * (1 + (int64_t)nS * N) * D;
    const embed::ForwardParams p{seq, patch, cls, pos, chan, S, B, nS, N, D};
    PRISM_LAUNCH(embed::element_blocks(n), embed::kElementThreads, 0, stream, embed::forward_kernel)(p);
    PRISM_LAUNCH_CHECK();
}

void embed_backward(float* dpatch, float* dcls, float* dpos, float* dchan, const float* dseq,
                    const int* S, int B, int nS, int N, int D, cudaStream_t stream) {
    const embed::BackwardParams p{dpatch, dcls, dpos, dchan, dseq, S, B, nS, N, D};
    PRISM_LAUNCH(embed::element_blocks((int64_t)B * nS * N * D), embed::kElementThreads, 0, stream,
                 embed::dpatch_kernel)(p);
    PRISM_LAUNCH_CHECK();
    PRISM_LAUNCH(embed::element_blocks((int64_t)(1 + N) * D), embed::kElementThreads, 0, stream, embed::dpos_kernel)(p);
    PRISM_LAUNCH_CHECK();
    if (dchan) {
        PRISM_LAUNCH(embed::element_blocks((int64_t)nS * D), embed::kElementThreads, 0, stream, embed::dchan_kernel)(p);
        PRISM_LAUNCH_CHECK();
    }
}

void select_rows(float* out, const float* x, int64_t stride, int B, int D, cudaStream_t stream) {
    const embed::SelectParams p{out, x, stride, B, D};
    PRISM_LAUNCH(embed::element_blocks((int64_t)B * D), embed::kElementThreads, 0, stream,
                 embed::select_rows_kernel)(p);
    PRISM_LAUNCH_CHECK();
}

void select_rows_backward(float* dx, const float* dout, int64_t stride, int B, int D,
                          cudaStream_t stream) {
    const embed::SelectBackwardParams p{dx, dout, stride, B, D};
    PRISM_LAUNCH(embed::element_blocks((int64_t)B * D), embed::kElementThreads, 0, stream,
                 embed::select_rows_backward_kernel)(p);
    PRISM_LAUNCH_CHECK();
}

}  // namespace prism::cuda_ops
