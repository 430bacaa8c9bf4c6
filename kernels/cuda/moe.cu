// MoE-ViT's channel routing on the device (kernels/cpu/moe.cpp): router
// softmax + top-k (one warp per token), the load-balance and z losses,
// dispatch as a stable counting sort that never leaves the GPU, gather, and
// the weighted combine. The routed attention itself is in attention.cu.
// Every float sum has one owner thread or a fixed-order reduction; the only
// atomics are integer counts in the dispatch histogram, exact in any order.
#include <climits>

#include "kernels/cuda/common.cuh"

namespace prism::cuda_ops {
using namespace cuda_detail;

namespace {

constexpr int kWarpsPerBlock = 8;

__device__ __forceinline__ int64_t global_warp() {
    return ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) / 32;
}
inline unsigned warp_blocks(int64_t warps) {
    return (unsigned)((warps + kWarpsPerBlock - 1) / kWarpsPerBlock);
}

// The order of the top-k: higher probability first, ties → lower position s
// (S is sorted, so the lower channel), exactly the CPU's repeated selection.
__device__ __forceinline__ bool ranks_before(float pa, int sa, float pb, int sb) {
    return pa > pb || (pa == pb && sa < sb);
}

__global__ void router_forward_kernel(float* probs, int* experts, float* weights, float* lse,
                                      const float* z, int64_t z_image_stride, const uint8_t* in_S,
                                      const int* S, int B, int nS, int N, int C, int k,
                                      bool renorm) {
    const int64_t R = (int64_t)nS * N, t = global_warp();
    const int lane = threadIdx.x % 32;
    if (t >= B * R) return;
    const float* zt = z + (t / R) * z_image_stride + (t % R) * C;
    float mx = -INFINITY;
    for (int s = lane; s < nS; s += 32) mx = fmaxf(mx, zt[S[s]]);
    mx = warp_max(mx);
    float* p = probs + t * C;
    float sum = 0.f;
    for (int c = lane; c < C; c += 32) {
        const float e = in_S[c] ? expf(zt[c] - mx) : 0.f;  // channels outside S: −inf
        p[c] = e;
        sum += e;
    }
    sum = warp_sum(sum);
    for (int c = lane; c < C; c += 32) p[c] = p[c] / sum;
    if (lane == 0) lse[t] = mx + logf(sum);
    // Top-k: pick j is the best candidate ranked after pick j-1. The
    // probabilities are recomputed with the same operations, so the same bits.
    float prev_p = INFINITY, chosen_sum = 0.f;
    int prev_s = -1;
    int* e = experts + t * k;
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
            const float op = __shfl_xor_sync(0xffffffffu, best_p, o);
            const int os = __shfl_xor_sync(0xffffffffu, best_s, o);
            if (ranks_before(op, os, best_p, best_s)) {
                best_p = op;
                best_s = os;
            }
        }
        if (lane == 0) e[j] = best_s;
        chosen_sum += best_p;
        prev_p = best_p;
        prev_s = best_s;
    }
    __syncwarp();
    if (lane < k) {
        const float w = p[S[e[lane]]];
        weights[t * k + lane] = renorm ? w / chosen_sum : w;
    }
    for (int j = 32 + lane; j < k; j += 32) {  // k > 32: the rest
        const float w = p[S[e[j]]];
        weights[t * k + j] = renorm ? w / chosen_sum : w;
    }
}

// dp[S[s]] of token t: the losses' part plus the combine weights' part.
__device__ __forceinline__ float router_dp(int s, int64_t t, const float* dprobs, const int* S,
                                           int C, const int* e, const float* dw, int k,
                                           bool renorm, float dw_dot_w, float chosen_sum) {
    float dp = dprobs ? dprobs[t * C + S[s]] : 0.f;
    for (int j = 0; j < k; j++)
        if (e[j] == s) dp += renorm ? (dw[j] - dw_dot_w) / chosen_sum : dw[j];
    return dp;
}

