// The kernels of kernels/cuda/embed.cu (kernels/cpu/embed.cpp is their
// reference): patch embedding's data movement (the matmul half is
// linear_forward), the token assembly of the sequence, and selecting the CLS
// rows for the head. One thread per output element in a grid-stride loop;
// each parameter gradient element belongs to one thread, which sums images
// (and channels or patches) in a fixed order. Written against primitives.cuh
// only, so that tests/test_elementwise_emulated.cpp runs them on the CPU.
#pragma once
#include "kernels/cuda/primitives.cuh"

namespace prism::embed {
#ifdef PRISM_EMULATION
inline namespace emulated {
#endif

using primitives::element_blocks;
using primitives::grid_first;
using primitives::grid_step;
using primitives::kElementThreads;


// images [B, C, H, W] → patches: P×P, row-major inside, patch n at grid
// position (n / (W/P), n % (W/P)).
struct PatchifyParams {
    float* out;
    const float* images;
    int B, C, H, W, P;
    const int* S;  // patchify_channels: the nS channels kept, in sequence order
    int nS;
    const uint8_t* keep;  // patchify_all: channels zeroed where keep[c] == 0 (nullptr: none)
    float scale;          // patchify_all: every pixel times this
};

// out [B, nS, N, P·P]: every kept channel's patches, one row each (the
// channel-wise models' per-channel tokens). element_blocks(B·nS·N·P·P) blocks.
PRISM_KERNEL(kElementThreads) patchify_channels_kernel(PatchifyParams p) {
    const int gw = p.W / p.P, N = (p.H / p.P) * gw, PP = p.P * p.P;
    const int64_t n_out = (int64_t)p.B * p.nS * N * PP;
    for (int64_t i = grid_first(); i < n_out; i += grid_step()) {
        const int px = (int)(i % PP);
        const int64_t row = i / PP;  // (b·nS + s)·N + n
        const int n = (int)(row % N);
        const int64_t bs = row / N;
        const int s = (int)(bs % p.nS), b = (int)(bs / p.nS);
        const int y = (n / gw) * p.P + px / p.P, x = (n % gw) * p.P + px % p.P;
        p.out[i] = p.images[(((int64_t)b * p.C + p.S[s]) * p.H + y) * p.W + x];
    }
}

// out [B, N, C·P·P]: all channels of a patch in one row (vit's tokens).
// element_blocks(B·N·C·P·P) blocks.
PRISM_KERNEL(kElementThreads) patchify_all_kernel(PatchifyParams p) {
    const int gw = p.W / p.P, N = (p.H / p.P) * gw, PP = p.P * p.P;
    const int64_t row_len = (int64_t)p.C * PP, n_out = (int64_t)p.B * N * row_len;
    for (int64_t i = grid_first(); i < n_out; i += grid_step()) {
        const int e = (int)(i % row_len);  // (c·P + py)·P + px
        const int64_t row = i / row_len;   // b·N + n
        const int n = (int)(row % N), b = (int)(row / N);
        const int c = e / PP, py = (e % PP) / p.P, px = e % p.P;
        const int y = (n / gw) * p.P + py, x = (n % gw) * p.P + px;
        p.out[i] = p.keep && !p.keep[c] ? 0.f : p.scale * p.images[(((int64_t)b * p.C + c) * p.H + y) * p.W + x];
    }
}

// The sequence [B, L = 1 + nS·N, D]: the CLS row, then channel s's N patch
// rows for each s in turn; every row gets its patch position's embedding
// and, in the channel-wise models (chan != nullptr), its channel's.
struct ForwardParams {
    float* seq;
    const float *patch, *cls, *pos, *chan;
    const int* S;
    int B, nS, N, D;
};

// element_blocks(B·L·D) blocks.
PRISM_KERNEL(kElementThreads) forward_kernel(ForwardParams p) {
    const int D = p.D;
    const int64_t L = 1 + (int64_t)p.nS * p.N;
    for (int64_t i = grid_first(); i < p.B * L * D; i += grid_step()) {
        const int d = (int)(i % D);
        const int64_t row = (i / D) % L, b = i / D / L;
        if (row == 0) {
            p.seq[i] = p.cls[d] + p.pos[d];
        } else {
            const int64_t r = row - 1;
            const int s = (int)(r / p.N), n = (int)(r % p.N);
            const float v = p.patch[(b * p.nS * p.N + r) * D + d] + p.pos[(int64_t)(1 + n) * D + d];
            p.seq[i] = p.chan ? v + p.chan[(int64_t)p.S[s] * D + d] : v;
        }
    }
}

// Every gradient is added into (dchan may be nullptr: no channel embedding).
struct BackwardParams {
    float *dpatch, *dcls, *dpos, *dchan;
    const float* dseq;
    const int* S;
    int B, nS, N, D;
};

// dpatch += dseq's patch rows. element_blocks(B·nS·N·D) blocks.
PRISM_KERNEL(kElementThreads) dpatch_kernel(BackwardParams p) {
    const int64_t R = (int64_t)p.nS * p.N, L = 1 + R, D = p.D;
    for (int64_t i = grid_first(); i < p.B * R * D; i += grid_step()) {
        const int64_t b = i / (R * D), rd = i % (R * D);
        p.dpatch[i] += p.dseq[b * L * D + D + rd];
    }
}

// One thread per (row of pos, d): dpos[0] and dcls sum the CLS rows over
// images; dpos[1+n] sums patch n over images and channels, in (b, s) order.
// element_blocks((1 + N)·D) blocks.
PRISM_KERNEL(kElementThreads) dpos_kernel(BackwardParams p) {
    const int64_t L = 1 + (int64_t)p.nS * p.N;
    const int D = p.D;
    for (int64_t i = grid_first(); i < (int64_t)(1 + p.N) * D; i += grid_step()) {
        const int d = (int)(i % D), q = (int)(i / D);
        float acc = 0.f;
        for (int b = 0; b < p.B; b++) {
            const float* img = p.dseq + b * L * D;
            if (q == 0) {
                acc += img[d];
            } else {
                for (int s = 0; s < p.nS; s++) acc += img[(1 + (int64_t)s * p.N + (q - 1)) * D + d];
            }
        }
        p.dpos[i] += acc;
        if (q == 0) p.dcls[d] += acc;
    }
}

// One thread per (position s, d): channel S[s] sums its patches over images
// (S holds distinct channels, so no two threads share an element).
// element_blocks(nS·D) blocks.
PRISM_KERNEL(kElementThreads) dchan_kernel(BackwardParams p) {
    const int64_t L = 1 + (int64_t)p.nS * p.N;
    const int D = p.D;
    for (int64_t i = grid_first(); i < (int64_t)p.nS * D; i += grid_step()) {
        const int d = (int)(i % D), s = (int)(i / D);
        float acc = 0.f;
        for (int b = 0; b < p.B; b++)
            for (int n = 0; n < p.N; n++) acc += p.dseq[(b * L + 1 + (int64_t)s * p.N + n) * D + d];
        p.dchan[(int64_t)p.S[s] * D + d] += acc;
    }
}

// out [B, D] = row b·stride of x, for b < B: the CLS rows the head reads.
struct SelectParams {
    float* out;
    const float* x;
    int64_t stride;
    int B, D;
};

// element_blocks(B·D) blocks.
PRISM_KERNEL(kElementThreads) select_rows_kernel(SelectParams p) {
    for (int64_t i = grid_first(); i < (int64_t)p.B * p.D; i += grid_step())
        p.out[i] = p.x[(i / p.D) * p.stride + i % p.D];
}

// dx's selected rows += dout [B, D].
struct SelectBackwardParams {
    float* dx;
    const float* dout;
    int64_t stride;
    int B, D;
};

// element_blocks(B·D) blocks.
PRISM_KERNEL(kElementThreads) select_rows_backward_kernel(SelectBackwardParams p) {
    for (int64_t i = grid_first(); i < (int64_t)p.B * p.D; i += grid_step())
        p.dx[(i / p.D) * p.stride + i % p.D] += p.dout[i];
}

#ifdef PRISM_EMULATION
}  // inline namespace emulated
#endif
}  // namespace prism::embed
