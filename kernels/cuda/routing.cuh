// The routing kernels of kernels/cuda/moe.cu (kernels/cpu/moe.cpp is their
// reference): router softmax + top-k, one warp per token, and its backward;
// dispatch as a stable counting sort that never leaves the GPU (a histogram
// per image, one scan, a placement per image); gather and the weighted combine;
// the load-balance and z losses.
//
// Every float sum has one owner thread and a fixed order; the only atomics are
// integer counts in the dispatch histogram, exact in any order. So two runs
// give the same bits.
//
// Written against the primitives of primitives.cuh only (shared memory through
// ld_shared/st_shared, barriers block_sync, warp collectives shfl_xor,
// match_any, warp_sync), so that tests/test_routing_emulated.cpp runs these
// kernels on the CPU through tests/emulator.h. Each kernel takes one
// parameter struct, and its launch geometry is defined here, next to it, for
// the launcher and the emulated test alike.
#pragma once
#include <limits.h>

#include "kernels/cuda/primitives.cuh"

namespace prism::routing {
#ifdef PRISM_EMULATION
inline namespace emulated {
#endif

using primitives::atomic_add_shared;
using primitives::block_sync;
using primitives::element_blocks;
using primitives::global_warp;
using primitives::grid_first;
using primitives::grid_step;
using primitives::kElementThreads;
using primitives::ld_shared;
using primitives::load_elem;
using primitives::match_any;
using primitives::popc;
using primitives::shfl_xor;
using primitives::st_shared;
using primitives::store_elem;
using primitives::warp_max;
using primitives::warp_sum;
using primitives::warp_sync;

constexpr int kWarpsPerBlock = 8, kWarpThreads = kWarpsPerBlock * 32;  // the one-warp-per-token kernels
constexpr int kDispatchThreads = 256, kDispatchWarps = kDispatchThreads / 32;

PRISM_HOST_DEVICE unsigned warp_blocks(int64_t warps) {
    return (unsigned)((warps + kWarpsPerBlock - 1) / kWarpsPerBlock);
}
PRISM_HOST_DEVICE size_t histogram_smem(int nS) { return sizeof(int) * (size_t)nS; }
PRISM_HOST_DEVICE size_t scan_smem() { return sizeof(int) * kDispatchThreads; }
PRISM_HOST_DEVICE size_t place_smem(int nS) { return sizeof(int) * (size_t)nS * (1 + kDispatchWarps); }

// ---- router ------------------------------------------------------------------------------
// Patch tokens t = b*(nS*N) + r; the logits z are patch rows (z, z_image_stride)
// of width C; in_S[c] != 0 marks the channels present, S lists them in order.

// The order of the top-k: higher probability first, ties → lower position s
// (S is sorted, so the lower channel), exactly the CPU's repeated selection.
PRISM_DEVICE bool ranks_before(float pa, int sa, float pb, int sb) { return pa > pb || (pa == pb && sa < sb); }

struct RouterFwdParams {
    float *probs, *weights, *lse;  // [T, C], [T, k], [T]
    int* experts;                  // [T, k]: positions into S
    const float* z;
    int64_t z_image_stride;
    const uint8_t* in_S;
    const int* S;
    int B, nS, N, C, k;
    bool renorm;  // weights renormalised over the chosen k, else the softmax's
};

// One warp per token; launch warp_blocks(T) blocks of kWarpThreads.
PRISM_KERNEL(kWarpThreads) router_forward_kernel(RouterFwdParams p) {
    const int64_t R = (int64_t)p.nS * p.N, t = global_warp();
    const int lane = threadIdx.x % 32, nS = p.nS, C = p.C, k = p.k;
    if (t >= p.B * R) return;  // whole warps: t is the warp's
    const float* zt = p.z + (t / R) * p.z_image_stride + (t % R) * C;
    const int* S = p.S;
    float mx = -INFINITY;
    for (int s = lane; s < nS; s += 32) mx = fmaxf(mx, zt[S[s]]);
    mx = warp_max(mx);
    float* probs = p.probs + t * C;
    float sum = 0.f;
    for (int c = lane; c < C; c += 32) {
        const float e = p.in_S[c] ? expf(zt[c] - mx) : 0.f;  // channels outside S: −inf
        probs[c] = e;
        sum += e;
    }
    sum = warp_sum(sum);
    for (int c = lane; c < C; c += 32) probs[c] = probs[c] / sum;
    if (lane == 0) p.lse[t] = mx + logf(sum);
    // Top-k: pick j is the best candidate ranked after pick j-1. The
    // probabilities are recomputed with the same operations, so the same bits.
    float prev_p = INFINITY, chosen_sum = 0.f;
    int prev_s = -1;
    int* e = p.experts + t * k;
    for (int j = 0; j < k; j++) {
        float best_p = -INFINITY;
        int best_s = INT_MAX;
        for (int s = lane; s < nS; s += 32) {
            const float ps = expf(zt[S[s]] - mx) / sum;
            if (ranks_before(prev_p, prev_s, ps, s) && ranks_before(ps, s, best_p, best_s)) {
                best_p = ps;
                best_s = s;
            }
        }
        for (int o = 16; o > 0; o >>= 1) {
            const float op = shfl_xor(best_p, o);
            const int os = shfl_xor(best_s, o);
            if (ranks_before(op, os, best_p, best_s)) {
                best_p = op;
                best_s = os;
            }
        }
        if (lane == 0) e[j] = best_s;
        chosen_sum += best_p;  // the same picks in the same order on every lane
        prev_p = best_p;
        prev_s = best_s;
    }
    warp_sync();  // lane 0's picks and every lane's probabilities, to all lanes
    for (int j = lane; j < k; j += 32) {
        const float w = probs[S[e[j]]];
        p.weights[t * k + j] = p.renorm ? w / chosen_sum : w;
    }
}

struct RouterBwdParams {
    float* dz;  // += ∂loss/∂z, patch rows like z
    int64_t dz_image_stride;
    const float *probs, *weights, *dweights;
    const float* dprobs;  // [T, C] from the losses, or nullptr
    const int *experts, *S;
    int B, nS, N, C, k;
    bool renorm;
};

// dp[S[s]] of token t: the losses' part plus the combine weights' part.
PRISM_DEVICE float router_dp(const RouterBwdParams& p, int s, int64_t t, const int* e, const float* dw,
                             float dw_dot_w, float chosen_sum) {
    float dp = p.dprobs ? p.dprobs[t * p.C + p.S[s]] : 0.f;
    for (int j = 0; j < p.k; j++)
        if (e[j] == s) dp += p.renorm ? (dw[j] - dw_dot_w) / chosen_sum : dw[j];
    return dp;
}

// One warp per token, as forward.
PRISM_KERNEL(kWarpThreads) router_backward_kernel(RouterBwdParams p) {
    const int64_t R = (int64_t)p.nS * p.N, t = global_warp();
    const int lane = threadIdx.x % 32, k = p.k;
    if (t >= p.B * R) return;
    const float* probs = p.probs + t * p.C;
    const int* e = p.experts + t * k;
    const float* w = p.weights + t * k;
    const float* dw = p.dweights + t * k;
    const int* S = p.S;
    // w_j = p_j / Σ_i p_i over the chosen: ∂/∂p_j = (dw_j − Σ_i dw_i w_i) / Σ_i p_i
    float chosen_sum = 0.f, dw_dot_w = 0.f;
    if (p.renorm)
        for (int j = 0; j < k; j++) {
            chosen_sum += probs[S[e[j]]];
            dw_dot_w += dw[j] * w[j];
        }
    float p_dot_dp = 0.f;
    for (int s = lane; s < p.nS; s += 32) p_dot_dp += probs[S[s]] * router_dp(p, s, t, e, dw, dw_dot_w, chosen_sum);
    p_dot_dp = warp_sum(p_dot_dp);
    float* dzt = p.dz + (t / R) * p.dz_image_stride + (t % R) * p.C;
    for (int s = lane; s < p.nS; s += 32) {
        const float dp = router_dp(p, s, t, e, dw, dw_dot_w, chosen_sum);
        dzt[S[s]] += probs[S[s]] * (dp - p_dot_dp);
    }
}

// ---- dispatch ----------------------------------------------------------------------------
// A stable counting sort of the T*k (token, slot) pairs by group g = b*nS + s:
// offsets [B*nS+1] the exclusive scan of the group sizes, pair_of_row and its
// inverse row_of_pair, counts [nS] the groups summed over images.
struct DispatchParams {
    int *offsets, *pair_of_row, *row_of_pair, *counts;
    const int* experts;  // [T, k]
    int64_t pairs_per_image;
    int B, nS;
};

// Block b: the histogram of image b's pairs over its groups → offsets[b*nS + s + 1].
// B blocks of kDispatchThreads, histogram_smem(nS).
PRISM_KERNEL(kDispatchThreads) dispatch_histogram_kernel(DispatchParams p) {
    PRISM_SMEM(smem);
    int* hist = reinterpret_cast<int*>(smem);  // [nS]
    const int b = blockIdx.x;
    for (int s = threadIdx.x; s < p.nS; s += blockDim.x) st_shared(&hist[s], 0);
    block_sync();
    const int* e = p.experts + b * p.pairs_per_image;
    for (int64_t i = threadIdx.x; i < p.pairs_per_image; i += blockDim.x) atomic_add_shared(&hist[e[i]], 1);
    block_sync();
    for (int s = threadIdx.x; s < p.nS; s += blockDim.x) p.offsets[(int64_t)b * p.nS + s + 1] = ld_shared(&hist[s]);
    if (b == 0 && threadIdx.x == 0) p.offsets[0] = 0;
}

// One block of kDispatchThreads, scan_smem(): counts[s] = Σ_b group sizes,
// then offsets becomes the inclusive scan of the sizes (offsets[0] = 0: an
// exclusive scan of the groups). Each thread scans a contiguous run; the
// runs' totals are scanned in shared memory.
PRISM_KERNEL(kDispatchThreads) dispatch_scan_kernel(DispatchParams p) {
    PRISM_SMEM(smem);
    int* run_total = reinterpret_cast<int*>(smem);  // [kDispatchThreads]
    const int nS = p.nS;
    const int64_t G = (int64_t)p.B * nS;
    for (int s = threadIdx.x; s < nS; s += blockDim.x) {
        int c = 0;
        for (int b = 0; b < p.B; b++) c += p.offsets[(int64_t)b * nS + s + 1];
        p.counts[s] = c;
    }
    const int64_t per = (G + kDispatchThreads - 1) / kDispatchThreads;
    const int64_t i0 = threadIdx.x * per, i1 = i0 + per < G ? i0 + per : G;
    int total = 0;
    for (int64_t i = i0; i < i1; i++) total += p.offsets[i + 1];
    st_shared(&run_total[threadIdx.x], total);
    block_sync();  // also: every count is read before the scan overwrites its sizes
    if (threadIdx.x == 0)
        for (int i = 1; i < kDispatchThreads; i++) st_shared(&run_total[i], ld_shared(&run_total[i]) + ld_shared(&run_total[i - 1]));
    block_sync();
    int acc = threadIdx.x ? ld_shared(&run_total[threadIdx.x - 1]) : 0;
    for (int64_t i = i0; i < i1; i++) {
        acc += p.offsets[i + 1];
        p.offsets[i + 1] = acc;
    }
}

// Block b places image b's pairs in pair order, kDispatchThreads at a time: a
// pair's row is its group's offset + the pairs of its group placed before this
// round + those of earlier warps in this round + earlier lanes of its warp.
// B blocks of kDispatchThreads, place_smem(nS).
PRISM_KERNEL(kDispatchThreads) dispatch_place_kernel(DispatchParams p) {
    PRISM_SMEM(smem);
    const int nS = p.nS;
    int* placed = reinterpret_cast<int*>(smem);  // [nS]
    int* warp_count = placed + nS;               // [kDispatchWarps][nS]
    const int b = blockIdx.x, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    for (int s = threadIdx.x; s < nS; s += blockDim.x) st_shared(&placed[s], 0);
    const int64_t base = b * p.pairs_per_image;
    for (int64_t r0 = 0; r0 < p.pairs_per_image; r0 += kDispatchThreads) {
        for (int i = threadIdx.x; i < kDispatchWarps * nS; i += blockDim.x) st_shared(&warp_count[i], 0);
        block_sync();
        const int64_t i = r0 + threadIdx.x;
        const int s = i < p.pairs_per_image ? p.experts[base + i] : -1;
        const unsigned same = match_any(s);
        const int rank = popc(same & ((1u << lane) - 1));
        if (s >= 0 && rank == 0) st_shared(&warp_count[warp * nS + s], popc(same));
        block_sync();
        if (s >= 0) {
            int row = p.offsets[(int64_t)b * nS + s] + ld_shared(&placed[s]) + rank;
            for (int w = 0; w < warp; w++) row += ld_shared(&warp_count[w * nS + s]);
            p.pair_of_row[row] = (int)(base + i);
            p.row_of_pair[base + i] = row;
        }
        block_sync();
        for (int t = threadIdx.x; t < nS; t += blockDim.x) {
            int n = ld_shared(&placed[t]);
            for (int w = 0; w < kDispatchWarps; w++) n += ld_shared(&warp_count[w * nS + t]);
            st_shared(&placed[t], n);
        }
        block_sync();  // before the next round clears warp_count
    }
}

// ---- gather and combine ------------------------------------------------------------------
// q, a, dq, da: patch rows (x, image stride) of width D; qg, og, dqg, dog:
// the gathered rows [T*k, D]. E: fp32, or bf16 (uint16_t) as the bf16 mode
// stores q, qg, og and a; sums are fp32.
template <class E>
struct GatherParams {
    E* qg;
    const E* q;
    int64_t q_image_stride;
    const int* pair_of_row;
    int64_t R, rows;
    int k, D;
};

// qg[i] = q[token of pair_of_row[i]], copied as it is; element_blocks(rows*D)
// blocks of kElementThreads.
template <class E>
PRISM_KERNEL(kElementThreads) gather_forward_kernel(GatherParams<E> p) {
    for (int64_t i = grid_first(); i < p.rows * p.D; i += grid_step()) {
        const int64_t row = i / p.D, t = p.pair_of_row[row] / p.k;
        p.qg[i] = p.q[(t / p.R) * p.q_image_stride + (t % p.R) * p.D + i % p.D];
    }
}

struct GatherBwdParams {
    float* dq;
    int64_t dq_image_stride;
    const float* dqg;
    const int* row_of_pair;
    int64_t R, tokens;
    int k, D;
};

// dq[t] += Σ_j dqg[row_of_pair[t*k+j]] in slot order; element_blocks(T*D).
PRISM_KERNEL(kElementThreads) gather_backward_kernel(GatherBwdParams p) {
    for (int64_t i = grid_first(); i < p.tokens * p.D; i += grid_step()) {
        const int64_t t = i / p.D;
        const int d = (int)(i % p.D);
        float* dst = p.dq + (t / p.R) * p.dq_image_stride + (t % p.R) * p.D + d;
        float acc = *dst;
        for (int j = 0; j < p.k; j++) acc += p.dqg[(int64_t)p.row_of_pair[t * p.k + j] * p.D + d];
        *dst = acc;
    }
}

template <class E>
struct CombineParams {
    E* a;
    int64_t a_image_stride;
    const E* og;
    const float* weights;
    const int* row_of_pair;
    int64_t R, tokens;
    int k, D;
};

// a[t] = Σ_j w_j·og[row_of_pair[t*k+j]] in slot order; element_blocks(T*D).
template <class E>
PRISM_KERNEL(kElementThreads) combine_forward_kernel(CombineParams<E> p) {
    for (int64_t i = grid_first(); i < p.tokens * p.D; i += grid_step()) {
        const int64_t t = i / p.D;
        const int d = (int)(i % p.D);
        float acc = 0.f;
        for (int j = 0; j < p.k; j++)
            acc += p.weights[t * p.k + j] * load_elem(&p.og[(int64_t)p.row_of_pair[t * p.k + j] * p.D + d]);
        store_elem(&p.a[(t / p.R) * p.a_image_stride + (t % p.R) * p.D + d], acc);
    }
}

// E: og's storage; G: dog's (uint16_t: bf16, written only).
template <class E, class G>
struct CombineBwdParams {
    G* dog;
    bool overwrite;  // dog written, not added into (each row has one writer)
    float* dweights;
    const float* da;
    int64_t da_image_stride;
    const E* og;
    const float* weights;
    const int* row_of_pair;
    int64_t R, tokens;
    int k, D;
};

// One warp per token: its dog rows (each owned by one (t, j)) and
// dweights[t, j] += ⟨dA, O⟩; warp_blocks(T) blocks of kWarpThreads.
template <class E, class G>
PRISM_KERNEL(kWarpThreads) combine_backward_kernel(CombineBwdParams<E, G> p) {
    const int64_t t = global_warp();
    const int lane = threadIdx.x % 32, D = p.D;
    if (t >= p.tokens) return;
    const float* g = p.da + (t / p.R) * p.da_image_stride + (t % p.R) * D;
    for (int j = 0; j < p.k; j++) {
        const int64_t row = p.row_of_pair[t * p.k + j];
        const float w = p.weights[t * p.k + j];
        float dw = 0.f;
        for (int d = lane; d < D; d += 32) {
            const float x = w * g[d];
            store_elem(&p.dog[row * D + d], p.overwrite ? x : load_elem(&p.dog[row * D + d]) + x);
            dw += g[d] * load_elem(&p.og[row * D + d]);
        }
        dw = warp_sum(dw);
        if (lane == 0) p.dweights[t * p.k + j] += dw;
    }
}

// ---- load balance -------------------------------------------------------------------
// Everything goes through the statistics of ops::aux_stats, as on the CPU:
// [2·nS+1] doubles (Σ_t p[t, S[s]], counts, tokens), this rank's or, in data
// parallel training, the sum over ranks. The loss is computed from them in
// float exactly as the CPU does; a world of one and a single process
// therefore give the same bits.

// The mass's column-sum term (reduce.cuh, accumulated in double) and where
// its sums go: probs[t, S[s]] → stats[s].
struct ProbsOfS {
    const float* probs;
    const int* S;
    int C;
    PRISM_DEVICE float operator()(int, int64_t t, int s) const { return probs[t * C + S[s]]; }
};
struct StoreMass {
    double* stats;
    PRISM_DEVICE void operator()(int, int s, double v) const { stats[s] = v; }
};

struct AuxCountsParams {
    double* stats;
    const int* counts;  // [nS], from the dispatch
    int64_t tokens;
    int nS;
};
constexpr int kAuxCountsThreads = 128;

// One block of kAuxCountsThreads: stats[nS + s] = counts[s], stats[2·nS] = tokens.
PRISM_KERNEL(kAuxCountsThreads) aux_counts_kernel(AuxCountsParams p) {
    for (int s = threadIdx.x; s < p.nS; s += blockDim.x) p.stats[p.nS + s] = (double)p.counts[s];
    if (threadIdx.x == 0) p.stats[2 * p.nS] = (double)p.tokens;
}

struct AuxLossParams {
    float* loss;
    float* dmass;  // [nS]: ∂loss/∂mass[s]
    float* share;  // all tokens / this rank's (1 on a single rank)
    const double* stats;
    int64_t tokens;  // this rank's
    int nS, k_eff;
    bool importance;  // α·CV²(mass), else Switch's α·|S|·Σ f_c·P_c
    float coef;
};

// One block of 32 threads, one of which computes the loss from the
// statistics in s order, as the CPU.
PRISM_KERNEL(32) aux_loss_kernel(AuxLossParams p) {
    if (threadIdx.x != 0 || blockIdx.x != 0) return;
    const int nS = p.nS;
    const float all_tokens = (float)p.stats[2 * nS];
    float loss = 0.f;
    if (!p.importance) {
        // L = α·|S|·Σ f_c·P_c, f_c = count/(T·k_eff) (no gradient), P_c = mass/T
        for (int s = 0; s < nS; s++) {
            const float mass = (float)p.stats[s], count = (float)p.stats[nS + s];
            const float f = count / (all_tokens * p.k_eff);
            loss += p.coef * nS * f * mass / all_tokens;
            p.dmass[s] = p.coef * nS * f / all_tokens;
        }
    } else {
        // L = α·CV²(mass) with the population variance
        float mu = 0.f;
        for (int s = 0; s < nS; s++) mu += (float)p.stats[s];
        mu /= nS;
        float var = 0.f;
        for (int s = 0; s < nS; s++) {
            const float m = (float)p.stats[s];
            var += (m - mu) * (m - mu);
        }
        var /= nS;
        loss = p.coef * var / (mu * mu);
        for (int s = 0; s < nS; s++) {
            const float m = (float)p.stats[s];
            p.dmass[s] = p.coef * (2.f * (m - mu) / (nS * mu * mu) - 2.f * var / (mu * mu * mu * nS));
        }
    }
    *p.share = all_tokens / float(p.tokens);
    *p.loss = loss;
}

struct AuxGradParams {
    float* dprobs;  // [tokens, C] += grad_scale·share·dmass[s] at column S[s]
    const float *dmass, *share;
    const int* S;
    int64_t tokens;
    int nS, C;
    float grad_scale;
};

// element_blocks(tokens·nS) blocks of kElementThreads.
PRISM_KERNEL(kElementThreads) aux_grad_kernel(AuxGradParams p) {
    const float sh = *p.share;
    for (int64_t i = grid_first(); i < p.tokens * p.nS; i += grid_step()) {
        const int s = (int)(i % p.nS);
        p.dprobs[(i / p.nS) * p.C + p.S[s]] += p.grad_scale * sh * p.dmass[s];
    }
}

// ---- z-loss ---------------------------------------------------------------------------
// coef·mean_t lse²: a device_sum (reduce.cuh) of LseSquared into ZLossOut.
struct LseSquared {
    const float* lse;
    PRISM_DEVICE double operator()(int64_t t) const { return (double)lse[t] * lse[t]; }
};
struct ZLossOut {
    float* loss;
    float coef;
    int64_t tokens;
    PRISM_DEVICE void operator()(double sum) const { *loss = coef * (float)sum / float(tokens); }
};

struct ZGradParams {
    float* dz;  // += grad_scale·coef·2·lse[t]/tokens · probs[t] (∂lse/∂z = softmax(z) = probs, zero outside S)
    int64_t dz_image_stride;
    const float *probs, *lse;
    int64_t R, tokens;  // R = nS·N tokens per image
    int C;
    float coef, grad_scale;
};

// element_blocks(tokens·C) blocks of kElementThreads.
PRISM_KERNEL(kElementThreads) z_grad_kernel(ZGradParams p) {
    for (int64_t i = grid_first(); i < p.tokens * p.C; i += grid_step()) {
        const int64_t t = i / p.C;
        const int c = (int)(i % p.C);
        const float g = p.grad_scale * p.coef * 2.f * p.lse[t] / float(p.tokens);
        p.dz[(t / p.R) * p.dz_image_stride + (t % p.R) * p.C + c] += g * p.probs[i];
    }
}

#ifdef PRISM_EMULATION
}  // inline namespace emulated
#endif
}  // namespace prism::routing