__global__ void router_backward_kernel(float* dz, int64_t dz_image_stride, const float* probs,
                                       const int* experts, const float* weights,
                                       const float* dweights, const float* dprobs, const int* S,
                                       int B, int nS, int N, int C, int k, bool renorm) {
    const int64_t R = (int64_t)nS * N, t = global_warp();
    const int lane = threadIdx.x % 32;
    if (t >= B * R) return;
    const float* p = probs + t * C;
    const int* e = experts + t * k;
    const float* w = weights + t * k;
    const float* dw = dweights + t * k;
    // w_j = p_j / Σ_i p_i over the chosen: ∂/∂p_j = (dw_j − Σ_i dw_i w_i) / Σ_i p_i
    float chosen_sum = 0.f, dw_dot_w = 0.f;
    if (renorm)
        for (int j = 0; j < k; j++) {
            chosen_sum += p[S[e[j]]];
            dw_dot_w += dw[j] * w[j];
        }
    float p_dot_dp = 0.f;
    for (int s = lane; s < nS; s += 32)
        p_dot_dp += p[S[s]] * router_dp(s, t, dprobs, S, C, e, dw, k, renorm, dw_dot_w, chosen_sum);
    p_dot_dp = warp_sum(p_dot_dp);
    float* dzt = dz + (t / R) * dz_image_stride + (t % R) * C;
    for (int s = lane; s < nS; s += 32) {
        const float dp = router_dp(s, t, dprobs, S, C, e, dw, k, renorm, dw_dot_w, chosen_sum);
        dzt[S[s]] += p[S[s]] * (dp - p_dot_dp);
    }
}

// ---- load balance -------------------------------------------------------------------
// Everything goes through the statistics of ops::aux_stats, as on the CPU:
// [2*nS+1] doubles (Σ_t p[t, S[s]], counts, tokens), this rank's or, in data
// parallel training, the sum over ranks. The loss is computed from them in
// float exactly as the CPU does; a world of one and a single process
// therefore give the same bits.
struct ProbsOfS {  // probs[t, S[s]], widened to double by the accumulator
    const float* probs;
    const int* S;
    int C;
    __device__ float operator()(int, int64_t t, int s) const { return probs[t * C + S[s]]; }
};
struct StoreMass {  // stats[s] = Σ_t p[t, S[s]]
    double* stats;
    __device__ void operator()(int, int s, double v) const { stats[s] = v; }
};

__global__ void aux_counts_kernel(double* stats, const int* counts, int64_t tokens, int nS) {
    for (int s = threadIdx.x; s < nS; s += blockDim.x) stats[nS + s] = (double)counts[s];
    if (threadIdx.x == 0) stats[2 * nS] = (double)tokens;
}

// One thread: the loss from the statistics (as the CPU, in s order),
// ∂loss/∂mass into dmass, and this rank's share of the tokens (all tokens /
// this rank's; 1 on a single rank) into *share.
__global__ void aux_loss_kernel(float* loss_out, float* dmass, float* share, const double* stats,
                                int64_t tokens, int nS, int k_eff, bool importance, float coef) {
    if (threadIdx.x != 0 || blockIdx.x != 0) return;
    const float all_tokens = (float)stats[2 * nS];
    float loss = 0.f;
    if (!importance) {
        // L = α·|S|·Σ f_c·P_c, f_c = count/(T·k_eff) (no gradient), P_c = mass/T
        for (int s = 0; s < nS; s++) {
            const float mass = (float)stats[s], count = (float)stats[nS + s];
            const float f = count / (all_tokens * k_eff);
            loss += coef * nS * f * mass / all_tokens;
            dmass[s] = coef * nS * f / all_tokens;
        }
    } else {
        // L = α·CV²(mass) with the population variance
        float mu = 0.f;
        for (int s = 0; s < nS; s++) mu += (float)stats[s];
        mu /= nS;
        float var = 0.f;
        for (int s = 0; s < nS; s++) {
            const float m = (float)stats[s];
            var += (m - mu) * (m - mu);
        }
        var /= nS;
        loss = coef * var / (mu * mu);
        for (int s = 0; s < nS; s++) {
            const float m = (float)stats[s];
            dmass[s] = coef * (2.f * (m - mu) / (nS * mu * mu) - 2.f * var / (mu * mu * mu * nS));
        }
    }
    *share = all_tokens / float(tokens);
    *loss_out = loss;
}

