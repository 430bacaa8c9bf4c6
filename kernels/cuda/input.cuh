// The input step's kernel of kernels/cuda/input.cu (kernels/cpu/input.cpp is
// its reference; kernels/ops.h defines the op): stored pixels to the model's
// normalized float input with the augmentation's crop, flips, quarter turns
// and dropout holes. One thread per output pixel in a grid-stride loop.
// Written against primitives.cuh only, so that
// tests/test_elementwise_emulated.cpp runs it on the CPU.
#pragma once
#include "kernels/cuda/primitives.cuh"
#include "kernels/ops.h"

namespace prism::input {
#ifdef PRISM_EMULATION
inline namespace emulated {
#endif

using primitives::element_blocks;
using primitives::grid_first;
using primitives::grid_step;
using primitives::kElementThreads;
using ops::InputAug;
using ops::Pixel;


template <Pixel P>
PRISM_DEVICE float load_pixel(const void* src, int64_t i) {
    if constexpr (P == Pixel::u8) return float(((const uint8_t*)src)[i]);
    if constexpr (P == Pixel::u16) return float(((const uint16_t*)src)[i]);
    if constexpr (P == Pixel::f16) return primitives::half_to_float(((const uint16_t*)src)[i]);
    if constexpr (P == Pixel::f32) return ((const float*)src)[i];
}

struct Params {
    float* out;       // [B, C, H, W]
    const void* raw;  // [B, C, H, W] stored pixels
    int B, C, H, W;
    const float *mean, *inv_std;  // [B·C]: per (image, channel) plane
    const InputAug* aug;          // [B], or nullptr: normalization only
    int* bad_image;               // the lowest image with a non-finite output, or nullptr
};

// element_blocks(B·C·H·W) blocks of kElementThreads.
template <Pixel P>
PRISM_KERNEL(kElementThreads) forward_kernel(Params p) {
    const int H = p.H, W = p.W;
    const int64_t hw = (int64_t)H * W, total = (int64_t)p.B * p.C * hw;
    for (int64_t i = grid_first(); i < total; i += grid_step()) {
        const int x = (int)(i % W), y = (int)(i / W % H);
        const int64_t plane = i / hw;  // b·C + c
        const int b = (int)(plane / p.C);
        int sy = y, sx = x;
        bool hole = false;
        if (p.aug) {
            const InputAug& a = p.aug[b];
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
                hole |= y >= a.hole_y[h] && y < a.hole_y[h] + a.hole_h && x >= a.hole_x[h] &&
                        x < a.hole_x[h] + a.hole_w;
        }
        float v = 0.f;
        if (sy >= 0 && sy < H && sx >= 0 && sx < W) {
            // A subtraction, then a product: no contraction can fuse them, so
            // these are the CPU's bits. A pixel under a hole counts as bad too,
            // as on the CPU.
            v = (load_pixel<P>(p.raw, plane * hw + (int64_t)sy * W + sx) - p.mean[plane]) * p.inv_std[plane];
            if (!isfinite(v) && p.bad_image) primitives::atomic_min_global(p.bad_image, b);
        }
        p.out[i] = hole ? 0.f : v;
    }
}

#ifdef PRISM_EMULATION
}  // inline namespace emulated
#endif
}  // namespace prism::input
