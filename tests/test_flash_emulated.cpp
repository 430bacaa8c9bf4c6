// The flash attention kernels (kernels/cuda/flash_attention.cuh) run on the
// CPU through tests/emulator.h, against the CPU reference ops in double.
// This checks the kernels' logic (tiling, masking, the online softmax, the
// fragment layouts they assume, staging and barriers as far as the emulator
// models them) on any machine; the GPU tests (test_cuda_flash.cpp) check the
// compiled kernels themselves. Shapes are small but cross every boundary: a
// partial last tile, several query and key tiles, empty routed groups, K/V
// resident (N ≤ 256) and streamed (N > 256), and 1, 2 and 4 warps per dK/dV block.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include <gtest/gtest.h>

#include "engine/rng.h"
#include "kernels/ops.h"
// last: the emulator defines threadIdx and friends as macros
#include "tests/emulator.h"
#include "kernels/cuda/flash_attention.cuh"

using namespace prism;
using prism::testing::to_bf16;
namespace fl = prism::flash;

namespace {

std::vector<float> bf16_normal(size_t n, Rng& rng) {
    std::vector<float> v(n);
    for (auto& x : v) x = emu::bf16_float(emu::bf16_bits(float(rng.normal())));
    return v;
}
std::vector<double> wide(const std::vector<float>& v) { return std::vector<double>(v.begin(), v.end()); }

// ‖got − ref‖ / ‖ref − base‖: for accumulated gradients, the error relative
// to what the op added (base: the starting values; empty: zero).
double rel_error(const std::vector<float>& got, const std::vector<double>& ref,
                 const std::vector<float>& base = {}) {
    double d2 = 0, r2 = 0;
    for (size_t i = 0; i < ref.size(); i++) {
        if (!std::isfinite(got[i])) return NAN;
        const double d = got[i] - ref[i], r = ref[i] - (base.empty() ? 0.0 : base[i]);
        d2 += d * d;
        r2 += r * r;
    }
    return std::sqrt(d2 / (r2 > 0 ? r2 : 1.0));
}

// A bf16-stored output must be the rounding of the fp32 one, element for
// element, with the same lse bits; returns its values widened.
std::vector<float> expect_stored_rounding(const std::string& what, const std::vector<uint16_t>& out16,
                                          const std::vector<float>& out, const std::vector<float>& lse16,
                                          const std::vector<float>& lse) {
    size_t wrong = 0;
    for (size_t i = 0; i < out16.size(); i++) wrong += out16[i] != emu::bf16_bits(out[i]);
    EXPECT_EQ(wrong, 0u) << what << ": the bf16 output is not the rounding of the fp32 one";
    EXPECT_EQ(0, std::memcmp(lse16.data(), lse.data(), lse.size() * sizeof(float))) << what << ": lse differs";
    std::vector<float> widened(out16.size());
    for (size_t i = 0; i < out16.size(); i++) widened[i] = emu::bf16_float(out16[i]);
    return widened;
}

void expect_rel(const std::string& what, double rel, double tol) {
    std::printf("[ emulated   ] %-44s rel %.3g\n", what.c_str(), rel);
    EXPECT_LE(rel, tol) << what;  // NaN fails too
}

constexpr double kTol = 2e-2;  // DESIGN.md §7, bf16
constexpr double kLseTol = 1e-3;

// fwd_warps: the forward's block size, dense_fwd_warps(L) unless given.
void run_dense(int B, int L, int Hd, uint64_t seed, int fwd_warps = 0) {
    if (!fwd_warps) fwd_warps = fl::dense_fwd_warps(L);
    const int D = fl::kDh * Hd;
    const int64_t rows = (int64_t)B * L;
    const std::string what = "dense B=" + std::to_string(B) + " L=" + std::to_string(L) + " Hd=" + std::to_string(Hd) +
                             (fwd_warps != 4 ? " (forward " + std::to_string(fwd_warps) + " warps)" : "");
    Rng rng(seed);
    const auto qkv = bf16_normal(rows * 3 * D, rng), dout = bf16_normal(rows * D, rng);
    const auto q16 = to_bf16(qkv);
    const fl::Sets s = fl::make_sets(nullptr, L, L, Hd);
    const int tiles = (L + 63) / 64;

    std::vector<float> out(rows * D, NAN), lse(rows * Hd, NAN);
    fl::FwdParams<uint16_t> fp{s, {q16.data(), 3 * D}, {q16.data() + D, 3 * D}, {q16.data() + 2 * D, 3 * D},
                               out.data(), D, lse.data()};
    const unsigned fwd_tiles = (L + 16 * fwd_warps - 1) / (16 * fwd_warps);
    auto forward = [&](const fl::FwdParams<uint16_t>& p) {
        if (fwd_warps == 8)
            emu::launch({(unsigned)B, (unsigned)Hd, fwd_tiles}, 256, fl::fwd_smem<8, false>(L),
                        fl::flash_fwd_kernel<uint16_t, 8, false>, p);
        else
            emu::launch({(unsigned)B, (unsigned)Hd, fwd_tiles}, 128, fl::fwd_smem<4, false>(L),
                        fl::flash_fwd_kernel<uint16_t, 4, false>, p);
    };
    forward(fp);

    const auto qkv_d = wide(qkv), dout_d = wide(dout);
    std::vector<double> ref(rows * D), ref_lse(rows * Hd);
    ops::attention_forward<double>(ref.data(), ref_lse.data(), qkv_d.data(), B, L, D, Hd);
    expect_rel(what + " out", rel_error(out, ref), kTol);
    expect_rel(what + " lse", rel_error(lse, ref_lse), kLseTol);
    // The bf16 mode's stored output alone: the rounding of the fp32 one, and
    // the backward's δ from it equals δ from its widened values in fp32.
    std::vector<uint16_t> out16(rows * D, 0xFFFF);
    {
        fl::FwdParams<uint16_t> fp16 = fp;
        fp16.out = nullptr;
        fp16.out_bf16 = out16.data();
        std::vector<float> lse16(rows * Hd, NAN);
        fp16.lse = lse16.data();
        forward(fp16);
        const std::vector<float> out_widened = expect_stored_rounding(what + " out", out16, out, lse16, lse);
        std::vector<float> delta_a(rows * Hd, NAN), delta_b(rows * Hd, NAN);
        fl::PrepParams pa{s, dout.data(), nullptr, D, rows, nullptr, delta_a.data(), nullptr, out16.data()};
        fl::PrepParams pb{s, dout.data(), out_widened.data(), D, rows, nullptr, delta_b.data(), nullptr};
        const unsigned prep_blocks = (unsigned)((rows + fl::kPrepWarps - 1) / fl::kPrepWarps);
        emu::launch({prep_blocks, 1, 1}, fl::kPrepWarps * 32, 0, fl::flash_bwd_prep_kernel, pa);
        emu::launch({prep_blocks, 1, 1}, fl::kPrepWarps * 32, 0, fl::flash_bwd_prep_kernel, pb);
        EXPECT_EQ(0, std::memcmp(delta_a.data(), delta_b.data(), delta_a.size() * sizeof(float)))
            << what << ": δ from the bf16 out differs";
    }

    // backward from random starting gradients (it accumulates)
    const auto g0 = bf16_normal(rows * 3 * D, rng);
    std::vector<float> dqkv = g0, dout16_unused;
    std::vector<uint16_t> do16(rows * D, 0xFFFF);
    std::vector<float> delta(rows * Hd, NAN);
    fl::PrepParams pp{s, dout.data(), out.data(), D, rows, nullptr, delta.data(), do16.data()};
    emu::launch({(unsigned)((rows + fl::kPrepWarps - 1) / fl::kPrepWarps), 1, 1}, fl::kPrepWarps * 32, 0,
                fl::flash_bwd_prep_kernel, pp);
    const fl::BwdParams<uint16_t> bp{s, {q16.data(), 3 * D}, {q16.data() + D, 3 * D}, {q16.data() + 2 * D, 3 * D},
                                     {do16.data(), D}, lse.data(), delta.data(), dqkv.data(), 3 * D,
                                     dqkv.data() + D, dqkv.data() + 2 * D, 3 * D};
    emu::launch({(unsigned)B, (unsigned)Hd, (unsigned)tiles}, 128, fl::dq_smem<4, false>(L),
                fl::flash_bwd_dq_kernel<uint16_t, 4, false>, bp);
    emu::launch({(unsigned)B, (unsigned)Hd, (unsigned)tiles}, 128, fl::dkv_smem<4>(),
                fl::flash_bwd_dkv_kernel<uint16_t, 4>, bp);
    {  // dqkv written instead (the model's dense backward): from NaN, the same values as added into zeros
        std::vector<float> added(rows * 3 * D, 0.f), written(rows * 3 * D, NAN);
        for (std::vector<float>* g : {&added, &written}) {
            fl::BwdParams<uint16_t> b2 = bp;
            b2.dq = g->data(), b2.dk = g->data() + D, b2.dv = g->data() + 2 * D;
            b2.overwrite_dq = b2.overwrite_dkv = g == &written;
            emu::launch({(unsigned)B, (unsigned)Hd, (unsigned)tiles}, 128, fl::dq_smem<4, false>(L),
                        fl::flash_bwd_dq_kernel<uint16_t, 4, false>, b2);
            emu::launch({(unsigned)B, (unsigned)Hd, (unsigned)tiles}, 128, fl::dkv_smem<4>(),
                        fl::flash_bwd_dkv_kernel<uint16_t, 4>, b2);
        }
        size_t differ = 0;
        for (size_t e = 0; e < added.size(); e++) differ += !(written[e] == added[e]);
        EXPECT_EQ(differ, 0u) << what << ": the overwritten dqkv differs from the one accumulated into zeros";
    }
    std::vector<double> ref_d(g0.begin(), g0.end());
    ops::attention_backward<double>(ref_d.data(), dout_d.data(), qkv_d.data(), ref.data(), ref_lse.data(), B, L, D,
                                    Hd);
    // per part: dq, dk, dv columns
    for (int part = 0; part < 3; part++) {
        std::vector<float> got, base;
        std::vector<double> r;
        for (int64_t row = 0; row < rows; row++)
            for (int c = 0; c < D; c++) {
                const int64_t e = row * 3 * D + part * D + c;
                got.push_back(dqkv[e]);
                base.push_back(g0[e]);
                r.push_back(ref_d[e]);
            }
        expect_rel(what + (part == 0 ? " dq" : part == 1 ? " dk" : " dv"), rel_error(got, r, base), kTol);
    }
}

// Group sizes drawn in 0..max_queries, some groups forced empty.
std::vector<int> random_offsets(int groups, int max_queries, Rng& rng) {
    std::vector<int> off(groups + 1, 0);
    for (int g = 0; g < groups; g++) {
        const int n = g % 3 == 1 ? 0 : (int)rng.below(max_queries + 1);
        off[g + 1] = off[g] + n;
    }
    return off;
}

// The lists routed_plan_kernel makes, as flash_attention.cu's RoutedPlan does.
struct EmulatedPlan {
    std::vector<fl::WorkItem> items;
    std::vector<int> groups, groups_tmp, counts;
    fl::RoutedWork work;
};
EmulatedPlan emulated_plan(const fl::RoutedGeometry& geo, const std::vector<int>& offsets, int64_t max_rows) {
    const int sets = (int)offsets.size() - 1;
    EmulatedPlan e;
    e.items.assign(geo.max_items, fl::WorkItem{-1, -1});
    e.groups.assign(sets, -1);
    e.groups_tmp.assign(sets, -1);
    e.counts.assign(2, -1);
    const fl::PlanParams p{offsets.data(), sets,           max_rows,           e.items.data(), e.counts.data(),
                           geo.item_tiles, geo.max_items,  e.groups.data(),    e.groups_tmp.data(),
                           e.counts.data() + 1,            geo.radix_passes};
    emu::launch({1, 1, 1}, fl::kPlanThreads, fl::kPlanSmem, fl::routed_plan_kernel, p);
    e.work = fl::RoutedWork{e.items.data(), e.counts.data(), geo.item_tiles, e.groups.data(), e.counts.data() + 1,
                            geo.key_blocks};
    return e;
}

// target_blocks: routed_geometry's, which sizes the work items from it: 1
// gives the largest items (a block walks up to kMaxItemTiles of its group's
// query tiles, what large batches do), the default a block per tile at these
// small shapes; item_tiles, when set, is what the test means it to give.
void run_routed(int B, int nS, int N, int Hd, int max_queries, uint64_t seed,
                int64_t target_blocks = fl::kRoutedTargetBlocks, int item_tiles = 0) {
    const int D = fl::kDh * Hd, sets = B * nS;
    const std::string what = "routed B=" + std::to_string(B) + " nS=" + std::to_string(nS) +
                             " N=" + std::to_string(N) + " Hd=" + std::to_string(Hd);
    ASSERT_LE(max_queries, nS * N) << "a group holds at most one slot per token of its image";
    Rng rng(seed);
    const auto offsets = random_offsets(sets, max_queries, rng);
    const int64_t rows = offsets.back(), T = (int64_t)sets * N;
    ASSERT_GT(rows, 0) << what << ": every group drew no query; pick another seed";
    const auto qg = bf16_normal(rows * D, rng), k = bf16_normal(T * D, rng), v = bf16_normal(T * D, rng),
               dog = bf16_normal(rows * D, rng);
    const fl::Sets s = fl::make_sets(offsets.data(), 0, N, Hd);
    // Groups of up to nS·N queries: the bound of k = nS.
    const int64_t max_rows = T * nS;
    const fl::RoutedGeometry geo = fl::routed_geometry(B, nS, N, Hd, max_rows, target_blocks);
    if (item_tiles) {
        ASSERT_EQ(geo.item_tiles, item_tiles) << what;
    }
    const EmulatedPlan plan = emulated_plan(geo, offsets, max_rows);
    const emu::Dim grid{(unsigned)(geo.max_items * Hd), 1, 1};
    const emu::Dim kgrid{(unsigned)(sets * Hd * geo.key_blocks), 1, 1};

    // The launches of flash_attention.cu's routed ops, for fp32 operands
    // (rounded as staged) and the bf16 mode's stored ones (Src = uint16_t).
    auto forward = [&](auto p) {
        using Src = std::remove_const_t<std::remove_pointer_t<decltype(p.q.p)>>;
        p.work = plan.work;
        if (geo.stationary)
            emu::launch(grid, 128, fl::fwd_smem<4, true>(N), fl::flash_fwd_kernel<Src, 4, true>, p);
        else
            emu::launch(grid, 128, fl::fwd_smem<4, false>(N), fl::flash_fwd_kernel<Src, 4, false>, p);
    };
    const int w = geo.key_warps;
    auto backward = [&](const fl::PrepParams& pp, auto bp) {
        using Src = std::remove_const_t<std::remove_pointer_t<decltype(bp.q.p)>>;
        bp.work = plan.work;
        emu::launch({(unsigned)((max_rows + fl::kPrepWarps - 1) / fl::kPrepWarps), 1, 1}, fl::kPrepWarps * 32, 0,
                    fl::flash_bwd_prep_kernel, pp);
        if (geo.stationary)
            emu::launch(grid, 128, fl::dq_smem<4, true>(N), fl::flash_bwd_dq_kernel<Src, 4, true>, bp);
        else
            emu::launch(grid, 128, fl::dq_smem<4, false>(N), fl::flash_bwd_dq_kernel<Src, 4, false>, bp);
        if (w == 1) emu::launch(kgrid, 32, fl::dkv_smem<1>(), fl::flash_bwd_dkv_kernel<Src, 1>, bp);
        else if (w == 2) emu::launch(kgrid, 64, fl::dkv_smem<2>(), fl::flash_bwd_dkv_kernel<Src, 2>, bp);
        else emu::launch(kgrid, 128, fl::dkv_smem<4>(), fl::flash_bwd_dkv_kernel<Src, 4>, bp);
    };

    std::vector<float> og(rows * D, NAN), lse(rows * Hd, NAN);
    const fl::FwdParams<float> fp{s, {qg.data(), D}, {k.data(), D}, {v.data(), D}, og.data(), D, lse.data()};
    forward(fp);

    const auto qg_d = wide(qg), k_d = wide(k), v_d = wide(v), dog_d = wide(dog);
    std::vector<double> ref(rows * D), ref_lse(rows * Hd);
    ops::routed_attention_forward<double>(ref.data(), ref_lse.data(), qg_d.data(), k_d.data(), v_d.data(),
                                          offsets.data(), B, nS, N, D, Hd);
    const std::string mode = (geo.stationary ? " (K/V resident, " : " (K/V streamed, ") +
                             std::to_string(geo.item_tiles) + " tiles per item)";
    expect_rel(what + " og" + mode, rel_error(og, ref), kTol);
    expect_rel(what + " lse", rel_error(lse, ref_lse), kLseTol);

    const auto gq = bf16_normal(rows * D, rng), gk = bf16_normal(T * D, rng), gv = bf16_normal(T * D, rng);
    std::vector<float> dqg = gq, dk = gk, dv = gv, delta((size_t)max_rows * Hd, NAN);
    const fl::PrepParams pp{s, dog.data(), og.data(), D, max_rows, offsets.data() + sets, delta.data(), nullptr};
    const fl::BwdParams<float> bp{s, {qg.data(), D}, {k.data(), D}, {v.data(), D}, {dog.data(), D}, lse.data(),
                                  delta.data(), dqg.data(), D, dk.data(), dv.data(), D};
    backward(pp, bp);

    std::vector<double> rq(gq.begin(), gq.end()), rk(gk.begin(), gk.end()), rv(gv.begin(), gv.end());
    ops::routed_attention_backward<double>(rq.data(), rk.data(), rv.data(), dog_d.data(), qg_d.data(), k_d.data(),
                                           v_d.data(), ref.data(), ref_lse.data(), offsets.data(), B, nS, N, D,
                                           Hd);
    expect_rel(what + " dqg", rel_error(dqg, rq, gq), kTol);
    expect_rel(what + " dk (" + std::to_string(w) + " warps)", rel_error(dk, rk, gk), kTol);
    expect_rel(what + " dv", rel_error(dv, rv, gv), kTol);
    {  // dqg written (the model's): from NaN, the values added into zeros; every row has its writer
        std::vector<float> added(rows * D, 0.f), written(rows * D, NAN), dk2 = gk, dv2 = gv;
        for (std::vector<float>* g : {&added, &written}) {
            fl::BwdParams<float> b2 = bp;
            b2.dq = g->data(), b2.dk = dk2.data(), b2.dv = dv2.data();
            b2.overwrite_dq = g == &written;
            backward(pp, b2);
        }
        size_t differ = 0;
        for (size_t e = 0; e < added.size(); e++) differ += !(written[e] == added[e]);
        EXPECT_EQ(differ, 0u) << what << ": the written dqg differs from the one added into zeros";
    }

    // The bf16 mode's stored operands (qg, k, v, og and dog in bf16, by
    // cp.async): og is the rounding of the fp32 og, lse the same bits, and
    // backward from them equals the fp32 operands' backward from the widened
    // og, bit for bit (the same values reach the same products).
    const auto qg16 = to_bf16(qg), k16 = to_bf16(k), v16 = to_bf16(v), dog16 = to_bf16(dog);
    std::vector<uint16_t> og16(rows * D, 0xFFFF);
    std::vector<float> lse16(rows * Hd, NAN);
    fl::FwdParams<uint16_t> fp16{s, {qg16.data(), D}, {k16.data(), D}, {v16.data(), D}, nullptr, D, lse16.data()};
    fp16.out_bf16 = og16.data();
    forward(fp16);
    const std::vector<float> og_widened = expect_stored_rounding(what + " og", og16, og, lse16, lse);
    std::vector<float> grads[2], deltas[2];
    for (int stored = 0; stored < 2; stored++) {
        std::vector<float>& g = grads[stored];
        g.clear();
        g.insert(g.end(), gq.begin(), gq.end());
        g.insert(g.end(), gk.begin(), gk.end());
        g.insert(g.end(), gv.begin(), gv.end());
        float *gdq = g.data(), *gdk = gdq + gq.size(), *gdv = gdk + gk.size();
        deltas[stored].assign(delta.size(), NAN);
        fl::PrepParams p2{s, nullptr, nullptr, D, max_rows, offsets.data() + sets, deltas[stored].data(), nullptr};
        if (stored) {
            p2.dout_bf16 = dog16.data();
            p2.out_bf16 = og16.data();
            backward(p2, fl::BwdParams<uint16_t>{s, {qg16.data(), D}, {k16.data(), D}, {v16.data(), D},
                                                 {dog16.data(), D}, lse16.data(), deltas[stored].data(), gdq, D, gdk,
                                                 gdv, D});
        } else {
            p2.dout = dog.data();
            p2.out = og_widened.data();
            backward(p2, fl::BwdParams<float>{s, {qg.data(), D}, {k.data(), D}, {v.data(), D}, {dog.data(), D},
                                              lse16.data(), deltas[stored].data(), gdq, D, gdk, gdv, D});
        }
    }
    EXPECT_EQ(0, std::memcmp(deltas[0].data(), deltas[1].data(), delta.size() * sizeof(float)))
        << what << ": δ from the bf16 og and dog differs";
    size_t differ = 0;
    for (size_t e = 0; e < grads[0].size(); e++) differ += !(grads[0][e] == grads[1][e]);
    EXPECT_EQ(differ, 0u) << what << ": the gradients from the bf16 operands differ from the fp32 operands'";
}

}  // namespace

