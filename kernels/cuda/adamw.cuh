// The optimizer's element-wise kernels of kernels/cuda/adamw.cu
// (kernels/cpu/adamw.cpp is their reference): clipping's scale and AdamW with
// the CPU's double-precision update, one thread per parameter in a
// grid-stride loop; the gradient norm's sum of squares is a device_sum
// (reduce.cuh) of Square. Written against primitives.cuh only, so that
// tests/test_elementwise_emulated.cpp runs them on the CPU.
#pragma once
#include "kernels/cuda/primitives.cuh"

namespace prism::adamw {
#ifdef PRISM_EMULATION
inline namespace emulated {
#endif

using primitives::element_blocks;
using primitives::grid_first;
using primitives::grid_step;
using primitives::kElementThreads;


// The sum of squares' term, in double as on the CPU, and where the sum goes.
struct Square {
    const float* x;
    PRISM_DEVICE double operator()(int64_t i) const { return (double)x[i] * x[i]; }
};
struct StoreDouble {
    double* out;
    PRISM_DEVICE void operator()(double v) const { *out = v; }
};

struct ScaleParams {
    float* x;
    int64_t n;
    float s;
};

// element_blocks(n) blocks of kElementThreads: x *= s.
PRISM_KERNEL(kElementThreads) scale_kernel(ScaleParams p) {
    for (int64_t i = grid_first(); i < p.n; i += grid_step()) p.x[i] *= p.s;
}

struct UpdateParams {
    float *param, *m, *v;
    const float* grad;
    int64_t n;
    double lr, beta1, beta2, eps, weight_decay;
    double bc1, bc2;  // the bias corrections 1 − β₁ᵗ, 1 − β₂ᵗ
    // Where weight_decay applies: everywhere (null), or where the element's
    // tile of the parameter block, (first + i) / tile, has a nonzero byte.
    const uint8_t* decays;
    int64_t first, tile;
};

// element_blocks(n) blocks of kElementThreads. The moments are rounded to
// fp32 before the update reads them, as the CPU stores and rereads them.
PRISM_KERNEL(kElementThreads) update_kernel(UpdateParams p) {
    for (int64_t i = grid_first(); i < p.n; i += grid_step()) {
        const float g = p.grad[i];
        const float mi = (float)(p.beta1 * p.m[i] + (1.0 - p.beta1) * g);
        const float vi = (float)(p.beta2 * p.v[i] + (1.0 - p.beta2) * (double)g * g);
        p.m[i] = mi;
        p.v[i] = vi;
        const double update = (mi / p.bc1) / (sqrt(vi / p.bc2) + p.eps);
        const double wd = !p.decays || p.decays[(p.first + i) / p.tile] ? p.weight_decay : 0.0;
        p.param[i] = (float)(p.param[i] - p.lr * (update + wd * p.param[i]));
    }
}

#ifdef PRISM_EMULATION
}  // inline namespace emulated
#endif
}  // namespace prism::adamw