__global__ void aux_grad_kernel(float* dprobs, const float* dmass, const float* share, const int* S,
                                int64_t tokens, int nS, int C, float grad_scale) {
    const float sh = *share;
    PRISM_GRID_STRIDE(i, tokens * nS) {
        const int s = (int)(i % nS);
        dprobs[(i / nS) * C + S[s]] += grad_scale * sh * dmass[s];
    }
}

// ---- z-loss ---------------------------------------------------------------------------
struct LseSquared {
    const float* lse;
    __device__ double operator()(int64_t t) const { return (double)lse[t] * lse[t]; }
};
struct ZLossOut {
    float* loss;
    float coef;
    int64_t tokens;
    __device__ void operator()(double sum) const { *loss = coef * (float)sum / float(tokens); }
};

__global__ void z_grad_kernel(float* dz, int64_t dz_image_stride, const float* probs,
                              const float* lse, int64_t R, int64_t tokens, int C, float coef,
                              float grad_scale) {
    PRISM_GRID_STRIDE(i, tokens * C) {
        const int64_t t = i / C;
        const int c = (int)(i % C);
        // ∂lse/∂z = softmax(z) = probs (zero outside S)
        const float g = grad_scale * coef * 2.f * lse[t] / float(tokens);
        dz[(t / R) * dz_image_stride + (t % R) * C + c] += g * probs[i];
    }
}

// ---- dispatch --------------------------------------------------------------------------
constexpr int kDispatchThreads = 256, kDispatchWarps = kDispatchThreads / 32;

// Block b: the histogram of image b's pairs over its groups → offsets[b*nS + s + 1].
__global__ void dispatch_histogram_kernel(int* offsets, const int* experts, int64_t pairs_per_image,
                                          int nS) {
    extern __shared__ int hist[];  // [nS]
    const int b = blockIdx.x;
    for (int s = threadIdx.x; s < nS; s += blockDim.x) hist[s] = 0;
    __syncthreads();
    const int* e = experts + b * pairs_per_image;
    for (int64_t i = threadIdx.x; i < pairs_per_image; i += blockDim.x) atomicAdd(&hist[e[i]], 1);
    __syncthreads();
    for (int s = threadIdx.x; s < nS; s += blockDim.x) offsets[(int64_t)b * nS + s + 1] = hist[s];
    if (b == 0 && threadIdx.x == 0) offsets[0] = 0;
}

// One block: counts[s] = Σ_b group sizes, then offsets becomes the inclusive
// scan of the sizes (offsets[0] = 0: an exclusive scan of the groups). Each
// thread scans a contiguous run; the runs' totals are scanned in shared memory.
__global__ void dispatch_scan_kernel(int* offsets, int* counts, int B, int nS) {
    __shared__ int run_total[kDispatchThreads];
    const int64_t G = (int64_t)B * nS;
    for (int s = threadIdx.x; s < nS; s += blockDim.x) {
        int c = 0;
        for (int b = 0; b < B; b++) c += offsets[(int64_t)b * nS + s + 1];
        counts[s] = c;
    }
    const int64_t per = (G + kDispatchThreads - 1) / kDispatchThreads;
    const int64_t i0 = threadIdx.x * per, i1 = i0 + per < G ? i0 + per : G;
    int total = 0;
    for (int64_t i = i0; i < i1; i++) total += offsets[i + 1];
    run_total[threadIdx.x] = total;
    __syncthreads();
    if (threadIdx.x == 0)
        for (int i = 1; i < kDispatchThreads; i++) run_total[i] += run_total[i - 1];
    __syncthreads();
    int acc = threadIdx.x ? run_total[threadIdx.x - 1] : 0;
    for (int64_t i = i0; i < i1; i++) {
        acc += offsets[i + 1];
        offsets[i + 1] = acc;
    }
}