TEST(FlashEmulated, DenseOneTile) { run_dense(2, 17, 1, 1); }
TEST(FlashEmulated, DensePartialTiles) { run_dense(1, 75, 2, 2); }
TEST(FlashEmulated, DenseThreeTiles) { run_dense(1, 130, 1, 3); }
// the long-sequence forward's 8-warp blocks, on a short sequence
TEST(FlashEmulated, DenseEightWarpForward) { run_dense(1, 150, 1, 10, 8); }

// N = 16 (So2Sat): one key chunk, one-warp dK/dV blocks
TEST(FlashEmulated, RoutedSixteenKeys) { run_routed(2, 3, 16, 1, 48, 4); }
// N = 20: two-warp dK/dV blocks; several blocks per group (few groups)
TEST(FlashEmulated, RoutedTwentyKeys) { run_routed(1, 3, 20, 2, 60, 5); }
// N = 70: K/V resident over two key tiles, the last partial
TEST(FlashEmulated, RoutedResidentTwoKeyTiles) { run_routed(1, 2, 70, 1, 140, 6); }
// one block per group walking all its query tiles over resident K/V (one key tile, two)
TEST(FlashEmulated, RoutedResidentOneBlockPerGroup) {
    run_routed(2, 3, 48, 1, 144, 8, 1, fl::kMaxItemTiles);
    run_routed(1, 3, 70, 1, 210, 9, 1, fl::kMaxItemTiles);
}
// items of two tiles: a group of three query tiles is a full item and a remainder
TEST(FlashEmulated, RoutedResidentSeveralItemsPerGroup) { run_routed(2, 3, 48, 1, 144, 11, 7, 2); }
// N = 300 > 256: key tiles streamed
TEST(FlashEmulated, RoutedStreamedKeys) { run_routed(1, 2, 300, 1, 100, 7); }

