// Flash attention on tensor cores: the kernels of kernels/cuda/flash_attention.cu.
//
// One engine serves dense self-attention and MoE-ViT's routed cross-attention,
// as in attention.cu: a "set" of query rows attends to that set's M key/value
// rows (dense: a set is an image, its L rows; routed: a set is an (image,
// channel) group, its queries are rows offsets[g]..offsets[g+1] of the
// gathered buffer and its keys the N patches of that channel). Head dim 64.
//
// Numerics: q, k, v, dO enter the matrix products as bf16 (rounded when a
// tile is staged in shared memory, or beforehand on the host side of the op);
// products accumulate in fp32 (mma.sync m16n8k16); softmax, its statistics
// and every output are fp32. P and dS are rounded to bf16 for the products
// they feed. The scores are never stored: forward keeps the per-row
// logsumexp (natural log, of the scaled scores), backward recomputes P from it.
//
// Kernels (all deterministic: fixed loop orders, each output element written
// by one thread, no atomics):
// - flash_fwd_kernel: a block owns W·16 query rows of one (set, head); each
//   warp 16 rows. Key/value tiles of 64 rows stream through shared memory
//   (double-buffered, cp.async) or, kStationary, the set's whole K and V are
//   staged once and the block walks several query tiles over them. S = QKᵀ,
//   the online softmax and O += PV stay in registers (FlashAttention-2).
// - flash_bwd_prep_kernel: δ_i = Σ_d dO_id·O_id per (row, head), fp32; for
//   dense also dO in bf16.
// - flash_bwd_dq_kernel: the forward's structure; per key tile S, P (from the
//   logsumexp), dP = dO·Vᵀ, dS = P∘(dP − δ), dQ += dS·K; dQ·scale is added to
//   the gradient at the end.
// - flash_bwd_dkv_kernel: a block owns W·16 keys of one (set, head), each warp
//   16 keys; the set's query tiles stream through in order. Per tile, in
//   registers: Sᵀ = K·Qᵀ, Pᵀ, dV += Pᵀ·dO, dPᵀ = V·dOᵀ, dSᵀ, dK += dSᵀ·Q.
//
// Fragment layouts are those of the PTX ISA for mma.m16n8k16 (.bf16, fp32
// accumulators): lane = 4·g + t; A (16×16, row) holds (g, 2t..2t+1),
// (g+8, 2t..), (g, 2t+8..), (g+8, 2t+8..); B (16×8, col) holds (k = 2t..2t+1,
// n = g) and (k = 2t+8.., n = g); C holds (g, 2t..2t+1) and (g+8, 2t..2t+1).
// A C fragment pair is therefore directly the A fragment of the next product
// (P·V, dS·K): no shuffles. Shared-memory tiles are [rows][64] bf16, 128-byte
// rows of eight 16-byte chunks, chunk c of row r stored at chunk c ^ (r & 7) so
// that ldmatrix's eight row reads hit eight different bank groups.
//
// The file is written so that tests can compile it on the host with the
// primitives of primitives.cuh replaced (PRISM_EMULATION: a CPU model
// of warps, ldmatrix, mma and cp.async; see tests/emulator.h).
#pragma once
#include <stdlib.h>

#include <stdexcept>
#include <string>

#include "kernels/cuda/primitives.cuh"

