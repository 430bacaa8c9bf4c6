// MoE-ViT's channel routing on the device (kernels/cpu/moe.cpp): the
// launchers of routing.cuh's kernels (router softmax + top-k, dispatch as a
// stable counting sort that never leaves the GPU, gather, the weighted
// combine) and the load-balance and z losses. The routed attention itself is
// in attention.cu.
// Every float sum has one owner thread or a fixed-order reduction; the only
// atomics are integer counts in the dispatch histogram, exact in any order.
#include <climits>

#include "kernels/cuda/common.cuh"
#include "kernels/cuda/routing.cuh"

namespace prism::cuda_ops {
using namespace cuda_detail;

void router_forward(float* probs, int* experts, float* weights, float* lse, const float* z,
                    int64_t z_image_stride, const uint8_t* in_S, const int* S, int B, int nS,
                    int N, int C, int k, Combine combine, cudaStream_t stream) {
    PRISM_CUDA_REQUIRE(k >= 1 && k <= nS, "router_forward: need 1 <= k <= nS");
    const int64_t tokens = (int64_t)B * nS * N;
    if (tokens <= 0) return;
    const routing::RouterFwdParams p{probs, weights, lse, experts, z, z_image_stride, in_S, S,
                                     B, nS, N, C, k, combine == Combine::renorm};
    PRISM_LAUNCH(routing::warp_blocks(tokens), routing::kWarpThreads, 0, stream, routing::router_forward_kernel)(p);
    PRISM_LAUNCH_CHECK();
}

void router_backward(float* dz, int64_t dz_image_stride, const float* probs, const int* experts,
                     const float* weights, const float* dweights, const float* dprobs,
                     const int* S, int B, int nS, int N, int C, int k, Combine combine,
                     cudaStream_t stream) {
    const int64_t tokens = (int64_t)B * nS * N;
    if (tokens <= 0) return;
    const routing::RouterBwdParams p{dz, dz_image_stride, probs, weights, dweights, dprobs, experts, S,
                                     B, nS, N, C, k, combine == Combine::renorm};
    PRISM_LAUNCH(routing::warp_blocks(tokens), routing::kWarpThreads, 0, stream, routing::router_backward_kernel)(p);
    PRISM_LAUNCH_CHECK();
}

void aux_stats(double* stats, const float* probs, const int* counts, const int* S, int64_t tokens,
               int nS, int C, cudaStream_t stream) {
    PRISM_CUDA_REQUIRE(nS >= 0 && tokens >= 0, "aux_stats: negative size");
    // Σ_t p[t, S[s]] in double: fixed chunks of tokens, each summed in a fixed
    // order, then the chunks in order (the CPU adds in token order; the two
    // differ only by double rounding, far below float resolution).
    column_sum_as<double>(1, tokens, nS, routing::ProbsOfS{probs, S, C}, routing::StoreMass{stats}, stream);
    const routing::AuxCountsParams p{stats, counts, tokens, nS};
    PRISM_LAUNCH(1, routing::kAuxCountsThreads, 0, stream, routing::aux_counts_kernel)(p);
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
    const routing::AuxLossParams p{loss, dmass, share, all_ranks, tokens, nS, k_eff,
                                   kind == AuxLoss::importance, coef};
    PRISM_LAUNCH(1, 32, 0, stream, routing::aux_loss_kernel)(p);
    PRISM_LAUNCH_CHECK();
    if (dprobs && tokens > 0) {
        const routing::AuxGradParams g{dprobs, dmass, share, S, tokens, nS, C, grad_scale};
        PRISM_LAUNCH(routing::element_blocks(tokens * nS), routing::kElementThreads, 0, stream,
                     routing::aux_grad_kernel)(g);
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
    device_sum(tokens, routing::LseSquared{lse}, routing::ZLossOut{loss, coef, tokens}, stream);
    if (dz && tokens > 0) {
        const routing::ZGradParams p{dz, dz_image_stride, probs, lse, R, tokens, C, coef, grad_scale};
        PRISM_LAUNCH(routing::element_blocks(tokens * C), routing::kElementThreads, 0, stream,
                     routing::z_grad_kernel)(p);
        PRISM_LAUNCH_CHECK();
    }
}

void moe_dispatch(int* offsets, int* pair_of_row, int* row_of_pair, int* counts,
                  const int* experts, int B, int nS, int N, int k, cudaStream_t stream) {
    using namespace routing;
    PRISM_CUDA_REQUIRE(B > 0 && nS > 0, "moe_dispatch: empty batch");
    PRISM_CUDA_REQUIRE((int64_t)B * nS * N * k <= INT_MAX, "moe_dispatch: too many pairs for int rows");
    PRISM_CUDA_REQUIRE(place_smem(nS) <= 48 * 1024, "moe_dispatch: too many channels");
    const DispatchParams p{offsets, pair_of_row, row_of_pair, counts, experts, (int64_t)nS * N * k, B, nS};
    PRISM_LAUNCH(B, kDispatchThreads, histogram_smem(nS), stream, dispatch_histogram_kernel)(p);
    PRISM_LAUNCH_CHECK();
    PRISM_LAUNCH(1, kDispatchThreads, scan_smem(), stream, dispatch_scan_kernel)(p);
    PRISM_LAUNCH_CHECK();
    PRISM_LAUNCH(B, kDispatchThreads, place_smem(nS), stream, dispatch_place_kernel)(p);
    PRISM_LAUNCH_CHECK();
}

void moe_gather_forward(float* qg, uint16_t* qg_bf16, const float* q, const uint16_t* q_bf16,
                        int64_t q_image_stride, const int* pair_of_row, int B, int nS, int N, int k, int D,
                        cudaStream_t stream) {
    using namespace routing;
    const int64_t R = (int64_t)nS * N, rows = B * R * k;
    PRISM_CUDA_REQUIRE(q_bf16 ? qg_bf16 && !qg : qg && !qg_bf16,
                       "moe_gather_forward: q and qg are both fp32 or both bf16");
    if (q_bf16)
        PRISM_LAUNCH(element_blocks(rows * D), kElementThreads, 0, stream, gather_forward_kernel)(
            GatherParams<uint16_t>{qg_bf16, q_bf16, q_image_stride, pair_of_row, R, rows, k, D});
    else
        PRISM_LAUNCH(element_blocks(rows * D), kElementThreads, 0, stream, gather_forward_kernel)(
            GatherParams<float>{qg, q, q_image_stride, pair_of_row, R, rows, k, D});
    PRISM_LAUNCH_CHECK();
}

void moe_gather_backward(float* dq, int64_t dq_image_stride, const float* dqg,
                         const int* row_of_pair, int B, int nS, int N, int k, int D,
                         cudaStream_t stream) {
    using namespace routing;
    const int64_t R = (int64_t)nS * N, tokens = B * R;
    PRISM_LAUNCH(element_blocks(tokens * D), kElementThreads, 0, stream, gather_backward_kernel)(
        GatherBwdParams{dq, dq_image_stride, dqg, row_of_pair, R, tokens, k, D});
    PRISM_LAUNCH_CHECK();
}

void combine_forward(float* a, uint16_t* a_bf16, int64_t a_image_stride, const float* og, const uint16_t* og_bf16,
                     const float* weights, const int* row_of_pair, int B, int nS, int N, int k, int D,
                     cudaStream_t stream) {
    using namespace routing;
    const int64_t R = (int64_t)nS * N, tokens = B * R;
    PRISM_CUDA_REQUIRE(og_bf16 ? a_bf16 && !a : a && !a_bf16, "combine_forward: og and a are both fp32 or both bf16");
    if (og_bf16)
        PRISM_LAUNCH(element_blocks(tokens * D), kElementThreads, 0, stream, combine_forward_kernel)(
            CombineParams<uint16_t>{a_bf16, a_image_stride, og_bf16, weights, row_of_pair, R, tokens, k, D});
    else
        PRISM_LAUNCH(element_blocks(tokens * D), kElementThreads, 0, stream, combine_forward_kernel)(
            CombineParams<float>{a, a_image_stride, og, weights, row_of_pair, R, tokens, k, D});
    PRISM_LAUNCH_CHECK();
}

void combine_backward(float* dog, uint16_t* dog_bf16, bool overwrite_dog, float* dweights, const float* da,
                      int64_t da_image_stride, const float* og, const uint16_t* og_bf16, const float* weights,
                      const int* row_of_pair, int B, int nS, int N, int k, int D, cudaStream_t stream) {
    using namespace routing;
    const int64_t R = (int64_t)nS * N, tokens = B * R;
    if (tokens <= 0) return;
    PRISM_CUDA_REQUIRE(dog_bf16 ? overwrite_dog && !dog && og_bf16 : dog != nullptr,
                       "combine_backward: dog is fp32, or written in bf16 (with og in bf16)");
    const unsigned grid = warp_blocks(tokens);
    if (dog_bf16)
        PRISM_LAUNCH(grid, kWarpThreads, 0, stream, combine_backward_kernel)(CombineBwdParams<uint16_t, uint16_t>{
            dog_bf16, true, dweights, da, da_image_stride, og_bf16, weights, row_of_pair, R, tokens, k, D});
    else if (og_bf16)
        PRISM_LAUNCH(grid, kWarpThreads, 0, stream, combine_backward_kernel)(CombineBwdParams<uint16_t, float>{
            dog, overwrite_dog, dweights, da, da_image_stride, og_bf16, weights, row_of_pair, R, tokens, k, D});
    else
        PRISM_LAUNCH(grid, kWarpThreads, 0, stream, combine_backward_kernel)(CombineBwdParams<float, float>{
            dog, overwrite_dog, dweights, da, da_image_stride, og, weights, row_of_pair, R, tokens, k, D});
    PRISM_LAUNCH_CHECK();
}

}  // namespace prism::cuda_ops