// routed_plan_kernel's lists against a host model: items by their tiles
// (most first), then group, then first tile; the non-empty groups by query
// tiles (most first), then group.
void check_plan(const std::vector<int>& offsets, int item_tiles, int radix_passes, const std::string& what) {
    const int sets = (int)offsets.size() - 1;
    constexpr int QT = fl::kWarps * 16;
    auto tiles_of = [&](int g, int per) { return (offsets[g + 1] - offsets[g] + per - 1) / per; };
    struct Item {
        int g, tile0, tiles;
    };
    std::vector<Item> want_items;
    std::vector<int> want_groups;
    for (int g = 0; g < sets; g++) {
        const int t = tiles_of(g, QT);
        for (int t0 = 0; t0 < t; t0 += item_tiles) want_items.push_back({g, t0, std::min(item_tiles, t - t0)});
        if (t > 0) want_groups.push_back(g);
    }
    std::stable_sort(want_items.begin(), want_items.end(),
                     [](const Item& a, const Item& b) { return a.tiles > b.tiles; });
    std::stable_sort(want_groups.begin(), want_groups.end(),
                     [&](int a, int b) { return tiles_of(a, fl::kQT2) > tiles_of(b, fl::kQT2); });

    fl::RoutedGeometry geo{};
    geo.item_tiles = item_tiles;
    geo.max_items = (int64_t)want_items.size();  // exactly enough
    geo.radix_passes = radix_passes;
    const EmulatedPlan plan = emulated_plan(geo, offsets, offsets.back());
    ASSERT_EQ(plan.counts[0], (int)want_items.size()) << what;
    ASSERT_EQ(plan.counts[1], (int)want_groups.size()) << what;
    size_t wrong_items = 0, wrong_groups = 0;
    for (size_t i = 0; i < want_items.size(); i++)
        wrong_items += plan.items[i].g != want_items[i].g || plan.items[i].tile0 != want_items[i].tile0;
    for (size_t i = 0; i < want_groups.size(); i++) wrong_groups += plan.groups[i] != want_groups[i];
    EXPECT_EQ(wrong_items, 0u) << what << ": work items out of order";
    EXPECT_EQ(wrong_groups, 0u) << what << ": groups out of order";
    std::printf("[ emulated   ] plan %-39s %zu items, %zu groups\n", what.c_str(), want_items.size(),
                want_groups.size());
}

