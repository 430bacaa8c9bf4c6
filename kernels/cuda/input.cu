// The input step on the device: the twin of kernels/cpu/input.cpp (see
// kernels/ops.h for the exact definition). One thread per output pixel; the
// loader's batch (stored pixels, per-image statistics and augmentation) is
// copied up as is, so the host never widens pixels to float.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "kernels/ops.h"

namespace prism::ops::cuda {

namespace {

template <Pixel P>
__device__ float load(const void* src, size_t i) {
    if constexpr (P == Pixel::u8) return float(((const uint8_t*)src)[i]);
    if constexpr (P == Pixel::u16) return float(((const uint16_t*)src)[i]);
    if constexpr (P == Pixel::f16) return __half2float(((const __half*)src)[i]);
    if constexpr (P == Pixel::f32) return ((const float*)src)[i];
}

template <Pixel P>
__global__ void input_kernel(float* out, const void* raw, int B, int C, int H, int W, const float* mean,
                             const float* inv_std, const InputAug* aug, int* bad_image) {
    const size_t hw = size_t(H) * W, total = size_t(B) * C * hw;
    for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < total; i += size_t(gridDim.x) * blockDim.x) {
        const int x = int(i % W), y = int(i / W % H);
        const size_t plane = i / hw;  // b * C + c
        const int b = int(plane / C);
        int sy = y, sx = x;
        bool hole = false;
        if (aug) {
            const InputAug& a = aug[b];
            const int xf = (a.dihedral & 4) ? W - 1 - x : x;
            switch (a.dihedral & 3) {
                case 0: sy = y, sx = xf; break;
                case 1: sy = xf, sx = W - 1 - y; break;
                case 2: sy = H - 1 - y, sx = W - 1 - xf; break;
                default: sy = H - 1 - xf, sx = y; break;
            }
            sy += a.dy;
            sx += a.dx;
            for (int h = 0; h < a.holes; h++)
                hole |= y >= a.hole_y[h] && y < a.hole_y[h] + a.hole_h && x >= a.hole_x[h] && x < a.hole_x[h] + a.hole_w;
        }
        float v = 0.f;
        if (sy >= 0 && sy < H && sx >= 0 && sx < W) {
            // Subtract then multiply, rounded separately (no FMA): the CPU's bits.
            v = __fmul_rn(__fsub_rn(load<P>(raw, plane * hw + size_t(sy) * W + sx), mean[plane]), inv_std[plane]);
            if (!isfinite(v) && bad_image) atomicMin(bad_image, b);
        }
        out[i] = hole ? 0.f : v;
    }
}

template <Pixel P>
void launch(float* out, const void* raw, int B, int C, int H, int W, const float* mean, const float* inv_std,
            const InputAug* aug, int* bad_image, cudaStream_t stream) {
    const size_t total = size_t(B) * C * H * W;
    const int threads = 256;
    const size_t blocks = (total + threads - 1) / threads;
    const unsigned grid = unsigned(blocks < 65535 * 64 ? blocks : 65535 * 64);
    if (grid == 0) return;
    input_kernel<P><<<grid, threads, 0, stream>>>(out, raw, B, C, H, W, mean, inv_std, aug, bad_image);
}

}  // namespace

void input_forward(float* out, const void* raw, Pixel pixel, int B, int C, int H, int W, const float* mean,
                   const float* inv_std, const InputAug* aug, int* bad_image, void* stream) {
    cudaStream_t s = (cudaStream_t)stream;
    switch (pixel) {
        case Pixel::u8: launch<Pixel::u8>(out, raw, B, C, H, W, mean, inv_std, aug, bad_image, s); break;
        case Pixel::u16: launch<Pixel::u16>(out, raw, B, C, H, W, mean, inv_std, aug, bad_image, s); break;
        case Pixel::f16: launch<Pixel::f16>(out, raw, B, C, H, W, mean, inv_std, aug, bad_image, s); break;
        case Pixel::f32: launch<Pixel::f32>(out, raw, B, C, H, W, mean, inv_std, aug, bad_image, s); break;
    }
}

}  // namespace prism::ops::cuda
