// The fp32 attention kernels of kernels/cuda/attention.cu.
//
// As in kernels/cpu/attention.cpp, one piece serves every attention op: the
// queries of a "set" attending to that set's M key/value rows, per head
// softmax(q_h·K_hᵀ/√dh)·V_h. Dense self-attention (a set is an image, its L
// rows) and MoE-ViT's routed cross-attention (a set is an (image, channel)
// group: its queries are rows offsets[g]..offsets[g+1] of the gathered buffer,
// its keys the N patches of that channel) differ only in their strides.
//
// Dense and routed attention are fused: the scores and probabilities live in
// registers and shared memory only, never in global memory (an L×L matrix per
// image and head would be most of the model's activation memory). Forward
// keeps the logsumexp of each query row; backward recomputes P = exp(s − lse).
// - fused_fwd_kernel: a block owns 32 queries of one (set, head), a warp 8 of
//   them. Key/value tiles of 32 rows (one key per lane) stream through shared
//   memory; each query keeps a running maximum m, its lanes' partial sums of
//   exp(s − m) and its output accumulators, all rescaled when m grows (the
//   online softmax), so one pass over the keys suffices.
// - fused_bwd_dq_kernel: the forward's tiling. Per query: δ = dO·O (also
//   stored, for the next kernel); per key tile, P from the scores and lse,
//   dS = P∘(dP − δ) with dP = dO·Vᵀ, and dQ += dS·K.
// - fused_bwd_dkv_kernel: a block owns 32 keys of one (set, head) and streams
//   the set's queries through in order, 16 at a time (Q, dO, lse, δ), with
//   P and dS recomputed per tile: dV += Pᵀ·dO, dK += dSᵀ·Q.
// The CLS row of MoE-ViT (one query per image over all its patch keys) keeps
// its probabilities, a vector per (image, head), as its op's contract says;
// it has a kernel pair of its own, a block per (image, head), that spreads
// the keys over the threads instead of wasting a 32-query tile on one query.
//
// Deterministic: fixed loop orders, reductions in a fixed order (butterflies,
// or every thread summing the same partials in the same order), each output
// element written by one thread, no atomics. Head dim at most 128: a lane
// owns head dims lane + 32·u, u < 4.
//
// The file is written so that tests can compile it on the host with the
// primitives of primitives.cuh replaced, as flash_attention.cuh is
// (tests/emulator.h): shared memory is touched only through
// ld_shared/st_shared, barriers are block_sync, and the warp reductions are
// shfl_xor butterflies.
#pragma once
#include "kernels/cuda/primitives.cuh"