TEST(FlashEmulated, RoutedPlanListsTheLargestWorkFirst) {
    Rng rng(40);
    // More groups than the plan's threads (several each, some threads none);
    // sizes from empty to 47 query tiles: two radix passes, both digits in use.
    std::vector<int> offsets(301, 0);
    for (int g = 0; g < 300; g++) {
        const int r = (int)rng.below(10);
        const int n = r < 2 ? 0 : r < 6 ? (int)rng.below(200) : (int)rng.below(3000);
        offsets[g + 1] = offsets[g] + n;
    }
    const int64_t max_rows = offsets.back();
    // The geometry's passes for these shapes: a group's tiles ≤ ⌈nS·N/64⌉ = 52, two digits.
    EXPECT_EQ(fl::routed_geometry(1, 300, 11, 1, max_rows).radix_passes, 2);
    check_plan(offsets, 3, 2, "300 groups, 3 tiles per item");
    check_plan(offsets, 1, 2, "300 groups, 1 tile per item");
    // three passes (a group of 300 tiles), few groups
    check_plan({0, 19200, 19200, 19300, 29000}, fl::kMaxItemTiles, 3, "4 groups, 300 tiles");
}

TEST(FlashEmulated, RoutedItemTilesSetting) {
    EXPECT_EQ(fl::item_tiles_setting(nullptr), fl::kMaxItemTiles);
    EXPECT_EQ(fl::item_tiles_setting(""), fl::kMaxItemTiles);
    EXPECT_EQ(fl::item_tiles_setting("4"), 4);
    EXPECT_EQ(fl::item_tiles_setting("15"), 15);
    for (const char* bad : {"0", "16", "-2", "x", "4x"}) {
        try {
            fl::item_tiles_setting(bad);
            ADD_FAILURE() << bad << " was taken";
        } catch (const std::runtime_error& e) {
            EXPECT_NE(std::string(e.what()).find("expected an integer 1..15"), std::string::npos) << e.what();
        }
    }
}

