// The fp32 attention kernels (kernels/cuda/attention.cuh) run on the CPU
// through tests/emulator.h, against the CPU reference ops in double, at
// DESIGN.md §7's fp32 tolerance (1e-5). This checks the kernels' logic (the
// online softmax, tiling and masking, lse and δ, staging and barriers as far
// as the emulator models them: shared-memory races, reads of what was never
// written, warp collectives reached by every lane) on any machine; the GPU
// tests (CudaOps.*Attention in test_cuda_ops.cpp) check the compiled kernels.
// Shapes are small but cross the boundaries: one and several query and key
// tiles with a partial last one, head dims below 32, not a multiple of 32,
// 64 and the largest (128), routed groups that are empty or span several
// query tiles, and the CLS row with more keys than a block has threads.
// Outputs start as NaN, so an element the kernels fail to write fails.
#include <cmath>
#include <cstdio>
#include <string>
#include <type_traits>
#include <vector>

#include <gtest/gtest.h>

#include "engine/rng.h"
#include "kernels/ops.h"
// last: the emulator defines threadIdx and friends as macros
#include "tests/emulator.h"
#include "kernels/cuda/attention.cuh"

using namespace prism;
using prism::testing::to_bf16;
namespace fu = prism::fused;

namespace {

constexpr double kTol = 1e-5;

std::vector<float> normal(size_t n, Rng& rng) {
    std::vector<float> v(n);
    for (auto& x : v) x = float(rng.normal());
    return v;
}
std::vector<float> scaled(std::vector<float> v, float s) {
    for (auto& x : v) x *= s;
    return v;
}
std::vector<double> wide(const std::vector<float>& v) { return std::vector<double>(v.begin(), v.end()); }

// ‖got − ref‖ / ‖ref − base‖ over the elements [begin, end) of every `stride`
// (all by default): for accumulated gradients, the error relative to what the
// op added (base: the starting values; empty: zero). NaN when got has a
// non-finite element there.
double rel_error(const std::vector<float>& got, const std::vector<double>& ref,
                 const std::vector<float>& base = {}, size_t stride = 0, size_t begin = 0, size_t end = 0) {
    double d2 = 0, r2 = 0;
    for (size_t i = 0; i < ref.size(); i++) {
        if (stride && (i % stride < begin || i % stride >= end)) continue;
        if (!std::isfinite(got[i])) return NAN;
        const double d = got[i] - ref[i], r = ref[i] - (base.empty() ? 0.0 : base[i]);
        d2 += d * d;
        r2 += r * r;
    }
    return std::sqrt(d2 / (r2 > 0 ? r2 : 1.0));
}

void expect_rel(const std::string& what, double rel, double tol = kTol) {
    std::printf("[ emulated   ] %-50s rel %.3g\n", what.c_str(), rel);
    EXPECT_LE(rel, tol) << what;  // NaN fails too
}

unsigned tiles(int64_t n, int tile) { return (unsigned)((n + tile - 1) / tile); }

// The launches of kernels/cuda/attention.cu's fused_forward and fused_backward.
void forward(const fu::FwdParams& p, int sets, int max_queries) {
    emu::launch({(unsigned)sets, (unsigned)p.a.Hd, tiles(max_queries, fu::kQT)}, fu::kThreads, fu::fwd_smem(p.a.dh),
                fu::fused_fwd_kernel, p);
}
void backward(fu::BwdParams p, int sets, int max_queries, int64_t stat_rows) {
    std::vector<float> delta(stat_rows * p.a.Hd, NAN);
    p.delta = delta.data();
    emu::launch({(unsigned)sets, (unsigned)p.a.Hd, tiles(max_queries, fu::kQT)}, fu::kThreads, fu::dq_smem(p.a.dh),
                fu::fused_bwd_dq_kernel, p);
    emu::launch({(unsigned)sets, (unsigned)p.a.Hd, tiles(p.a.M, fu::kKT)}, fu::kThreads, fu::dkv_smem(p.a.dh),
                fu::fused_bwd_dkv_kernel, p);
}

void run_dense(int B, int L, int Hd, int dh, uint64_t seed) {
    const int D = Hd * dh;
    const int64_t rows = (int64_t)B * L;
    const std::string what = "dense B=" + std::to_string(B) + " L=" + std::to_string(L) +
                             " Hd=" + std::to_string(Hd) + " dh=" + std::to_string(dh);
    Rng rng(seed);
    const auto qkv = normal(rows * 3 * D, rng), dout = normal(rows * D, rng), g0 = normal(rows * 3 * D, rng);
    std::vector<float> out(rows * D, NAN), lse(rows * Hd, NAN);
    forward(fu::FwdParams{fu::dense_attn(qkv.data(), L, D, Hd), {out.data(), (int64_t)L * D, D}, lse.data()}, B, L);

    const auto qkv_d = wide(qkv), dout_d = wide(dout);
    std::vector<double> ref(rows * D), ref_lse(rows * Hd);
    ops::attention_forward<double>(ref.data(), ref_lse.data(), qkv_d.data(), B, L, D, Hd);
    expect_rel(what + " out", rel_error(out, ref));
    expect_rel(what + " lse", rel_error(lse, ref_lse));

    // backward from the kernels' own out and lse (as the model runs it), from
    // random starting gradients (it accumulates)
    std::vector<float> dqkv = g0;
    const int64_t img = (int64_t)L * 3 * D;
    backward(fu::BwdParams{fu::dense_attn(qkv.data(), L, D, Hd),
                           {dout.data(), (int64_t)L * D, D},
                           {out.data(), (int64_t)L * D, D},
                           lse.data(),
                           nullptr,
                           {dqkv.data(), img, 3 * D},
                           {dqkv.data() + D, img, 3 * D},
                           {dqkv.data() + 2 * D, img, 3 * D}},
             B, L, rows);
    std::vector<double> ref_d(g0.begin(), g0.end());
    ops::attention_backward<double>(ref_d.data(), dout_d.data(), qkv_d.data(), ref.data(), ref_lse.data(), B, L, D,
                                    Hd);
    for (int part = 0; part < 3; part++)
        expect_rel(what + (part == 0 ? " dq" : part == 1 ? " dk" : " dv"),
                   rel_error(dqkv, ref_d, g0, 3 * D, part * D, (part + 1) * D));
}

// Group sizes drawn in 0..max_queries, every third group forced empty.
std::vector<int> random_offsets(int groups, int max_queries, Rng& rng) {
    std::vector<int> off(groups + 1, 0);
    for (int g = 0; g < groups; g++) off[g + 1] = off[g] + (g % 3 == 1 ? 0 : (int)rng.below(max_queries + 1));
    return off;
}

void run_routed(int B, int nS, int N, int Hd, int dh, int max_queries, uint64_t seed) {
    const int D = Hd * dh, sets = B * nS;
    const std::string what = "routed B=" + std::to_string(B) + " nS=" + std::to_string(nS) + " N=" + std::to_string(N) +
                             " Hd=" + std::to_string(Hd) + " dh=" + std::to_string(dh);
    ASSERT_LE(max_queries, nS * N) << "a group holds at most one slot per token of its image";
    Rng rng(seed);
    const auto offsets = random_offsets(sets, max_queries, rng);
    const int64_t rows = offsets.back(), T = (int64_t)sets * N;
    ASSERT_GT(rows, 0) << what << ": every group drew no query; pick another seed";
    const auto qg = normal(rows * D, rng), k = normal(T * D, rng), v = normal(T * D, rng), dog = normal(rows * D, rng);
    const auto gq = normal(rows * D, rng), gk = normal(T * D, rng), gv = normal(T * D, rng);
    const fu::Attn a = fu::routed_attn(qg.data(), k.data(), v.data(), offsets.data(), N, D, Hd);
    std::vector<float> og(rows * D, NAN), lse(rows * Hd, NAN);
    forward(fu::FwdParams{a, {og.data(), 0, D}, lse.data()}, sets, nS * N);

    const auto qg_d = wide(qg), k_d = wide(k), v_d = wide(v), dog_d = wide(dog);
    std::vector<double> ref(rows * D), ref_lse(rows * Hd);
    ops::routed_attention_forward<double>(ref.data(), ref_lse.data(), qg_d.data(), k_d.data(), v_d.data(),
                                          offsets.data(), B, nS, N, D, Hd);
    expect_rel(what + " og", rel_error(og, ref));
    expect_rel(what + " lse", rel_error(lse, ref_lse));

    std::vector<float> dqg = gq, dk = gk, dv = gv;
    backward(fu::BwdParams{a,
                           {dog.data(), 0, D},
                           {og.data(), 0, D},
                           lse.data(),
                           nullptr,
                           {dqg.data(), 0, D},
                           {dk.data(), (int64_t)N * D, D},
                           {dv.data(), (int64_t)N * D, D}},
             sets, nS * N, (int64_t)sets * N * nS);
    std::vector<double> rq(gq.begin(), gq.end()), rk(gk.begin(), gk.end()), rv(gv.begin(), gv.end());
    ops::routed_attention_backward<double>(rq.data(), rk.data(), rv.data(), dog_d.data(), qg_d.data(), k_d.data(),
                                           v_d.data(), ref.data(), ref_lse.data(), offsets.data(), B, nS, N, D, Hd);
    expect_rel(what + " dqg", rel_error(dqg, rq, gq));
    expect_rel(what + " dk", rel_error(dk, rk, gk));
    expect_rel(what + " dv", rel_error(dv, rv, gv));
}

// The CLS query is row 0 of each image's L = 1 + M rows; the other rows of
// out must stay untouched. bf16: q, k, v and out stored in bf16 (the bf16
// mode's), against the reference on the widened values; out within its
// rounding (a bf16 element is off by at most 2^-9 of itself).
void run_cls(int B, int M, int Hd, int dh, uint64_t seed, bool bf16 = false) {
    const int D = Hd * dh;
    const int64_t stride = (int64_t)(1 + M) * D;
    const std::string what = std::string(bf16 ? "cls bf16" : "cls") + " B=" + std::to_string(B) +
                             " M=" + std::to_string(M) + " Hd=" + std::to_string(Hd) + " dh=" + std::to_string(dh);
    Rng rng(seed);
    auto operand = [&](size_t n) {
        auto v = normal(n, rng);
        if (bf16)
            for (auto& x : v) x = prism::testing::bf16_value(prism::testing::bf16_bits(x));
        return v;
    };
    const auto q = operand(B * stride), k = operand((size_t)B * M * D), v = operand((size_t)B * M * D);
    // Starting gradients of the size of what the op adds (p ~ 1/M per key):
    // larger ones would hide the increments in their own rounding.
    const auto dout = normal(B * stride, rng), gq = scaled(normal(q.size(), rng), 1.f),
               gk = scaled(normal(k.size(), rng), 1.f / M), gv = scaled(normal(v.size(), rng), 1.f / M);
    std::vector<float> out(B * stride, NAN), probs((size_t)B * Hd * M, NAN);
    std::vector<float> dq = gq, dk = gk, dv = gv, ds((size_t)B * Hd * M, NAN);
    const emu::Dim grid{(unsigned)B, (unsigned)Hd, 1};
    auto run = [&](const auto* qe, const auto* ke, const auto* ve, auto* oute) {
        using E = std::remove_const_t<std::remove_pointer_t<decltype(qe)>>;
        const fu::AttnOf<E> a = fu::cls_attn(qe, stride, ke, ve, M, D, Hd);
        emu::launch(grid, fu::kThreads, fu::cls_smem(dh), fu::cls_fwd_kernel<E>,
                    fu::ClsFwdParams<E>{a, {oute, stride, 0}, probs.data()});
        emu::launch(grid, fu::kThreads, fu::cls_smem(dh), fu::cls_bwd_kernel<E>,
                    fu::ClsBwdParams<E>{a,
                                        probs.data(),
                                        {dout.data(), stride, 0},
                                        {dq.data(), stride, 0},
                                        {dk.data(), (int64_t)M * D, D},
                                        {dv.data(), (int64_t)M * D, D},
                                        ds.data()});
    };
    if (bf16) {
        const auto q16 = to_bf16(q), k16 = to_bf16(k), v16 = to_bf16(v);
        std::vector<uint16_t> out16(out.size(), 0xFFFFu);
        run(q16.data(), k16.data(), v16.data(), out16.data());
        for (size_t i = 0; i < out.size(); i++)
            if (out16[i] != 0xFFFFu) out[i] = prism::testing::bf16_value(out16[i]);
    } else {
        run(q.data(), k.data(), v.data(), out.data());
    }

    const auto q_d = wide(q), k_d = wide(k), v_d = wide(v), dout_d = wide(dout);
    std::vector<double> ref(B * stride, NAN), ref_p(probs.size());
    ops::cls_attention_forward<double>(ref.data(), stride, ref_p.data(), q_d.data(), stride, k_d.data(), v_d.data(), B,
                                       M, D, Hd);
    expect_rel(what + " out", rel_error(out, ref, {}, stride, 0, D), bf16 ? 2e-3 : kTol);
    size_t touched = 0;
    for (int64_t i = 0; i < B * stride; i++) touched += i % stride >= D && !std::isnan(out[i]);
    EXPECT_EQ(touched, 0u) << what << ": wrote rows other than the CLS row";
    expect_rel(what + " probs", rel_error(probs, ref_p));

    std::vector<double> rq(gq.begin(), gq.end()), rk(gk.begin(), gk.end()), rv(gv.begin(), gv.end());
    ops::cls_attention_backward<double>(rq.data(), stride, rk.data(), rv.data(), dout_d.data(), stride, q_d.data(),
                                        stride, k_d.data(), v_d.data(), ref_p.data(), B, M, D, Hd);
    expect_rel(what + " dq", rel_error(dq, rq, gq));
    expect_rel(what + " dk", rel_error(dk, rk, gk));
    expect_rel(what + " dv", rel_error(dv, rv, gv));
}

}  // namespace

