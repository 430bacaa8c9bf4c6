// MoE-ViT's channel routing (DESIGN.md §1): router softmax + top-k, the
// load-balance and z losses, dispatch of (token, slot) pairs to the channel
// groups, and the weighted combine. The routed attention itself is in
// attention.cpp.
#include <cmath>
#include <vector>
#include "kernels/ops.h"
#include "kernels/cpu/instantiate.h"

namespace prism::ops {

template <class T>
void router_forward(T* probs, int* experts, T* weights, T* lse, const T* z,
                    int64_t z_image_stride, const uint8_t* in_S, const int* S, int B, int nS,
                    int N, int C, int k, Combine combine) {
    const int64_t R = (int64_t)nS * N;
    #pragma omp parallel for collapse(2)
    for (int b = 0; b < B; b++)
        for (int64_t r = 0; r < R; r++) {
            const int64_t t = b * R + r;
            const T* zt = z + b * z_image_stride + r * C;
            T* p = probs + t * C;
            T mx = -INFINITY;
            for (int s = 0; s < nS; s++) mx = std::max(mx, zt[S[s]]);
            T sum = 0;
            for (int c = 0; c < C; c++) {
                p[c] = in_S[c] ? std::exp(zt[c] - mx) : T(0);  // channels outside S: −inf
                sum += p[c];
            }
            for (int c = 0; c < C; c++) p[c] /= sum;
            lse[t] = mx + std::log(sum);
            // Top-k by repeated selection: scanning S in ascending channel order
            // with a strict '>' makes ties go to the lower channel.
            int* e = experts + t * k;
            T chosen_sum = 0;
            for (int j = 0; j < k; j++) {
                int best = -1;
                for (int s = 0; s < nS; s++) {
                    bool taken = false;
                    for (int i = 0; i < j; i++) taken |= (e[i] == s);
                    if (!taken && (best < 0 || p[S[s]] > p[S[best]])) best = s;
                }
                e[j] = best;
                chosen_sum += p[S[best]];
            }
            for (int j = 0; j < k; j++)
                weights[t * k + j] = combine == Combine::renorm ? p[S[e[j]]] / chosen_sum : p[S[e[j]]];
        }
}
PRISM_INSTANTIATE(router_forward)

template <class T>
void router_backward(T* dz, int64_t dz_image_stride, const T* probs, const int* experts,
                     const T* weights, const T* dweights, const T* dprobs, const int* S,
                     int B, int nS, int N, int C, int k, Combine combine) {
    const int64_t R = (int64_t)nS * N;
    #pragma omp parallel
    {
    std::vector<T> dp(C);  // one scratch row per thread, not per token
    #pragma omp for collapse(2)
    for (int b = 0; b < B; b++)
        for (int64_t r = 0; r < R; r++) {
            const int64_t t = b * R + r;
            const T* p = probs + t * C;
            for (int c = 0; c < C; c++) dp[c] = dprobs ? dprobs[t * C + c] : T(0);
            const int* e = experts + t * k;
            const T* w = weights + t * k;
            const T* dw = dweights + t * k;
            if (combine == Combine::softmax) {
                for (int j = 0; j < k; j++) dp[S[e[j]]] += dw[j];
            } else {
                // w_j = p_j / Σ_i p_i over the chosen: ∂/∂p_j = (dw_j − Σ_i dw_i w_i) / Σ_i p_i
                T chosen_sum = 0, dw_dot_w = 0;
                for (int j = 0; j < k; j++) { chosen_sum += p[S[e[j]]]; dw_dot_w += dw[j] * w[j]; }
                for (int j = 0; j < k; j++) dp[S[e[j]]] += (dw[j] - dw_dot_w) / chosen_sum;
            }
            // softmax backward over the channels of S
            T p_dot_dp = 0;
            for (int s = 0; s < nS; s++) p_dot_dp += p[S[s]] * dp[S[s]];
            T* dzt = dz + b * dz_image_stride + r * C;
            for (int s = 0; s < nS; s++) dzt[S[s]] += p[S[s]] * (dp[S[s]] - p_dot_dp);
        }
    }
}
PRISM_INSTANTIATE(router_backward)

template <class T>
void aux_stats(double* stats, const T* probs, const int* counts, const int* S, int64_t tokens,
               int nS, int C) {
    // Per-channel probability mass Σ_t p[t,c], summed in token order.
    for (int s = 0; s < nS; s++) stats[s] = 0;
    for (int64_t t = 0; t < tokens; t++)
        for (int s = 0; s < nS; s++) stats[s] += double(probs[t * C + S[s]]);
    for (int s = 0; s < nS; s++) stats[nS + s] = double(counts[s]);
    stats[2 * nS] = double(tokens);
}
PRISM_INSTANTIATE(aux_stats)

template <class T>
T aux_loss_forward_backward(T* dprobs, const T* probs, const int* counts, const int* S,
                            int64_t tokens, int nS, int C, int k_eff, AuxLoss kind, T coef,
                            T grad_scale, const double* all_ranks) {
    if (kind == AuxLoss::none || coef == T(0)) return T(0);
    std::vector<double> local;
    if (!all_ranks) {
        local.resize(2 * size_t(nS) + 1);
        aux_stats(local.data(), probs, counts, S, tokens, nS, C);
        all_ranks = local.data();
    }
    // mass and counts of the union of the ranks' tokens, and their number.
    std::vector<T> mass(nS), count(nS);
    for (int s = 0; s < nS; s++) mass[s] = T(all_ranks[s]), count[s] = T(all_ranks[nS + s]);
    const T all_tokens = T(all_ranks[2 * nS]);
    std::vector<T> dmass(nS);  // ∂loss/∂mass[s]
    T loss = 0;
    if (kind == AuxLoss::switch_) {
        // L = α·|S|·Σ f_c·P_c, f_c = count/(T·k_eff) (no gradient), P_c = mass/T
        for (int s = 0; s < nS; s++) {
            const T f = count[s] / (all_tokens * k_eff);
            loss += coef * nS * f * mass[s] / all_tokens;
            dmass[s] = coef * nS * f / all_tokens;
        }
    } else {
        // L = α·CV²(mass) with the population variance.
        T mu = 0;
        for (int s = 0; s < nS; s++) mu += mass[s];
        mu /= nS;
        T var = 0;
        for (int s = 0; s < nS; s++) var += (mass[s] - mu) * (mass[s] - mu);
        var /= nS;
        loss = coef * var / (mu * mu);
        for (int s = 0; s < nS; s++)
            dmass[s] = coef * (T(2) * (mass[s] - mu) / (nS * mu * mu) - T(2) * var / (mu * mu * mu * nS));
    }
    if (dprobs) {
        const T share = all_tokens / T(tokens);  // 1 on a single rank
        #pragma omp parallel for
        for (int64_t t = 0; t < tokens; t++)
            for (int s = 0; s < nS; s++) dprobs[t * C + S[s]] += grad_scale * share * dmass[s];
    }
    return loss;
}
PRISM_INSTANTIATE(aux_loss_forward_backward)

template <class T>
T z_loss_forward_backward(T* dz, int64_t dz_image_stride, const T* probs, const T* lse,
                          int B, int nS, int N, int C, T coef, T grad_scale) {
    if (coef == T(0)) return T(0);
    const int64_t R = (int64_t)nS * N, tokens = B * R;
    T loss = 0;
    for (int64_t t = 0; t < tokens; t++) loss += lse[t] * lse[t];
    loss = coef * loss / T(tokens);
    if (!dz) return loss;
    #pragma omp parallel for collapse(2)
    for (int b = 0; b < B; b++)
        for (int64_t r = 0; r < R; r++) {
            const int64_t t = b * R + r;
            // ∂lse/∂z = softmax(z) = probs (zero outside S)
            const T g = grad_scale * coef * T(2) * lse[t] / T(tokens);
            for (int c = 0; c < C; c++) dz[b * dz_image_stride + r * C + c] += g * probs[t * C + c];
        }
    return loss;
}
PRISM_INSTANTIATE(z_loss_forward_backward)

void moe_dispatch(int* offsets, int* pair_of_row, int* row_of_pair, int* counts,
                  const int* experts, int B, int nS, int N, int k) {
    const int64_t R = (int64_t)nS * N, G = (int64_t)B * nS;
    // histogram of groups g = b*nS + s ...
    for (int64_t g = 0; g <= G; g++) offsets[g] = 0;
    for (int b = 0; b < B; b++)
        for (int64_t i = 0; i < R * k; i++) offsets[b * nS + experts[b * R * k + i] + 1]++;
    for (int s = 0; s < nS; s++) counts[s] = 0;
    for (int64_t g = 0; g < G; g++) counts[g % nS] += offsets[g + 1];
    // ... exclusive scan ...
    for (int64_t g = 0; g < G; g++) offsets[g + 1] += offsets[g];
    // ... and a stable placement: pairs keep token order inside their group.
    std::vector<int> fill(offsets, offsets + G);
    for (int b = 0; b < B; b++)
        for (int64_t i = 0; i < R * k; i++) {
            const int64_t pair = b * R * k + i;
            const int row = fill[b * nS + experts[pair]]++;
            pair_of_row[row] = (int)pair;
            row_of_pair[pair] = row;
        }
}

template <class T>
void moe_gather_forward(T* qg, const T* q, int64_t q_image_stride, const int* pair_of_row,
                        int B, int nS, int N, int k, int D) {
    const int64_t R = (int64_t)nS * N, rows = B * R * k;
    #pragma omp parallel for
    for (int64_t i = 0; i < rows; i++) {
        const int64_t t = pair_of_row[i] / k, b = t / R, r = t % R;
        const T* src = q + b * q_image_stride + r * D;
        for (int d = 0; d < D; d++) qg[i * D + d] = src[d];
    }
}
PRISM_INSTANTIATE(moe_gather_forward)

template <class T>
void moe_gather_backward(T* dq, int64_t dq_image_stride, const T* dqg, const int* row_of_pair,
                         int B, int nS, int N, int k, int D) {
    const int64_t R = (int64_t)nS * N;
    #pragma omp parallel for collapse(2)
    for (int b = 0; b < B; b++)
        for (int64_t r = 0; r < R; r++) {
            const int64_t t = b * R + r;
            T* dst = dq + b * dq_image_stride + r * D;
            for (int j = 0; j < k; j++) {
                const T* src = dqg + (int64_t)row_of_pair[t * k + j] * D;
                for (int d = 0; d < D; d++) dst[d] += src[d];
            }
        }
}
PRISM_INSTANTIATE(moe_gather_backward)

template <class T>
void combine_forward(T* a, int64_t a_image_stride, const T* og, const T* weights,
                     const int* row_of_pair, int B, int nS, int N, int k, int D) {
    const int64_t R = (int64_t)nS * N;
    #pragma omp parallel for collapse(2)
    for (int b = 0; b < B; b++)
        for (int64_t r = 0; r < R; r++) {
            const int64_t t = b * R + r;
            T* dst = a + b * a_image_stride + r * D;
            for (int d = 0; d < D; d++) dst[d] = 0;
            for (int j = 0; j < k; j++) {  // slots in a fixed order
                const T w = weights[t * k + j];
                const T* src = og + (int64_t)row_of_pair[t * k + j] * D;
                for (int d = 0; d < D; d++) dst[d] += w * src[d];
            }
        }
}
PRISM_INSTANTIATE(combine_forward)

template <class T>
void combine_backward(T* dog, T* dweights, const T* da, int64_t da_image_stride, const T* og,
                      const T* weights, const int* row_of_pair, int B, int nS, int N, int k,
                      int D) {
    const int64_t R = (int64_t)nS * N;
    #pragma omp parallel for collapse(2)
    for (int b = 0; b < B; b++)
        for (int64_t r = 0; r < R; r++) {
            const int64_t t = b * R + r;
            const T* g = da + b * da_image_stride + r * D;
            for (int j = 0; j < k; j++) {
                const int64_t row = row_of_pair[t * k + j];
                const T w = weights[t * k + j];
                T dw = 0;
                for (int d = 0; d < D; d++) {
                    dog[row * D + d] += w * g[d];
                    dw += g[d] * og[row * D + d];  // ⟨dA, O⟩: the router's gradient
                }
                dweights[t * k + j] += dw;
            }
        }
}
PRISM_INSTANTIATE(combine_backward)

}  // namespace prism::ops