// Block b places image b's pairs in pair order, kDispatchThreads at a time: a
// pair's row is its group's offset + the pairs of its group placed before this
// round + those of earlier warps in this round + earlier lanes of its warp.
__global__ void dispatch_place_kernel(int* pair_of_row, int* row_of_pair, const int* offsets,
                                      const int* experts, int64_t pairs_per_image, int nS) {
    extern __shared__ int sh[];
    int* placed = sh;                 // [nS]
    int* warp_count = sh + nS;        // [kDispatchWarps][nS]
    const int b = blockIdx.x, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    for (int s = threadIdx.x; s < nS; s += blockDim.x) placed[s] = 0;
    const int64_t base = b * pairs_per_image;
    for (int64_t r0 = 0; r0 < pairs_per_image; r0 += kDispatchThreads) {
        for (int i = threadIdx.x; i < kDispatchWarps * nS; i += blockDim.x) warp_count[i] = 0;
        __syncthreads();
        const int64_t i = r0 + threadIdx.x;
        const int s = i < pairs_per_image ? experts[base + i] : -1;
        const unsigned same = __match_any_sync(0xffffffffu, s);
        const int rank = __popc(same & ((1u << lane) - 1));
        if (s >= 0 && rank == 0) warp_count[warp * nS + s] = __popc(same);
        __syncthreads();
        if (s >= 0) {
            int row = offsets[(int64_t)b * nS + s] + placed[s] + rank;
            for (int w = 0; w < warp; w++) row += warp_count[w * nS + s];
            pair_of_row[row] = (int)(base + i);
            row_of_pair[base + i] = row;
        }
        __syncthreads();
        for (int t = threadIdx.x; t < nS; t += blockDim.x)
            for (int w = 0; w < kDispatchWarps; w++) placed[t] += warp_count[w * nS + t];
        __syncthreads();  // before the next round clears warp_count
    }
}

// ---- gather and combine ----------------------------------------------------------------
// E: fp32, or bf16 as the bf16 mode stores q and qg (copied as they are).
template <class E>
__global__ void gather_forward_kernel(E* qg, const E* q, int64_t q_image_stride,
                                      const int* pair_of_row, int64_t R, int k, int D,
                                      int64_t rows) {
    PRISM_GRID_STRIDE(i, rows * D) {
        const int64_t row = i / D, t = pair_of_row[row] / k;
        qg[i] = q[(t / R) * q_image_stride + (t % R) * D + i % D];
    }
}

// dq[t] += Σ_j dqg[row_of_pair[t*k+j]] in slot order; a[t] = Σ_j w_j·og[...] likewise.
__global__ void gather_backward_kernel(float* dq, int64_t dq_image_stride, const float* dqg,
                                       const int* row_of_pair, int64_t R, int64_t tokens, int k,
                                       int D) {
    PRISM_GRID_STRIDE(i, tokens * D) {
        const int64_t t = i / D;
        const int d = (int)(i % D);
        float* dst = dq + (t / R) * dq_image_stride + (t % R) * D + d;
        float acc = *dst;
        for (int j = 0; j < k; j++) acc += dqg[(int64_t)row_of_pair[t * k + j] * D + d];
        *dst = acc;
    }
}

