// The element-wise kernels of kernels/cuda/activation.cu
// (kernels/cpu/activation.cpp is their reference): exact (erf) GELU, forward
// and backward, on fp32 or the bf16 mode's stored operands, and the residual
// add with drop path's per-image scale. One thread per element in a
// grid-stride loop. Written against primitives.cuh only, so that
// tests/test_elementwise_emulated.cpp runs them on the CPU.
#pragma once
#include "kernels/cuda/primitives.cuh"

namespace prism::activation {
#ifdef PRISM_EMULATION
inline namespace emulated {
#endif

using primitives::element_blocks;
using primitives::grid_first;
using primitives::grid_step;
using primitives::kElementThreads;
using primitives::load_elem;
using primitives::store_elem;


constexpr float kSqrtHalf = 0.70710678118654752440f;    // 1/√2
constexpr float kInvSqrt2Pi = 0.39894228040143267794f;  // 1/√(2π)

// x: fp32, or the bf16 mode's stored fc1 output (uint16_t). out and/or
// out_bf16 (the bf16 mode's input of the second MLP product).
template <class X>
struct GeluForwardParams {
    float* out;
    uint16_t* out_bf16;
    const X* x;
    int64_t n;
};

// element_blocks(n) blocks of kElementThreads.
template <class X>
PRISM_KERNEL(kElementThreads) gelu_forward_kernel(GeluForwardParams<X> p) {
    for (int64_t i = grid_first(); i < p.n; i += grid_step()) {
        const float xi = load_elem(&p.x[i]);
        const float y = 0.5f * xi * (1.f + erff(xi * kSqrtHalf));
        if (p.out) p.out[i] = y;
        if (p.out_bf16) store_elem(&p.out_bf16[i], y);
    }
}

// dx fp32 (added into, or overwritten) or dx_bf16 (written); dout and x fp32
// or the bf16 mode's stored ones.
template <class G, class X>
struct GeluBackwardParams {
    float* dx;
    uint16_t* dx_bf16;
    bool overwrite;
    const G* dout;
    const X* x;
    int64_t n;
};

// element_blocks(n) blocks of kElementThreads.
template <class G, class X>
PRISM_KERNEL(kElementThreads) gelu_backward_kernel(GeluBackwardParams<G, X> p) {
    for (int64_t i = grid_first(); i < p.n; i += grid_step()) {
        const float xi = load_elem(&p.x[i]);
        const float cdf = 0.5f * (1.f + erff(xi * kSqrtHalf));
        const float pdf = kInvSqrt2Pi * expf(-0.5f * xi * xi);
        const float g = load_elem(&p.dout[i]) * (cdf + xi * pdf);
        if (p.dx_bf16) store_elem(&p.dx_bf16[i], g);
        else p.dx[i] = p.overwrite ? g : p.dx[i] + g;
    }
}

// out[b] = x[b] + scale[b]·branch[b] (out may be x; scale nullptr: 1): the
// forward, and with out = x = dbranch, branch = dx the backward's
// dbranch[b] += scale[b]·dx[b].
struct ResidualParams {
    float* out;
    const float *x, *branch, *scale;
    int64_t per_image, n;
};

// element_blocks(n) blocks of kElementThreads.
PRISM_KERNEL(kElementThreads) residual_kernel(ResidualParams p) {
    for (int64_t i = grid_first(); i < p.n; i += grid_step())
        p.out[i] = p.x[i] + (p.scale ? p.scale[i / p.per_image] : 1.f) * p.branch[i];
}

#ifdef PRISM_EMULATION
}  // inline namespace emulated
#endif
}  // namespace prism::activation
