// The routing kernels (kernels/cuda/routing.cuh: router, dispatch, gather,
// combine, the load-balance and z losses) run on the CPU through tests/emulator.h with the launch
// geometry kernels/cuda/moe.cu gives them, against the CPU reference ops
// (kernels/cpu/moe.cpp): the top-k picks, the dispatch's rows and offsets
// exactly, every float output within DESIGN.md §7's fp32 tolerance (1e-5,
// relative in the L2 norm), bf16 outputs as the rounding of the reference.
// This checks the kernels' logic (the warp butterflies and the tie order of
// the top-k, the histogram's atomics, the scan's runs, the placement's rounds
// and match_any ranks, shared-memory races and unwritten reads as the emulator
// models them) on any machine; CudaOps.Router, .DispatchIsTheCpuCountingSort
// and .GatherAndCombine in test_cuda_ops.cpp check the compiled kernels.
// Shapes cross the boundaries: more than 32 channels (a lane's second
// channel), k above 32 (a lane's second pick), empty groups, an image with
// more pairs than a placement round (256), one image and several.
// Outputs start as NaN (or -7 for indices), so an element left unwritten fails.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "engine/rng.h"
#include "kernels/ops.h"
#include "tests/emulated_testutil.h"
#include "tests/routing_testutil.h"
// last: the emulator defines threadIdx and friends as macros
#include "tests/emulator.h"
#include "kernels/cuda/routing.cuh"
#include "tests/reduce_emulated.h"

using namespace prism;
using prism::testing::change;
using prism::testing::expect_close;
using prism::testing::grid_logits;
using prism::testing::normal;
using prism::testing::random_experts;
using prism::testing::to_bf16;
using prism::testing::widen;
namespace rt = prism::routing;