// E: og and a in fp32, or both in bf16 (the bf16 mode); the sum is fp32.
template <class E>
__global__ void combine_forward_kernel(E* a, int64_t a_image_stride, const E* og,
                                       const float* weights, const int* row_of_pair, int64_t R,
                                       int64_t tokens, int k, int D) {
    PRISM_GRID_STRIDE(i, tokens * D) {
        const int64_t t = i / D;
        const int d = (int)(i % D);
        float acc = 0.f;
        for (int j = 0; j < k; j++)
            acc += weights[t * k + j] * load_as(&og[(int64_t)row_of_pair[t * k + j] * D + d]);
        store_as(&a[(t / R) * a_image_stride + (t % R) * D + d], acc);
    }
}

// One warp per token: dog rows (each owned by one (t, j)) and dweights[t, j] += ⟨dA, O⟩.
// E: og in fp32, or bf16 as the bf16 mode stores it, and then dog written in
// bf16 too (G = uint16_t: overwrite only). overwrite: dog is written, not
// added into (each row has one writer).
template <class E, class G>
__global__ void combine_backward_kernel(G* dog, bool overwrite, float* dweights, const float* da,
                                        int64_t da_image_stride, const E* og,
                                        const float* weights, const int* row_of_pair, int64_t R,
                                        int64_t tokens, int k, int D) {
    const int64_t t = global_warp();
    const int lane = threadIdx.x % 32;
    if (t >= tokens) return;
    const float* g = da + (t / R) * da_image_stride + (t % R) * D;
    for (int j = 0; j < k; j++) {
        const int64_t row = row_of_pair[t * k + j];
        const float w = weights[t * k + j];
        float dw = 0.f;
        for (int d = lane; d < D; d += 32) {
            const float x = w * g[d];
            store_as(&dog[row * D + d], overwrite ? x : load_as(&dog[row * D + d]) + x);
            dw += g[d] * load_as(&og[row * D + d]);
        }
        dw = warp_sum(dw);
        if (lane == 0) dweights[t * k + j] += dw;
    }
}

}  // namespace

void router_forward(float* probs, int* experts, float* weights, float* lse, const float* z,
                    int64_t z_image_stride, const uint8_t* in_S, const int* S, int B, int nS,
                    int N, int C, int k, Combine combine, cudaStream_t stream) {
    PRISM_CUDA_REQUIRE(k >= 1 && k <= nS, "router_forward: need 1 <= k <= nS");
    const int64_t tokens = (int64_t)B * nS * N;
    if (tokens <= 0) return;
    router_forward_kernel<<<warp_blocks(tokens), kWarpsPerBlock * 32, 0, stream>>>(
        probs, experts, weights, lse, z, z_image_stride, in_S, S, B, nS, N, C, k,
        combine == Combine::renorm);
    PRISM_LAUNCH_CHECK();
}

void router_backward(float* dz, int64_t dz_image_stride, const float* probs, const int* experts,
                     const float* weights, const float* dweights, const float* dprobs,
                     const int* S, int B, int nS, int N, int C, int k, Combine combine,
                     cudaStream_t stream) {
    const int64_t tokens = (int64_t)B * nS * N;
    if (tokens <= 0) return;
    router_backward_kernel<<<warp_blocks(tokens), kWarpsPerBlock * 32, 0, stream>>>(
        dz, dz_image_stride, probs, experts, weights, dweights, dprobs, S, B, nS, N, C, k,
        combine == Combine::renorm);
    PRISM_LAUNCH_CHECK();
}

void aux_stats(double* stats, const float* probs, const int* counts, const int* S, int64_t tokens,
               int nS, int C, cudaStream_t stream) {
    PRISM_CUDA_REQUIRE(nS >= 0 && tokens >= 0, "aux_stats: negative size");
    // Σ_t p[t, S[s]] in double: fixed chunks of tokens, each summed in a fixed
    // order, then the chunks in order (the CPU adds in token order; the two
    // differ only by double rounding, far below float resolution).
    column_sum_as<double>(1, tokens, nS, ProbsOfS{probs, S, C}, StoreMass{stats}, stream);
    aux_counts_kernel<<<1, 128, 0, stream>>>(stats, counts, tokens, nS);
    PRISM_LAUNCH_CHECK();
}

