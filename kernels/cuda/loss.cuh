// The softmax cross-entropy kernels of kernels/cuda/loss.cu (kernels/cpu/loss.cpp
// is their reference): one warp per row for the probabilities, the row's loss
// and its argmax hit, then one thread summing the rows in order. Written
// against primitives.cuh only, so that tests/test_reduce_emulated.cpp runs
// them on the CPU.
#pragma once
#include <limits.h>

#include "kernels/cuda/primitives.cuh"

namespace prism::cross_entropy {
#ifdef PRISM_EMULATION
inline namespace emulated {
#endif

using primitives::element_blocks;
using primitives::grid_first;
using primitives::grid_step;
using primitives::kElementThreads;
using primitives::shfl_xor;
using primitives::warp_sum;

constexpr int kRowsPerBlock = 8, kRowThreads = kRowsPerBlock * 32;  // one warp per row
PRISM_HOST_DEVICE unsigned row_blocks(int B) { return (unsigned)((B + kRowsPerBlock - 1) / kRowsPerBlock); }

struct RowsParams {
    float* probs;     // [B, K]
    float* row_loss;  // [B]: −log p[label]
    int* hit;         // [B]: argmax == label
    const float* logits;
    const int32_t* labels;
    int B, K;
};

// row_blocks(B) blocks of kRowThreads. Argmax ties → the lower class, as the
// CPU's strict '>' scan.
PRISM_KERNEL(kRowThreads) rows_kernel(RowsParams p) {
    const int b = blockIdx.x * kRowsPerBlock + threadIdx.x / 32, lane = threadIdx.x % 32, K = p.K;
    if (b >= p.B) return;  // whole warps
    const float* z = p.logits + (int64_t)b * K;
    float best = -INFINITY;
    int arg = INT_MAX;
    for (int c = lane; c < K; c += 32)
        if (z[c] > best) {  // ascending c: the first of equal values stays
            best = z[c];
            arg = c;
        }
    for (int o = 16; o > 0; o >>= 1) {
        const float ob = shfl_xor(best, o);
        const int oa = shfl_xor(arg, o);
        if (ob > best || (ob == best && oa < arg)) {
            best = ob;
            arg = oa;
        }
    }
    float* pr = p.probs + (int64_t)b * K;
    float sum = 0.f;
    for (int c = lane; c < K; c += 32) {
        pr[c] = expf(z[c] - best);
        sum += pr[c];
    }
    sum = warp_sum(sum);
    for (int c = lane; c < K; c += 32) pr[c] = pr[c] / sum;
    if (lane == 0) {
        p.row_loss[b] = -(z[p.labels[b]] - best - logf(sum));
        p.hit[b] = arg == p.labels[b];
    }
}

struct TotalParams {
    float* loss;   // the mean over rows
    int* correct;  // the hits, or nullptr
    const float* row_loss;
    const int* hit;
    int B;
};

// One block of 32 threads: thread 0 adds the rows in order.
PRISM_KERNEL(32) total_kernel(TotalParams p) {
    if (threadIdx.x != 0 || blockIdx.x != 0) return;
    float total = 0.f;
    int hits = 0;
    for (int b = 0; b < p.B; b++) {
        total += p.row_loss[b];
        hits += p.hit[b];
    }
    *p.loss = total / p.B;
    if (p.correct) *p.correct = hits;
}

struct BackwardParams {
    float* dlogits;  // += grad_scale·(probs − onehot)/B
    const float* probs;
    const int32_t* labels;
    int B, K;
    float grad_scale;
};

// element_blocks(B·K) blocks of kElementThreads.
PRISM_KERNEL(kElementThreads) backward_kernel(BackwardParams p) {
    for (int64_t i = grid_first(); i < (int64_t)p.B * p.K; i += grid_step()) {
        const int b = (int)(i / p.K), c = (int)(i % p.K);
        p.dlogits[i] += p.grad_scale * (p.probs[i] - float(c == p.labels[b])) / float(p.B);
    }
}

#ifdef PRISM_EMULATION
}  // inline namespace emulated
#endif
}  // namespace prism::cross_entropy