TEST(FlashEmulated, RoutedPlanTrapsOnMoreRowsThanAnnounced) {
    const std::vector<int> offsets = {0, 64, 200};
    fl::RoutedGeometry geo = fl::routed_geometry(1, 2, 100, 1, 199);
    std::vector<fl::WorkItem> items(64);
    std::vector<int> counts(2);
    const fl::PlanParams p{offsets.data(), 2, 199, items.data(), counts.data(), geo.item_tiles, geo.max_items,
                           nullptr,        nullptr, nullptr,     geo.radix_passes};
    EXPECT_THROW(emu::launch({1, 1, 1}, fl::kPlanThreads, fl::kPlanSmem, fl::routed_plan_kernel, p),
                 std::runtime_error);
}

TEST(FlashEmulated, TheEmulatorCatchesAWarpThatSkipsACollective) {
    // A kernel whose lanes disagree on a shuffle must fail, not pass quietly.
    struct P {};
    auto bad = [](P) {
        if ((threadIdx.x & 31) < 16) fl::shfl_xor(1.f, 1);
        else fl::block_sync();
    };
    EXPECT_THROW(emu::launch({1, 1, 1}, 32, 0, bad, P{}), std::runtime_error);
}

namespace {
struct OptInParams {
    float* out;
};
void write_one_kernel(OptInParams p) {
    if (threadIdx.x == 0) *p.out = 1.f;
}
}  // namespace