void aux_loss_forward_backward(float* loss, float* dprobs, const float* probs, const int* counts,
                               const int* S, int64_t tokens, int nS, int C, int k_eff,
                               AuxLoss kind, float coef, float grad_scale, const double* all_ranks,
                               cudaStream_t stream) {
    if (kind == AuxLoss::none || coef == 0.f || nS <= 0) {
        PRISM_CUDA_CHECK(cudaMemsetAsync(loss, 0, sizeof(float), stream));
        return;
    }
    // [this rank's stats when all_ranks is null: 2*nS+1 doubles][dmass: nS floats][share]
    const size_t stats_bytes = all_ranks ? 0 : sizeof(double) * (2 * (size_t)nS + 1);
    Scratch scratch(stats_bytes + sizeof(float) * ((size_t)nS + 1), stream);
    float* dmass = reinterpret_cast<float*>(scratch.as<char>() + stats_bytes);  // ∂loss/∂mass
    float* share = dmass + nS;
    if (!all_ranks) {
        aux_stats(scratch.as<double>(), probs, counts, S, tokens, nS, C, stream);
        all_ranks = scratch.as<double>();
    }
    aux_loss_kernel<<<1, 32, 0, stream>>>(loss, dmass, share, all_ranks, tokens, nS, k_eff,
                                          kind == AuxLoss::importance, coef);
    PRISM_LAUNCH_CHECK();
    if (dprobs && tokens > 0) {
        aux_grad_kernel<<<grid_for(tokens * nS), kThreads, 0, stream>>>(dprobs, dmass, share, S,
                                                                       tokens, nS, C, grad_scale);
        PRISM_LAUNCH_CHECK();
    }
}

void z_loss_forward_backward(float* loss, float* dz, int64_t dz_image_stride, const float* probs,
                             const float* lse, int B, int nS, int N, int C, float coef,
                             float grad_scale, cudaStream_t stream) {
    if (coef == 0.f) {
        PRISM_CUDA_CHECK(cudaMemsetAsync(loss, 0, sizeof(float), stream));
        return;
    }
    const int64_t R = (int64_t)nS * N, tokens = B * R;
    device_sum(tokens, LseSquared{lse}, ZLossOut{loss, coef, tokens}, stream);
    if (dz && tokens > 0) {
        z_grad_kernel<<<grid_for(tokens * C), kThreads, 0, stream>>>(
            dz, dz_image_stride, probs, lse, R, tokens, C, coef, grad_scale);
        PRISM_LAUNCH_CHECK();
    }
}

void moe_dispatch(int* offsets, int* pair_of_row, int* row_of_pair, int* counts,
                  const int* experts, int B, int nS, int N, int k, cudaStream_t stream) {
    PRISM_CUDA_REQUIRE(B > 0 && nS > 0, "moe_dispatch: empty batch");
    PRISM_CUDA_REQUIRE((int64_t)B * nS * N * k <= INT_MAX, "moe_dispatch: too many pairs for int rows");
    const int64_t pairs_per_image = (int64_t)nS * N * k;
    dispatch_histogram_kernel<<<B, kDispatchThreads, sizeof(int) * nS, stream>>>(
        offsets, experts, pairs_per_image, nS);
    PRISM_LAUNCH_CHECK();
    dispatch_scan_kernel<<<1, kDispatchThreads, 0, stream>>>(offsets, counts, B, nS);
    PRISM_LAUNCH_CHECK();
    const size_t smem = sizeof(int) * (size_t)nS * (1 + kDispatchWarps);
    PRISM_CUDA_REQUIRE(smem <= 48 * 1024, "moe_dispatch: too many channels");
    dispatch_place_kernel<<<B, kDispatchThreads, smem, stream>>>(pair_of_row, row_of_pair, offsets,
                                                                 experts, pairs_per_image, nS);
    PRISM_LAUNCH_CHECK();
}