// one query tile, one key tile; head dim 8 (lanes past it idle)
TEST(FusedEmulated, DenseOneTile) { run_dense(2, 17, 2, 8, 1); }
// three query and key tiles, the last partial; So2Sat's head dim
TEST(FusedEmulated, DensePartialTiles) { run_dense(1, 75, 1, 64, 2); }
// head dims 48 (not a multiple of 32) and 128 (the largest)
TEST(FusedEmulated, DenseHeadDims) {
    run_dense(2, 33, 1, 48, 3);
    run_dense(1, 40, 2, 128, 4);
}

// So2Sat's N = 16 (one partial key tile), empty groups
TEST(FusedEmulated, RoutedSixteenKeys) { run_routed(2, 3, 16, 2, 64, 48, 5); }
// two key tiles; groups of up to 140 queries: several query tiles and dK/dV steps
TEST(FusedEmulated, RoutedSeveralTiles) {
    run_routed(1, 3, 40, 1, 24, 120, 6);
    run_routed(1, 2, 70, 1, 64, 140, 7);
}

// fewer keys than threads, and more (several keys per thread)
TEST(FusedEmulated, ClsRow) {
    run_cls(2, 45, 2, 16, 8);
    run_cls(1, 300, 1, 64, 9);
}
// q, k, v and the output stored in bf16 (the bf16 mode's moevit at head dim 64)
TEST(FusedEmulated, ClsRowBf16) {
    run_cls(2, 45, 2, 64, 10, true);
    run_cls(1, 300, 1, 64, 11, true);
}
