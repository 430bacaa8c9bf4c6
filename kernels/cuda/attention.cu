// Attention on the device, built like kernels/cpu/attention.cpp from one
// piece: the queries of a "set" attending to that set's M key/value rows, per
// head softmax(q_h·K_hᵀ/√dh)·V_h. Dense self-attention (a set is an image),
// MoE-ViT's routed cross-attention (a set is an (image, channel) group whose
// queries are rows offsets[g]..offsets[g+1] of the gathered buffer) and its CLS
// row (one query per image) differ only in the strides they pass.
//
// Straightforward kernels (correct first; issue 5 makes them fast):
// - forward, one block per (set, head, 32-query tile): raw scores into the
//   probs buffer while key tiles stream through shared memory, then the
//   softmax in place, then P·V with value tiles in shared memory;
// - backward in two kernels, with no atomics: per (set, head, query tile) the
//   row sums δ = Σ_m p·(dO·v_m) and dq; per (set, head, 32-key tile) dK and dV,
//   each key's sum running over the set's queries in order.
#include <cmath>

#include "kernels/cuda/common.cuh"

namespace prism::cuda_ops {
using namespace cuda_detail;

namespace {

constexpr int kWarps = 4, kBlock = kWarps * 32;
constexpr int kQT = 32;               // queries per tile (forward, dq)
constexpr int kQPW = kQT / kWarps;    // queries per warp
constexpr int kKT = 32;               // keys per tile: one per lane
constexpr int kKPW = kKT / kWarps;    // keys per warp (dK, dV)
constexpr int kQT2 = 16;              // queries per step of the dK/dV kernel
constexpr int kMaxDh = 128;
constexpr int kDPL = kMaxDh / 32;     // head dims per lane, at most

// Rows of one operand: row r of set g is p + g*set + r*row; head h adds h*dh.
template <class T>
struct Rows {
    T* p;
    int64_t set, row;
    __device__ T* at(int g, int64_t r) const { return p + g * set + r * row; }
};

struct Attn {
    int nq;              // queries per set when offsets == nullptr
    const int* offsets;  // else: set g's queries are rows offsets[g]..offsets[g+1]
    int M, Hd, dh;
    float scale;
    Rows<const float> q, k, v;
    int64_t p_head;      // probs row of (g, query r, head h): probs.at(g, r) + h*p_head
};

struct Fwd {
    Attn a;
    Rows<float> out, probs;
};

struct Bwd {
    Attn a;
    Rows<const float> dout, probs;
    Rows<float> dq, dk, dv;  // dk, dv: same set/row strides as k, v
    float* delta;            // [query row][Hd], query row = set*nq + i or the gathered row
};

__device__ __forceinline__ void set_queries(const Attn& a, int g, int& first, int& count) {
    first = a.offsets ? a.offsets[g] : 0;
    count = a.offsets ? a.offsets[g + 1] - first : a.nq;
}

// Loads rows [r0, r0 + n) of head h (n ≤ tile rows; the rest zero) into a
// [tile][ld] shared array.
__device__ __forceinline__ void load_tile(float* dst, int ld, int tile, const Rows<const float>& src,
                                          int g, int64_t r0, int n, int h, int dh) {
    for (int e = threadIdx.x; e < tile * dh; e += blockDim.x) {
        const int i = e / dh, d = e % dh;
        dst[i * ld + d] = i < n ? src.at(g, r0 + i)[h * dh + d] : 0.f;
    }
}

__device__ __forceinline__ float dot_smem(const float* a, const float* b, int dh) {
    float s = 0.f;
    for (int d = 0; d < dh; d++) s += a[d] * b[d];
    return s;
}

// The (set, head, query tile) of a block in the query-tile kernels, with
// its shared memory: a [kQT][dh] tile of query-side rows, a [kKT][dh+1] key
// or value tile (padded: lanes read different rows without bank conflicts)
// and a [kQT][kKT] tile of probabilities or score gradients.
struct QueryTile {
    int g, h, first, q0, nq, warp, lane;
    float *rows, *kv, *w;
};

__device__ __forceinline__ bool query_tile(const Attn& a, float* smem, QueryTile& t) {
    int count;
    t.g = blockIdx.x;
    t.h = blockIdx.y;
    set_queries(a, t.g, t.first, count);
    t.q0 = blockIdx.z * kQT;
    if (t.q0 >= count) return false;
    t.nq = min(kQT, count - t.q0);
    t.warp = threadIdx.x / 32;
    t.lane = threadIdx.x % 32;
    t.rows = smem;
    t.kv = t.rows + kQT * a.dh;
    t.w = t.kv + kKT * (a.dh + 1);
    return true;
}

// Warp w's queries are w*kQPW + j; lane owns head dims lane + 32·u.
using Acc = float[kQPW][kDPL];

__device__ __forceinline__ void zero(Acc& acc) {
#pragma unroll
    for (int j = 0; j < kQPW; j++)
#pragma unroll
        for (int u = 0; u < kDPL; u++) acc[j][u] = 0.f;
}

// acc[j] += Σ_{m<n} w[query j][m] · kv[m]: P·V in forward, dS·K for dq.
__device__ __forceinline__ void accumulate(Acc& acc, const QueryTile& t, int n, int dh) {
    const int ld = dh + 1;
    for (int m = 0; m < n; m++) {
#pragma unroll
        for (int u = 0; u < kDPL; u++) {
            const int d = t.lane + 32 * u;
            const float x = d < dh ? t.kv[m * ld + d] : 0.f;
#pragma unroll
            for (int j = 0; j < kQPW; j++) acc[j][u] += t.w[(t.warp * kQPW + j) * kKT + m] * x;
        }
    }
}

// Writes (or adds) each valid query's head slice.
template <bool kAdd>
__device__ __forceinline__ void store(const Rows<float>& dst, const Acc& acc, const QueryTile& t,
                                      int dh) {
#pragma unroll
    for (int j = 0; j < kQPW; j++) {
        const int i = t.warp * kQPW + j;
        if (i >= t.nq) continue;
        float* o = dst.at(t.g, t.first + t.q0 + i) + t.h * dh;
#pragma unroll
        for (int u = 0; u < kDPL; u++) {
            const int d = t.lane + 32 * u;
            if (d < dh) o[d] = kAdd ? o[d] + acc[j][u] : acc[j][u];
        }
    }
}

__global__ void __launch_bounds__(kBlock) attend_forward_kernel(Fwd f) {
    extern __shared__ float smem[];
    const Attn& a = f.a;
    QueryTile t;
    if (!query_tile(a, smem, t)) return;
    const int g = t.g, h = t.h, dh = a.dh, ld = dh + 1, warp = t.warp, lane = t.lane;
    load_tile(t.rows, dh, kQT, a.q, g, t.first + t.q0, t.nq, h, dh);
    auto probs_row = [&](int i) { return f.probs.at(g, t.first + t.q0 + i) + h * a.p_head; };

    // Scores, scaled, straight into the probs rows; each lane keeps the
    // maximum over its keys.
    float mx[kQPW];
#pragma unroll
    for (int j = 0; j < kQPW; j++) mx[j] = -INFINITY;
    for (int m0 = 0; m0 < a.M; m0 += kKT) {
        __syncthreads();
        load_tile(t.kv, ld, kKT, a.k, g, m0, min(kKT, a.M - m0), h, dh);
        __syncthreads();
        const int m = m0 + lane;
#pragma unroll
        for (int j = 0; j < kQPW; j++) {
            const int i = warp * kQPW + j;
            if (i < t.nq && m < a.M) {
                const float s = dot_smem(t.rows + i * dh, t.kv + lane * ld, dh) * a.scale;
                probs_row(i)[m] = s;
                mx[j] = fmaxf(mx[j], s);
            }
        }
    }
    // Softmax of each row in place: a lane reads back only what it wrote.
#pragma unroll
    for (int j = 0; j < kQPW; j++) {
        const int i = warp * kQPW + j;
        const float row_max = warp_max(mx[j]);
        if (i >= t.nq) continue;
        float* p = probs_row(i);
        float sum = 0.f;
        for (int m = lane; m < a.M; m += 32) {
            const float e = expf(p[m] - row_max);
            p[m] = e;
            sum += e;
        }
        sum = warp_sum(sum);
        for (int m = lane; m < a.M; m += 32) p[m] = p[m] / sum;
    }
    // out = P·V
    Acc acc;
    zero(acc);
    for (int m0 = 0; m0 < a.M; m0 += kKT) {
        const int n = min(kKT, a.M - m0);
        __syncthreads();  // also publishes the probs rows to the whole block
        load_tile(t.kv, ld, kKT, a.v, g, m0, n, h, dh);
        for (int e = threadIdx.x; e < kQT * kKT; e += blockDim.x) {
            const int i = e / kKT, m = e % kKT;
            t.w[e] = (i < t.nq && m < n) ? probs_row(i)[m0 + m] : 0.f;
        }
        __syncthreads();
        accumulate(acc, t, n, dh);
    }
    store<false>(f.out, acc, t, dh);
}

// δ_i = Σ_m p_im·dp_im with dp_im = dO_i·v_m; then dq_i += Σ_m ds_im·k_m with
// ds_im = p_im·(dp_im − δ_i)·scale (dp computed again rather than stored).
__global__ void __launch_bounds__(kBlock) attend_backward_dq_kernel(Bwd bw) {
    extern __shared__ float smem[];
    const Attn& a = bw.a;
    QueryTile t;
    if (!query_tile(a, smem, t)) return;
    const int g = t.g, h = t.h, dh = a.dh, ld = dh + 1, warp = t.warp, lane = t.lane;
    load_tile(t.rows, dh, kQT, bw.dout, g, t.first + t.q0, t.nq, h, dh);  // dO rows
    auto probs_row = [&](int i) { return bw.probs.at(g, t.first + t.q0 + i) + h * a.p_head; };

    float delta[kQPW];
#pragma unroll
    for (int j = 0; j < kQPW; j++) delta[j] = 0.f;
    for (int m0 = 0; m0 < a.M; m0 += kKT) {
        __syncthreads();
        load_tile(t.kv, ld, kKT, a.v, g, m0, min(kKT, a.M - m0), h, dh);
        __syncthreads();
        const int m = m0 + lane;
#pragma unroll
        for (int j = 0; j < kQPW; j++) {
            const int i = warp * kQPW + j;
            if (i < t.nq && m < a.M)
                delta[j] += probs_row(i)[m] * dot_smem(t.rows + i * dh, t.kv + lane * ld, dh);
        }
    }
    const int64_t delta_base = a.offsets ? t.first + t.q0 : (int64_t)g * a.nq + t.q0;
#pragma unroll
    for (int j = 0; j < kQPW; j++) {
        delta[j] = warp_sum(delta[j]);
        const int i = warp * kQPW + j;
        if (lane == 0 && i < t.nq) bw.delta[(delta_base + i) * a.Hd + h] = delta[j];
    }

    Acc acc;
    zero(acc);
    for (int m0 = 0; m0 < a.M; m0 += kKT) {
        const int n = min(kKT, a.M - m0);
        __syncthreads();
        load_tile(t.kv, ld, kKT, a.v, g, m0, n, h, dh);
        __syncthreads();
#pragma unroll
        for (int j = 0; j < kQPW; j++) {  // ds of (query j, key lane): warp-private rows of w
            const int i = warp * kQPW + j;
            float ds = 0.f;
            if (i < t.nq && lane < n)
                ds = probs_row(i)[m0 + lane] *
                     (dot_smem(t.rows + i * dh, t.kv + lane * ld, dh) - delta[j]) * a.scale;
            t.w[i * kKT + lane] = ds;
        }
        __syncthreads();
        load_tile(t.kv, ld, kKT, a.k, g, m0, n, h, dh);
        __syncthreads();
        accumulate(acc, t, n, dh);
    }
    store<true>(bw.dq, acc, t, dh);
}

// dK_m += Σ_i ds_im·q_i, dV_m += Σ_i p_im·dO_i over the set's queries in order.
__global__ void __launch_bounds__(kBlock) attend_backward_dkv_kernel(Bwd bw) {
    extern __shared__ float smem[];
    const Attn& a = bw.a;
    const int g = blockIdx.x, h = blockIdx.y, dh = a.dh, ld = dh + 1;
    const int m0 = blockIdx.z * kKT;
    if (m0 >= a.M) return;
    const int nk = min(kKT, a.M - m0);
    int first, count;
    set_queries(a, g, first, count);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    float* sV = smem;                // [kKT][dh+1]
    float* sQ = sV + kKT * ld;       // [kQT2][dh]
    float* sDO = sQ + kQT2 * dh;     // [kQT2][dh]
    float* sP = sDO + kQT2 * dh;     // [kQT2][kKT]
    float* sDS = sP + kQT2 * kKT;    // [kQT2][kKT]
    float* sDelta = sDS + kQT2 * kKT;  // [kQT2]
    load_tile(sV, ld, kKT, a.v, g, m0, nk, h, dh);
    const int64_t delta_base = a.offsets ? first : (int64_t)g * a.nq;

    float acc_k[kKPW][kDPL], acc_v[kKPW][kDPL];
#pragma unroll
    for (int r = 0; r < kKPW; r++)
#pragma unroll
        for (int u = 0; u < kDPL; u++) acc_k[r][u] = acc_v[r][u] = 0.f;
    for (int i0 = 0; i0 < count; i0 += kQT2) {
        const int n = min(kQT2, count - i0);
        __syncthreads();
        load_tile(sQ, dh, kQT2, a.q, g, first + i0, n, h, dh);
        load_tile(sDO, dh, kQT2, bw.dout, g, first + i0, n, h, dh);
        for (int e = threadIdx.x; e < kQT2 * kKT; e += blockDim.x) {
            const int i = e / kKT, m = e % kKT;
            sP[e] = (i < n && m < nk) ? bw.probs.at(g, first + i0 + i)[h * a.p_head + m0 + m] : 0.f;
        }
        for (int i = threadIdx.x; i < kQT2; i += blockDim.x)
            sDelta[i] = i < n ? bw.delta[(delta_base + i0 + i) * a.Hd + h] : 0.f;
        __syncthreads();
        // ds for (query i, key lane), warps taking every kWarps-th query
        for (int i = warp; i < n; i += kWarps) {
            const float p = sP[i * kKT + lane];
            sDS[i * kKT + lane] =
                lane < nk ? p * (dot_smem(sDO + i * dh, sV + lane * ld, dh) - sDelta[i]) * a.scale
                          : 0.f;
        }
        __syncthreads();
        // warp owns keys warp*kKPW + r, lane owns dims lane + 32·u
        for (int i = 0; i < n; i++) {
#pragma unroll
            for (int u = 0; u < kDPL; u++) {
                const int d = lane + 32 * u;
                const float qd = d < dh ? sQ[i * dh + d] : 0.f;
                const float od = d < dh ? sDO[i * dh + d] : 0.f;
#pragma unroll
                for (int r = 0; r < kKPW; r++) {
                    const int m = warp * kKPW + r;
                    acc_k[r][u] += sDS[i * kKT + m] * qd;
                    acc_v[r][u] += sP[i * kKT + m] * od;
                }
            }
        }
    }
#pragma unroll
    for (int r = 0; r < kKPW; r++) {
        const int m = warp * kKPW + r;
        if (m >= nk) continue;
        float* dk = bw.dk.at(g, m0 + m) + h * dh;
        float* dv = bw.dv.at(g, m0 + m) + h * dh;
#pragma unroll
        for (int u = 0; u < kDPL; u++) {
            const int d = lane + 32 * u;
            if (d < dh) {
                dk[d] += acc_k[r][u];
                dv[d] += acc_v[r][u];
            }
        }
    }
}

size_t forward_smem(int dh) { return sizeof(float) * (kQT * dh + kKT * (dh + 1) + kQT * kKT); }
size_t dkv_smem(int dh) {
    return sizeof(float) * (kKT * (dh + 1) + 2 * kQT2 * dh + 2 * kQT2 * kKT + kQT2);
}

// Checks the shape and fills the common part; `max_queries` bounds any set's
// query count (the grid's query tiles).
Attn make_attn(int nq, const int* offsets, int M, int D, int Hd, Rows<const float> q,
               Rows<const float> k, Rows<const float> v, int64_t p_head) {
    PRISM_CUDA_REQUIRE(Hd > 0 && D % Hd == 0, "attention: D must be a multiple of the head count");
    const int dh = D / Hd;
    PRISM_CUDA_REQUIRE(dh <= kMaxDh, "attention: head dim above 128 is not supported");
    return Attn{nq, offsets, M, Hd, dh, 1.f / sqrtf((float)dh), q, k, v, p_head};
}

void attend_forward(const Fwd& f, int sets, int max_queries, cudaStream_t stream) {
    if (sets <= 0 || max_queries <= 0 || f.a.M <= 0) return;
    const dim3 grid(sets, f.a.Hd, (max_queries + kQT - 1) / kQT);
    attend_forward_kernel<<<grid, kBlock, forward_smem(f.a.dh), stream>>>(f);
    PRISM_LAUNCH_CHECK();
}

// total_queries: rows of the delta scratch (sets*nq, or the gathered rows).
void attend_backward(Bwd bw, int sets, int max_queries, int64_t total_queries,
                     cudaStream_t stream) {
    if (sets <= 0 || max_queries <= 0 || bw.a.M <= 0) return;
    Scratch delta(sizeof(float) * (size_t)total_queries * bw.a.Hd, stream);
    bw.delta = delta.as<float>();
    const dim3 qgrid(sets, bw.a.Hd, (max_queries + kQT - 1) / kQT);
    attend_backward_dq_kernel<<<qgrid, kBlock, forward_smem(bw.a.dh), stream>>>(bw);
    PRISM_LAUNCH_CHECK();
    const dim3 kgrid(sets, bw.a.Hd, (bw.a.M + kKT - 1) / kKT);
    attend_backward_dkv_kernel<<<kgrid, kBlock, dkv_smem(bw.a.dh), stream>>>(bw);
    PRISM_LAUNCH_CHECK();
}

}  // namespace

// ---- dense: a set is an image; q | k | v are column blocks of qkv [B, L, 3D] ----
void attention_forward(float* out, float* probs, const float* qkv, int B, int L, int D, int Hd,
                       cudaStream_t stream) {
    const int64_t img = (int64_t)L * 3 * D;
    const Attn a = make_attn(L, nullptr, L, D, Hd, {qkv, img, 3 * D}, {qkv + D, img, 3 * D},
                             {qkv + 2 * D, img, 3 * D}, (int64_t)L * L);
    attend_forward(Fwd{a, {out, (int64_t)L * D, D}, {probs, (int64_t)Hd * L * L, L}}, B, L, stream);
}

void attention_backward(float* dqkv, const float* dout, const float* qkv, const float* probs,
                        int B, int L, int D, int Hd, cudaStream_t stream) {
    const int64_t img = (int64_t)L * 3 * D;
    const Attn a = make_attn(L, nullptr, L, D, Hd, {qkv, img, 3 * D}, {qkv + D, img, 3 * D},
                             {qkv + 2 * D, img, 3 * D}, (int64_t)L * L);
    Bwd bw{a, {dout, (int64_t)L * D, D}, {probs, (int64_t)Hd * L * L, L},
           {dqkv, img, 3 * D}, {dqkv + D, img, 3 * D}, {dqkv + 2 * D, img, 3 * D}, nullptr};
    attend_backward(bw, B, L, (int64_t)B * L, stream);
}

// ---- routed: a set is group g = b*nS + s; its queries are gathered rows ----------
// k, v [B, nS, N, D]; qg, og [T*k, D]; probs [T*k, Hd, N]. A group holds at
// most one slot per token of its image: at most nS*N queries.
void routed_attention_forward(float* og, float* probs, const float* qg, const float* k,
                              const float* v, const int* offsets, int B, int nS, int N, int D,
                              int Hd, cudaStream_t stream) {
    const Attn a = make_attn(0, offsets, N, D, Hd, {qg, 0, D}, {k, (int64_t)N * D, D},
                             {v, (int64_t)N * D, D}, N);
    attend_forward(Fwd{a, {og, 0, D}, {probs, 0, (int64_t)Hd * N}}, B * nS, nS * N, stream);
}

void routed_attention_backward(float* dqg, float* dk, float* dv, const float* dog,
                               const float* qg, const float* k, const float* v,
                               const float* probs, const int* offsets, int B, int nS, int N,
                               int D, int Hd, cudaStream_t stream) {
    const Attn a = make_attn(0, offsets, N, D, Hd, {qg, 0, D}, {k, (int64_t)N * D, D},
                             {v, (int64_t)N * D, D}, N);
    // The gathered rows number B*nS*N*k_slots; the kernels index delta by
    // gathered row, so size it by the largest row count any k gives: B*nS*N*nS.
    Bwd bw{a, {dog, 0, D}, {probs, 0, (int64_t)Hd * N}, {dqg, 0, D},
           {dk, (int64_t)N * D, D}, {dv, (int64_t)N * D, D}, nullptr};
    attend_backward(bw, B * nS, nS * N, (int64_t)B * nS * N * nS, stream);
}

// ---- CLS: a set is an image with one query, row 0 of (q, q_image_stride) ----------
void cls_attention_forward(float* out, int64_t out_image_stride, float* probs, const float* q,
                           int64_t q_image_stride, const float* k, const float* v, int B, int M,
                           int D, int Hd, cudaStream_t stream) {
    const Attn a = make_attn(1, nullptr, M, D, Hd, {q, q_image_stride, 0}, {k, (int64_t)M * D, D},
                             {v, (int64_t)M * D, D}, M);
    attend_forward(Fwd{a, {out, out_image_stride, 0}, {probs, (int64_t)Hd * M, 0}}, B, 1, stream);
}

void cls_attention_backward(float* dq, int64_t dq_image_stride, float* dk, float* dv,
                            const float* dout, int64_t dout_image_stride, const float* q,
                            int64_t q_image_stride, const float* k, const float* v,
                            const float* probs, int B, int M, int D, int Hd,
                            cudaStream_t stream) {
    const Attn a = make_attn(1, nullptr, M, D, Hd, {q, q_image_stride, 0}, {k, (int64_t)M * D, D},
                             {v, (int64_t)M * D, D}, M);
    Bwd bw{a, {dout, dout_image_stride, 0}, {probs, (int64_t)Hd * M, 0}, {dq, dq_image_stride, 0},
           {dk, (int64_t)M * D, D}, {dv, (int64_t)M * D, D}, nullptr};
    attend_backward(bw, B, 1, B, stream);
}

}  // namespace prism::cuda_ops