TEST(FlashEmulated, TheEmulatorRefusesMoreThan48KiBOfSharedMemoryWithoutTheOptIn) {
    // As the device does: a launch of more dynamic shared memory than 48 KiB
    // needs cudaFuncSetAttribute for that kernel first (the emulated runtime's
    // records it in emu::smem_opt_in), and no more than it allowed.
    float out = 0.f;
    auto run = [&](size_t smem) { PRISM_LAUNCH(1, 32, smem, 0, write_one_kernel)(OptInParams{&out}); };
    EXPECT_NO_THROW(run(48 * 1024));
    EXPECT_THROW(run(48 * 1024 + 16), std::runtime_error);
    const void* kernel = emu::kernel_address(write_one_kernel);
    emu::smem_opt_in()[kernel] = 64 * 1024;
    EXPECT_NO_THROW(run(64 * 1024));
    EXPECT_THROW(run(64 * 1024 + 16), std::runtime_error);
    emu::smem_opt_in().erase(kernel);
    EXPECT_EQ(out, 1.f);
}

TEST(FlashEmulated, GeometryOnlyRunsNoBlockButRefusesWhatTheDeviceRefuses) {
    // PRISM_EMULATE_GEOMETRY_ONLY's mode (CudaModel.GeometryOnly* runs whole
    // steps in it): a launch is checked, then nothing runs.
    struct Restore {
        ~Restore() { emu::geometry_only = false; }
    } restore;
    ASSERT_FALSE(emu::geometry_only) << "the test process runs the kernels";
    emu::geometry_only = true;
    float out = 0.f;
    auto run = [&](emu::Dim grid, int threads, size_t smem) {
        PRISM_LAUNCH(grid, threads, smem, 0, write_one_kernel)(OptInParams{&out});
    };
    EXPECT_NO_THROW(run({65535, 65535, 65535}, 1024, 48 * 1024));  // 2^48 blocks: only the bounds are looked at
    EXPECT_EQ(out, 0.f) << "a block ran";
    EXPECT_THROW(run({1, 65536, 1}, 32, 0), std::runtime_error);
    EXPECT_THROW(run({1, 1, 65536}, 32, 0), std::runtime_error);
    EXPECT_THROW(run({0, 1, 1}, 32, 0), std::runtime_error);
    EXPECT_THROW(run({1, 1, 1}, 1056, 0), std::runtime_error);
    EXPECT_THROW(run({1, 1, 1}, 32, 48 * 1024 + 16), std::runtime_error);  // no opt-in
    emu::geometry_only = false;
    run({1, 1, 1}, 32, 0);
    EXPECT_EQ(out, 1.f);
}