namespace {

// bf16 results that must be the reference's rounding, but for a last-bit
// difference where the fp32 sums' order differs from the CPU's.
void expect_rounding_of(const std::string& what, const std::vector<uint16_t>& got, const std::vector<float>& ref) {
    ASSERT_EQ(got.size(), ref.size()) << what;
    int64_t off_by_more = 0;
    for (size_t i = 0; i < ref.size(); i++) {
        const int diff = std::abs(int(got[i]) - int(bf16_bits(ref[i])));
        if (diff > 1 || std::isnan(bf16_value(got[i]))) off_by_more++;
    }
    std::printf("[ emulated   ] %-56s %lld of %zu off by more than one bf16 step\n", what.c_str(),
                (long long)off_by_more, ref.size());
    EXPECT_EQ(off_by_more, 0) << what;
}

struct Shape {
    int B, C, N, D;
    std::vector<int> S;  // the channels present, ascending
};
std::string tag(const Shape& sh, int k) {
    return "B=" + std::to_string(sh.B) + " C=" + std::to_string(sh.C) + " |S|=" + std::to_string(sh.S.size()) +
           " N=" + std::to_string(sh.N) + " k=" + std::to_string(k);
}
std::vector<uint8_t> mask_of(const std::vector<int>& S, int C) {
    std::vector<uint8_t> m(C, 0);
    for (int c : S) m[c] = 1;
    return m;
}
std::vector<int> every_but(int C, const std::vector<int>& missing) {
    std::vector<int> S;
    for (int c = 0; c < C; c++)
        if (std::find(missing.begin(), missing.end(), c) == missing.end()) S.push_back(c);
    return S;
}

// moe.cu's router_forward and router_backward.
void router_forward(const rt::RouterFwdParams& p) {
    const int64_t T = (int64_t)p.B * p.nS * p.N;
    emu::launch({rt::warp_blocks(T)}, rt::kWarpThreads, 0, rt::router_forward_kernel, p);
}
void router_backward(const rt::RouterBwdParams& p) {
    const int64_t T = (int64_t)p.B * p.nS * p.N;
    emu::launch({rt::warp_blocks(T)}, rt::kWarpThreads, 0, rt::router_backward_kernel, p);
}

void run_router(const Shape& sh, int k, ops::Combine combine, uint64_t seed) {
    const int B = sh.B, C = sh.C, N = sh.N, nS = (int)sh.S.size();
    const int64_t T = (int64_t)B * nS * N, L = 1 + (int64_t)nS * N;  // patch rows after a CLS row
    const std::string what = tag(sh, k) + (combine == ops::Combine::renorm ? " renorm" : " softmax");
    Rng rng(seed);
    const auto z = grid_logits(B * L * C, rng);  // exact ties among them
    const auto in_S = mask_of(sh.S, C);
    std::vector<float> r_probs(T * C, NAN), r_w(T * k, NAN), r_lse(T, NAN);
    std::vector<int> r_e(T * k, -7);
    ops::router_forward(r_probs.data(), r_e.data(), r_w.data(), r_lse.data(), z.data() + C, L * C, in_S.data(),
                        sh.S.data(), B, nS, N, C, k, combine);
    std::vector<float> probs(T * C, NAN), w(T * k, NAN), lse(T, NAN);
    std::vector<int> e(T * k, -7);
    router_forward({probs.data(), w.data(), lse.data(), e.data(), z.data() + C, L * C, in_S.data(), sh.S.data(), B,
                    nS, N, C, k, combine == ops::Combine::renorm});
    EXPECT_EQ(e, r_e) << what << ": the top-k picks differ";
    expect_close(what + " probs", probs, r_probs);
    expect_close(what + " weights", w, r_w);
    expect_close(what + " lse", lse, r_lse);

    for (bool with_dprobs : {true, false}) {
        const auto dweights = normal(T * k, rng), dprobs = normal(T * C, rng), g = normal(z.size(), rng);
        auto ref = g, got = g;
        ops::router_backward<float>(ref.data() + C, L * C, r_probs.data(), r_e.data(), r_w.data(), dweights.data(),
                                    with_dprobs ? dprobs.data() : nullptr, sh.S.data(), B, nS, N, C, k, combine);
        router_backward({got.data() + C, L * C, r_probs.data(), r_w.data(), dweights.data(),
                         with_dprobs ? dprobs.data() : nullptr, r_e.data(), sh.S.data(), B, nS, N, C, k,
                         combine == ops::Combine::renorm});
        // against dz's change, not dz: the added gradient must be right, not just small beside g
        std::vector<float> d_ref(g.size()), d_got(g.size());
        for (size_t i = 0; i < g.size(); i++) d_ref[i] = ref[i] - g[i], d_got[i] = got[i] - g[i];
        expect_close(what + (with_dprobs ? " dz (with dprobs)" : " dz"), d_got, d_ref);
    }
}

// Channel 2 missing of 5; 40 channels with 5 missing (lanes own two); 3 of 3.
const std::vector<Shape> kShapes = {
    {2, 5, 3, 8, {0, 1, 3, 4}},
    {1, 40, 2, 8, every_but(40, {0, 7, 31, 32, 39})},
    {3, 3, 4, 8, {0, 1, 2}},
};

TEST(RoutingEmulated, Router) {
    uint64_t seed = 1;
    for (const Shape& sh : kShapes) {
        const int nS = (int)sh.S.size();
        for (int k : {1, 2, nS})
            for (auto combine : {ops::Combine::softmax, ops::Combine::renorm}) run_router(sh, k, combine, seed++);
    }
}

TEST(RoutingEmulated, RouterMoreThan32Picks) {
    run_router(kShapes[1], 33, ops::Combine::renorm, 40);
}

TEST(RoutingEmulated, RouterTiesGoToLowerChannel) {
    const int B = 1, C = 5, N = 3, k = 3, nS = 4;
    const std::vector<int> S = {0, 1, 3, 4};
    const int64_t T = (int64_t)nS * N;
    const std::vector<float> z(T * C, 0.5f);  // every channel ties
    const auto in_S = mask_of(S, C);
    std::vector<float> probs(T * C, NAN), w(T * k, NAN), lse(T, NAN);
    std::vector<int> e(T * k, -7);
    router_forward({probs.data(), w.data(), lse.data(), e.data(), z.data(), C, in_S.data(), S.data(), B, nS, N, C,
                    k, false});
    for (int64_t t = 0; t < T; t++)
        EXPECT_EQ(std::vector<int>(e.begin() + t * k, e.begin() + (t + 1) * k), (std::vector<int>{0, 1, 2}))
            << "token " << t;
}

// moe.cu's moe_dispatch.
void dispatch(const rt::DispatchParams& p) {
    emu::launch({(unsigned)p.B}, rt::kDispatchThreads, rt::histogram_smem(p.nS), rt::dispatch_histogram_kernel, p);
    emu::launch({1}, rt::kDispatchThreads, rt::scan_smem(), rt::dispatch_scan_kernel, p);
    emu::launch({(unsigned)p.B}, rt::kDispatchThreads, rt::place_smem(p.nS), rt::dispatch_place_kernel, p);
}

struct Dispatch {
    std::vector<int> offsets, por, rop, counts;
};
Dispatch dispatch_of(const std::vector<int>& experts, int B, int nS, int N, int k, bool emulated) {
    const int64_t pairs = (int64_t)B * nS * N * k;
    Dispatch d{std::vector<int>(B * nS + 1, -7), std::vector<int>(pairs, -7), std::vector<int>(pairs, -7),
               std::vector<int>(nS, -7)};
    if (emulated)
        dispatch({d.offsets.data(), d.por.data(), d.rop.data(), d.counts.data(), experts.data(),
                  (int64_t)nS * N * k, B, nS});
    else
        ops::moe_dispatch(d.offsets.data(), d.por.data(), d.rop.data(), d.counts.data(), experts.data(), B, nS, N, k);
    return d;
}

TEST(RoutingEmulated, DispatchIsTheCpuCountingSort) {
    Rng rng(7);
    // B, nS, N, k: small; 300 and 780 pairs per image (two and four placement rounds)
    const int cases[][4] = {{2, 4, 3, 2}, {3, 5, 30, 2}, {1, 13, 20, 3}, {2, 6, 7, 3}};
    for (const auto& c : cases) {
        const int B = c[0], nS = c[1], N = c[2], k = c[3];
        const int64_t T = (int64_t)B * nS * N;
        for (int allowed : {nS, std::min(nS, k + 1), k}) {
            const std::string what = "B=" + std::to_string(B) + " nS=" + std::to_string(nS) + " N=" +
                                     std::to_string(N) + " k=" + std::to_string(k) + " from " +
                                     std::to_string(allowed) + " positions";
            const auto experts = random_experts(T, k, allowed, rng);
            const Dispatch ref = dispatch_of(experts, B, nS, N, k, false);
            const Dispatch got = dispatch_of(experts, B, nS, N, k, true);
            EXPECT_EQ(got.offsets, ref.offsets) << what << ": offsets";
            EXPECT_EQ(got.por, ref.por) << what << ": pair_of_row";
            EXPECT_EQ(got.rop, ref.rop) << what << ": row_of_pair";
            EXPECT_EQ(got.counts, ref.counts) << what << ": counts";
            std::printf("[ emulated   ] dispatch %-47s %s\n", what.c_str(),
                        got.por == ref.por && got.offsets == ref.offsets ? "the CPU's rows" : "DIFFERS");
        }
    }
}

TEST(RoutingEmulated, GatherAndCombine) {
    Rng rng(11);
    // B, nS, N, k, D: D of 8 (a lane idle), 40 (a lane's second element)
    const int cases[][5] = {{2, 4, 3, 2, 8}, {1, 3, 5, 3, 40}, {3, 5, 2, 1, 8}};
    for (const auto& c : cases) {
        const int B = c[0], nS = c[1], N = c[2], k = c[3], D = c[4];
        const int64_t T = (int64_t)B * nS * N, rows = T * k, L = 1 + (int64_t)nS * N, stride = L * D, R = T / B;
        const std::string what = "B=" + std::to_string(B) + " nS=" + std::to_string(nS) + " N=" +
                                 std::to_string(N) + " k=" + std::to_string(k) + " D=" + std::to_string(D);
        const Dispatch dsp = dispatch_of(random_experts(T, k, std::min(nS, k + 1), rng), B, nS, N, k, false);
        const auto launch_elements = [](int64_t n, auto kernel, const auto& p) {
            emu::launch({rt::element_blocks(n)}, rt::kElementThreads, 0, kernel, p);
        };

        // gather, from q as patch rows after a CLS row; fp32, and the bf16 mode's copy
        const auto q = normal(B * stride, rng);
        std::vector<float> ref_qg(rows * D, NAN), qg(rows * D, NAN);
        ops::moe_gather_forward(ref_qg.data(), q.data() + D, stride, dsp.por.data(), B, nS, N, k, D);
        launch_elements(rows * D, rt::gather_forward_kernel<float>,
                        rt::GatherParams<float>{qg.data(), q.data() + D, stride, dsp.por.data(), R, rows, k, D});
        EXPECT_EQ(qg, ref_qg) << what << ": gather copies";
        const auto q16 = to_bf16(q);
        std::vector<uint16_t> qg16(rows * D, 0xFFFF);
        launch_elements(rows * D, rt::gather_forward_kernel<uint16_t>,
                        rt::GatherParams<uint16_t>{qg16.data(), q16.data() + D, stride, dsp.por.data(), R, rows, k, D});
        EXPECT_EQ(qg16, to_bf16(ref_qg)) << what << ": gather bf16 copies";

        // gather backward: dq += the slots' dqg rows
        const auto dqg = normal(rows * D, rng), g_q = normal(q.size(), rng);
        auto r_dq = g_q, dq = g_q;
        ops::moe_gather_backward(r_dq.data() + D, stride, dqg.data(), dsp.rop.data(), B, nS, N, k, D);
        launch_elements(T * D, rt::gather_backward_kernel,
                        rt::GatherBwdParams{dq.data() + D, stride, dqg.data(), dsp.rop.data(), R, T, k, D});
        expect_close(what + " gather backward", dq, r_dq);

        // combine into patch rows (the CLS rows stay as they were)
        const auto og = normal(rows * D, rng), w = normal(T * k, rng);
        std::vector<float> ref_a(B * stride, NAN), a(B * stride, NAN);
        ops::combine_forward(ref_a.data() + D, stride, og.data(), w.data(), dsp.rop.data(), B, nS, N, k, D);
        launch_elements(T * D, rt::combine_forward_kernel<float>,
                        rt::CombineParams<float>{a.data() + D, stride, og.data(), w.data(), dsp.rop.data(), R, T, k, D});
        for (int b = 0; b < B; b++)
            for (int d = 0; d < D; d++) EXPECT_TRUE(std::isnan(a[b * stride + d])) << what << ": a CLS row written";
        std::vector<float> patch_a, patch_ref;  // the patch rows only
        for (int64_t i = 0; i < B * stride; i++)
            if (i % stride >= D) patch_a.push_back(a[i]), patch_ref.push_back(ref_a[i]);
        expect_close(what + " combine", patch_a, patch_ref);
        // the bf16 mode's: og and a in bf16, the sum in fp32
        const auto og16 = to_bf16(og);
        std::vector<float> ref_a16(B * stride, 0.f);
        ops::combine_forward(ref_a16.data() + D, stride, widen(og16).data(), w.data(), dsp.rop.data(), B, nS, N, k, D);
        std::vector<uint16_t> a16(B * stride, 0);
        launch_elements(T * D, rt::combine_forward_kernel<uint16_t>,
                        rt::CombineParams<uint16_t>{a16.data() + D, stride, og16.data(), w.data(), dsp.rop.data(),
                                                    R, T, k, D});
        expect_rounding_of(what + " combine bf16", a16, ref_a16);

        // combine backward: dog (+= or written) and dweights += ⟨dA, O⟩
        const auto da = normal(B * stride, rng), g_og = normal(og.size(), rng), g_w = normal(w.size(), rng);
        const unsigned warp_grid = rt::warp_blocks(T);
        for (bool overwrite : {false, true}) {
            std::vector<float> r_dog = overwrite ? std::vector<float>(og.size(), 0.f) : g_og, r_dw = g_w;
            ops::combine_backward(r_dog.data(), r_dw.data(), da.data() + D, stride, og.data(), w.data(),
                                  dsp.rop.data(), B, nS, N, k, D);
            std::vector<float> dog = overwrite ? std::vector<float>(og.size(), NAN) : g_og, dw = g_w;
            emu::launch({warp_grid}, rt::kWarpThreads, 0, rt::combine_backward_kernel<float, float>,
                        rt::CombineBwdParams<float, float>{dog.data(), overwrite, dw.data(), da.data() + D, stride,
                                                           og.data(), w.data(), dsp.rop.data(), R, T, k, D});
            const std::string how = overwrite ? " (dog written)" : " (dog added into)";
            expect_close(what + " combine dog" + how, dog, r_dog);
            expect_close(what + " combine dweights" + how, dw, r_dw);
        }
        // the bf16 mode's: og in bf16 and dog written in bf16
        std::vector<float> r_dog(og.size(), 0.f), r_dw = g_w;
        ops::combine_backward(r_dog.data(), r_dw.data(), da.data() + D, stride, widen(og16).data(), w.data(),
                              dsp.rop.data(), B, nS, N, k, D);
        std::vector<uint16_t> dog16(og.size(), 0xFFFF);
        std::vector<float> dw = g_w;
        emu::launch({warp_grid}, rt::kWarpThreads, 0, rt::combine_backward_kernel<uint16_t, uint16_t>,
                    rt::CombineBwdParams<uint16_t, uint16_t>{dog16.data(), true, dw.data(), da.data() + D, stride,
                                                             og16.data(), w.data(), dsp.rop.data(), R, T, k, D});
        expect_rounding_of(what + " combine dog bf16", dog16, r_dog);
        expect_close(what + " combine dweights, og bf16", dw, r_dw);
    }
}

}  // namespace