void moe_gather_forward(float* qg, uint16_t* qg_bf16, const float* q, const uint16_t* q_bf16,
                        int64_t q_image_stride, const int* pair_of_row, int B, int nS, int N, int k, int D,
                        cudaStream_t stream) {
    const int64_t R = (int64_t)nS * N, rows = B * R * k;
    PRISM_CUDA_REQUIRE(q_bf16 ? qg_bf16 && !qg : qg && !qg_bf16,
                       "moe_gather_forward: q and qg are both fp32 or both bf16");
    if (q_bf16)
        gather_forward_kernel<<<grid_for(rows * D), kThreads, 0, stream>>>(qg_bf16, q_bf16, q_image_stride,
                                                                           pair_of_row, R, k, D, rows);
    else
        gather_forward_kernel<<<grid_for(rows * D), kThreads, 0, stream>>>(qg, q, q_image_stride, pair_of_row, R,
                                                                           k, D, rows);
    PRISM_LAUNCH_CHECK();
}

void moe_gather_backward(float* dq, int64_t dq_image_stride, const float* dqg,
                         const int* row_of_pair, int B, int nS, int N, int k, int D,
                         cudaStream_t stream) {
    const int64_t R = (int64_t)nS * N, tokens = B * R;
    gather_backward_kernel<<<grid_for(tokens * D), kThreads, 0, stream>>>(
        dq, dq_image_stride, dqg, row_of_pair, R, tokens, k, D);
    PRISM_LAUNCH_CHECK();
}

void combine_forward(float* a, uint16_t* a_bf16, int64_t a_image_stride, const float* og, const uint16_t* og_bf16,
                     const float* weights, const int* row_of_pair, int B, int nS, int N, int k, int D,
                     cudaStream_t stream) {
    const int64_t R = (int64_t)nS * N, tokens = B * R;
    PRISM_CUDA_REQUIRE(og_bf16 ? a_bf16 && !a : a && !a_bf16, "combine_forward: og and a are both fp32 or both bf16");
    if (og_bf16)
        combine_forward_kernel<<<grid_for(tokens * D), kThreads, 0, stream>>>(a_bf16, a_image_stride, og_bf16,
                                                                              weights, row_of_pair, R, tokens, k, D);
    else
        combine_forward_kernel<<<grid_for(tokens * D), kThreads, 0, stream>>>(a, a_image_stride, og, weights,
                                                                              row_of_pair, R, tokens, k, D);
    PRISM_LAUNCH_CHECK();
}

void combine_backward(float* dog, uint16_t* dog_bf16, bool overwrite_dog, float* dweights, const float* da,
                      int64_t da_image_stride, const float* og, const uint16_t* og_bf16, const float* weights,
                      const int* row_of_pair, int B, int nS, int N, int k, int D, cudaStream_t stream) {
    const int64_t R = (int64_t)nS * N, tokens = B * R;
    if (tokens <= 0) return;
    PRISM_CUDA_REQUIRE(dog_bf16 ? overwrite_dog && !dog && og_bf16 : dog != nullptr,
                       "combine_backward: dog is fp32, or written in bf16 (with og in bf16)");
    const unsigned grid = warp_blocks(tokens), threads = kWarpsPerBlock * 32;
    if (dog_bf16)
        combine_backward_kernel<<<grid, threads, 0, stream>>>(dog_bf16, true, dweights, da, da_image_stride, og_bf16,
                                                              weights, row_of_pair, R, tokens, k, D);
    else if (og_bf16)
        combine_backward_kernel<<<grid, threads, 0, stream>>>(dog, overwrite_dog, dweights, da, da_image_stride,
                                                              og_bf16, weights, row_of_pair, R, tokens, k, D);
    else
        combine_backward_kernel<<<grid, threads, 0, stream>>>(dog, overwrite_dog, dweights, da, da_image_stride, og,
                                                              weights, row_of_pair, R, tokens, k, D);
    PRISM_LAUNCH_CHECK();
}

}  // namespace prism::cuda_ops
