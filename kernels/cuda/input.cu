// The input step on the device: the twin of kernels/cpu/input.cpp (see
// kernels/ops.h for the exact definition; the kernel is in input.cuh). The
// loader's batch (stored pixels, per-image statistics and augmentation) is
// copied up as is, so the host never widens pixels to float.
#include "kernels/cuda/common.cuh"
#include "kernels/cuda/input.cuh"
#include "kernels/cuda_ops.h"

namespace prism::cuda_ops {
using ops::InputAug;
using ops::Pixel;

namespace {

template <Pixel P>
void launch(const input::Params& p, cudaStream_t stream) {
    const int64_t total = (int64_t)p.B * p.C * p.H * p.W;
    if (total == 0) return;
    PRISM_LAUNCH(input::element_blocks(total), input::kElementThreads, 0, stream, input::forward_kernel<P>)(p);
    PRISM_LAUNCH_CHECK();
}

}  // namespace

void input_forward(float* out, const void* raw, Pixel pixel, int B, int C, int H, int W, const float* mean,
                   const float* inv_std, const InputAug* aug, int* bad_image, cudaStream_t s) {
    const input::Params p{out, raw, B, C, H, W, mean, inv_std, aug, bad_image};
    switch (pixel) {
        case Pixel::u8: launch<Pixel::u8>(p, s); break;
        case Pixel::u16: launch<Pixel::u16>(p, s); break;
        case Pixel::f16: launch<Pixel::f16>(p, s); break;
        case Pixel::f32: launch<Pixel::f32>(p, s); break;
    }
}

}  // namespace prism::cuda_ops