// The load-balance loss (Switch and importance, on one rank and on the
// statistics of two) and the z-loss, with their gradients, against
// kernels/cpu/moe.cpp; the launchers' sequence is moe.cu's.
TEST(RoutingEmulated, LoadBalanceAndZLoss) {
    Rng rng(23);
    const int B = 3, C = 7, N = 37, k = 2;
    const std::vector<int> S = {5, 1, 6, 2};  // an HCS subset, out of order
    const int nS = (int)S.size();
    const int64_t R = (int64_t)nS * N, tokens = B * R;
    // Router probabilities: positive, zero outside S, as the router writes them.
    std::vector<float> probs(tokens * C, 0.f);
    for (int64_t t = 0; t < tokens; t++)
        for (int s = 0; s < nS; s++) probs[t * C + S[s]] = float(0.05 + rng.uniform());
    std::vector<int> counts(nS);
    for (auto& c : counts) c = int(rng.below(tokens * k / 2));
    // Another rank's statistics, for the data-parallel case.
    std::vector<double> other(2 * nS + 1);
    for (int s = 0; s < nS; s++) other[s] = 40 * rng.uniform(), other[nS + s] = double(rng.below(100));
    other[2 * nS] = 150;

    std::vector<double> stats(2 * nS + 1, NAN), ref_stats(2 * nS + 1);
    prism::testing::column_sum<double>(1, tokens, nS, rt::ProbsOfS{probs.data(), S.data(), C},
                                       rt::StoreMass{stats.data()});
    emu::launch({1}, rt::kAuxCountsThreads, 0, rt::aux_counts_kernel,
                rt::AuxCountsParams{stats.data(), counts.data(), tokens, nS});
    ops::aux_stats(ref_stats.data(), probs.data(), counts.data(), S.data(), tokens, nS, C);
    for (int i = 0; i <= 2 * nS; i++) EXPECT_NEAR(stats[i], ref_stats[i], 1e-12 * std::abs(ref_stats[i])) << i;

    const float coef = 0.01f, grad_scale = 0.5f;
    for (const ops::AuxLoss kind : {ops::AuxLoss::switch_, ops::AuxLoss::importance})
        for (const bool two_ranks : {false, true}) {
            const std::string what = std::string(kind == ops::AuxLoss::switch_ ? "switch" : "importance") +
                                     (two_ranks ? ", two ranks' statistics" : ", one rank");
            std::vector<double> all = stats;
            if (two_ranks)
                for (int i = 0; i <= 2 * nS; i++) all[i] += other[i];
            const auto dprobs0 = normal(probs.size(), rng, 0.1);
            auto ref_d = dprobs0;
            const float ref_loss = ops::aux_loss_forward_backward(ref_d.data(), probs.data(), counts.data(), S.data(),
                                                                  tokens, nS, C, k, kind, coef, grad_scale,
                                                                  two_ranks ? all.data() : nullptr);
            float loss = NAN, share = NAN;
            std::vector<float> dmass(nS, NAN);
            emu::launch({1}, 32, 0, rt::aux_loss_kernel,
                        rt::AuxLossParams{&loss, dmass.data(), &share, all.data(), tokens, nS, k,
                                          kind == ops::AuxLoss::importance, coef});
            auto d = dprobs0;
            emu::launch({rt::element_blocks(tokens * nS)}, rt::kElementThreads, 0, rt::aux_grad_kernel,
                        rt::AuxGradParams{d.data(), dmass.data(), &share, S.data(), tokens, nS, C, grad_scale});
            expect_close("load balance loss, " + what, std::vector<float>{loss}, std::vector<float>{ref_loss});
            // the gradient alone: dprobs0 is most of dprobs
            expect_close("load balance gradient, " + what, change(d, dprobs0), change(ref_d, dprobs0));
        }

    // z-loss, dz with padding between images (dz_image_stride > R·C).
    const auto lse = normal(tokens, rng, 1.0, 2.0);
    const int64_t stride = R * C + 5;
    const auto dz0 = normal(B * stride, rng, 0.1);
    auto ref_dz = dz0;
    const float ref_z = ops::z_loss_forward_backward(ref_dz.data(), stride, probs.data(), lse.data(), B, nS, N, C,
                                                     coef, grad_scale);
    float z = NAN;
    prism::testing::device_sum(tokens, rt::LseSquared{lse.data()}, rt::ZLossOut{&z, coef, tokens});
    auto dz = dz0;
    emu::launch({rt::element_blocks(tokens * C)}, rt::kElementThreads, 0, rt::z_grad_kernel,
                rt::ZGradParams{dz.data(), stride, probs.data(), lse.data(), R, tokens, C, coef, grad_scale});
    expect_close("z-loss", std::vector<float>{z}, std::vector<float>{ref_z});
    expect_close("z-loss gradient (padding untouched)", change(dz, dz0), change(ref_dz, dz0));
}