namespace prism::flash {
// The emulated build gets its own names: the kernels' host stubs in the CUDA
// object and their emulated bodies must not meet in the linker.
#ifdef PRISM_EMULATION
inline namespace emulated {
#endif
// These kernels use nearly every primitive: listing them would hide the code.
using namespace primitives;

constexpr int kDh = 64;      // head dim (the only one supported)
constexpr int kKT = 64;      // keys per tile (forward, dq)
constexpr int kQT2 = 64;     // queries per tile of the dK/dV kernel
constexpr int kMaxStationaryKeys = 256;  // sets with at most this many keys keep K, V resident
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Element offset of chunk `c` (8 bf16) of row `r` in a swizzled [rows][64] tile.
PRISM_DEVICE int swz(int r, int c) { return r * kDh + ((c ^ (r & 7)) << 3); }

// ---- what the kernels see ----------------------------------------------------------------
// Rows of one operand: row r, head h at p + r*row + h*64.
template <class T>
struct Operand {
    const T* p;
    int64_t row;
};

// Which query rows and keys a set has, and where its softmax statistics go.
struct Sets {
    const int* offsets;  // routed: set g's queries are rows offsets[g]..offsets[g+1]; dense: null
    int nq;              // dense: set g's queries are rows g*nq .. g*nq + nq - 1
    int M;               // keys per set: key m of set g is row g*M + m of k and v
    int Hd;
    float scale;         // 1/√dh
    float scale_log2;    // scale·log2(e): softmax in base 2
};

inline Sets make_sets(const int* offsets, int nq, int M, int Hd) {
    const float scale = 1.f / sqrtf((float)kDh);
    return Sets{offsets, nq, M, Hd, scale, scale * kLog2e};
}

PRISM_DEVICE void set_queries(const Sets& s, int g, int64_t& first, int& count) {
    if (s.offsets) {
        first = s.offsets[g];
        count = s.offsets[g + 1] - s.offsets[g];
    } else {
        first = (int64_t)g * s.nq;
        count = s.nq;
    }
}

// lse and δ: dense [sets, Hd, nq] (the query's index i in its set), routed
// [rows, Hd] (its gathered row).
PRISM_DEVICE int64_t stat_index(const Sets& s, int g, int h, int i, int64_t row) {
    return s.offsets ? row * s.Hd + h : ((int64_t)g * s.Hd + h) * s.nq + i;
}

// The routed kernels' work, listed on the device by routed_plan_kernel
// (below) from the offsets; null pointers (dense): the (set, head, z) grid.
struct WorkItem {
    int g;      // the group
    int tile0;  // its first query tile; the item has min(item_tiles, the group's tiles − tile0)
};
struct RoutedWork {
    const WorkItem* items = nullptr;  // query-tile kernels: block x takes item x / Hd, head x % Hd
    const int* n_items = nullptr;
    int item_tiles = 0;
    const int* groups = nullptr;      // dK/dV kernel: block x takes group x / (Hd·key_blocks), ...
    const int* n_groups = nullptr;
    int key_blocks = 0;
};

// The query tiles a block of the forward or dQ kernel walks: qt = begin,
// begin + step, ... < end, of set g's, head h. Dense: block (g, h, z) takes
// tiles z, z + Z, ...; routed: its work item's tiles. False: nothing to do
// (past the list's end, or an empty set).
struct TileWalk {
    int g, h, begin, end, step;
    int64_t first;  // the set's first query row
    int count;      // and its queries
};
PRISM_DEVICE bool tile_walk(const Sets& s, const RoutedWork& w, int QT, TileWalk& t) {
    if (w.items) {
        const int x = (int)blockIdx.x / s.Hd;
        if (x >= *w.n_items) return false;
        const WorkItem item = w.items[x];
        t.g = item.g, t.h = (int)blockIdx.x % s.Hd;
        set_queries(s, t.g, t.first, t.count);
        t.begin = item.tile0, t.step = 1;
        t.end = imin(item.tile0 + w.item_tiles, (t.count + QT - 1) / QT);
    } else {
        t.g = blockIdx.x, t.h = blockIdx.y;
        set_queries(s, t.g, t.first, t.count);
        t.begin = blockIdx.z, t.step = gridDim.z, t.end = (t.count + QT - 1) / QT;
    }
    return t.begin < t.end;
}

template <class Src>
struct FwdParams {
    Sets s;
    Operand<Src> q, k, v;
    float* out;  // row r, head h at out + r*out_row + h*64 (r as for q); may be null
    int64_t out_row;
    float* lse;
    uint16_t* out_bf16 = nullptr;  // the same in bf16 (the bf16 mode's stored output), when set
    RoutedWork work = {};
};

template <class Src>
struct BwdParams {
    Sets s;
    Operand<Src> q, k, v, dout;
    const float* lse;
    const float* delta;  // indexed like lse
    float* dq;           // rows as q
    int64_t dq_row;
    float* dk;  // rows as k (dv as v)
    float* dv;
    int64_t dkv_row;
    // The gradients are written, not added into (each element has one writer
    // thread): dq and dk, dv where nothing else writes them (the dense op's
    // dqkv; the routed op's dqg, while its dk and dv also take the CLS row's).
    bool overwrite_dq = false;
    bool overwrite_dkv = false;
    RoutedWork work = {};
};

PRISM_DEVICE void put_f2(bool overwrite, float* p, float x, float y) {
    if (overwrite) store_f2(p, x, y);
    else add_f2(p, x, y);
}

// ---- staging tiles in shared memory --------------------------------------------------
// Rows [0, rows) of the swizzled tile get operand rows row0 + r for r < n and
// zeros beyond: bf16 sources by cp.async (the caller commits and waits), fp32
// sources converted on the way (plain loads and stores: visible after the next
// block_sync).
template <int kThreads>
PRISM_DEVICE void stage_rows(uint16_t* tile, const Operand<uint16_t>& src, int64_t row0, int n,
                             int rows, int h) {
    for (int e = threadIdx.x; e < rows * 8; e += kThreads) {
        const int r = e >> 3, c = e & 7;
        const bool ok = r < n;
        const uint16_t* g = ok ? src.p + (row0 + r) * src.row + h * kDh + c * 8 : src.p;
        cp_async_16(tile + swz(r, c), g, ok);
    }
}
template <int kThreads>
PRISM_DEVICE void stage_rows(uint16_t* tile, const Operand<float>& src, int64_t row0, int n,
                             int rows, int h) {
    for (int e = threadIdx.x; e < rows * 8; e += kThreads) {
        const int r = e >> 3, c = e & 7;
        uint32_t w[4] = {0u, 0u, 0u, 0u};
        if (r < n) {
            float x[8];
            load_f8(x, src.p + (row0 + r) * src.row + h * kDh + c * 8);
            for (int i = 0; i < 4; i++) w[i] = pack_bf16(x[2 * i], x[2 * i + 1]);
        }
        store_shared_16(tile + swz(r, c), w[0], w[1], w[2], w[3]);
    }
}

// ---- warp-level fragments ------------------------------------------------------------------
// A operand (16×16) from a [m][k] tile: rows m0.., columns 16·ks..
PRISM_DEVICE void frag_a(uint32_t (&a)[4], const uint16_t* tile, int m0, int ks, int lane) {
    ldsm_x4(a, tile + swz(m0 + (lane & 15), 2 * ks + (lane >> 4)));
}
// B operands of two n-tiles (n0.., n0+8..) for k-step ks, from a [n][k] tile
// (Kᵀ from K, Qᵀ from Q, ...): b[0], b[1] for n0; b[2], b[3] for n0+8.
PRISM_DEVICE void frag_b_nk(uint32_t (&b)[4], const uint16_t* tile, int n0, int ks, int lane) {
    ldsm_x4(b, tile + swz(n0 + (lane & 7) + ((lane >> 4) << 3), 2 * ks + ((lane >> 3) & 1)));
}
// The same from a [k][n] tile (V for P·V, K for dS·K, ...): rows k0 = 16·ks..,
// columns 16·np.. (n-tiles 2np, 2np+1).
PRISM_DEVICE void frag_b_kn(uint32_t (&b)[4], const uint16_t* tile, int ks, int np, int lane) {
    ldsm_x4_trans(b, tile + swz(16 * ks + (lane & 7) + (((lane >> 3) & 1) << 3), 2 * np + (lane >> 4)));
}
// The accumulators of n-tiles 2kk, 2kk+1 as the A operand of k-step kk.
PRISM_DEVICE void c_to_a(uint32_t (&a)[4], const float (&c)[8][4], int kk) {
    a[0] = pack_bf16(c[2 * kk][0], c[2 * kk][1]);
    a[1] = pack_bf16(c[2 * kk][2], c[2 * kk][3]);
    a[2] = pack_bf16(c[2 * kk + 1][0], c[2 * kk + 1][1]);
    a[3] = pack_bf16(c[2 * kk + 1][2], c[2 * kk + 1][3]);
}

PRISM_DEVICE void zero(float (&c)[8][4]) {
    for (int j = 0; j < 8; j++)
        for (int e = 0; e < 4; e++) c[j][e] = 0.f;
}

// c[j] (+)= a_frags · tile_nkᵀ over the 64 head dims: rows of the warp's 16 × 64
// columns n of a [n][64] tile, only the first `chunks` 16-column chunks.
PRISM_DEVICE void product_nk(float (&c)[8][4], const uint32_t (&a)[4][4], const uint16_t* tile,
                             int chunks, int lane) {
PRISM_UNROLL
    for (int np = 0; np < 4; np++) {
        if (np >= chunks) break;
PRISM_UNROLL
        for (int ks = 0; ks < 4; ks++) {
            uint32_t b[4];
            frag_b_nk(b, tile, 16 * np, ks, lane);
            mma_bf16(c[2 * np], a[ks], b[0], b[1]);
            mma_bf16(c[2 * np + 1], a[ks], b[2], b[3]);
        }
    }
}

// acc (+)= c · tile_kn: the warp's 16 rows × 64 head dims, summing over the
// first `chunks`·16 rows of a [k][64] tile (k = the columns of c).
PRISM_DEVICE void product_kn(float (&acc)[8][4], const float (&c)[8][4], const uint16_t* tile,
                             int chunks, int lane) {
PRISM_UNROLL
    for (int kk = 0; kk < 4; kk++) {
        if (kk >= chunks) break;
        uint32_t a[4];
        c_to_a(a, c, kk);
PRISM_UNROLL
        for (int np = 0; np < 4; np++) {
            uint32_t b[4];
            frag_b_kn(b, tile, kk, np, lane);
            mma_bf16(acc[2 * np], a, b[0], b[1]);
            mma_bf16(acc[2 * np + 1], a, b[2], b[3]);
        }
    }
}

PRISM_DEVICE float quad_max(float v) {
    v = fmaxf(v, shfl_xor(v, 1));
    return fmaxf(v, shfl_xor(v, 2));
}
PRISM_DEVICE float quad_sum(float v) {
    v += shfl_xor(v, 1);
    return v + shfl_xor(v, 2);
}

// Key tiles of a set for the query-tile kernels: kStationary stages all of K
// and V once (round_up(M, 16) rows each) and tile kt is a view into them;
// otherwise two 64-row buffers alternate.
template <bool kStationary>
struct KeyTiles {
    uint16_t *k, *v;
    static PRISM_HOST_DEVICE int rows(int M) { return kStationary ? (M + 15) / 16 * 16 : 2 * kKT; }
    PRISM_DEVICE const uint16_t* k_tile(int kt) const { return k + (kStationary ? kt : (kt & 1)) * kKT * kDh; }
    PRISM_DEVICE const uint16_t* v_tile(int kt) const { return v + (kStationary ? kt : (kt & 1)) * kKT * kDh; }
};

// Issues the staging of key tile kt into its buffer (streaming mode).
template <int kThreads, class Src>
PRISM_DEVICE void stage_key_tile(const KeyTiles<false>& t, const Operand<Src>& k, const Operand<Src>& v,
                                 int64_t kv0, int M, int kt, int h) {
    uint16_t* kb = t.k + (kt & 1) * kKT * kDh;
    uint16_t* vb = t.v + (kt & 1) * kKT * kDh;
    const int n = imin(kKT, M - kt * kKT);
    stage_rows<kThreads>(kb, k, kv0 + kt * kKT, n, kKT, h);
    stage_rows<kThreads>(vb, v, kv0 + kt * kKT, n, kKT, h);
}

// Masks the scores of keys ≥ M (tile starting at key0) with −∞.
PRISM_DEVICE void mask_keys(float (&s)[8][4], int key0, int M, int lane) {
    if (key0 + kKT <= M) return;
    const int t = lane & 3;
PRISM_UNROLL
    for (int j = 0; j < 8; j++)
PRISM_UNROLL
        for (int e = 0; e < 4; e++)
            if (key0 + 8 * j + 2 * t + (e & 1) >= M) s[j][e] = -INFINITY;
}

// ---- forward ------------------------------------------------------------------------------
// Dense grid (sets, Hd, Z): block z takes the set's query tiles z, z+Z, ...;
// routed: (items·Hd), block x its work item's tiles (tile_walk).
template <class Src, int W, bool kStationary>
PRISM_KERNEL(W * 32) flash_fwd_kernel(FwdParams<Src> p) {
    constexpr int kThreads = W * 32, QT = W * 16;
    PRISM_SMEM(smem_raw);
    const Sets& s = p.s;
    TileWalk walk;
    if (!tile_walk(s, p.work, QT, walk)) return;
    const int g = walk.g, h = walk.h, M = s.M, count = walk.count;
    const int64_t first = walk.first;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, gr = lane >> 2, t = lane & 3;
    const int k_tiles = (M + kKT - 1) / kKT;
    const int64_t kv0 = (int64_t)g * M;

    uint16_t* sQ = reinterpret_cast<uint16_t*>(smem_raw);
    KeyTiles<kStationary> kv;
    kv.k = sQ + QT * kDh;
    kv.v = kv.k + KeyTiles<kStationary>::rows(M) * kDh;
    if (kStationary) {
        const int rows = KeyTiles<kStationary>::rows(M);
        stage_rows<kThreads>(kv.k, p.k, kv0, M, rows, h);
        stage_rows<kThreads>(kv.v, p.v, kv0, M, rows, h);
    }

    for (int qt = walk.begin; qt < walk.end; qt += walk.step) {
        block_sync();  // everyone is done with the previous tile's buffers
        const int i0 = qt * QT;
        stage_rows<kThreads>(sQ, p.q, first + i0, imin(QT, count - i0), QT, h);
        if constexpr (!kStationary) stage_key_tile<kThreads>(kv, p.k, p.v, kv0, M, 0, h);
        cp_async_commit();
        // A warp whose 16 rows are all past the set's end only helps staging.
        const bool active = i0 + warp * 16 < count;

        uint32_t qf[4][4];
        float o[8][4];
        zero(o);
        float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.f, l1 = 0.f;  // rows gr, gr+8 (base 2)
        for (int kt = 0; kt < k_tiles; kt++) {
            cp_async_wait_all();
            block_sync();  // tile kt visible to all; tile kt-1's buffer free
            if constexpr (!kStationary) {
                if (kt + 1 < k_tiles) stage_key_tile<kThreads>(kv, p.k, p.v, kv0, M, kt + 1, h);
                cp_async_commit();
            }
            if (!active) continue;
            if (kt == 0)
                for (int ks = 0; ks < 4; ks++) frag_a(qf[ks], sQ, warp * 16, ks, lane);
            const int key0 = kt * kKT;
            const int chunks = imin(4, (M - key0 + 15) / 16);  // 16-key chunks holding keys < M

            float sc[8][4];
            zero(sc);
            product_nk(sc, qf, kv.k_tile(kt), chunks, lane);
            mask_keys(sc, key0, M, lane);

            // Online softmax, base 2: each row's max over its quad, then rescale.
            float mx0 = -INFINITY, mx1 = -INFINITY;
PRISM_UNROLL
            for (int j = 0; j < 8; j++) {
                mx0 = fmaxf(mx0, fmaxf(sc[j][0], sc[j][1]));
                mx1 = fmaxf(mx1, fmaxf(sc[j][2], sc[j][3]));
            }
            // Every tile has a key < M, so the new maxima are finite.
            const float n0 = fmaxf(m0, quad_max(mx0) * s.scale_log2);
            const float n1 = fmaxf(m1, quad_max(mx1) * s.scale_log2);
            const float a0 = exp2f(m0 - n0), a1 = exp2f(m1 - n1);
            m0 = n0, m1 = n1;
            float r0 = 0.f, r1 = 0.f;
PRISM_UNROLL
            for (int j = 0; j < 8; j++) {
                sc[j][0] = exp2f(fmaf(sc[j][0], s.scale_log2, -n0));
                sc[j][1] = exp2f(fmaf(sc[j][1], s.scale_log2, -n0));
                sc[j][2] = exp2f(fmaf(sc[j][2], s.scale_log2, -n1));
                sc[j][3] = exp2f(fmaf(sc[j][3], s.scale_log2, -n1));
                r0 += sc[j][0] + sc[j][1];
                r1 += sc[j][2] + sc[j][3];
                o[j][0] *= a0, o[j][1] *= a0, o[j][2] *= a1, o[j][3] *= a1;
            }
            l0 = l0 * a0 + r0;  // this lane's columns; the quad's sum at the end
            l1 = l1 * a1 + r1;
            product_kn(o, sc, kv.v_tile(kt), chunks, lane);
        }
        if (!active) continue;
        l0 = quad_sum(l0);
        l1 = quad_sum(l1);
        const float inv0 = 1.f / l0, inv1 = 1.f / l1;
        for (int half = 0; half < 2; half++) {
            const int i = i0 + warp * 16 + gr + 8 * half;
            if (i >= count) continue;
            const int64_t row = first + i, at = row * p.out_row + h * kDh;
            const float inv = half ? inv1 : inv0;
PRISM_UNROLL
            for (int j = 0; j < 8; j++) {
                const float x = o[j][2 * half] * inv, y = o[j][2 * half + 1] * inv;
                if (p.out) store_f2(p.out + at + 8 * j + 2 * t, x, y);
                if (p.out_bf16) store_bf16x2(p.out_bf16 + at + 8 * j + 2 * t, x, y);
            }
            if (t == 0) p.lse[stat_index(s, g, h, i, row)] = ((half ? m1 : m0) + log2f(half ? l1 : l0)) * kLn2;
        }
    }
    cp_async_wait_all();  // nothing may be in flight when the block exits
}

// ---- backward -------------------------------------------------------------------------------
// One warp per (row, all heads): δ = Σ dO·O per head (fp32, a butterfly sum),
// and, when dout_rounded is set, dO rounded to bf16 in the same layout. dO and O
// are read in fp32, or in bf16 as the bf16 mode stores them.
// Rows r < rows, and r < *rows_on_device when that is set (routed: offsets[B·nS]).
constexpr int kPrepWarps = 8;
struct PrepParams {
    Sets s;
    const float* dout;
    const float* out;
    int64_t row_stride;  // of dout and out (D)
    int64_t rows;
    const int* rows_on_device;
    float* delta;
    uint16_t* dout_rounded;                  // written: dO in bf16 (the dense kernels' tiles), when set
    const uint16_t* out_bf16 = nullptr;      // O as the bf16 mode stores it: read instead of out, when set
    const uint16_t* dout_bf16 = nullptr;     // dO likewise: read instead of dout (dout_rounded then null)
};

PRISM_KERNEL(kPrepWarps * 32) flash_bwd_prep_kernel(PrepParams p) {
    const int lane = threadIdx.x & 31;
    const int64_t rows = p.rows_on_device && *p.rows_on_device < p.rows ? (int64_t)*p.rows_on_device : p.rows;
    for (int64_t row = (int64_t)blockIdx.x * kPrepWarps + (threadIdx.x >> 5); row < rows;
         row += (int64_t)gridDim.x * kPrepWarps) {
        // dense rows are fewer than 2^31 (the host checks): 32-bit division
        const int g = p.s.offsets ? 0 : (int)row / p.s.nq, i = p.s.offsets ? 0 : (int)row % p.s.nq;
        for (int h = 0; h < p.s.Hd; h++) {
            const int64_t e = row * p.row_stride + h * kDh + 2 * lane;
            float dx, dy, ox, oy;
            if (p.dout_bf16) load_bf16x2(dx, dy, p.dout_bf16 + e);
            else load_f2(dx, dy, p.dout + e);
            if (p.out_bf16) load_bf16x2(ox, oy, p.out_bf16 + e);
            else load_f2(ox, oy, p.out + e);
            float d = dx * ox + dy * oy;
            for (int m = 16; m > 0; m >>= 1) d += shfl_xor(d, m);
            if (lane == 0) p.delta[stat_index(p.s, g, h, i, row)] = d;
            if (p.dout_rounded) store_bf16x2(p.dout_rounded + e, dx, dy);
        }
    }
}

// dQ: grid and staging as the forward; the query tile stages Q and dO.
template <class Src, int W, bool kStationary>
PRISM_KERNEL(W * 32) flash_bwd_dq_kernel(BwdParams<Src> p) {
    constexpr int kThreads = W * 32, QT = W * 16;
    PRISM_SMEM(smem_raw);
    const Sets& s = p.s;
    TileWalk walk;
    if (!tile_walk(s, p.work, QT, walk)) return;
    const int g = walk.g, h = walk.h, M = s.M, count = walk.count;
    const int64_t first = walk.first;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, gr = lane >> 2, t = lane & 3;
    const int k_tiles = (M + kKT - 1) / kKT;
    const int64_t kv0 = (int64_t)g * M;

    uint16_t* sQ = reinterpret_cast<uint16_t*>(smem_raw);
    uint16_t* sdO = sQ + QT * kDh;
    KeyTiles<kStationary> kv;
    kv.k = sdO + QT * kDh;
    kv.v = kv.k + KeyTiles<kStationary>::rows(M) * kDh;
    if (kStationary) {
        const int rows = KeyTiles<kStationary>::rows(M);
        stage_rows<kThreads>(kv.k, p.k, kv0, M, rows, h);
        stage_rows<kThreads>(kv.v, p.v, kv0, M, rows, h);
    }

    for (int qt = walk.begin; qt < walk.end; qt += walk.step) {
        block_sync();
        const int i0 = qt * QT, n = imin(QT, count - i0);
        stage_rows<kThreads>(sQ, p.q, first + i0, n, QT, h);
        stage_rows<kThreads>(sdO, p.dout, first + i0, n, QT, h);
        if constexpr (!kStationary) stage_key_tile<kThreads>(kv, p.k, p.v, kv0, M, 0, h);
        cp_async_commit();
        const bool active = i0 + warp * 16 < count;

        // This lane's two rows: logsumexp in base 2, and δ (rows past the end: 0, unused).
        float lse2[2] = {0.f, 0.f}, dlt[2] = {0.f, 0.f};
        for (int half = 0; half < 2; half++) {
            const int i = i0 + warp * 16 + gr + 8 * half;
            if (i < count) {
                const int64_t x = stat_index(s, g, h, i, first + i);
                lse2[half] = p.lse[x] * kLog2e;
                dlt[half] = p.delta[x];
            }
        }
        uint32_t qf[4][4], df[4][4];
        float dq[8][4];
        zero(dq);
        for (int kt = 0; kt < k_tiles; kt++) {
            cp_async_wait_all();
            block_sync();
            if constexpr (!kStationary) {
                if (kt + 1 < k_tiles) stage_key_tile<kThreads>(kv, p.k, p.v, kv0, M, kt + 1, h);
                cp_async_commit();
            }
            if (!active) continue;
            if (kt == 0)
                for (int ks = 0; ks < 4; ks++) {
                    frag_a(qf[ks], sQ, warp * 16, ks, lane);
                    frag_a(df[ks], sdO, warp * 16, ks, lane);
                }
            const int key0 = kt * kKT;
            const int chunks = imin(4, (M - key0 + 15) / 16);
            float sc[8][4], dp[8][4];
            zero(sc);
            zero(dp);
            product_nk(sc, qf, kv.k_tile(kt), chunks, lane);
            mask_keys(sc, key0, M, lane);
            product_nk(dp, df, kv.v_tile(kt), chunks, lane);
PRISM_UNROLL
            for (int j = 0; j < 8; j++)
PRISM_UNROLL
                for (int e = 0; e < 4; e++) {
                    const float pr = exp2f(fmaf(sc[j][e], s.scale_log2, -lse2[e >> 1]));
                    sc[j][e] = pr * (dp[j][e] - dlt[e >> 1]);  // dS (of the scaled score)
                }
            product_kn(dq, sc, kv.k_tile(kt), chunks, lane);
        }
        if (!active) continue;
        for (int half = 0; half < 2; half++) {
            const int i = i0 + warp * 16 + gr + 8 * half;
            if (i >= count) continue;
            float* d = p.dq + (first + i) * p.dq_row + h * kDh;
PRISM_UNROLL
            for (int j = 0; j < 8; j++)
                put_f2(p.overwrite_dq, d + 8 * j + 2 * t, dq[j][2 * half] * s.scale, dq[j][2 * half + 1] * s.scale);
        }
    }
    cp_async_wait_all();
}

// dK, dV: dense grid (sets, Hd, ceil(M / (16W))); routed (groups·Hd·that),
// block x: listed group x / (Hd·key_blocks), then head, then key block. The
// set's query tiles in order.
template <class Src, int W>
PRISM_KERNEL(W * 32) flash_bwd_dkv_kernel(BwdParams<Src> p) {
    constexpr int kThreads = W * 32, KB = W * 16;
    PRISM_SMEM(smem_raw);
    const Sets& s = p.s;
    int g = blockIdx.x, h = blockIdx.y, key_block = blockIdx.z;
    if (p.work.groups) {
        const int per_group = s.Hd * p.work.key_blocks, x = (int)blockIdx.x / per_group;
        if (x >= *p.work.n_groups) return;
        g = p.work.groups[x];
        h = (int)blockIdx.x % per_group / p.work.key_blocks;
        key_block = (int)blockIdx.x % p.work.key_blocks;
    }
    const int M = s.M, key0 = key_block * KB;
    int64_t first;
    int count;
    set_queries(s, g, first, count);
    if (count == 0 || key0 >= M) return;  // a group without queries adds nothing
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, gr = lane >> 2, t = lane & 3;
    const int q_tiles = (count + kQT2 - 1) / kQT2;
    const int64_t kv0 = (int64_t)g * M + key0;

    uint16_t* sK = reinterpret_cast<uint16_t*>(smem_raw);
    uint16_t* sV = sK + KB * kDh;
    uint16_t* sQ = sV + KB * kDh;          // [2][kQT2][64]
    uint16_t* sdO = sQ + 2 * kQT2 * kDh;   // [2][kQT2][64]
    float* sL = reinterpret_cast<float*>(sdO + 2 * kQT2 * kDh);  // [2][kQT2]: logsumexp, base 2
    float* sD = sL + 2 * kQT2;                                   // [2][kQT2]: δ
    const int nk = imin(KB, M - key0);
    stage_rows<kThreads>(sK, p.k, kv0, nk, KB, h);
    stage_rows<kThreads>(sV, p.v, kv0, nk, KB, h);

    // Query tile qt into buffer qt & 1; rows past the end get lse = +∞ (P = 0).
    auto stage_queries = [&](int qt) {
        const int b = qt & 1, i0 = qt * kQT2, n = imin(kQT2, count - i0);
        stage_rows<kThreads>(sQ + b * kQT2 * kDh, p.q, first + i0, n, kQT2, h);
        stage_rows<kThreads>(sdO + b * kQT2 * kDh, p.dout, first + i0, n, kQT2, h);
        for (int r = threadIdx.x; r < kQT2; r += kThreads) {
            const int i = i0 + r;
            const int64_t x = i < count ? stat_index(s, g, h, i, first + i) : 0;
            st_shared(sL + b * kQT2 + r, i < count ? p.lse[x] * kLog2e : INFINITY);
            st_shared(sD + b * kQT2 + r, i < count ? p.delta[x] : 0.f);
        }
    };
    stage_queries(0);
    cp_async_commit();
    const bool active = warp * 16 < nk;  // the warp owns keys key0 + 16·warp ..

    float dk[8][4], dv[8][4];
    zero(dk);
    zero(dv);
    for (int qt = 0; qt < q_tiles; qt++) {
        cp_async_wait_all();
        block_sync();
        if (qt + 1 < q_tiles) stage_queries(qt + 1);
        cp_async_commit();
        if (!active) continue;
        const int b = qt & 1;
        const uint16_t* tQ = sQ + b * kQT2 * kDh;
        const uint16_t* tdO = sdO + b * kQT2 * kDh;
        const float* tL = sL + b * kQT2;
        const float* tD = sD + b * kQT2;
        const int chunks = imin(4, (count - qt * kQT2 + 15) / 16);  // 16-query chunks with queries

        // The warp's K and V rows are fragments read again for every tile:
        // kept in registers across tiles they would cost 32 more per thread.
        uint32_t kf[4][4], vf[4][4];
        for (int ks = 0; ks < 4; ks++) frag_a(kf[ks], sK, warp * 16, ks, lane);
        float st[8][4];  // Sᵀ: the warp's 16 keys × the tile's 64 queries
        zero(st);
        product_nk(st, kf, tQ, chunks, lane);
PRISM_UNROLL
        for (int j = 0; j < 8; j++)
PRISM_UNROLL
            for (int e = 0; e < 4; e++)
                st[j][e] = exp2f(fmaf(st[j][e], s.scale_log2, -ld_shared(tL + 8 * j + 2 * t + (e & 1))));
        product_kn(dv, st, tdO, chunks, lane);  // dV += Pᵀ·dO
        for (int ks = 0; ks < 4; ks++) frag_a(vf[ks], sV, warp * 16, ks, lane);
        float dpt[8][4];
        zero(dpt);
        product_nk(dpt, vf, tdO, chunks, lane);  // dPᵀ = V·dOᵀ
PRISM_UNROLL
        for (int j = 0; j < 8; j++)
PRISM_UNROLL
            for (int e = 0; e < 4; e++) st[j][e] *= dpt[j][e] - ld_shared(tD + 8 * j + 2 * t + (e & 1));
        product_kn(dk, st, tQ, chunks, lane);  // dK += dSᵀ·Q
    }
    cp_async_wait_all();
    if (!active) return;
    for (int half = 0; half < 2; half++) {
        const int m = warp * 16 + gr + 8 * half;
        if (m >= nk) continue;
        float* dkr = p.dk + (kv0 + m) * p.dkv_row + h * kDh;
        float* dvr = p.dv + (kv0 + m) * p.dkv_row + h * kDh;
PRISM_UNROLL
        for (int j = 0; j < 8; j++) {
            put_f2(p.overwrite_dkv, dkr + 8 * j + 2 * t, dk[j][2 * half] * s.scale, dk[j][2 * half + 1] * s.scale);
            put_f2(p.overwrite_dkv, dvr + 8 * j + 2 * t, dv[j][2 * half], dv[j][2 * half + 1]);
        }
    }
}

// ---- launch geometry (host) ----------------------------------------------------------------
// Dynamic shared memory of each kernel, in bytes.
template <int W, bool kStationary>
inline size_t fwd_smem(int M) {
    return sizeof(uint16_t) * kDh * (W * 16 + 2 * KeyTiles<kStationary>::rows(M));
}
template <int W, bool kStationary>
inline size_t dq_smem(int M) {
    return sizeof(uint16_t) * kDh * (2 * W * 16 + 2 * KeyTiles<kStationary>::rows(M));
}
template <int W>
inline size_t dkv_smem() {
    return sizeof(uint16_t) * kDh * (2 * W * 16 + 4 * kQT2) + sizeof(float) * 4 * kQT2;
}

constexpr int kWarps = 4;  // warps per block of the query-tile kernels: 64 query rows

// Warps per block of the dense forward: 128 query rows per block halve the
// key/value tiles each query row waits for, which long sequences need (the
// registers per thread stay the same, so does the occupancy); short ones would
// waste more of their last tile.
inline int dense_fwd_warps(int L) { return L > 512 ? 8 : kWarps; }

// Warps (16 keys each) per block of the routed dK/dV kernel: as few as the
// group's keys need (So2Sat: N = 16, one warp).
inline int routed_dkv_warps(int N) { return N <= 16 ? 1 : (N <= 32 ? 2 : kWarps); }

// ---- routed work lists ------------------------------------------------------------------
// A group has anywhere from 0 to nS·N queries, and a router early in training
// (or a skewed data set) sends most of them to a few channels. A grid of a
// block per (group, head) would spend blocks on empty groups and end with
// the device waiting on the largest groups' last blocks. So the routed
// kernels walk lists that routed_plan_kernel makes from the offsets, on the
// device (the group sizes never go to the host):
// - for the forward and dQ kernels, work items of up to item_tiles query
//   tiles of one group (K and V resident: staged once per item), the items
//   with the most tiles first: the full ones, then each group's remainder by
//   its size;
// - for the dK/dV kernel, whose blocks walk all their group's queries, the
//   non-empty groups, the most query tiles first.
// The hardware issues a grid's blocks roughly in index order, so the largest
// pieces start first and the small ones fill the tail. Both orders are stable
// (by group within a size), and a block's result does not depend on when it
// runs: the outputs stay bit for bit deterministic. The lists' lengths stay
// on the device; each grid is sized for the most work the shapes allow and
// its blocks past the list's end return at once.
struct RoutedGeometry {
    bool stationary;     // K/V resident in shared memory (N ≤ kMaxStationaryKeys)
    int item_tiles;      // query tiles per work item
    int64_t max_items;   // the most items offsets with max_rows rows can make
    int key_warps, key_blocks;  // of the dK/dV kernel
    int radix_passes;    // 4-bit digits of the most query tiles a group can have
};
// The most query tiles per item: more reuse K/V longer, fewer balance better.
// 8 is a guess to be measured (flash_attention.cu lets PRISM_ROUTED_ITEM_TILES
// override it, up to kPlanClasses − 1, for that sweep).
constexpr int kMaxItemTiles = 8;
constexpr int kPlanClasses = 16;  // counting-sort classes per pass of routed_plan_kernel (4 bits)
static_assert(kMaxItemTiles < kPlanClasses, "an item's tiles are its class");

// The item size cap from PRISM_ROUTED_ITEM_TILES's value (null or empty: kMaxItemTiles).
inline int item_tiles_setting(const char* value) {
    if (!value || !*value) return kMaxItemTiles;
    char* end = nullptr;
    const long v = strtol(value, &end, 10);
    if (*end || v < 1 || v >= kPlanClasses)
        throw std::runtime_error(std::string("PRISM_ROUTED_ITEM_TILES=") + value + ": expected an integer 1.." +
                                 std::to_string(kPlanClasses - 1));
    return (int)v;
}

constexpr int64_t kRoutedTargetBlocks = 2048;  // enough blocks of the forward to fill an H100/H200

// max_rows: a bound on offsets[B·nS] (B·nS·N·k); target_blocks: the forward
// grid the item size aims at; max_item_tiles < kPlanClasses.
inline RoutedGeometry routed_geometry(int B, int nS, int N, int Hd, int64_t max_rows,
                                      int64_t target_blocks = kRoutedTargetBlocks,
                                      int max_item_tiles = kMaxItemTiles) {
    constexpr int QT = kWarps * 16;
    const int64_t sets = (int64_t)B * nS;
    RoutedGeometry r{};
    r.stationary = N <= kMaxStationaryKeys;
    // With K and V streamed every tile pays for them alike: one tile per item.
    int64_t per = r.stationary ? ((max_rows + QT - 1) / QT) * Hd / (target_blocks > 0 ? target_blocks : 1) : 1;
    r.item_tiles = (int)(per < 1 ? 1 : (per > max_item_tiles ? max_item_tiles : per));
    // Σ_g ⌈c_g/QT⌉ ≤ ⌊(Σ c_g + sets·(QT−1))/QT⌋, and likewise for the items.
    const int64_t max_tiles = (max_rows + sets * (QT - 1)) / QT;
    r.max_items = (max_tiles + sets * (r.item_tiles - 1)) / r.item_tiles;
    r.key_warps = routed_dkv_warps(N);
    r.key_blocks = (N + 16 * r.key_warps - 1) / (16 * r.key_warps);
    const int64_t group_rows = max_rows < (int64_t)nS * N ? max_rows : (int64_t)nS * N;
    int64_t group_tiles = (group_rows + kQT2 - 1) / kQT2;
    r.radix_passes = 1;
    while (group_tiles >>= 4) r.radix_passes++;
    return r;
}

constexpr int kPlanThreads = 256;
constexpr size_t kPlanSmem = sizeof(int) * (kPlanClasses * kPlanThreads + kPlanClasses);

struct PlanParams {
    const int* offsets;  // [sets + 1]
    int sets;
    int64_t max_rows;    // the bound the geometry assumed; more rows are a caller's bug (trap)
    // query-tile items (items null: none wanted)
    WorkItem* items;
    int* n_items;
    int item_tiles;
    int64_t max_items;
    // dK/dV groups (groups null: none wanted); tmp: as many ints, for the sort
    int* groups;
    int* groups_tmp;
    int* n_groups;
    int radix_passes;
};

// Where a stable counting sort puts each thread's elements: every thread has
// counted its own (a contiguous run of the input) per class in `mine`; on
// return at[c] is the position of its first element of class c, the classes
// in descending order (class kPlanClasses − 1 first), and the result is the
// number of elements. A Hillis–Steele scan over the threads, all classes at once.
PRISM_DEVICE int class_positions(int* sh, const int (&mine)[kPlanClasses], int (&at)[kPlanClasses]) {
    const int tid = threadIdx.x;
    int run[kPlanClasses];
    for (int c = 0; c < kPlanClasses; c++) run[c] = mine[c];
    for (int off = 1; off < kPlanThreads; off <<= 1) {
        for (int c = 0; c < kPlanClasses; c++) st_shared(sh + c * kPlanThreads + tid, run[c]);
        block_sync();
        if (tid >= off)
            for (int c = 0; c < kPlanClasses; c++) run[c] += ld_shared(sh + c * kPlanThreads + tid - off);
        block_sync();
    }
    int* totals = sh + kPlanClasses * kPlanThreads;
    if (tid == kPlanThreads - 1)
        for (int c = 0; c < kPlanClasses; c++) st_shared(totals + c, run[c]);
    block_sync();
    int start = 0;
    for (int c = kPlanClasses - 1; c >= 0; c--) {
        at[c] = start + run[c] - mine[c];
        start += ld_shared(totals + c);
    }
    return start;
}

PRISM_DEVICE int query_tiles_of(const int* offsets, int g, int rows_per_tile) {
    return (offsets[g + 1] - offsets[g] + rows_per_tile - 1) / rows_per_tile;
}

// One block of kPlanThreads; each thread owns a contiguous run of groups (or
// of the list being sorted), so that the sorts are stable.
PRISM_KERNEL(kPlanThreads) routed_plan_kernel(PlanParams p) {
    PRISM_SMEM(smem_raw);
    int* sh = reinterpret_cast<int*>(smem_raw);
    constexpr int QT = kWarps * 16;
    const int tid = threadIdx.x;
    if (p.offsets[p.sets] > p.max_rows) device_trap("routed_plan_kernel: more gathered rows than announced");
    int mine[kPlanClasses], at[kPlanClasses];
    const int per = (p.sets + kPlanThreads - 1) / kPlanThreads;
    const int g0 = imin(p.sets, tid * per), g1 = imin(p.sets, g0 + per);

    if (p.items) {  // class of an item: its tiles (1 .. item_tiles ≤ 15)
        for (int c = 0; c < kPlanClasses; c++) mine[c] = 0;
        for (int g = g0; g < g1; g++) {
            const int tiles = query_tiles_of(p.offsets, g, QT);
            mine[p.item_tiles] += tiles / p.item_tiles;
            if (tiles % p.item_tiles) mine[tiles % p.item_tiles]++;
        }
        const int n = class_positions(sh, mine, at);
        if (n > p.max_items) device_trap("routed_plan_kernel: more work items than the grid has blocks");
        for (int g = g0; g < g1; g++) {
            const int tiles = query_tiles_of(p.offsets, g, QT);
            for (int t0 = 0; t0 < tiles; t0 += p.item_tiles)
                p.items[at[imin(p.item_tiles, tiles - t0)]++] = WorkItem{g, t0};
        }
        if (tid == 0) *p.n_items = n;
    }

    if (p.groups) {  // LSD radix sort by query tiles, descending; empty groups dropped in pass 0
        const int* in = nullptr;
        int* out = (p.radix_passes & 1) ? p.groups : p.groups_tmp;  // the last pass writes groups
        int n = p.sets;
        for (int pass = 0; pass < p.radix_passes; pass++) {
            const int shift = 4 * pass;
            const int per_n = (n + kPlanThreads - 1) / kPlanThreads;
            const int i0 = imin(n, tid * per_n), i1 = imin(n, i0 + per_n);
            for (int c = 0; c < kPlanClasses; c++) mine[c] = 0;
            for (int i = i0; i < i1; i++) {
                const int g = in ? in[i] : i;
                const int tiles = query_tiles_of(p.offsets, g, kQT2);
                if (tiles > 0) mine[(tiles >> shift) & (kPlanClasses - 1)]++;
            }
            const int total = class_positions(sh, mine, at);
            for (int i = i0; i < i1; i++) {
                const int g = in ? in[i] : i;
                const int tiles = query_tiles_of(p.offsets, g, kQT2);
                if (tiles > 0) out[at[(tiles >> shift) & (kPlanClasses - 1)]++] = g;
            }
            block_sync();  // this pass's list, written by every thread, is the next one's input
            n = total;
            in = out;
            out = out == p.groups ? p.groups_tmp : p.groups;
        }
        if (tid == 0) *p.n_groups = n;
    }
}

#ifdef PRISM_EMULATION
}  // inline namespace emulated
#endif
}  // namespace prism::flash
