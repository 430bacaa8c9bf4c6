// Fused ("flash") attention ops on tensor cores: the host side. The kernels
// and the design notes are in flash_attention.cuh.
//
// Dense: the tiles are bf16: the bf16 mode's stored qkv as it is, or qkv
// rounded once per op into scratch of the same layout (one read of 4 bytes,
// one write of 2, per element), so that the K/V tiles every query tile
// streams are half the bytes and come in by cp.async. Backward also rounds dO
// (in the kernel that computes δ).
// Routed: the bf16 mode's stored operands (qg, k, v, og and dog in bf16) come
// in by cp.async as they are; fp32 operands are rounded as the tiles are
// staged (no scratch copy: the gathered buffers' row count lives on the
// device only, the last offset, and with K/V resident each row is read once
// or a few times).
#include <climits>
#include <cmath>
#include <cstdlib>
#include <type_traits>

#include "kernels/cuda/common.cuh"
#include "kernels/cuda/flash_attention.cuh"

namespace prism::cuda_ops {
using namespace cuda_detail;
using namespace prism::flash;

static_assert(kDh == kFlashHeadDim, "cuda_ops.h announces the head dim the kernels support");

namespace {

void require_head_dim(int D, int Hd, const char* op) {
    PRISM_CUDA_REQUIRE(Hd > 0 && D == kDh * Hd,
                       (std::string(op) + ": head dim D/Hd must be 64 (D = " + std::to_string(D) +
                        ", Hd = " + std::to_string(Hd) + ")")
                           .c_str());
}

void require_aligned(const void* p, const char* what) {
    PRISM_CUDA_REQUIRE(reinterpret_cast<uintptr_t>(p) % 16 == 0,
                       (std::string("flash attention: ") + what + " must be 16-byte aligned").c_str());
}

// Launches with the dynamic shared memory the kernel needs (above 48 KiB it
// has to be allowed per kernel first).
template <class Params>
void launch(void (*kernel)(Params), dim3 grid, int threads, size_t smem, cudaStream_t stream,
            const Params& p) {
    if (grid.x == 0 || grid.y == 0 || grid.z == 0) return;
    if (smem > 48 * 1024)
        PRISM_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
    PRISM_LAUNCH(grid, threads, smem, stream, kernel)(p);
    PRISM_LAUNCH_CHECK();
}

unsigned clamp_grid(int64_t n) { return (unsigned)(n < 1 ? 1 : (n > 65535 ? 65535 : n)); }

void bwd_prep(const PrepParams& p, cudaStream_t stream) {
    const int64_t blocks = (p.rows + kPrepWarps - 1) / kPrepWarps;
    if (p.rows <= 0) return;
    PRISM_LAUNCH(clamp_grid(blocks), kPrepWarps * 32, 0, stream, flash_bwd_prep_kernel)(p);
    PRISM_LAUNCH_CHECK();
}

// Dense: qkv_bf16 if given, else bf16(qkv) in `scratch`.
const uint16_t* qkv_tiles(Scratch& scratch, const float* qkv, const uint16_t* qkv_bf16, int64_t n,
                          cudaStream_t stream) {
    if (qkv_bf16) {
        require_aligned(qkv_bf16, "qkv (bf16)");
        return qkv_bf16;
    }
    PRISM_CUDA_REQUIRE(qkv != nullptr, "flash attention: no qkv");
    to_bf16(scratch.as<uint16_t>(), qkv, n, stream);
    return scratch.as<uint16_t>();
}

}  // namespace

// ---- dense -----------------------------------------------------------------------------------
void flash_attention_forward(float* out, uint16_t* out_bf16, float* lse, const float* qkv, const uint16_t* qkv_bf16,
                             int B, int L, int D, int Hd, cudaStream_t stream) {
    require_head_dim(D, Hd, "flash_attention_forward");
    if (B <= 0 || L <= 0) return;
    PRISM_CUDA_REQUIRE(out || out_bf16, "flash_attention_forward: no output");
    if (out) require_aligned(out, "out");
    if (out_bf16) require_aligned(out_bf16, "out (bf16)");
    const int64_t n = (int64_t)B * L * 3 * D;
    Scratch qkv16(qkv_bf16 ? 0 : sizeof(uint16_t) * n, stream);
    const uint16_t* q = qkv_tiles(qkv16, qkv, qkv_bf16, n, stream);
    FwdParams<uint16_t> p{make_sets(nullptr, L, L, Hd), {q, 3 * D}, {q + D, 3 * D}, {q + 2 * D, 3 * D}, out,
                          D, lse, out_bf16};
    const int w = dense_fwd_warps(L);
    const dim3 grid(B, Hd, (L + w * 16 - 1) / (w * 16));
    if (w == 8)
        launch(flash_fwd_kernel<uint16_t, 8, false>, grid, 8 * 32, fwd_smem<8, false>(L), stream, p);
    else
        launch(flash_fwd_kernel<uint16_t, kWarps, false>, grid, kWarps * 32, fwd_smem<kWarps, false>(L), stream, p);
}

void flash_attention_backward(float* dqkv, const float* dout, const float* qkv, const uint16_t* qkv_bf16,
                              const float* out, const uint16_t* out_bf16, const float* lse, int B, int L, int D,
                              int Hd, bool overwrite_dqkv, cudaStream_t stream) {
    require_head_dim(D, Hd, "flash_attention_backward");
    if (B <= 0 || L <= 0) return;
    require_aligned(dqkv, "dqkv");
    require_aligned(dout, "dout");
    PRISM_CUDA_REQUIRE(out || out_bf16, "flash_attention_backward: no forward output");
    if (out_bf16) require_aligned(out_bf16, "out (bf16)");
    else require_aligned(out, "out");
    const int64_t n = (int64_t)B * L * 3 * D, rows = (int64_t)B * L;
    PRISM_CUDA_REQUIRE(rows < INT32_MAX, "flash_attention_backward: B·L must be below 2^31");
    Scratch qkv16(qkv_bf16 ? 0 : sizeof(uint16_t) * n, stream), dout16(sizeof(uint16_t) * rows * D, stream),
        delta(sizeof(float) * rows * Hd, stream);
    const uint16_t* q = qkv_tiles(qkv16, qkv, qkv_bf16, n, stream);
    const Sets s = make_sets(nullptr, L, L, Hd);
    bwd_prep(PrepParams{s, dout, out, D, rows, nullptr, delta.as<float>(), dout16.as<uint16_t>(), out_bf16}, stream);
    const BwdParams<uint16_t> p{s,
                                {q, 3 * D},
                                {q + D, 3 * D},
                                {q + 2 * D, 3 * D},
                                {dout16.as<uint16_t>(), D},
                                lse,
                                delta.as<float>(),
                                dqkv,
                                3 * D,
                                dqkv + D,
                                dqkv + 2 * D,
                                3 * D,
                                overwrite_dqkv,
                                overwrite_dqkv};
    const int tiles = (L + kWarps * 16 - 1) / (kWarps * 16);
    launch(flash_bwd_dq_kernel<uint16_t, kWarps, false>, dim3(B, Hd, tiles), kWarps * 32,
           dq_smem<kWarps, false>(L), stream, p);
    launch(flash_bwd_dkv_kernel<uint16_t, kWarps>, dim3(B, Hd, tiles), kWarps * 32, dkv_smem<kWarps>(), stream, p);
}

// ---- routed -----------------------------------------------------------------------------------
namespace {

int max_item_tiles() {
    static const int tiles = item_tiles_setting(std::getenv("PRISM_ROUTED_ITEM_TILES"));
    return tiles;
}

// The work lists of routed_plan_kernel (flash_attention.cuh) for one op, in
// scratch; with_groups: the dK/dV kernel's list too (backward).
class RoutedPlan {
public:
    RoutedPlan(const int* offsets, int B, int nS, int N, int Hd, int k, bool with_groups, cudaStream_t stream)
        : sets_((int64_t)B * nS),
          geo_(routed_geometry(B, nS, N, Hd, sets_ * N * k, kRoutedTargetBlocks, max_item_tiles())),
          scratch_(sizeof(WorkItem) * geo_.max_items + sizeof(int) * (2 + (with_groups ? 2 * sets_ : 0)), stream) {
        PRISM_CUDA_REQUIRE(geo_.max_items * Hd < INT32_MAX && sets_ * Hd * geo_.key_blocks < INT32_MAX,
                           "flash routed attention: more blocks than a grid's x dimension holds");
        WorkItem* items = scratch_.as<WorkItem>();
        int* counts = reinterpret_cast<int*>(items + geo_.max_items);
        int* groups = with_groups ? counts + 2 : nullptr;
        work_ = RoutedWork{items, counts, geo_.item_tiles, groups, with_groups ? counts + 1 : nullptr,
                           geo_.key_blocks};
        const PlanParams p{offsets,     (int)sets_, sets_ * N * k, items, counts, geo_.item_tiles, geo_.max_items,
                           groups,      groups ? groups + sets_ : nullptr, counts + 1, geo_.radix_passes};
        PRISM_LAUNCH(1, kPlanThreads, kPlanSmem, stream, routed_plan_kernel)(p);
        PRISM_LAUNCH_CHECK();
    }
    const RoutedGeometry& geometry() const { return geo_; }
    const RoutedWork& work() const { return work_; }
    dim3 query_grid(int Hd) const { return dim3((unsigned)(geo_.max_items * Hd)); }
    dim3 key_grid(int Hd) const { return dim3((unsigned)(sets_ * Hd * geo_.key_blocks)); }

private:
    int64_t sets_;
    RoutedGeometry geo_;
    Scratch scratch_;
    RoutedWork work_{};
};

void require_routed_shape(int B, int nS, int N, int k, const char* op) {
    PRISM_CUDA_REQUIRE(k >= 1 && k <= nS && (int64_t)B * nS * N * k < INT32_MAX,
                       (std::string(op) + ": need 1 <= k <= nS and B·nS·N·k gathered rows below 2^31").c_str());
}

// og_bf16: og stored in bf16 instead (bf16 operands only).
template <class Src>
void routed_forward(float* og, uint16_t* og_bf16, float* lse, const Src* qg, const Src* k, const Src* v,
                    const int* offsets, int B, int nS, int N, int slots, int D, int Hd, cudaStream_t stream) {
    require_head_dim(D, Hd, "flash_routed_attention_forward");
    if (B <= 0 || nS <= 0 || N <= 0) return;
    require_routed_shape(B, nS, N, slots, "flash_routed_attention_forward");
    require_aligned(qg, "qg");
    require_aligned(k, "k");
    require_aligned(v, "v");
    PRISM_CUDA_REQUIRE((og != nullptr) != (og_bf16 != nullptr), "flash_routed_attention_forward: one output");
    require_aligned(og ? (const void*)og : (const void*)og_bf16, "og");
    const RoutedPlan plan(offsets, B, nS, N, Hd, slots, false, stream);
    FwdParams<Src> p{make_sets(offsets, 0, N, Hd), {qg, D}, {k, D}, {v, D}, og, D, lse, og_bf16};
    p.work = plan.work();
    if (plan.geometry().stationary)
        launch(flash_fwd_kernel<Src, kWarps, true>, plan.query_grid(Hd), kWarps * 32, fwd_smem<kWarps, true>(N),
               stream, p);
    else
        launch(flash_fwd_kernel<Src, kWarps, false>, plan.query_grid(Hd), kWarps * 32, fwd_smem<kWarps, false>(N),
               stream, p);
}

// Src = uint16_t: dog and og in bf16 too; the tiles' dO is dog as it is.
template <class Src>
void routed_backward(float* dqg, float* dk, float* dv, const Src* dog, const Src* qg, const Src* k, const Src* v,
                     const Src* og, const float* lse, const int* offsets, int B, int nS, int N, int slots, int D,
                     int Hd, bool overwrite_dqg, cudaStream_t stream) {
    require_head_dim(D, Hd, "flash_routed_attention_backward");
    if (B <= 0 || nS <= 0 || N <= 0) return;
    require_routed_shape(B, nS, N, slots, "flash_routed_attention_backward");
    for (const void* ptr : {(const void*)dqg, (const void*)dk, (const void*)dv, (const void*)dog,
                            (const void*)qg, (const void*)k, (const void*)v, (const void*)og})
        require_aligned(ptr, "every routed attention buffer");
    constexpr bool kBf16 = std::is_same_v<Src, uint16_t>;
    // δ is indexed by gathered row; the prep kernel stops at the real count, offsets[B·nS].
    PRISM_CUDA_REQUIRE((int64_t)B * nS * N <= INT_MAX, "routed attention: B*nS*N must fit an int");
    const int sets = B * nS;
    const int64_t max_rows = (int64_t)sets * N * slots;
    Scratch delta(sizeof(float) * max_rows * Hd, stream);
    const Sets s = make_sets(offsets, 0, N, Hd);
    PrepParams prep{s, nullptr, nullptr, D, max_rows, offsets + sets, delta.as<float>(), nullptr};
    if constexpr (kBf16) {
        prep.dout_bf16 = dog;
        prep.out_bf16 = og;
    } else {
        prep.dout = dog;
        prep.out = og;
    }
    bwd_prep(prep, stream);
    const RoutedPlan plan(offsets, B, nS, N, Hd, slots, true, stream);
    BwdParams<Src> p{s, {qg, D}, {k, D}, {v, D}, {dog, D}, lse, delta.as<float>(), dqg, D, dk, dv, D, overwrite_dqg};
    p.work = plan.work();
    const dim3 grid = plan.query_grid(Hd), kgrid = plan.key_grid(Hd);
    if (plan.geometry().stationary)
        launch(flash_bwd_dq_kernel<Src, kWarps, true>, grid, kWarps * 32, dq_smem<kWarps, true>(N), stream, p);
    else
        launch(flash_bwd_dq_kernel<Src, kWarps, false>, grid, kWarps * 32, dq_smem<kWarps, false>(N), stream, p);
    const int w = plan.geometry().key_warps;
    if (w == 1)
        launch(flash_bwd_dkv_kernel<Src, 1>, kgrid, 32, dkv_smem<1>(), stream, p);
    else if (w == 2)
        launch(flash_bwd_dkv_kernel<Src, 2>, kgrid, 64, dkv_smem<2>(), stream, p);
    else
        launch(flash_bwd_dkv_kernel<Src, kWarps>, kgrid, kWarps * 32, dkv_smem<kWarps>(), stream, p);
}

}  // namespace

void flash_routed_attention_forward(float* og, float* lse, const float* qg, const float* k, const float* v,
                                    const int* offsets, int B, int nS, int N, int slots, int D, int Hd,
                                    cudaStream_t stream) {
    routed_forward(og, nullptr, lse, qg, k, v, offsets, B, nS, N, slots, D, Hd, stream);
}
void flash_routed_attention_forward_bf16(uint16_t* og, float* lse, const uint16_t* qg, const uint16_t* k,
                                         const uint16_t* v, const int* offsets, int B, int nS, int N, int slots, int D,
                                         int Hd, cudaStream_t stream) {
    routed_forward(nullptr, og, lse, qg, k, v, offsets, B, nS, N, slots, D, Hd, stream);
}

void flash_routed_attention_backward(float* dqg, float* dk, float* dv, const float* dog, const float* qg,
                                     const float* k, const float* v, const float* og, const float* lse,
                                     const int* offsets, int B, int nS, int N, int slots, int D, int Hd,
                                     bool overwrite_dqg, cudaStream_t stream) {
    routed_backward(dqg, dk, dv, dog, qg, k, v, og, lse, offsets, B, nS, N, slots, D, Hd, overwrite_dqg, stream);
}
void flash_routed_attention_backward_bf16(float* dqg, float* dk, float* dv, const uint16_t* dog,
                                          const uint16_t* qg, const uint16_t* k, const uint16_t* v,
                                          const uint16_t* og, const float* lse, const int* offsets, int B, int nS,
                                          int N, int slots, int D, int Hd, bool overwrite_dqg,
                                          cudaStream_t stream) {
    routed_backward(dqg, dk, dv, dog, qg, k, v, og, lse, offsets, B, nS, N, slots, D, Hd, overwrite_dqg, stream);
}

}  // namespace prism::cuda_ops