namespace prism::fused {
#ifdef PRISM_EMULATION
inline namespace emulated {
#endif

using primitives::block_sync;
using primitives::imin;
using primitives::ld_shared;
using primitives::load_elem;
using primitives::store_elem;
using primitives::shfl_xor;
using primitives::st_shared;
using primitives::warp_max;
using primitives::warp_sum;

constexpr int kWarps = 4, kThreads = kWarps * 32;
constexpr int kQT = 32;             // queries per block (forward, dq)
constexpr int kQPW = kQT / kWarps;  // queries per warp
constexpr int kKT = 32;             // keys per tile: one per lane
constexpr int kKPW = kKT / kWarps;  // keys per warp (dK, dV)
constexpr int kQT2 = 16;            // queries per step of the dK/dV kernel
constexpr int kMaxDh = 128;
constexpr int kDPL = kMaxDh / 32;   // head dims per lane, at most

// Rows of one operand: row r of set g at p + g*set + r*row; head h adds h*dh.
template <class T>
struct Rows {
    T* p;
    int64_t set, row;
    PRISM_DEVICE T* at(int g, int64_t r) const { return p + g * set + r * row; }
};

// q, k, v of element type E: fp32, or (the CLS row's kernels) bf16 as the
// bf16 mode stores them.
template <class E>
struct AttnOf {
    const int* offsets;  // routed: set g's queries are rows offsets[g]..offsets[g+1]; dense: null
    int nq;              // dense: queries per set
    int M, Hd, dh;
    float scale;         // 1/√dh
    Rows<const E> q, k, v;
};
using Attn = AttnOf<float>;

PRISM_DEVICE void set_queries(const Attn& a, int g, int64_t& first, int& count) {
    first = a.offsets ? a.offsets[g] : 0;
    count = a.offsets ? a.offsets[g + 1] - a.offsets[g] : a.nq;
}

// lse and δ of query i of set g (row = its row in q): dense [sets, Hd, nq],
// routed [rows, Hd]. The flash kernels use the same layouts.
PRISM_DEVICE int64_t stat_index(const Attn& a, int g, int h, int i, int64_t row) {
    return a.offsets ? row * a.Hd + h : ((int64_t)g * a.Hd + h) * a.nq + i;
}

struct FwdParams {
    Attn a;
    Rows<float> out;  // rows as q
    float* lse;
};

struct BwdParams {
    Attn a;
    Rows<const float> dout, out;  // rows as q
    const float* lse;
    float* delta;                 // indexed like lse; the dq kernel writes it
    Rows<float> dq, dk, dv;       // as q, k, v
};

// The CLS row: one query per set (nq = 1); probabilities [sets, Hd, M]. The
// output is stored like q, k and v (E).
template <class E>
struct ClsFwdParams {
    AttnOf<E> a;
    Rows<E> out;
    float* probs;
};
template <class E>
struct ClsBwdParams {
    AttnOf<E> a;
    const float* probs;
    Rows<const float> dout;
    Rows<float> dq, dk, dv;
    float* ds;  // [sets, Hd, M] scratch
};

// ---- the ops' operands as the kernels see them (host) --------------------------------------
template <class E>
inline AttnOf<E> make_attn(const int* offsets, int nq, int M, int D, int Hd, Rows<const E> q, Rows<const E> k,
                           Rows<const E> v) {
    const int dh = D / Hd;
    return AttnOf<E>{offsets, nq, M, Hd, dh, 1.f / sqrtf((float)dh), q, k, v};
}
// Dense: a set is an image; q | k | v are column blocks of qkv [B, L, 3D].
inline Attn dense_attn(const float* qkv, int L, int D, int Hd) {
    const int64_t img = (int64_t)L * 3 * D;
    return make_attn<float>(nullptr, L, L, D, Hd, {qkv, img, 3 * D}, {qkv + D, img, 3 * D},
                            {qkv + 2 * D, img, 3 * D});
}
// Routed: a set is group g = b*nS + s, its queries gathered rows of qg
// [rows, D], its keys and values the N rows of k, v [B, nS, N, D].
inline Attn routed_attn(const float* qg, const float* k, const float* v, const int* offsets, int N, int D, int Hd) {
    return make_attn<float>(offsets, 0, N, D, Hd, {qg, 0, D}, {k, (int64_t)N * D, D}, {v, (int64_t)N * D, D});
}
// CLS: a set is an image, its one query row 0 of (q, q_image_stride), its
// keys and values the M rows of k, v [B, M, D].
template <class E>
inline AttnOf<E> cls_attn(const E* q, int64_t q_image_stride, const E* k, const E* v, int M, int D, int Hd) {
    return make_attn<E>(nullptr, 1, M, D, Hd, {q, q_image_stride, 0}, {k, (int64_t)M * D, D}, {v, (int64_t)M * D, D});
}

// Rows r0 .. r0+n-1 of head h into a [rows][ld] shared tile; rows n.. get zeros.
PRISM_DEVICE void load_tile(float* dst, int ld, int rows, const Rows<const float>& src, int g,
                            int64_t r0, int n, int h, int dh) {
    for (int e = threadIdx.x; e < rows * dh; e += kThreads) {
        const int i = e / dh, d = e % dh;
        st_shared(dst + i * ld + d, i < n ? src.at(g, r0 + i)[h * dh + d] : 0.f);
    }
}

// acc[j] += Σ_{m<nk} w[i][m]·T[m] for the warp's queries i = warp·kQPW + j
// (i < nq), each lane over its head dims: P·V in forward, dS·K for dq. w is
// a [kQT][kKT] shared tile, T a [kKT][ld] one.
PRISM_DEVICE void accumulate_tile(float (&acc)[kQPW][kDPL], const float* w, const float* T, int ld, int nk,
                                  int nq, int warp, int lane, int dh) {
PRISM_UNROLL
    for (int j = 0; j < kQPW; j++) {
        const int i = warp * kQPW + j;
        if (i >= nq) continue;
        for (int m = 0; m < nk; m++) {
            const float wm = ld_shared(w + i * kKT + m);
PRISM_UNROLL
            for (int u = 0; u < kDPL; u++) {
                const int d = lane + 32 * u;
                if (d < dh) acc[j][u] += wm * ld_shared(T + m * ld + d);
            }
        }
    }
}

// The block of the query-tile kernels (forward, dq): set g, head h, and its
// queries q0 .. q0+nq-1 of the set (rows first + q0 ..). False when the tile
// is past the set's last query (every tile of an empty group).
struct QueryBlock {
    int g, h, q0, nq, warp, lane;
    int64_t first;
};
PRISM_DEVICE bool query_block(const Attn& a, QueryBlock& t) {
    t.g = blockIdx.x, t.h = blockIdx.y;
    int count;
    set_queries(a, t.g, t.first, count);
    t.q0 = blockIdx.z * kQT;
    if (t.q0 >= count) return false;
    t.nq = imin(kQT, count - t.q0);
    t.warp = threadIdx.x / 32, t.lane = threadIdx.x % 32;
    return true;
}

PRISM_DEVICE float dot_shared(const float* a, const float* b, int dh) {
    float s = 0.f;
    for (int d = 0; d < dh; d++) s += ld_shared(a + d) * ld_shared(b + d);
    return s;
}

// Query tiles (forward, dq): dh-wide rows (every lane reads the same one);
// key tiles padded to dh+1 so that the 32 lanes, one key each, hit 32 banks.
inline size_t fwd_smem(int dh) { return sizeof(float) * (kQT * dh + 2 * kKT * (dh + 1) + kQT * kKT); }
inline size_t dq_smem(int dh) { return sizeof(float) * (2 * kQT * dh + 2 * kKT * (dh + 1) + kQT * kKT); }
inline size_t dkv_smem(int dh) {
    return sizeof(float) * (2 * kKT * (dh + 1) + 2 * kQT2 * dh + 2 * kQT2 * kKT + 2 * kQT2);
}
inline size_t cls_smem(int dh) { return sizeof(float) * (2 * dh + kThreads); }

// ---- forward ------------------------------------------------------------------------------
// Grid (sets, Hd, query tiles of the largest set).
PRISM_KERNEL(kThreads) fused_fwd_kernel(FwdParams p) {
    PRISM_SMEM(smem_raw);
    const Attn& a = p.a;
    QueryBlock t;
    if (!query_block(a, t)) return;
    const int g = t.g, h = t.h, q0 = t.q0, nq = t.nq, warp = t.warp, lane = t.lane, dh = a.dh, ld = dh + 1;
    const int64_t first = t.first;
    float* sQ = reinterpret_cast<float*>(smem_raw);  // [kQT][dh]
    float* sK = sQ + kQT * dh;                        // [kKT][dh+1]
    float* sV = sK + kKT * ld;                        // [kKT][dh+1]
    float* sP = sV + kKT * ld;                        // [kQT][kKT], a warp's rows its own
    load_tile(sQ, dh, kQT, a.q, g, first + q0, nq, h, dh);

    // Query j of the warp: mx the largest scaled score so far, l this lane's
    // share of Σ exp(s − mx), acc its head dims of Σ exp(s − mx)·v.
    float mx[kQPW], l[kQPW], acc[kQPW][kDPL];
PRISM_UNROLL
    for (int j = 0; j < kQPW; j++) {
        mx[j] = -INFINITY;
        l[j] = 0.f;
PRISM_UNROLL
        for (int u = 0; u < kDPL; u++) acc[j][u] = 0.f;
    }
    for (int m0 = 0; m0 < a.M; m0 += kKT) {
        const int nk = imin(kKT, a.M - m0);
        block_sync();  // the previous tile is no longer read
        load_tile(sK, ld, kKT, a.k, g, m0, nk, h, dh);
        load_tile(sV, ld, kKT, a.v, g, m0, nk, h, dh);
        block_sync();
PRISM_UNROLL
        for (int j = 0; j < kQPW; j++) {
            const int i = warp * kQPW + j;
            if (i >= nq) continue;  // the same for the whole warp
            const float s = lane < nk ? dot_shared(sQ + i * dh, sK + lane * ld, dh) * a.scale : -INFINITY;
            // Finite: every tile holds a key. On the first tile alpha = 0.
            const float m_new = fmaxf(mx[j], warp_max(s));
            const float alpha = expf(mx[j] - m_new);
            const float e = expf(s - m_new);  // 0 past the last key
            mx[j] = m_new;
            l[j] = l[j] * alpha + e;
PRISM_UNROLL
            for (int u = 0; u < kDPL; u++) acc[j][u] *= alpha;
            st_shared(sP + i * kKT + lane, e);
        }
        block_sync();  // each lane needs every lane's e
        accumulate_tile(acc, sP, sV, ld, nk, nq, warp, lane, dh);
    }
PRISM_UNROLL
    for (int j = 0; j < kQPW; j++) {
        const int i = warp * kQPW + j;
        if (i >= nq) continue;
        const float sum = warp_sum(l[j]);
        const int64_t row = first + q0 + i;
        float* o = p.out.at(g, row) + h * dh;
PRISM_UNROLL
        for (int u = 0; u < kDPL; u++) {
            const int d = lane + 32 * u;
            if (d < dh) o[d] = acc[j][u] / sum;
        }
        if (lane == 0) p.lse[stat_index(a, g, h, q0 + i, row)] = mx[j] + logf(sum);
    }
}

// ---- backward -----------------------------------------------------------------------------
// dQ, and δ for the dK/dV kernel. Grid as the forward's.
PRISM_KERNEL(kThreads) fused_bwd_dq_kernel(BwdParams p) {
    PRISM_SMEM(smem_raw);
    const Attn& a = p.a;
    QueryBlock t;
    if (!query_block(a, t)) return;
    const int g = t.g, h = t.h, q0 = t.q0, nq = t.nq, warp = t.warp, lane = t.lane, dh = a.dh, ld = dh + 1;
    const int64_t first = t.first;
    float* sQ = reinterpret_cast<float*>(smem_raw);  // [kQT][dh]
    float* sdO = sQ + kQT * dh;                       // [kQT][dh]
    float* sK = sdO + kQT * dh;                       // [kKT][dh+1]
    float* sV = sK + kKT * ld;                        // [kKT][dh+1]
    float* sS = sV + kKT * ld;                        // [kQT][kKT]: dS, a warp's rows its own
    load_tile(sQ, dh, kQT, a.q, g, first + q0, nq, h, dh);
    load_tile(sdO, dh, kQT, p.dout, g, first + q0, nq, h, dh);

    float lse[kQPW], delta[kQPW], acc[kQPW][kDPL];
PRISM_UNROLL
    for (int j = 0; j < kQPW; j++) {
        lse[j] = delta[j] = 0.f;
PRISM_UNROLL
        for (int u = 0; u < kDPL; u++) acc[j][u] = 0.f;
        const int i = warp * kQPW + j;
        if (i >= nq) continue;
        const int64_t row = first + q0 + i, x = stat_index(a, g, h, q0 + i, row);
        const float* dO = p.dout.at(g, row) + h * dh;
        const float* O = p.out.at(g, row) + h * dh;
        float part = 0.f;
PRISM_UNROLL
        for (int u = 0; u < kDPL; u++) {
            const int d = lane + 32 * u;
            if (d < dh) part += dO[d] * O[d];
        }
        lse[j] = p.lse[x];
        delta[j] = warp_sum(part);
        if (lane == 0) p.delta[x] = delta[j];
    }
    for (int m0 = 0; m0 < a.M; m0 += kKT) {
        const int nk = imin(kKT, a.M - m0);
        block_sync();
        load_tile(sK, ld, kKT, a.k, g, m0, nk, h, dh);
        load_tile(sV, ld, kKT, a.v, g, m0, nk, h, dh);
        block_sync();
PRISM_UNROLL
        for (int j = 0; j < kQPW; j++) {  // dS of (query j, key lane), without the 1/√dh
            const int i = warp * kQPW + j;
            if (i >= nq) continue;
            float ds = 0.f;
            if (lane < nk) {
                const float pr = expf(dot_shared(sQ + i * dh, sK + lane * ld, dh) * a.scale - lse[j]);
                ds = pr * (dot_shared(sdO + i * dh, sV + lane * ld, dh) - delta[j]);
            }
            st_shared(sS + i * kKT + lane, ds);
        }
        block_sync();
        accumulate_tile(acc, sS, sK, ld, nk, nq, warp, lane, dh);
    }
PRISM_UNROLL
    for (int j = 0; j < kQPW; j++) {
        const int i = warp * kQPW + j;
        if (i >= nq) continue;
        float* dq = p.dq.at(g, first + q0 + i) + h * dh;
PRISM_UNROLL
        for (int u = 0; u < kDPL; u++) {
            const int d = lane + 32 * u;
            if (d < dh) dq[d] += acc[j][u] * a.scale;
        }
    }
}

// dK, dV of 32 keys: grid (sets, Hd, key tiles). Each key's sums run over the
// set's queries in order; the 16 queries of a step are split over the warps
// for P and dS, then each warp sums them for its own 8 keys.
PRISM_KERNEL(kThreads) fused_bwd_dkv_kernel(BwdParams p) {
    PRISM_SMEM(smem_raw);
    const Attn& a = p.a;
    const int g = blockIdx.x, h = blockIdx.y, dh = a.dh, ld = dh + 1;
    const int m0 = blockIdx.z * kKT;
    int64_t first;
    int count;
    set_queries(a, g, first, count);
    if (m0 >= a.M || count == 0) return;  // a group without queries adds nothing
    const int nk = imin(kKT, a.M - m0);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    float* sK = reinterpret_cast<float*>(smem_raw);  // [kKT][dh+1]
    float* sV = sK + kKT * ld;                        // [kKT][dh+1]
    float* sQ = sV + kKT * ld;                        // [kQT2][dh]
    float* sdO = sQ + kQT2 * dh;                      // [kQT2][dh]
    float* sP = sdO + kQT2 * dh;                      // [kQT2][kKT]
    float* sS = sP + kQT2 * kKT;                      // [kQT2][kKT]: dS without the 1/√dh
    float* sL = sS + kQT2 * kKT;                      // [kQT2]: lse
    float* sD = sL + kQT2;                            // [kQT2]: δ
    load_tile(sK, ld, kKT, a.k, g, m0, nk, h, dh);
    load_tile(sV, ld, kKT, a.v, g, m0, nk, h, dh);

    float acc_k[kKPW][kDPL], acc_v[kKPW][kDPL];
PRISM_UNROLL
    for (int r = 0; r < kKPW; r++)
PRISM_UNROLL
        for (int u = 0; u < kDPL; u++) acc_k[r][u] = acc_v[r][u] = 0.f;
    for (int i0 = 0; i0 < count; i0 += kQT2) {
        const int n = imin(kQT2, count - i0);
        block_sync();  // the previous step is no longer read
        load_tile(sQ, dh, kQT2, a.q, g, first + i0, n, h, dh);
        load_tile(sdO, dh, kQT2, p.dout, g, first + i0, n, h, dh);
        for (int r = threadIdx.x; r < n; r += kThreads) {
            const int64_t x = stat_index(a, g, h, i0 + r, first + i0 + r);
            st_shared(sL + r, p.lse[x]);
            st_shared(sD + r, p.delta[x]);
        }
        block_sync();
        for (int i = warp; i < n; i += kWarps) {  // P and dS of (query i, key lane)
            float pr = 0.f, ds = 0.f;
            if (lane < nk) {
                pr = expf(dot_shared(sQ + i * dh, sK + lane * ld, dh) * a.scale - ld_shared(sL + i));
                ds = pr * (dot_shared(sdO + i * dh, sV + lane * ld, dh) - ld_shared(sD + i));
            }
            st_shared(sP + i * kKT + lane, pr);
            st_shared(sS + i * kKT + lane, ds);
        }
        block_sync();
        for (int i = 0; i < n; i++) {  // the warp's keys warp*kKPW + r, the lane's head dims
PRISM_UNROLL
            for (int u = 0; u < kDPL; u++) {
                const int d = lane + 32 * u;
                if (d >= dh) continue;
                const float qd = ld_shared(sQ + i * dh + d), od = ld_shared(sdO + i * dh + d);
PRISM_UNROLL
                for (int r = 0; r < kKPW; r++) {
                    const int m = warp * kKPW + r;
                    acc_k[r][u] += ld_shared(sS + i * kKT + m) * qd;
                    acc_v[r][u] += ld_shared(sP + i * kKT + m) * od;
                }
            }
        }
    }
PRISM_UNROLL
    for (int r = 0; r < kKPW; r++) {
        const int m = warp * kKPW + r;
        if (m >= nk) continue;
        float* dk = p.dk.at(g, m0 + m) + h * dh;
        float* dv = p.dv.at(g, m0 + m) + h * dh;
PRISM_UNROLL
        for (int u = 0; u < kDPL; u++) {
            const int d = lane + 32 * u;
            if (d < dh) {
                dk[d] += acc_k[r][u] * a.scale;
                dv[d] += acc_v[r][u];
            }
        }
    }
}

// ---- the CLS row: one query per set, probabilities kept ------------------------------------
// Σ over the block of each thread's v, the same bits in every thread: the
// partials are summed in thread order by everyone (red: kThreads floats).
PRISM_DEVICE float block_sum(float v, float* red) {
    block_sync();  // red is free
    st_shared(red + threadIdx.x, v);
    block_sync();
    float s = 0.f;
    for (int t = 0; t < kThreads; t++) s += ld_shared(red + t);
    return s;
}
PRISM_DEVICE float block_max(float v, float* red) {
    block_sync();
    st_shared(red + threadIdx.x, v);
    block_sync();
    float s = -INFINITY;
    for (int t = 0; t < kThreads; t++) s = fmaxf(s, ld_shared(red + t));
    return s;
}

// Grid (sets, Hd): thread t takes keys t, t + kThreads, ...; each writes and
// rereads its own probabilities, and the block's maximum and sum come from
// block_max, block_sum. Then out's head dims d (one per thread) sum over the
// keys in order.
template <class E>
PRISM_KERNEL(kThreads) cls_fwd_kernel(ClsFwdParams<E> p) {
    PRISM_SMEM(smem_raw);
    const AttnOf<E>& a = p.a;
    const int g = blockIdx.x, h = blockIdx.y, dh = a.dh, M = a.M;
    float* sq = reinterpret_cast<float*>(smem_raw);  // [dh]
    float* red = sq + dh;                             // [kThreads]
    float* pr = p.probs + ((int64_t)g * a.Hd + h) * M;
    for (int d = threadIdx.x; d < dh; d += kThreads) st_shared(sq + d, load_elem(a.q.at(g, 0) + h * dh + d));
    block_sync();
    float mx = -INFINITY;
    for (int m = threadIdx.x; m < M; m += kThreads) {
        const E* k = a.k.at(g, m) + h * dh;
        float s = 0.f;
        for (int d = 0; d < dh; d++) s += ld_shared(sq + d) * load_elem(k + d);
        pr[m] = s * a.scale;
        mx = fmaxf(mx, pr[m]);
    }
    mx = block_max(mx, red);
    float sum = 0.f;
    for (int m = threadIdx.x; m < M; m += kThreads) {
        pr[m] = expf(pr[m] - mx);
        sum += pr[m];
    }
    sum = block_sum(sum, red);
    for (int m = threadIdx.x; m < M; m += kThreads) pr[m] = pr[m] / sum;
    block_sync();  // every probability written
    for (int d = threadIdx.x; d < dh; d += kThreads) {
        float o = 0.f;
        for (int m = 0; m < M; m++) o += pr[m] * load_elem(a.v.at(g, m) + h * dh + d);
        store_elem(p.out.at(g, 0) + h * dh + d, o);
    }
}

// Grid (sets, Hd): δ = Σ_m p_m·dp_m (block_sum), then per key (thread t's
// keys as in forward) dS, dK and dV; dS goes through scratch to the dq sum.
template <class E>
PRISM_KERNEL(kThreads) cls_bwd_kernel(ClsBwdParams<E> p) {
    PRISM_SMEM(smem_raw);
    const AttnOf<E>& a = p.a;
    const int g = blockIdx.x, h = blockIdx.y, dh = a.dh, M = a.M;
    float* sq = reinterpret_cast<float*>(smem_raw);  // [dh]
    float* sdO = sq + dh;                             // [dh]
    float* red = sdO + dh;                            // [kThreads]
    const float* pr = p.probs + ((int64_t)g * a.Hd + h) * M;
    float* ds = p.ds + ((int64_t)g * a.Hd + h) * M;
    for (int d = threadIdx.x; d < dh; d += kThreads) {
        st_shared(sq + d, load_elem(a.q.at(g, 0) + h * dh + d));
        st_shared(sdO + d, p.dout.at(g, 0)[h * dh + d]);
    }
    block_sync();
    auto dp = [&](int m) {
        const E* v = a.v.at(g, m) + h * dh;
        float s = 0.f;
        for (int d = 0; d < dh; d++) s += ld_shared(sdO + d) * load_elem(v + d);
        return s;
    };
    float part = 0.f;
    for (int m = threadIdx.x; m < M; m += kThreads) part += pr[m] * dp(m);
    const float delta = block_sum(part, red);
    for (int m = threadIdx.x; m < M; m += kThreads) {
        const float s = pr[m] * (dp(m) - delta) * a.scale;
        ds[m] = s;
        float* dk = p.dk.at(g, m) + h * dh;
        float* dv = p.dv.at(g, m) + h * dh;
        for (int d = 0; d < dh; d++) {
            dk[d] += s * ld_shared(sq + d);
            dv[d] += pr[m] * ld_shared(sdO + d);
        }
    }
    block_sync();  // every dS written
    for (int d = threadIdx.x; d < dh; d += kThreads) {
        float acc = 0.f;
        for (int m = 0; m < M; m++) acc += ds[m] * load_elem(a.k.at(g, m) + h * dh + d);
        p.dq.at(g, 0)[h * dh + d] += acc;
    }
}

#ifdef PRISM_EMULATION
}  // inline namespace emulated
#endif
}  // namespace prism::fused
