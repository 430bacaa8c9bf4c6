// The hand-written kernels around kernels/cuda/linear.cu's cuBLAS products
// (kernels/cpu/linear.cpp is the reference of what they compute together):
// the bias a product accumulates into, the bf16 copies of its operands, the
// channel-major copies of the experts' weight gradient, and the per-group
// pointer arrays of the batched products, chosen on the device from S. Also
// the shapes of the products, so that linear.cu's cuBLAS calls and
// tests/test_linear_emulated.cpp's column-major model of them read the same
// transposes and leading dimensions. One thread per output element (or per
// group) in a grid-stride loop. Written against primitives.cuh only, so that
// the test runs them on the CPU.
#pragma once
#include "kernels/cuda/primitives.cuh"

namespace prism::linear {
#ifdef PRISM_EMULATION
inline namespace emulated {
#endif

using primitives::element_blocks;
using primitives::grid_first;
using primitives::grid_step;
using primitives::kElementThreads;
using primitives::load_elem;
using primitives::store_elem;


// ---- the products' shapes ------------------------------------------------------------------
// A cuBLAS product in column-major terms: C = op(A)·op(B) + β·C, op(A) m×k
// and op(B) k×n. Row-major X [rows, in] is column-major Xᵀ, so the forward is
// Yᵀ [out, rows] = Wᵀ-as-stored · Xᵀ (see linear.cu). A linear layer makes one
// of each; the experts one per group (b, s), rows = N, for the forward and
// dx, and one per channel position s, rows = B·N, for dW.
struct Product {
    bool trans_a, trans_b;
    int64_t m, n, k, lda, ldb, ldc;
};
// y [rows, out] (+)= x · Wᵀ: A = W, B = x, C = y
inline Product forward_product(int64_t rows, int in_dim, int out_dim) {
    return {true, false, out_dim, rows, in_dim, in_dim, in_dim, out_dim};
}
// dx [rows, in] (+)= dout · W: A = W, B = dout, C = dx
inline Product dx_product(int64_t rows, int in_dim, int out_dim) {
    return {false, false, in_dim, rows, out_dim, in_dim, out_dim, in_dim};
}
// dW [out, in] += doutᵀ · x summed over the rows: A = x, B = dout, C = dW
inline Product dw_product(int64_t rows, int in_dim, int out_dim) {
    return {false, true, in_dim, out_dim, rows, in_dim, out_dim, in_dim};
}

// ---- biases --------------------------------------------------------------------------------
// O: fp32, or bf16 for a bf16 result (the bias rounded).
template <class O>
struct FillBiasParams {
    O* out;
    const float* bias;
    int64_t rows;
    int out_dim;
};

// out[r, o] = bias[o]: the product then adds into it (beta = 1).
// element_blocks(rows·out_dim) blocks.
template <class O>
PRISM_KERNEL(kElementThreads) fill_bias_kernel(FillBiasParams<O> p) {
    for (int64_t i = grid_first(); i < p.rows * p.out_dim; i += grid_step())
        store_elem(&p.out[i], p.bias[i % p.out_dim]);
}

template <class O>
struct ExpertBiasParams {
    O* out;
    const float* bias;  // [C, out_dim]
    const int* S;
    int B, nS, N, out_dim;
};

// out [B, nS, N, out_dim] = bias[S[s]] on every row of group (b, s).
// element_blocks(B·nS·N·out_dim) blocks.
template <class O>
PRISM_KERNEL(kElementThreads) fill_expert_bias_kernel(ExpertBiasParams<O> p) {
    for (int64_t i = grid_first(); i < (int64_t)p.B * p.nS * p.N * p.out_dim; i += grid_step()) {
        const int o = (int)(i % p.out_dim);
        const int s = (int)((i / p.out_dim / p.N) % p.nS);
        store_elem(&p.out[i], p.bias[(int64_t)p.S[s] * p.out_dim + o]);
    }
}

// ---- bf16 copies of the experts' operands --------------------------------------------------
struct UsedExpertsParams {
    uint16_t* Wb;     // [nS, out, in]
    const float* W;   // [C, out, in]
    const int* S;
    int nS;
    int64_t per_expert;  // out·in
};

// Wb[s] = bf16(W[S[s]]): only the experts this step uses.
// element_blocks(nS·per_expert) blocks.
PRISM_KERNEL(kElementThreads) used_experts_bf16_kernel(UsedExpertsParams p) {
    for (int64_t i = grid_first(); i < p.nS * p.per_expert; i += grid_step()) {
        const int64_t s = i / p.per_expert;
        store_elem(&p.Wb[i], p.W[(int64_t)p.S[s] * p.per_expert + i % p.per_expert]);
    }
}

struct PatchRowsParams {
    uint16_t* xb;  // [B, per_image], compact
    const float* x;
    int64_t x_image_stride;
    int B;
    int64_t per_image;  // nS·N·in: the patch rows of one image
};

// xb = bf16 of the patch rows of x, whose images lie x_image_stride apart.
// element_blocks(B·per_image) blocks.
PRISM_KERNEL(kElementThreads) patch_rows_bf16_kernel(PatchRowsParams p) {
    for (int64_t i = grid_first(); i < p.B * p.per_image; i += grid_step())
        store_elem(&p.xb[i], p.x[(i / p.per_image) * p.x_image_stride + i % p.per_image]);
}

// E: the copies' type (fp32, or bf16); X: x's (fp32, or the bf16 mode's
// stored bf16 patch rows).
template <class E, class X>
struct ChannelMajorParams {
    E *xp, *gp;  // xp [nS, B, N, in], gp [nS, B, N, out]
    const X* x;  // patch rows, x_image_stride apart
    int64_t x_image_stride;
    const float* dout;  // [B, nS, N, out]
    int B, nS, N, in_dim, out_dim;
};

// Channel-major copies for the weight gradient: channel s's rows of x and of
// dout made contiguous, images in order, so that one product per channel
// (K = B·N) sums its images. element_blocks(nS·B·N·(in + out)) blocks.
template <class E, class X>
PRISM_KERNEL(kElementThreads) channel_major_kernel(ChannelMajorParams<E, X> p) {
    const int width = p.in_dim + p.out_dim;
    const int64_t rows = (int64_t)p.nS * p.B * p.N;
    for (int64_t i = grid_first(); i < rows * width; i += grid_step()) {
        const int64_t row = i / width;  // (s·B + b)·N + n
        const int col = (int)(i % width);
        const int64_t n = row % p.N, b = (row / p.N) % p.B, s = row / p.N / p.B;
        if (col < p.in_dim)
            store_elem(&p.xp[row * p.in_dim + col],
                       load_elem(&p.x[b * p.x_image_stride + (s * p.N + n) * p.in_dim + col]));
        else
            store_elem(&p.gp[row * p.out_dim + col - p.in_dim],
                       p.dout[((b * p.nS + s) * p.N + n) * p.out_dim + col - p.in_dim]);
    }
}

// ---- the batched products' pointers ---------------------------------------------------------
// Where group g = b·nS + s starts in a buffer: b·image + s·channel elements
// in (group-major [B, nS, N, ·], channel-major [nS, B, N, ·] and the patch
// rows of a sequence buffer differ only in these two strides).
struct GroupAt {
    int64_t image, channel;
};

// W: the weights' type; I, O: the product's input and output.
template <class W, class I, class O>
struct GroupPointersParams {
    W** w_ptr;
    I** in_ptr;
    O** out_ptr;
    const W* weights;    // [C, out, in] (S given) or the compact [nS, out, in]
    int64_t per_expert;  // out·in
    const int* S;        // nullptr: weights holds position s's expert at s
    const I* in;
    GroupAt in_at;
    O* out;
    GroupAt out_at;
    int B, nS;
};

// Group g's weight, input rows and output rows. element_blocks(B·nS) blocks.
template <class W, class I, class O>
PRISM_KERNEL(kElementThreads) group_pointers_kernel(GroupPointersParams<W, I, O> p) {
    for (int64_t g = grid_first(); g < (int64_t)p.B * p.nS; g += grid_step()) {
        const int64_t b = g / p.nS, s = g % p.nS;
        const int64_t expert = p.S ? p.S[s] : s;
        p.w_ptr[g] = const_cast<W*>(p.weights + expert * p.per_expert);
        p.in_ptr[g] = const_cast<I*>(p.in + b * p.in_at.image + s * p.in_at.channel);
        p.out_ptr[g] = p.out + b * p.out_at.image + s * p.out_at.channel;
    }
}

template <class E>
struct WeightPointersParams {
    float** dw_ptr;
    E **xp_ptr, **gp_ptr;
    float* dW;  // [C, out, in]
    E *xp, *gp;  // channel_major_kernel's copies
    const int* S;
    int nS;
    int64_t rows_per_channel;  // B·N
    int in_dim, out_dim;
};

// The weight gradient's pointers for channel position s: dW[S[s]] and s's
// rows of xp and gp. element_blocks(nS) blocks.
template <class E>
PRISM_KERNEL(kElementThreads) weight_pointers_kernel(WeightPointersParams<E> p) {
    for (int64_t s = grid_first(); s < p.nS; s += grid_step()) {
        p.dw_ptr[s] = p.dW + (int64_t)p.S[s] * p.out_dim * p.in_dim;
        p.xp_ptr[s] = p.xp + s * p.rows_per_channel * p.in_dim;
        p.gp_ptr[s] = p.gp + s * p.rows_per_channel * p.out_dim;
    }
}

// ---- the bias gradients' column-sum terms (reduce.cuh) --------------------------------------
// Channel s's rows of dout [B, nS, N, out] in (b, n) order: the bias
// gradient of expert S[s] sums them.
struct ChannelRows {  // term = dout[((b·nS + s)·N + n)·out + c], r = b·N + n
    const float* dout;
    int nS, N, out;
    PRISM_DEVICE float operator()(int s, int64_t r, int c) const {
        const int64_t b = r / N, n = r % N;
        return dout[((b * nS + s) * N + n) * out + c];
    }
};

struct Bf16RowMajor {  // term = float(x[r·cols + c])
    const uint16_t* x;
    int cols;
    PRISM_DEVICE float operator()(int, int64_t r, int c) const { return load_elem(&x[r * cols + c]); }
};

#ifdef PRISM_EMULATION
}  // inline namespace emulated
#endif
}  // namespace prism::linear
