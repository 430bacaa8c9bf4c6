// Every CUDA op (kernels/cuda_ops.h) against the CPU reference (kernels/ops.h)
// in float, on fresh random inputs of several shapes: So2Sat (N=16, C=18,
// D=384, 6 heads), JUMP-CP (N=196, C=8) and a tiny odd one, with all channels
// and an HCS subset. Device outputs are poisoned first, so an element the op
// fails to write fails the comparison; gradients start from the same random
// values on both sides (every backward accumulates); each backward (and the
// attention forwards) runs twice and must give bit-identical results.
// Agreement: ‖out − ref‖/‖ref‖ ≤ 1e-5 (bf16: 2e-2, DESIGN.md §7).
// Without a CUDA device every test is skipped, saying so.
//
// tests/emulated/cuda_ops.cpp compiles this file again for the emulator
// (EmulatedCudaOps.*): the same tests at the tiny shape, without a GPU.
#if defined(PRISM_CUDA) || defined(PRISM_EMULATION)
#include <algorithm>
#include <climits>
#include <cstring>
#include <functional>
#include <iterator>
#include <numeric>
#include <string>
#include <vector>

#include "data/shard.h"  // float_to_half
#include "kernels/cuda_ops.h"
#include "kernels/ops.h"
#include "tests/cuda_testutil.h"
#include "tests/routing_testutil.h"

using namespace prism;
using namespace prism::testing;
namespace cu = prism::cuda_ops;

namespace {

struct Shape {
    const char* name;
    int B, C, N, D, Hd, H, W, P;
};
const Shape kShapes[] = {
#ifndef PRISM_EMULATION  // hours in the emulator
    {"so2sat", 2, 18, 16, 384, 6, 32, 32, 8},
    {"jumpcp", 2, 8, 196, 384, 6, 224, 224, 16},
#endif
    {"tiny", 3, 3, 15, 10, 2, 9, 15, 3},
};

// The channels present: all of them, and a sorted random subset as HCS draws.
std::vector<std::vector<int>> channel_sets(int C, Rng& rng) {
    std::vector<int> all(C);
    std::iota(all.begin(), all.end(), 0);
    std::vector<std::vector<int>> sets = {all};
    if (C > 1) {
        std::vector<int> perm = all;
        for (int i = C - 1; i > 0; i--) std::swap(perm[i], perm[rng.below(i + 1)]);
        const int m = 1 + (int)rng.below(C - 1);  // 1..C-1
        std::vector<int> sub(perm.begin(), perm.begin() + m);
        std::sort(sub.begin(), sub.end());
        sets.push_back(sub);
    }
    return sets;
}

std::vector<uint8_t> mask_of(const std::vector<int>& S, int C) {
    std::vector<uint8_t> m(C, 0);
    for (int c : S) m[c] = 1;
    return m;
}

std::string tag(const Shape& sh, const std::vector<int>& S) {
    return std::string(sh.name) + " |S|=" + std::to_string(S.size());
}

std::vector<int> top_k_values(int nS) {
    std::vector<int> ks = {1};
    if (nS >= 2) ks.push_back(2);
    if (nS > 2) ks.push_back(nS);
    return ks;
}

struct Dispatch {
    std::vector<int> offsets, por, rop, counts;
};
Dispatch cpu_dispatch(const std::vector<int>& experts, int B, int nS, int N, int k) {
    const int64_t T = (int64_t)B * nS * N;
    Dispatch d{std::vector<int>(B * nS + 1), std::vector<int>(T * k), std::vector<int>(T * k),
               std::vector<int>(nS)};
    ops::moe_dispatch(d.offsets.data(), d.por.data(), d.rop.data(), d.counts.data(), experts.data(),
                      B, nS, N, k);
    return d;
}

// Linear layer shapes: odd tiny ones, and each shape's qkv and fc2 over its
// whole channel-wise sequence.
struct LinearCase {
    std::string name;
    int64_t rows;
    int in, out;
};
std::vector<LinearCase> linear_cases() {
    std::vector<LinearCase> cases = {{"tiny odd", 19, 6, 5}, {"one row", 1, 7, 3}};
    for (const Shape& sh : kShapes) {
        const int64_t rows = (int64_t)sh.B * (1 + sh.C * sh.N);
        cases.push_back({std::string(sh.name) + " qkv", rows, sh.D, 3 * sh.D});
        cases.push_back({std::string(sh.name) + " fc2", rows, 4 * sh.D, sh.D});
    }
    return cases;
}

class CudaOps : public CudaStreamTest {};

// Why the linear ops cannot run here, or nullptr. (A GTEST_SKIP inside a
// helper would return from the helper only: the test skips itself.) The
// emulated build has tests/emulated_cublas.h.
const char* no_linear_ops() { return cu::has_cublas() ? nullptr : "this build has no cuBLAS (CUBLAS_HOME)"; }

}  // namespace

TEST_F(CudaOps, Patchify) {
    Rng rng(101);
    for (const Shape& sh : kShapes)
        for (const auto& S : channel_sets(sh.C, rng)) {
            const int B = sh.B, C = sh.C, nS = (int)S.size(), N = sh.N, PP = sh.P * sh.P;
            const auto images = randn_f((size_t)B * C * sh.H * sh.W, rng);
            auto d_images = to_device(images);
            auto d_S = to_device(S);
            auto ref = poisoned<float>((size_t)B * nS * N * PP);
            ops::patchify_channels(ref.data(), images.data(), B, C, sh.H, sh.W, sh.P, S.data(), nS);
            DeviceArray<float> out(ref.size());
            out.poison();
            cu::patchify_channels(out.get(), d_images.get(), B, C, sh.H, sh.W, sh.P, d_S.get(), nS, stream);
            expect_close(tag(sh, S) + " patchify_channels", out.download(), ref);

            const auto keep = mask_of(S, C);
            auto d_keep = to_device(keep);
            const float scale = float(C) / float(nS);
            for (bool masked : {false, true}) {
                auto ref_all = poisoned<float>((size_t)B * N * C * PP);
                ops::patchify_all(ref_all.data(), images.data(), B, C, sh.H, sh.W, sh.P,
                                  masked ? keep.data() : nullptr, masked ? scale : 1.f);
                DeviceArray<float> all(ref_all.size());
                all.poison();
                cu::patchify_all(all.get(), d_images.get(), B, C, sh.H, sh.W, sh.P,
                                 masked ? d_keep.get() : nullptr, masked ? scale : 1.f, stream);
                expect_close(tag(sh, S) + (masked ? " patchify_all keep" : " patchify_all"),
                             all.download(), ref_all);
            }
        }
}

TEST_F(CudaOps, Embed) {
    Rng rng(102);
    for (const Shape& sh : kShapes)
        for (const auto& channels : channel_sets(sh.C, rng))
            for (bool with_chan : {true, false}) {  // chvit/moevit, vit (one row per patch)
                const std::vector<int> S = with_chan ? channels : std::vector<int>{0};
                const int B = sh.B, C = sh.C, nS = (int)S.size(), N = sh.N, D = sh.D;
                const int64_t L = 1 + (int64_t)nS * N;
                const std::string what = tag(sh, S) + (with_chan ? " embed" : " embed (vit)");
                const auto patch = randn_f((size_t)B * nS * N * D, rng), cls = randn_f(D, rng),
                           pos = randn_f((size_t)(1 + N) * D, rng), chan = randn_f((size_t)C * D, rng);
                auto d_patch = to_device(patch), d_cls = to_device(cls), d_pos = to_device(pos),
                     d_chan = to_device(chan);
                auto d_S = to_device(S);
                auto ref = poisoned<float>(B * L * D);
                ops::embed_forward<float>(ref.data(), patch.data(), cls.data(), pos.data(),
                                          with_chan ? chan.data() : nullptr, S.data(), B, nS, N, D);
                DeviceArray<float> seq(ref.size());
                seq.poison();
                cu::embed_forward(seq.get(), d_patch.get(), d_cls.get(), d_pos.get(),
                                  with_chan ? d_chan.get() : nullptr, d_S.get(), B, nS, N, D, stream);
                expect_close(what + " forward", seq.download(), ref);

                const auto dseq = randn_f(B * L * D, rng);
                const auto g_patch = randn_f(patch.size(), rng), g_cls = randn_f(D, rng),
                           g_pos = randn_f(pos.size(), rng), g_chan = randn_f(chan.size(), rng);
                auto r_patch = g_patch, r_cls = g_cls, r_pos = g_pos, r_chan = g_chan;
                ops::embed_backward<float>(r_patch.data(), r_cls.data(), r_pos.data(),
                                           with_chan ? r_chan.data() : nullptr, dseq.data(),
                                           S.data(), B, nS, N, D);
                auto d_dseq = to_device(dseq);
                DeviceArray<float> dp(patch.size()), dc(D), dpos(pos.size()), dch(chan.size());
                auto got = run_twice(what + " backward",
                                     {{&dp, g_patch}, {&dc, g_cls}, {&dpos, g_pos}, {&dch, g_chan}}, [&] {
                    cu::embed_backward(dp.get(), dc.get(), dpos.get(), with_chan ? dch.get() : nullptr,
                                       d_dseq.get(), d_S.get(), B, nS, N, D, stream);
                });
                expect_close(what + " dpatch", got[0], r_patch);
                expect_close(what + " dcls", got[1], r_cls);
                expect_close(what + " dpos", got[2], r_pos);
                expect_close(what + " dchan", got[3], r_chan);
            }
}

TEST_F(CudaOps, SelectRows) {
    Rng rng(103);
    for (const Shape& sh : kShapes) {
        const int B = sh.B, D = sh.D;
        const int64_t stride = (1 + (int64_t)sh.C * sh.N) * D;
        const auto x = randn_f(B * stride, rng);
        auto d_x = to_device(x);
        auto ref = poisoned<float>((size_t)B * D);
        ops::select_rows(ref.data(), x.data(), stride, B, D);
        DeviceArray<float> out(ref.size());
        out.poison();
        cu::select_rows(out.get(), d_x.get(), stride, B, D, stream);
        expect_close(std::string(sh.name) + " select_rows", out.download(), ref);

        const auto dout = randn_f((size_t)B * D, rng), g = randn_f(x.size(), rng);
        auto r = g;
        ops::select_rows_backward(r.data(), dout.data(), stride, B, D);
        auto d_dout = to_device(dout);
        DeviceArray<float> dx(x.size());
        auto got = run_twice(std::string(sh.name) + " select_rows_backward", {{&dx, g}}, [&] {
            cu::select_rows_backward(dx.get(), d_dout.get(), stride, B, D, stream);
        });
        expect_close(std::string(sh.name) + " select_rows_backward", got[0], r);
    }
}

TEST_F(CudaOps, LayerNorm) {
    Rng rng(104);
    for (const Shape& sh : kShapes) {
        const int64_t rows = (int64_t)sh.B * (1 + sh.C * sh.N);
        const int D = sh.D;
        const std::string what = std::string(sh.name) + " layernorm";
        // a large mean: the statistics must not cancel
        const auto x = randn_f(rows * D, rng, 1.0, 3.0), w = randn_f(D, rng), b = randn_f(D, rng);
        auto d_x = to_device(x), d_w = to_device(w), d_b = to_device(b);
        auto ref = poisoned<float>(x.size()), ref_mean = poisoned<float>(rows), ref_rstd = poisoned<float>(rows);
        ops::layernorm_forward(ref.data(), ref_mean.data(), ref_rstd.data(), x.data(), w.data(), b.data(), rows, D);
        DeviceArray<float> out(x.size()), mean(rows), rstd(rows);
        out.poison();
        mean.poison();
        rstd.poison();
        cu::layernorm_forward(out.get(), nullptr, mean.get(), rstd.get(), d_x.get(), d_w.get(), d_b.get(), rows, D,
                              stream);
        const auto out_full = out.download();
        expect_close(what + " out", out_full, ref);
        expect_close(what + " mean", mean.download(), ref_mean);
        expect_close(what + " rstd", rstd.download(), ref_rstd);
        // The bf16 mode's output: the rounding of the fp32 one, with or without it.
        DeviceArray<uint16_t> out_bf16(x.size());
        for (bool with_full : {true, false}) {
            out.poison();
            out_bf16.poison();
            cu::layernorm_forward(with_full ? out.get() : nullptr, out_bf16.get(), mean.get(), rstd.get(), d_x.get(),
                                  d_w.get(), d_b.get(), rows, D, stream);
            const std::string how = with_full ? " bf16 out (with fp32)" : " bf16 out (alone)";
            expect_rounding_of(what + how, out_bf16.download(), out_full);
            if (with_full) expect_bit_identical(what + " out beside bf16", out.download(), out_full);
        }

        const auto dout = randn_f(x.size(), rng), g_x = randn_f(x.size(), rng), g_w = randn_f(D, rng),
                   g_b = randn_f(D, rng);
        auto r_x = g_x, r_w = g_w, r_b = g_b;
        ops::layernorm_backward(r_x.data(), r_w.data(), r_b.data(), dout.data(), x.data(), w.data(),
                                ref_mean.data(), ref_rstd.data(), rows, D);
        auto d_dout = to_device(dout), d_mean = to_device(ref_mean), d_rstd = to_device(ref_rstd);
        DeviceArray<float> dx(x.size()), dw(D), db(D);
        auto got = run_twice(what + " backward", {{&dx, g_x}, {&dw, g_w}, {&db, g_b}}, [&] {
            cu::layernorm_backward(dx.get(), dw.get(), db.get(), d_dout.get(), d_x.get(), d_w.get(),
                                   d_mean.get(), d_rstd.get(), rows, D, stream);
        });
        expect_close(what + " dx", got[0], r_x);
        expect_close(what + " dw", got[1], r_w);
        expect_close(what + " db", got[2], r_b);
    }
}

TEST_F(CudaOps, Linear) {
    if (const char* why = no_linear_ops()) GTEST_SKIP() << why;
    const auto cases = linear_cases();
    Rng rng(105);
    for (const LinearCase& c : cases)
        for (bool bias : {true, false}) {
            const std::string what = "linear " + c.name + (bias ? "" : " (no bias, no dx)");
            const auto x = randn_f(c.rows * c.in, rng), W = randn_f((size_t)c.out * c.in, rng),
                       b = randn_f(c.out, rng);
            auto d_x = to_device(x), d_W = to_device(W), d_b = to_device(b);
            auto ref = poisoned<float>(c.rows * c.out);
            ops::linear_forward<float>(ref.data(), x.data(), W.data(), bias ? b.data() : nullptr, c.rows, c.in, c.out);
            DeviceArray<float> out(ref.size());
            out.poison();
            cu::linear_forward(out.get(), d_x.get(), d_W.get(), bias ? d_b.get() : nullptr, c.rows, c.in, c.out, stream);
            expect_close(what + " forward", out.download(), ref);

            const auto dout = randn_f(ref.size(), rng), g_x = randn_f(x.size(), rng),
                       g_W = randn_f(W.size(), rng), g_b = randn_f(b.size(), rng);
            auto r_x = g_x, r_W = g_W, r_b = g_b;
            ops::linear_backward<float>(bias ? r_x.data() : nullptr, r_W.data(), bias ? r_b.data() : nullptr,
                                        dout.data(), x.data(), W.data(), c.rows, c.in, c.out);
            auto d_dout = to_device(dout);
            DeviceArray<float> dx(x.size()), dW(W.size()), db(b.size());
            auto got = run_twice(what + " backward", {{&dx, g_x}, {&dW, g_W}, {&db, g_b}}, [&] {
                cu::linear_backward(bias ? dx.get() : nullptr, false, dW.get(), bias ? db.get() : nullptr,
                                    d_dout.get(), d_x.get(), d_W.get(), c.rows, c.in, c.out, stream);
            });
            expect_close(what + " dx", got[0], r_x);
            expect_close(what + " dW", got[1], r_W);
            expect_close(what + " db", got[2], r_b);
            if (bias) {  // dx written, not added into: from a poisoned dx, the CPU's from zero
                std::vector<float> r_x0(x.size(), 0.f), r_W0 = g_W;
                ops::linear_backward<float>(r_x0.data(), r_W0.data(), nullptr, dout.data(), x.data(), W.data(), c.rows,
                                            c.in, c.out);
                auto fresh = run_twice(what + " backward, dx overwritten", {{&dx, {}}, {&dW, g_W}}, [&] {
                    cu::linear_backward(dx.get(), true, dW.get(), nullptr, d_dout.get(), d_x.get(), d_W.get(), c.rows,
                                        c.in, c.out, stream);
                });
                expect_close(what + " dx overwritten", fresh[0], r_x0);
                expect_close(what + " dW beside overwritten dx", fresh[1], r_W0);
            }
        }
}

TEST_F(CudaOps, Bf16Conversions) {
    Rng rng(117);
    auto x = randn_f(100003, rng, 3.0);
    // exact halves between two bf16 values (both parities), signed zeros, inf, NaN
    const float specials[] = {1.00390625f, 1.01171875f, -1.00390625f, 0.f, -0.f, INFINITY, -INFINITY, NAN,
                              3.0e38f, 1.0e-40f};
    std::copy(std::begin(specials), std::end(specials), x.begin());
    auto d_x = to_device(x);
    DeviceArray<uint16_t> b(x.size());
    b.poison();
    cu::to_bf16(b.get(), d_x.get(), (int64_t)x.size(), stream);
    const auto bits = b.download();
    EXPECT_EQ(bits, to_bf16(x)) << "float → bf16 differs from round-to-nearest-even";
    DeviceArray<float> back(x.size());
    back.poison();
    cu::from_bf16(back.get(), b.get(), (int64_t)x.size(), stream);
    const auto wide = back.download(), ref = widen(bits);
    EXPECT_EQ(std::memcmp(wide.data(), ref.data(), wide.size() * sizeof(float)), 0) << "bf16 → float is not exact";
}

// The input step (stored pixels → normalized, augmented floats) through its
// launcher: every stored pixel type, plain and with flips, turns, crops and holes,
// the statistics and augmentation read from device memory; then a NaN pixel
// in images 2 and 3, of which the device reports the lower.
TEST_F(CudaOps, InputStep) {
    Rng rng(120);
    const int B = 4, C = 3, H = 12, W = 12;
    const size_t n = (size_t)B * C * H * W;
    std::vector<float> mean(B * C), inv_std(B * C);
    for (int q = 0; q < B * C; q++) {
        mean[q] = float(rng.uniform() * 100);
        inv_std[q] = float(0.01 + 0.1 * rng.uniform());
    }
    std::vector<ops::InputAug> aug(B);
    for (int b = 0; b < B; b++) {
        aug[b].dihedral = 2 * b + 1;
        aug[b].dy = b - 1, aug[b].dx = 1 - b;
        aug[b].holes = b % 2, aug[b].hole_h = 4, aug[b].hole_w = 3, aug[b].hole_y[0] = 9, aug[b].hole_x[0] = 2;
    }
    auto d_mean = to_device(mean), d_inv_std = to_device(inv_std);
    auto d_aug = to_device(aug);
    DeviceArray<int> d_bad(1);
    // Every stored pixel type a shard can hold.
    for (const ops::Pixel pixel : {ops::Pixel::u8, ops::Pixel::u16, ops::Pixel::f16, ops::Pixel::f32}) {
        std::vector<uint8_t> raw(n * ops::pixel_size(pixel));
        for (size_t i = 0; i < n; i++) {
            const float v = float(rng.normal() * 50 + 50);
            if (pixel == ops::Pixel::u8) raw[i] = uint8_t(rng.below(256));
            else if (pixel == ops::Pixel::u16) reinterpret_cast<uint16_t*>(raw.data())[i] = uint16_t(rng.below(65536));
            else if (pixel == ops::Pixel::f16) reinterpret_cast<uint16_t*>(raw.data())[i] = float_to_half(v);
            else reinterpret_cast<float*>(raw.data())[i] = v;
        }
        const char* names[] = {"u8", "u16", "f16", "f32"};
        const std::string name = std::string("input step ") + names[int(pixel)];
        DeviceArray<float> out(n);
        for (const bool augmented : {false, true}) {
            const std::string what = name + (augmented ? " augmented" : "");
            std::vector<float> ref(n);
            ASSERT_EQ(ops::input_forward(ref.data(), raw.data(), pixel, B, C, H, W, mean.data(), inv_std.data(),
                                         augmented ? aug.data() : nullptr),
                      -1);
            auto d_raw = to_device(raw);
            d_bad.upload({INT_MAX});
            const auto got = run_twice(what, {{&out, {}}}, [&] {
                cu::input_forward(out.get(), d_raw.get(), pixel, B, C, H, W, d_mean.get(), d_inv_std.get(),
                                  augmented ? d_aug.get() : nullptr, d_bad.get(), stream);
            });
            expect_close(what, got[0], ref);
            EXPECT_EQ(d_bad.download()[0], INT_MAX) << what << ": a finite batch reported as not";
        }
        if (pixel == ops::Pixel::f32) {
            reinterpret_cast<float*>(raw.data())[3 * C * H * W + 5] = NAN;
            reinterpret_cast<float*>(raw.data())[2 * C * H * W + H * W + 7] = NAN;
            auto d_raw = to_device(raw);
            d_bad.upload({INT_MAX});
            out.poison();
            cu::input_forward(out.get(), d_raw.get(), pixel, B, C, H, W, d_mean.get(), d_inv_std.get(), nullptr,
                              d_bad.get(), stream);
            EXPECT_EQ(d_bad.download()[0], 2) << "the lowest image with a non-finite value";
        }
    }
}

// bf16 inputs, fp32 accumulation: against the CPU on the same bf16-rounded
// values; bf16 outputs within DESIGN.md §7's 2e-2, fp32 gradients within 1e-4.
TEST_F(CudaOps, LinearBf16) {
    if (const char* why = no_linear_ops()) GTEST_SKIP() << why;
    const auto cases = linear_cases();
    Rng rng(118);
    for (const LinearCase& c : cases)
        for (bool bias : {true, false}) {
            const std::string what = "linear bf16 " + c.name + (bias ? "" : " (no bias, no dx)");
            const auto xb = to_bf16(randn_f(c.rows * c.in, rng)), Wb = to_bf16(randn_f((size_t)c.out * c.in, rng));
            const auto b = randn_f(c.out, rng);
            const auto x = widen(xb), W = widen(Wb), b_rounded = widen(to_bf16(b));
            auto d_x = to_device(xb), d_W = to_device(Wb);
            auto d_b = to_device(b);
            auto ref = poisoned<float>(c.rows * c.out);
            ops::linear_forward<float>(ref.data(), x.data(), W.data(), bias ? b_rounded.data() : nullptr, c.rows, c.in, c.out);
            DeviceArray<uint16_t> out(ref.size());
            out.poison();
            cu::linear_forward_bf16(out.get(), d_x.get(), d_W.get(), bias ? d_b.get() : nullptr, c.rows, c.in, c.out, stream);
            expect_close(what + " forward", widen(out.download()), ref, 2e-2);

            const auto doutb = to_bf16(randn_f(ref.size(), rng)), g_xb = to_bf16(randn_f(x.size(), rng));
            const auto g_W = randn_f(W.size(), rng), g_b = randn_f(b.size(), rng);
            const auto dout = widen(doutb);
            auto r_x = widen(g_xb), r_W = g_W, r_b = g_b;
            ops::linear_backward<float>(bias ? r_x.data() : nullptr, r_W.data(), bias ? r_b.data() : nullptr,
                                        dout.data(), x.data(), W.data(), c.rows, c.in, c.out);
            auto d_dout = to_device(doutb);
            DeviceArray<uint16_t> dx(x.size());
            DeviceArray<float> dW(W.size()), db(b.size());
            std::vector<uint16_t> got_dx[2];
            std::vector<float> got_dW[2], got_db[2];
            for (int run = 0; run < 2; run++) {
                dx.upload(g_xb);
                dW.upload(g_W);
                db.upload(g_b);
                cu::linear_backward_bf16(bias ? dx.get() : nullptr, dW.get(), bias ? db.get() : nullptr, d_dout.get(),
                                         d_x.get(), d_W.get(), c.rows, c.in, c.out, stream);
                got_dx[run] = dx.download();
                got_dW[run] = dW.download();
                got_db[run] = db.download();
            }
            expect_bit_identical(what + " dx", got_dx[0], got_dx[1]);
            expect_bit_identical(what + " dW", got_dW[0], got_dW[1]);
            expect_bit_identical(what + " db", got_db[0], got_db[1]);
            expect_close(what + " dx", widen(got_dx[0]), r_x, 2e-2);
            expect_close(what + " dW", got_dW[0], r_W, 1e-4);
            expect_close(what + " db", got_db[0], r_b, 1e-4);
        }
}

// The bf16 mode's linear layer (mixed: fp32 tensors, x, W and dout rounded to
// bf16 for the products, the bias added in cuBLASLt's epilogue, or by the
// fallback where Lt has no algorithm): against the CPU on the same rounded
// values with the fp32 bias, so only the order of the fp32 accumulation
// differs (1e-4); the bias gradient from the unrounded dout.
TEST_F(CudaOps, LinearMixed) {
    if (const char* why = no_linear_ops()) GTEST_SKIP() << why;
    Rng rng(119);
    for (const LinearCase& c : linear_cases())
        for (bool bias : {true, false}) {
            const std::string what = "linear mixed " + c.name + (bias ? "" : " (no bias, no dx)");
            const auto x = randn_f(c.rows * c.in, rng), W = randn_f((size_t)c.out * c.in, rng), b = randn_f(c.out, rng);
            const auto xr = widen(to_bf16(x)), Wr = widen(to_bf16(W));
            auto d_x = to_device(x), d_W = to_device(W), d_b = to_device(b);
            auto ref = poisoned<float>(c.rows * c.out);
            ops::linear_forward<float>(ref.data(), xr.data(), Wr.data(), bias ? b.data() : nullptr, c.rows, c.in, c.out);
            DeviceArray<float> out(ref.size());
            auto got = run_twice(what + " forward", {{&out, {}}}, [&] {
                cu::linear_forward_mixed(out.get(), d_x.get(), nullptr, d_W.get(), nullptr, bias ? d_b.get() : nullptr,
                                         c.rows, c.in, c.out, stream);
            });
            expect_close(what + " forward", got[0], ref, 1e-4);
            // x stored in bf16 by the model (no fp32 x at all), and W's bf16 copy
            // the model rounds once per forward: the same operand values, so the
            // same bits as rounding them here.
            auto d_xb = to_device(to_bf16(x)), d_Wb = to_device(to_bf16(W));
            const auto stored = run_twice(what + " forward, x and W stored bf16", {{&out, {}}}, [&] {
                cu::linear_forward_mixed(out.get(), nullptr, d_xb.get(), d_W.get(), d_Wb.get(),
                                         bias ? d_b.get() : nullptr, c.rows, c.in, c.out, stream);
            });
            expect_bit_identical(what + " forward, x and W stored bf16", stored[0], got[0]);
            if (bias) {  // a caller's bias may sit at any 4-byte boundary (the model's are aligned)
                std::vector<float> shifted(b.size() + 1, 0.f);
                std::copy(b.begin(), b.end(), shifted.begin() + 1);
                auto d_shifted = to_device(shifted);
                const auto moved = run_twice(what + " forward, bias 4-byte aligned", {{&out, {}}}, [&] {
                    cu::linear_forward_mixed(out.get(), d_x.get(), nullptr, d_W.get(), nullptr, d_shifted.get() + 1,
                                             c.rows, c.in, c.out, stream);
                });
                expect_bit_identical(what + " forward, bias 4-byte aligned", moved[0], got[0]);
            }
            {  // the result stored in bf16 (the bf16 mode's qkv): the bias rounded and accumulated into
                std::vector<float> b_rounded = widen(to_bf16(b));
                auto ref16 = poisoned<float>(c.rows * c.out);
                ops::linear_forward<float>(ref16.data(), xr.data(), Wr.data(), bias ? b_rounded.data() : nullptr,
                                           c.rows, c.in, c.out);
                DeviceArray<uint16_t> out16(ref16.size());
                std::vector<uint16_t> runs[2];
                auto d_bb = to_device(to_bf16(b));  // the bias's bf16 copy, as the model keeps it
                for (int run = 0; run < 2; run++) {
                    out16.poison();
                    cu::linear_forward_mixed_to_bf16(out16.get(), run ? nullptr : d_x.get(), run ? d_xb.get() : nullptr,
                                                     d_W.get(), run ? d_Wb.get() : nullptr, bias ? d_b.get() : nullptr,
                                                     bias && run ? d_bb.get() : nullptr, c.rows, c.in, c.out, stream);
                    runs[run] = out16.download();
                }
                expect_bit_identical(what + " forward to bf16 (x, W, b fp32; their bf16 copies)", runs[0], runs[1]);
                expect_close(what + " forward to bf16", widen(runs[0]), ref16, 1e-2);
            }

            const auto dout = randn_f(ref.size(), rng), g_x = randn_f(x.size(), rng), g_W = randn_f(W.size(), rng),
                       g_b = randn_f(b.size(), rng);
            const auto doutr = widen(to_bf16(dout));
            auto r_x = g_x, r_W = g_W, r_b = g_b;
            ops::linear_backward<float>(bias ? r_x.data() : nullptr, r_W.data(), nullptr, doutr.data(), xr.data(),
                                        Wr.data(), c.rows, c.in, c.out);
            if (bias)
                for (int64_t r = 0; r < c.rows; r++)
                    for (int o = 0; o < c.out; o++) r_b[o] += dout[r * c.out + o];
            auto d_dout = to_device(dout);
            DeviceArray<float> dx(x.size()), dW(W.size()), db(b.size());
            auto grads = run_twice(what + " backward", {{&dx, g_x}, {&dW, g_W}, {&db, g_b}}, [&] {
                cu::linear_backward_mixed(bias ? dx.get() : nullptr, nullptr, false, dW.get(), bias ? db.get() : nullptr,
                                          d_dout.get(), nullptr, d_x.get(), nullptr, d_W.get(), nullptr, c.rows, c.in,
                                          c.out, stream);
            });
            expect_close(what + " dx", grads[0], r_x, 1e-4);
            expect_close(what + " dW", grads[1], r_W, 1e-4);
            expect_close(what + " db", grads[2], r_b, 1e-4);
            const RunBuffers grad_buffers = {{&dx, g_x}, {&dW, g_W}, {&db, g_b}};
            const auto stored_grads = run_twice(what + " backward, x and W stored bf16", grad_buffers, [&] {
                cu::linear_backward_mixed(bias ? dx.get() : nullptr, nullptr, false, dW.get(), bias ? db.get() : nullptr,
                                          d_dout.get(), nullptr, nullptr, d_xb.get(), d_W.get(), d_Wb.get(), c.rows,
                                          c.in, c.out, stream);
            });
            for (int i = 0; i < 3; i++)
                expect_bit_identical(what + " backward, x and W stored bf16, buffer " + std::to_string(i),
                                     stored_grads[i], grads[i]);
            if (bias) {  // dx written (the GEMM's beta 0), from a poisoned dx: the CPU's from zero
                std::vector<float> r_x0(x.size(), 0.f), r_W0 = g_W;
                ops::linear_backward<float>(r_x0.data(), r_W0.data(), nullptr, doutr.data(), xr.data(), Wr.data(),
                                            c.rows, c.in, c.out);
                auto fresh = run_twice(what + " backward, dx overwritten", {{&dx, {}}, {&dW, g_W}}, [&] {
                    cu::linear_backward_mixed(dx.get(), nullptr, true, dW.get(), nullptr, d_dout.get(), nullptr,
                                              d_x.get(), nullptr, d_W.get(), nullptr, c.rows, c.in, c.out, stream);
                });
                expect_close(what + " dx overwritten", fresh[0], r_x0, 1e-4);
                // the bf16 mode's MLP gradients: dout stored in bf16 (the bias
                // gradient sums those values), dx written in bf16
                auto d_dout16 = to_device(to_bf16(dout));
                DeviceArray<uint16_t> dx16(x.size());
                dx16.poison();
                auto stored = run_twice(what + " backward, bf16 dout and dx", {{&dW, g_W}, {&db, g_b}}, [&] {
                    cu::linear_backward_mixed(nullptr, dx16.get(), true, dW.get(), db.get(), nullptr, d_dout16.get(),
                                              nullptr, d_xb.get(), d_W.get(), d_Wb.get(), c.rows, c.in, c.out, stream);
                });
                std::vector<float> r_b16 = g_b;
                for (int64_t r = 0; r < c.rows; r++)
                    for (int o = 0; o < c.out; o++) r_b16[o] += doutr[r * c.out + o];
                expect_close(what + " dx stored bf16", widen(dx16.download()), r_x0, 1e-2);
                expect_bit_identical(what + " dW, bf16 dout", stored[0], fresh[1]);
                expect_close(what + " db from bf16 dout", stored[1], r_b16, 1e-4);
                expect_close(what + " dW beside overwritten dx", fresh[1], r_W0, 1e-4);
            }
        }
}

// The expert projections, fp32 and the bf16 mode's (mixed: x, W and dout
// enter the products as bf16). The mixed ops are checked against the CPU on
// the same bf16-rounded values, so only the order of the fp32 accumulation
// differs (1e-4); their bias gradient comes from the fp32 dout, as in fp32.
TEST_F(CudaOps, ExpertLinear) {
    if (const char* why = no_linear_ops()) GTEST_SKIP() << why;
    Rng rng(106);
    for (bool mixed : {false, true})
        for (const Shape& sh : kShapes)
            for (const auto& S : channel_sets(sh.C, rng)) {
                const int B = sh.B, C = sh.C, nS = (int)S.size(), N = sh.N, D = sh.D;
                const int64_t L = 1 + (int64_t)nS * N, stride = L * D;
                const std::string what = tag(sh, S) + (mixed ? " expert_linear mixed" : " expert_linear");
                const double tol = mixed ? 1e-4 : 1e-5;
                auto operand = [&](size_t n) { return mixed ? widen(to_bf16(randn_f(n, rng))) : randn_f(n, rng); };
                // x: the patch rows of a sequence buffer (its CLS rows are skipped)
                const auto x = operand(B * stride), W = operand((size_t)C * D * D);
                const auto bias = randn_f((size_t)C * D, rng);
                auto d_x = to_device(x), d_W = to_device(W), d_bias = to_device(bias);
                auto d_S = to_device(S);
                auto ref = poisoned<float>((size_t)B * nS * N * D);
                ops::expert_linear_forward(ref.data(), x.data() + D, stride, W.data(), bias.data(), S.data(), B, nS, N,
                                           D, D);
                DeviceArray<float> out(ref.size());
                // mixed: x and W as fp32, and as the model's bf16-stored sequence
                // matrix and bf16 copy of all C experts (same operand values: the
                // same bits)
                auto d_xb = to_device(to_bf16(x)), d_Wb = to_device(to_bf16(W));
                auto forward = [&](bool stored) {
                    if (!mixed)
                        cu::expert_linear_forward(out.get(), d_x.get() + D, stride, d_W.get(), d_bias.get(), d_S.get(),
                                                  B, nS, N, D, D, stream);
                    else if (!stored)
                        cu::expert_linear_forward_mixed(out.get(), nullptr, d_x.get() + D, nullptr, stride, d_W.get(),
                                                        nullptr, d_bias.get(), d_S.get(), B, nS, N, D, D, stream);
                    else
                        cu::expert_linear_forward_mixed(out.get(), nullptr, nullptr, d_xb.get() + D, stride,
                                                        d_W.get(), d_Wb.get(), d_bias.get(), d_S.get(), B, nS, N, D, D,
                                                        stream);
                };
                const auto fwd = run_twice(what + " forward", {{&out, {}}}, [&] { forward(false); });
                expect_close(what + " forward", fwd[0], ref, tol);
                if (mixed) {
                    expect_bit_identical(what + " forward, x and W stored bf16",
                                         run_twice(what + " forward, x and W stored bf16", {{&out, {}}},
                                                   [&] { forward(true); })[0],
                                         fwd[0]);
                    // The bf16 mode's stored k, v: the result in bf16 (from the
                    // bias rounded to bf16), poisoned before each run.
                    DeviceArray<uint16_t> out16(ref.size());
                    std::vector<uint16_t> runs[2];
                    for (int run = 0; run < 2; run++) {
                        out16.poison();
                        cu::expert_linear_forward_mixed(nullptr, out16.get(), run ? nullptr : d_x.get() + D,
                                                        run ? d_xb.get() + D : nullptr, stride, d_W.get(),
                                                        run ? d_Wb.get() : nullptr, d_bias.get(), d_S.get(), B, nS, N,
                                                        D, D, stream);
                        runs[run] = out16.download();
                    }
                    expect_bit_identical(what + " forward to bf16 (x, W, b fp32; their bf16 copies)", runs[0], runs[1]);
                    expect_close(what + " forward to bf16", widen(runs[0]), ref, 1e-2);
                }

                const auto dout = operand(ref.size());
                const auto g_x = randn_f(x.size(), rng), g_W = randn_f(W.size(), rng), g_b = randn_f(bias.size(), rng);
                auto r_x = g_x, r_W = g_W, r_b = g_b;
                ops::expert_linear_backward(r_x.data() + D, r_W.data(), r_b.data(), dout.data(), x.data() + D,
                                            stride, W.data(), S.data(), B, nS, N, D, D);
                auto d_dout = to_device(dout);
                DeviceArray<float> dx(x.size()), dW(W.size()), db(bias.size());
                auto backward = [&](bool stored) {
                    if (!mixed)
                        cu::expert_linear_backward(dx.get() + D, dW.get(), db.get(), d_dout.get(), d_x.get() + D, stride,
                                                   d_W.get(), d_S.get(), B, nS, N, D, D, stream);
                    else
                        cu::expert_linear_backward_mixed(dx.get() + D, dW.get(), db.get(), d_dout.get(),
                                                         stored ? nullptr : d_x.get() + D,
                                                         stored ? d_xb.get() + D : nullptr, stride, d_W.get(),
                                                         stored ? d_Wb.get() : nullptr, d_S.get(), B, nS, N, D, D,
                                                         stream);
                };
                const RunBuffers grads = {{&dx, g_x}, {&dW, g_W}, {&db, g_b}};
                auto got = run_twice(what + " backward", grads, [&] { backward(false); });
                expect_close(what + " dx", got[0], r_x, tol);
                expect_close(what + " dW", got[1], r_W, tol);
                expect_close(what + " dbias", got[2], r_b);
                if (mixed) {
                    const auto stored =
                        run_twice(what + " backward, x and W stored bf16", grads, [&] { backward(true); });
                    for (int i = 0; i < 3; i++)
                        expect_bit_identical(what + " backward, x and W stored bf16, buffer " + std::to_string(i),
                                             stored[i], got[i]);
                }
            }
}

TEST_F(CudaOps, GeluAndResidual) {
    Rng rng(107);
    for (int64_t n : {int64_t(7), int64_t(1000003)}) {
        const std::string what = "gelu n=" + std::to_string(n);
        const auto x = randn_f(n, rng, 2.0);
        auto d_x = to_device(x);
        auto ref = poisoned<float>(n);
        ops::gelu_forward(ref.data(), x.data(), n);
        DeviceArray<float> out(n);
        out.poison();
        cu::gelu_forward(out.get(), nullptr, d_x.get(), nullptr, n, stream);
        const auto out_full = out.download();
        expect_close(what + " forward", out_full, ref);
        DeviceArray<uint16_t> out_bf16(n);
        for (bool with_full : {true, false}) {
            out.poison();
            out_bf16.poison();
            cu::gelu_forward(with_full ? out.get() : nullptr, out_bf16.get(), d_x.get(), nullptr, n, stream);
            expect_rounding_of(what + (with_full ? " bf16 out (with fp32)" : " bf16 out (alone)"), out_bf16.download(),
                               out_full);
            if (with_full) expect_bit_identical(what + " forward beside bf16", out.download(), out_full);
        }
        const auto dout = randn_f(n, rng), g = randn_f(n, rng);
        auto r = g;
        ops::gelu_backward(r.data(), dout.data(), x.data(), n);
        auto d_dout = to_device(dout);
        DeviceArray<float> dx(n);
        auto got = run_twice(what + " backward", {{&dx, g}}, [&] {
            cu::gelu_backward(dx.get(), nullptr, false, d_dout.get(), nullptr, d_x.get(), nullptr, n, stream);
        });
        expect_close(what + " backward", got[0], r);
        std::vector<float> r0(n, 0.f);  // written, not added into: from a poisoned dx, the CPU's from zero
        ops::gelu_backward(r0.data(), dout.data(), x.data(), n);
        auto fresh = run_twice(what + " backward, dx overwritten", {{&dx, {}}}, [&] {
            cu::gelu_backward(dx.get(), nullptr, true, d_dout.get(), nullptr, d_x.get(), nullptr, n, stream);
        });
        expect_close(what + " backward, dx overwritten", fresh[0], r0);
        {  // dx written in bf16 (the bf16 mode's ∂fc1): the rounding of the fp32 one
            DeviceArray<uint16_t> dx16(n);
            dx16.poison();
            cu::gelu_backward(nullptr, dx16.get(), true, d_dout.get(), nullptr, d_x.get(), nullptr, n, stream);
            expect_rounding_of(what + " backward, dx stored bf16", dx16.download(), fresh[0]);
        }
        {  // x as the bf16 mode stores fc1: the same as its widened values in fp32, bit for bit
            const auto x16 = to_bf16(x);
            auto d_x16 = to_device(x16);
            auto d_xw = to_device(widen(x16));
            DeviceArray<float> a(n), b(n);
            a.poison();
            b.poison();
            cu::gelu_forward(a.get(), nullptr, nullptr, d_x16.get(), n, stream);
            cu::gelu_forward(b.get(), nullptr, d_xw.get(), nullptr, n, stream);
            expect_bit_identical(what + " forward, x stored bf16", a.download(), b.download());
            a.upload(g);
            b.upload(g);
            cu::gelu_backward(a.get(), nullptr, false, d_dout.get(), nullptr, nullptr, d_x16.get(), n, stream);
            cu::gelu_backward(b.get(), nullptr, false, d_dout.get(), nullptr, d_xw.get(), nullptr, n, stream);
            expect_bit_identical(what + " backward, x stored bf16", a.download(), b.download());
            // dout stored in bf16 (the bf16 mode's ∂act), against its widened values
            const auto dout16 = to_bf16(dout);
            auto d_dout16 = to_device(dout16);
            auto d_dout_w = to_device(widen(dout16));
            a.upload(g);
            b.upload(g);
            cu::gelu_backward(a.get(), nullptr, false, nullptr, d_dout16.get(), nullptr, d_x16.get(), n, stream);
            cu::gelu_backward(b.get(), nullptr, false, d_dout_w.get(), nullptr, d_xw.get(), nullptr, n, stream);
            expect_bit_identical(what + " backward, dout stored bf16", a.download(), b.download());
        }
    }
    const int B = 3;
    const int64_t per = 1001;
    const std::vector<float> scale = {0.f, 1.25f, 1.f};  // dropped, kept (1/keep_prob), no drop path
    auto d_scale = to_device(scale);
    for (bool drop : {true, false}) {
        const std::string what = drop ? "residual (drop path)" : "residual";
        const auto x = randn_f(B * per, rng), branch = randn_f(B * per, rng);
        auto ref = poisoned<float>(x.size());
        ops::residual_forward<float>(ref.data(), x.data(), branch.data(), drop ? scale.data() : nullptr, B, per);
        DeviceArray<float> d_out(x.size());
        auto d_x = to_device(x), d_branch = to_device(branch);
        auto got = run_twice(what + " forward", {{&d_out, {}}}, [&] {
            cu::residual_forward(d_out.get(), d_x.get(), d_branch.get(), drop ? d_scale.get() : nullptr, B, per,
                                 stream);
        });
        expect_close(what + " forward", got[0], ref);
        // in place, as the CPU reference allows
        auto in_place = run_twice(what + " forward in place", {{&d_x, x}}, [&] {
            cu::residual_forward(d_x.get(), d_x.get(), d_branch.get(), drop ? d_scale.get() : nullptr, B, per,
                                 stream);
        });
        expect_close(what + " forward in place", in_place[0], ref);
        const auto dx = randn_f(B * per, rng), g = randn_f(B * per, rng);
        auto r = g;
        ops::residual_backward<float>(r.data(), dx.data(), drop ? scale.data() : nullptr, B, per);
        auto d_dx = to_device(dx);
        DeviceArray<float> dbranch(g.size());
        auto gotb = run_twice(what + " backward", {{&dbranch, g}}, [&] {
            cu::residual_backward(dbranch.get(), d_dx.get(), drop ? d_scale.get() : nullptr, B, per, stream);
        });
        expect_close(what + " backward", gotb[0], r);
    }
}

// The residual add before LN2 fused with it: the sum, LN's output and its
// statistics against the CPU's residual_forward then layernorm_forward, with
// and without drop path, at every shape (a large mean, as above).
TEST_F(CudaOps, ResidualLayerNorm) {
    Rng rng(109);
    for (const Shape& sh : kShapes) {
        const int B = sh.B, D = sh.D;
        const int64_t L = 1 + sh.C * sh.N, rows = (int64_t)B * L;
        std::vector<float> scale(B);
        for (int i = 0; i < B; i++) scale[i] = i % 3 == 0 ? 0.f : i % 3 == 1 ? 1.25f : 1.f;
        const auto x = randn_f(rows * D, rng, 1.0, 3.0), branch = randn_f(rows * D, rng), w = randn_f(D, rng),
                   b = randn_f(D, rng);
        auto d_x = to_device(x), d_branch = to_device(branch), d_w = to_device(w), d_b = to_device(b),
             d_scale = to_device(scale);
        for (bool drop : {true, false}) {
            const std::string what = std::string(sh.name) + (drop ? " residual+layernorm (drop path)" : " residual+layernorm");
            auto r_sum = poisoned<float>(x.size()), r_out = poisoned<float>(x.size()), r_mean = poisoned<float>(rows),
                 r_rstd = poisoned<float>(rows);
            ops::residual_forward<float>(r_sum.data(), x.data(), branch.data(), drop ? scale.data() : nullptr, B, L * D);
            ops::layernorm_forward(r_out.data(), r_mean.data(), r_rstd.data(), r_sum.data(), w.data(), b.data(), rows, D);
            DeviceArray<float> sum(x.size()), out(x.size()), mean(rows), rstd(rows);
            auto got = run_twice(what, {{&sum, {}}, {&out, {}}, {&mean, {}}, {&rstd, {}}}, [&] {
                cu::residual_layernorm_forward(sum.get(), out.get(), nullptr, mean.get(), rstd.get(), d_x.get(),
                                               d_branch.get(), drop ? d_scale.get() : nullptr, d_w.get(), d_b.get(), B,
                                               L, D, stream);
            });
            expect_close(what + " sum", got[0], r_sum);
            expect_close(what + " out", got[1], r_out);
            expect_close(what + " mean", got[2], r_mean);
            expect_close(what + " rstd", got[3], r_rstd);
            // The bf16 mode's LN2: bf16 output alone, the rounding of the fp32 one.
            DeviceArray<uint16_t> out_bf16(x.size());
            out_bf16.poison();
            sum.poison();
            cu::residual_layernorm_forward(sum.get(), nullptr, out_bf16.get(), mean.get(), rstd.get(), d_x.get(),
                                           d_branch.get(), drop ? d_scale.get() : nullptr, d_w.get(), d_b.get(), B, L,
                                           D, stream);
            expect_rounding_of(what + " bf16 out (alone)", out_bf16.download(), got[1]);
            expect_bit_identical(what + " sum beside bf16 out", sum.download(), got[0]);
        }
    }
}

// Dense attention at each shape's chvit and vit sequence, and at head dim 128.
// lse is compared with the CPU's; backward reads the CPU's out and lse.
TEST_F(CudaOps, DenseAttention) {
    Rng rng(108);
    struct Case {
        std::string name;
        int B, L, D, Hd;
    };
    std::vector<Case> cases;
    for (const Shape& sh : kShapes)
        for (bool channelwise : {true, false}) {  // chvit: 1 + C·N tokens; vit: 1 + N
            const int L = 1 + (channelwise ? sh.C : 1) * sh.N;
            cases.push_back({std::string(sh.name) + " attention L=" + std::to_string(L),
                             std::string(sh.name) == "jumpcp" ? 1 : sh.B, L, sh.D, sh.Hd});
        }
    cases.push_back({"head dim 128 attention L=45", 2, 45, 256, 2});
    // The shipped configs' head dim, in fp32 (train.precision=fp32, and the
    // bf16 mode where an operand is not aligned for the flash kernels).
    cases.push_back({"head dim 64 attention L=37", 2, 37, 128, 2});
    for (const Case& c : cases) {
        const int B = c.B, L = c.L, D = c.D, Hd = c.Hd;
        const std::string& what = c.name;
        const auto qkv = randn_f((size_t)B * L * 3 * D, rng);
        auto d_qkv = to_device(qkv);
        auto ref = poisoned<float>((size_t)B * L * D), ref_lse = poisoned<float>((size_t)B * Hd * L);
        ops::attention_forward(ref.data(), ref_lse.data(), qkv.data(), B, L, D, Hd);
        DeviceArray<float> out(ref.size()), lse(ref_lse.size());
        const auto fwd = run_twice(what + " forward", {{&out, {}}, {&lse, {}}}, [&] {
            cu::attention_forward(out.get(), lse.get(), d_qkv.get(), B, L, D, Hd, stream);
        });
        expect_close(what + " out", fwd[0], ref);
        expect_close(what + " lse", fwd[1], ref_lse);

        const auto dout = randn_f(ref.size(), rng), g = randn_f(qkv.size(), rng);
        auto r = g;
        ops::attention_backward(r.data(), dout.data(), qkv.data(), ref.data(), ref_lse.data(), B, L, D, Hd);
        auto d_dout = to_device(dout), d_out = to_device(ref), d_lse = to_device(ref_lse);
        DeviceArray<float> dqkv(qkv.size());
        auto got = run_twice(what + " backward", {{&dqkv, g}}, [&] {
            cu::attention_backward(dqkv.get(), d_dout.get(), d_qkv.get(), d_out.get(), d_lse.get(), B, L, D, Hd,
                                   stream);
        });
        expect_close(what + " dqkv", got[0], r);
    }
}

TEST_F(CudaOps, Router) {
    Rng rng(109);
    for (const Shape& sh : kShapes)
        for (const auto& S : channel_sets(sh.C, rng))
            for (int k : top_k_values((int)S.size()))
                for (auto combine : {ops::Combine::softmax, ops::Combine::renorm}) {
                    const int B = sh.B, C = sh.C, nS = (int)S.size(), N = sh.N;
                    const int64_t L = 1 + (int64_t)nS * N, T = (int64_t)B * nS * N;
                    const std::string what = tag(sh, S) + " k=" + std::to_string(k) +
                                             (combine == ops::Combine::renorm ? " renorm" : " softmax");
                    const auto z = grid_logits(B * L * C, rng);  // router logits as patch rows
                    const auto in_S = mask_of(S, C);
                    auto d_z = to_device(z);
                    auto d_in_S = to_device(in_S);
                    auto d_S = to_device(S);
                    auto r_probs = poisoned<float>(T * C), r_w = poisoned<float>(T * k), r_lse = poisoned<float>(T);
                    auto r_e = poisoned<int>(T * k);
                    ops::router_forward(r_probs.data(), r_e.data(), r_w.data(), r_lse.data(), z.data() + C, L * C,
                                        in_S.data(), S.data(), B, nS, N, C, k, combine);
                    DeviceArray<float> probs(r_probs.size()), w(r_w.size()), lse(r_lse.size());
                    DeviceArray<int> e(r_e.size());
                    probs.poison();
                    w.poison();
                    lse.poison();
                    e.poison();
                    cu::router_forward(probs.get(), e.get(), w.get(), lse.get(), d_z.get() + C, L * C,
                                       d_in_S.get(), d_S.get(), B, nS, N, C, k, combine, stream);
                    expect_close(what + " probs", probs.download(), r_probs);
                    EXPECT_EQ(e.download(), r_e) << what << ": experts differ";
                    expect_close(what + " weights", w.download(), r_w);
                    expect_close(what + " lse", lse.download(), r_lse);

                    // backward from the reference's forward, with and without loss gradients
                    auto d_probs = to_device(r_probs), d_w = to_device(r_w);
                    auto d_e = to_device(r_e);
                    for (bool with_dprobs : {true, false}) {
                        const auto dweights = randn_f(T * k, rng), dprobs = randn_f(T * C, rng),
                                   g = randn_f(z.size(), rng);
                        auto r = g;
                        ops::router_backward<float>(r.data() + C, L * C, r_probs.data(), r_e.data(), r_w.data(),
                                                    dweights.data(), with_dprobs ? dprobs.data() : nullptr,
                                                    S.data(), B, nS, N, C, k, combine);
                        auto d_dw = to_device(dweights), d_dp = to_device(dprobs);
                        DeviceArray<float> dz(z.size());
                        auto got = run_twice(what + " backward", {{&dz, g}}, [&] {
                            cu::router_backward(dz.get() + C, L * C, d_probs.get(), d_e.get(), d_w.get(),
                                                d_dw.get(), with_dprobs ? d_dp.get() : nullptr, d_S.get(), B,
                                                nS, N, C, k, combine, stream);
                        });
                        expect_close(what + (with_dprobs ? " dz (with dprobs)" : " dz"), got[0], r);
                    }
                }
}

TEST_F(CudaOps, RouterTiesGoToLowerChannel) {
    const int B = 1, C = 5, N = 3, k = 3;
    const std::vector<int> S = {0, 1, 3, 4};
    const int nS = 4;
    const int64_t T = (int64_t)nS * N;
    const std::vector<float> z(T * C, 0.5f);  // every channel ties
    const auto in_S = mask_of(S, C);
    auto d_z = to_device(z);
    auto d_in_S = to_device(in_S);
    auto d_S = to_device(S);
    DeviceArray<float> probs(T * C), w(T * k), lse(T);
    DeviceArray<int> e(T * k);
    e.poison();
    cu::router_forward(probs.get(), e.get(), w.get(), lse.get(), d_z.get(), C, d_in_S.get(), d_S.get(),
                       B, nS, N, C, k, ops::Combine::softmax, stream);
    const auto experts = e.download();
    for (int64_t t = 0; t < T; t++)
        EXPECT_EQ(std::vector<int>(experts.begin() + t * k, experts.begin() + (t + 1) * k),
                  (std::vector<int>{0, 1, 2}))
            << "token " << t;
}

TEST_F(CudaOps, AuxAndZLoss) {
    Rng rng(110);
    for (const Shape& sh : kShapes)
        for (const auto& S : channel_sets(sh.C, rng))
            for (auto kind : {ops::AuxLoss::switch_, ops::AuxLoss::importance, ops::AuxLoss::none}) {
                const int B = sh.B, C = sh.C, nS = (int)S.size(), N = sh.N, k = std::min(2, nS);
                const int64_t L = 1 + (int64_t)nS * N, T = (int64_t)B * nS * N;
                const char* kind_name = kind == ops::AuxLoss::switch_ ? " switch" : kind == ops::AuxLoss::importance ? " importance" : " none";
                const std::string what = tag(sh, S) + kind_name;
                const auto z = randn_f(B * L * C, rng, 2.0);
                const auto in_S = mask_of(S, C);
                std::vector<float> probs(T * C), w(T * k), lse(T);
                std::vector<int> experts(T * k);
                ops::router_forward(probs.data(), experts.data(), w.data(), lse.data(), z.data() + C, L * C,
                                    in_S.data(), S.data(), B, nS, N, C, k, ops::Combine::softmax);
                const Dispatch dsp = cpu_dispatch(experts, B, nS, N, k);
                auto d_probs = to_device(probs), d_lse = to_device(lse);
                auto d_counts = to_device(dsp.counts), d_S = to_device(S);

                const auto g = randn_f(T * C, rng);
                auto r = g;
                const float ref_loss = ops::aux_loss_forward_backward<float>(
                    r.data(), probs.data(), dsp.counts.data(), S.data(), T, nS, C, k, kind, 0.3f, 0.7f);
                DeviceArray<float> loss(1), dprobs(g.size());
                loss.poison();
                auto got = run_twice(what + " aux loss", {{&dprobs, g}}, [&] {
                    cu::aux_loss_forward_backward(loss.get(), dprobs.get(), d_probs.get(), d_counts.get(), d_S.get(),
                                                  T, nS, C, k, kind, 0.3f, 0.7f, nullptr, stream);
                });
                expect_close_scalar(what + " aux loss", loss.download()[0], ref_loss);
                expect_close(what + " aux dprobs", got[0], r);

                if (kind != ops::AuxLoss::switch_) continue;  // the z-loss once per shape and subset
                for (float coef : {0.2f, 0.f}) {
                    const auto gz = randn_f(z.size(), rng);
                    auto rz = gz;
                    const float ref_z = ops::z_loss_forward_backward<float>(rz.data() + C, L * C, probs.data(),
                                                                           lse.data(), B, nS, N, C, coef, 0.7f);
                    DeviceArray<float> zl(1), dz(gz.size());
                    zl.poison();
                    auto gotz = run_twice(what + " z-loss", {{&dz, gz}}, [&] {
                        cu::z_loss_forward_backward(zl.get(), dz.get() + C, L * C, d_probs.get(), d_lse.get(), B, nS,
                                                    N, C, coef, 0.7f, stream);
                    });
                    expect_close_scalar(what + " z-loss coef=" + std::to_string(coef), zl.download()[0], ref_z);
                    expect_close(what + " z-loss dz coef=" + std::to_string(coef), gotz[0], rz);
                }
            }
}

// The data-parallel load balance: aux_stats against the CPU's (the mass in
// double to within double rounding, counts and tokens exact, two runs the
// same bits), and the loss from statistics summed over "ranks" (this batch's
// and another's, as the all-reduce would give them) against the CPU op.
TEST_F(CudaOps, AuxStatsAndTheLossOfAllRanks) {
    Rng rng(112);
    for (const Shape& sh : kShapes)
        for (const auto& S : channel_sets(sh.C, rng)) {
            const int B = sh.B, C = sh.C, nS = (int)S.size(), N = sh.N, k = std::min(2, nS);
            const int64_t L = 1 + (int64_t)nS * N, T = (int64_t)B * nS * N;
            const std::string what = tag(sh, S);
            const auto in_S = mask_of(S, C);
            // This rank's batch and another rank's (a different batch, same S).
            std::vector<float> probs[2];
            Dispatch dsp[2];
            for (int r = 0; r < 2; r++) {
                const auto z = randn_f(B * L * C, rng, 2.0);
                std::vector<float> w(T * k), lse(T);
                std::vector<int> experts(T * k);
                probs[r].resize(T * C);
                ops::router_forward(probs[r].data(), experts.data(), w.data(), lse.data(), z.data() + C, L * C,
                                    in_S.data(), S.data(), B, nS, N, C, k, ops::Combine::softmax);
                dsp[r] = cpu_dispatch(experts, B, nS, N, k);
            }
            auto d_probs = to_device(probs[0]);
            auto d_counts = to_device(dsp[0].counts), d_S = to_device(S);

            std::vector<double> ref(2 * nS + 1), other(2 * nS + 1);
            ops::aux_stats(ref.data(), probs[0].data(), dsp[0].counts.data(), S.data(), T, nS, C);
            ops::aux_stats(other.data(), probs[1].data(), dsp[1].counts.data(), S.data(), T, nS, C);
            DeviceArray<double> stats(ref.size());
            std::vector<double> runs[2];
            for (int run = 0; run < 2; run++) {
                stats.poison();
                cu::aux_stats(stats.get(), d_probs.get(), d_counts.get(), d_S.get(), T, nS, C, stream);
                runs[run] = stats.download();
            }
            expect_bit_identical(what + " aux_stats", runs[0], runs[1]);
            double worst = 0;
            for (int s = 0; s < nS; s++) {
                ASSERT_TRUE(std::isfinite(runs[0][s])) << what << " mass " << s;
                worst = std::max(worst, std::fabs(runs[0][s] - ref[s]) / std::fabs(ref[s]));
                EXPECT_EQ(runs[0][nS + s], ref[nS + s]) << what << " count " << s;
            }
            EXPECT_EQ(runs[0][2 * nS], ref[2 * nS]) << what << " tokens";
            std::printf("[ cuda-vs-cpu ] %-48s rel %.3g (bit-identical mass: %s)\n", (what + " aux_stats mass").c_str(),
                        worst, std::memcmp(runs[0].data(), ref.data(), sizeof(double) * nS) == 0 ? "yes" : "no");
            EXPECT_LE(worst, 1e-12) << what;

            // The loss of both "ranks" together, from the summed statistics.
            std::vector<double> sum(ref.size());
            for (size_t i = 0; i < sum.size(); i++) sum[i] = ref[i] + other[i];
            auto d_sum = to_device(sum);
            for (auto kind : {ops::AuxLoss::switch_, ops::AuxLoss::importance}) {
                const std::string w = what + (kind == ops::AuxLoss::switch_ ? " switch" : " importance") + " all ranks";
                const auto g = randn_f(T * C, rng);
                auto r = g;
                const float ref_loss = ops::aux_loss_forward_backward<float>(
                    r.data(), probs[0].data(), dsp[0].counts.data(), S.data(), T, nS, C, k, kind, 0.3f, 0.7f,
                    sum.data());
                DeviceArray<float> loss(1), dprobs(g.size());
                loss.poison();
                auto got = run_twice(w, {{&dprobs, g}}, [&] {
                    cu::aux_loss_forward_backward(loss.get(), dprobs.get(), d_probs.get(), d_counts.get(), d_S.get(),
                                                  T, nS, C, k, kind, 0.3f, 0.7f, d_sum.get(), stream);
                });
                expect_close_scalar(w + " loss", loss.download()[0], ref_loss);
                expect_close(w + " dprobs", got[0], r);
            }
        }
}

TEST_F(CudaOps, DispatchIsTheCpuCountingSort) {
    Rng rng(111);
    for (const Shape& sh : kShapes)
        for (const auto& S : channel_sets(sh.C, rng))
            for (int k : top_k_values((int)S.size())) {
                const int B = sh.B, nS = (int)S.size(), N = sh.N;
                const int64_t T = (int64_t)B * nS * N;
                // all positions; only the first k+1 (empty groups); the same k for every token
                for (int allowed : {nS, std::min(nS, k + 1), k}) {
                    const std::string what = tag(sh, S) + " k=" + std::to_string(k) + " from " +
                                             std::to_string(allowed) + " positions";
                    const auto experts = random_experts(T, k, allowed, rng);
                    const Dispatch ref = cpu_dispatch(experts, B, nS, N, k);
                    auto d_e = to_device(experts);
                    DeviceArray<int> offsets(ref.offsets.size()), por(ref.por.size()), rop(ref.rop.size()),
                        counts(ref.counts.size());
                    std::vector<int> runs[2];
                    for (int run = 0; run < 2; run++) {
                        offsets.poison();
                        por.poison();
                        rop.poison();
                        counts.poison();
                        cu::moe_dispatch(offsets.get(), por.get(), rop.get(), counts.get(), d_e.get(), B, nS, N, k, stream);
                        runs[run] = por.download();
                    }
                    EXPECT_EQ(offsets.download(), ref.offsets) << what;
                    EXPECT_EQ(runs[0], ref.por) << what << ": pair_of_row";
                    EXPECT_EQ(runs[1], ref.por) << what << ": pair_of_row, second run";
                    EXPECT_EQ(rop.download(), ref.rop) << what << ": row_of_pair";
                    EXPECT_EQ(counts.download(), ref.counts) << what << ": counts";
                }
            }
}

TEST_F(CudaOps, GatherAndCombine) {
    Rng rng(112);
    for (const Shape& sh : kShapes)
        for (const auto& S : channel_sets(sh.C, rng))
            for (int k : top_k_values((int)S.size())) {
                const int B = sh.B, nS = (int)S.size(), N = sh.N, D = sh.D;
                const int64_t L = 1 + (int64_t)nS * N, T = (int64_t)B * nS * N, stride = L * D;
                const std::string what = tag(sh, S) + " k=" + std::to_string(k);
                const Dispatch dsp = cpu_dispatch(random_experts(T, k, std::min(nS, k + 1), rng), B, nS, N, k);
                auto d_por = to_device(dsp.por), d_rop = to_device(dsp.rop);

                // gather: q as patch rows of a sequence buffer
                const auto q = randn_f(B * stride, rng);
                auto d_q = to_device(q);
                auto ref_qg = poisoned<float>(T * k * D);
                ops::moe_gather_forward(ref_qg.data(), q.data() + D, stride, dsp.por.data(), B, nS, N, k, D);
                DeviceArray<float> qg(ref_qg.size());
                qg.poison();
                cu::moe_gather_forward(qg.get(), nullptr, d_q.get() + D, nullptr, stride, d_por.get(), B, nS, N, k, D,
                                       stream);
                expect_close(what + " gather", qg.download(), ref_qg);
                {  // the bf16 mode's stored q and qg: the same copy, in bf16
                    auto d_q16 = to_device(to_bf16(q));
                    DeviceArray<uint16_t> qg16(ref_qg.size());
                    qg16.poison();
                    cu::moe_gather_forward(nullptr, qg16.get(), nullptr, d_q16.get() + D, stride, d_por.get(), B, nS,
                                           N, k, D, stream);
                    expect_bit_identical(what + " gather bf16", qg16.download(), to_bf16(ref_qg));
                }
                const auto dqg = randn_f(ref_qg.size(), rng), g_q = randn_f(q.size(), rng);
                auto r_q = g_q;
                ops::moe_gather_backward(r_q.data() + D, stride, dqg.data(), dsp.rop.data(), B, nS, N, k, D);
                auto d_dqg = to_device(dqg);
                DeviceArray<float> dq(q.size());
                auto got = run_twice(what + " gather backward", {{&dq, g_q}}, [&] {
                    cu::moe_gather_backward(dq.get() + D, stride, d_dqg.get(), d_rop.get(), B, nS, N, k, D, stream);
                });
                expect_close(what + " gather backward", got[0], r_q);

                // combine into patch rows; the CLS rows stay untouched
                const auto og = randn_f(T * k * D, rng), w = randn_f(T * k, rng);
                auto d_og = to_device(og), d_w = to_device(w);
                auto ref_a = poisoned<float>(B * stride);
                ops::combine_forward(ref_a.data() + D, stride, og.data(), w.data(), dsp.rop.data(), B, nS, N, k, D);
                DeviceArray<float> a(ref_a.size());
                a.poison();
                cu::combine_forward(a.get() + D, nullptr, stride, d_og.get(), nullptr, d_w.get(), d_rop.get(), B, nS,
                                    N, k, D, stream);
                expect_close(what + " combine", a.download(), ref_a);
                // The bf16 mode's: og and the output in bf16, against the CPU on the widened og.
                const auto og16 = to_bf16(og);
                auto d_og16 = to_device(og16);
                auto ref_a16 = poisoned<float>(B * stride);
                ops::combine_forward(ref_a16.data() + D, stride, widen(og16).data(), w.data(), dsp.rop.data(), B, nS,
                                     N, k, D);
                DeviceArray<uint16_t> a16(ref_a.size());
                a16.poison();
                cu::combine_forward(nullptr, a16.get() + D, stride, nullptr, d_og16.get(), d_w.get(), d_rop.get(), B,
                                    nS, N, k, D, stream);
                expect_close(what + " combine bf16", widen_keeping_poison(a16.download()), ref_a16, 1e-2);
                const auto da = randn_f(B * stride, rng), g_og = randn_f(og.size(), rng), g_w = randn_f(w.size(), rng);
                auto r_og = g_og, r_w = g_w;
                ops::combine_backward(r_og.data(), r_w.data(), da.data() + D, stride, og.data(), w.data(),
                                      dsp.rop.data(), B, nS, N, k, D);
                auto d_da = to_device(da);
                DeviceArray<float> dog(og.size()), dw(w.size());
                auto gotc = run_twice(what + " combine backward", {{&dog, g_og}, {&dw, g_w}}, [&] {
                    cu::combine_backward(dog.get(), nullptr, false, dw.get(), d_da.get() + D, stride, d_og.get(),
                                         nullptr, d_w.get(), d_rop.get(), B, nS, N, k, D, stream);
                });
                expect_close(what + " combine dog", gotc[0], r_og);
                expect_close(what + " combine dweights", gotc[1], r_w);
                // dog written (overwrite): from poison, as the CPU from zero
                std::vector<float> z_og(og.size(), 0.f), z_w = g_w;
                ops::combine_backward(z_og.data(), z_w.data(), da.data() + D, stride, og.data(), w.data(),
                                      dsp.rop.data(), B, nS, N, k, D);
                auto dog_written = run_twice(what + " combine backward, dog written", {{&dog, {}}, {&dw, g_w}}, [&] {
                    cu::combine_backward(dog.get(), nullptr, true, dw.get(), d_da.get() + D, stride, d_og.get(),
                                         nullptr, d_w.get(), d_rop.get(), B, nS, N, k, D, stream);
                });
                expect_close(what + " combine dog written", dog_written[0], z_og);
                // the bf16 mode's: og in bf16, dog written in bf16
                std::vector<float> z16_og(og.size(), 0.f), z16_w = g_w;
                ops::combine_backward(z16_og.data(), z16_w.data(), da.data() + D, stride, widen(og16).data(), w.data(),
                                      dsp.rop.data(), B, nS, N, k, D);
                DeviceArray<uint16_t> dog16(og.size());
                dog16.poison();
                dw.upload(g_w);
                cu::combine_backward(nullptr, dog16.get(), true, dw.get(), d_da.get() + D, stride, nullptr,
                                     d_og16.get(), d_w.get(), d_rop.get(), B, nS, N, k, D, stream);
                expect_rounding_of(what + " combine dog bf16", dog16.download(), z16_og);
                expect_close(what + " combine dweights, og bf16", dw.download(), z16_w);
            }
}

// Routed attention over a real dispatch at every shape, |S| and k, with and
// without empty groups, and at head dim 128. Backward reads the CPU's og and lse.
TEST_F(CudaOps, RoutedAttention) {
    Rng rng(113);
    auto check = [&](const std::string& what, int B, int nS, int N, int D, int Hd, int k, int allowed) {
        const int64_t T = (int64_t)B * nS * N, rows = T * k;
        const Dispatch dsp = cpu_dispatch(random_experts(T, k, allowed, rng), B, nS, N, k);
        const auto qg = randn_f(rows * D, rng), kk = randn_f(T * D, rng), vv = randn_f(T * D, rng);
        auto d_qg = to_device(qg), d_k = to_device(kk), d_v = to_device(vv);
        auto d_off = to_device(dsp.offsets);
        auto ref = poisoned<float>(rows * D), ref_lse = poisoned<float>(rows * Hd);
        ops::routed_attention_forward(ref.data(), ref_lse.data(), qg.data(), kk.data(), vv.data(),
                                      dsp.offsets.data(), B, nS, N, D, Hd);
        DeviceArray<float> og(ref.size()), lse(ref_lse.size());
        const auto fwd = run_twice(what + " routed forward", {{&og, {}}, {&lse, {}}}, [&] {
            cu::routed_attention_forward(og.get(), lse.get(), d_qg.get(), d_k.get(), d_v.get(), d_off.get(), B, nS,
                                         N, D, Hd, stream);
        });
        expect_close(what + " routed og", fwd[0], ref);
        expect_close(what + " routed lse", fwd[1], ref_lse);

        const auto dog = randn_f(ref.size(), rng), g_q = randn_f(qg.size(), rng), g_k = randn_f(kk.size(), rng),
                   g_v = randn_f(vv.size(), rng);
        auto r_q = g_q, r_k = g_k, r_v = g_v;
        ops::routed_attention_backward(r_q.data(), r_k.data(), r_v.data(), dog.data(), qg.data(), kk.data(),
                                       vv.data(), ref.data(), ref_lse.data(), dsp.offsets.data(), B, nS, N, D, Hd);
        auto d_dog = to_device(dog), d_og = to_device(ref), d_lse = to_device(ref_lse);
        DeviceArray<float> dqg(qg.size()), dk(kk.size()), dv(vv.size());
        auto got = run_twice(what + " routed backward", {{&dqg, g_q}, {&dk, g_k}, {&dv, g_v}}, [&] {
            cu::routed_attention_backward(dqg.get(), dk.get(), dv.get(), d_dog.get(), d_qg.get(), d_k.get(),
                                          d_v.get(), d_og.get(), d_lse.get(), d_off.get(), B, nS, N, k, D, Hd,
                                          stream);
        });
        expect_close(what + " routed dqg", got[0], r_q);
        expect_close(what + " routed dk", got[1], r_k);
        expect_close(what + " routed dv", got[2], r_v);
    };
    for (const Shape& sh : kShapes)
        for (const auto& S : channel_sets(sh.C, rng))
            for (int k : top_k_values((int)S.size()))
                for (bool empty_groups : {true, false}) {
                    const int nS = (int)S.size();
                    const int allowed = empty_groups ? std::min(nS, k + 1) : nS;
                    if (!empty_groups && allowed == std::min(nS, k + 1)) continue;  // same case twice
                    check(tag(sh, S) + " k=" + std::to_string(k) + (allowed < nS ? " (empty groups)" : ""), sh.B,
                          nS, sh.N, sh.D, sh.Hd, k, allowed);
                }
    check("head dim 128 N=20 k=2 (empty groups)", 2, 4, 20, 256, 2, 2, 3);
}

TEST_F(CudaOps, ClsAttention) {
    Rng rng(114);
    for (const Shape& sh : kShapes)
        for (const auto& S : channel_sets(sh.C, rng)) {
            const int B = sh.B, nS = (int)S.size(), N = sh.N, D = sh.D, Hd = sh.Hd, M = nS * N;
            const int64_t L = 1 + (int64_t)M, stride = L * D;
            const std::string what = tag(sh, S) + " cls attention";
            const auto q = randn_f(B * stride, rng), kk = randn_f((size_t)B * M * D, rng),
                       vv = randn_f((size_t)B * M * D, rng);
            auto d_q = to_device(q), d_k = to_device(kk), d_v = to_device(vv);
            // the result goes to row 0 of each image; the patch rows stay untouched
            auto ref = poisoned<float>(B * stride), ref_p = poisoned<float>((size_t)B * Hd * M);
            ops::cls_attention_forward(ref.data(), stride, ref_p.data(), q.data(), stride, kk.data(), vv.data(),
                                       B, M, D, Hd);
            DeviceArray<float> out(ref.size()), probs(ref_p.size());
            out.poison();
            probs.poison();
            cu::cls_attention_forward(out.get(), stride, probs.get(), d_q.get(), stride, d_k.get(), d_v.get(), B,
                                      M, D, Hd, stream);
            expect_close(what + " out", out.download(), ref);
            expect_close(what + " probs", probs.download(), ref_p);

            const auto dout = randn_f(B * stride, rng), g_q = randn_f(q.size(), rng),
                       g_k = randn_f(kk.size(), rng), g_v = randn_f(vv.size(), rng);
            auto r_q = g_q, r_k = g_k, r_v = g_v;
            ops::cls_attention_backward(r_q.data(), stride, r_k.data(), r_v.data(), dout.data(), stride, q.data(),
                                        stride, kk.data(), vv.data(), ref_p.data(), B, M, D, Hd);
            auto d_dout = to_device(dout), d_p = to_device(ref_p);
            DeviceArray<float> dq(q.size()), dk(kk.size()), dv(vv.size());
            auto got = run_twice(what + " backward", {{&dq, g_q}, {&dk, g_k}, {&dv, g_v}}, [&] {
                cu::cls_attention_backward(dq.get(), stride, dk.get(), dv.get(), d_dout.get(), stride, d_q.get(),
                                           stride, d_k.get(), d_v.get(), d_p.get(), B, M, D, Hd, stream);
            });
            expect_close(what + " dq", got[0], r_q);
            expect_close(what + " dk", got[1], r_k);
            expect_close(what + " dv", got[2], r_v);

            // The bf16 mode's: q, k, v and out stored in bf16, against the CPU on
            // the widened values (out within its rounding, the rest fp32's 1e-5).
            const auto q16 = to_bf16(q), k16 = to_bf16(kk), v16 = to_bf16(vv);
            const auto qw = widen(q16), kw = widen(k16), vw = widen(v16);
            auto d_q16 = to_device(q16), d_k16 = to_device(k16), d_v16 = to_device(v16);
            auto ref16 = poisoned<float>(B * stride), ref16_p = poisoned<float>((size_t)B * Hd * M);
            ops::cls_attention_forward(ref16.data(), stride, ref16_p.data(), qw.data(), stride, kw.data(), vw.data(),
                                       B, M, D, Hd);
            DeviceArray<uint16_t> out16(ref.size());
            out16.poison();
            probs.poison();
            cu::cls_attention_forward_bf16(out16.get(), stride, probs.get(), d_q16.get(), stride, d_k16.get(),
                                           d_v16.get(), B, M, D, Hd, stream);
            expect_close(what + " out, bf16", widen_keeping_poison(out16.download()), ref16, 1e-2);
            expect_close(what + " probs, bf16 inputs", probs.download(), ref16_p);
            auto r16_q = g_q, r16_k = g_k, r16_v = g_v;
            ops::cls_attention_backward(r16_q.data(), stride, r16_k.data(), r16_v.data(), dout.data(), stride,
                                        qw.data(), stride, kw.data(), vw.data(), ref16_p.data(), B, M, D, Hd);
            auto d_p16 = to_device(ref16_p);
            auto got16 = run_twice(what + " backward, bf16 inputs", {{&dq, g_q}, {&dk, g_k}, {&dv, g_v}}, [&] {
                cu::cls_attention_backward_bf16(dq.get(), stride, dk.get(), dv.get(), d_dout.get(), stride,
                                                d_q16.get(), stride, d_k16.get(), d_v16.get(), d_p16.get(), B, M, D,
                                                Hd, stream);
            });
            expect_close(what + " dq, bf16 inputs", got16[0], r16_q);
            expect_close(what + " dk, bf16 inputs", got16[1], r16_k);
            expect_close(what + " dv, bf16 inputs", got16[2], r16_v);
        }
}

TEST_F(CudaOps, CrossEntropy) {
    Rng rng(115);
    for (int B : {1, 37})
        for (int K : {17, 1000}) {
            const std::string what = "cross entropy B=" + std::to_string(B) + " K=" + std::to_string(K);
            auto logits = grid_logits((size_t)B * K, rng);
            std::fill(logits.begin(), logits.begin() + K, 0.25f);  // row 0: every class ties
            std::vector<int32_t> labels(B);
            for (auto& l : labels) l = (int32_t)rng.below(K);
            auto d_logits = to_device(logits);
            auto d_labels = to_device(labels);
            auto ref_p = poisoned<float>((size_t)B * K);
            int ref_correct = -1;
            const float ref_loss = ops::cross_entropy_forward(ref_p.data(), logits.data(), labels.data(), B, K, &ref_correct);
            DeviceArray<float> probs(ref_p.size()), loss(1);
            DeviceArray<int> correct(1);
            probs.poison();
            loss.poison();
            correct.poison();
            cu::cross_entropy_forward(loss.get(), probs.get(), d_logits.get(), d_labels.get(), B, K, correct.get(), stream);
            expect_close(what + " probs", probs.download(), ref_p);
            expect_close_scalar(what + " loss", loss.download()[0], ref_loss);
            EXPECT_EQ(correct.download()[0], ref_correct) << what;

            const auto g = randn_f(logits.size(), rng);
            auto r = g;
            ops::cross_entropy_backward(r.data(), ref_p.data(), labels.data(), B, K, 0.5f);
            auto d_p = to_device(ref_p);
            DeviceArray<float> dl(g.size());
            auto got = run_twice(what + " backward", {{&dl, g}}, [&] {
                cu::cross_entropy_backward(dl.get(), d_p.get(), d_labels.get(), B, K, 0.5f, stream);
            });
            expect_close(what + " dlogits", got[0], r);
        }
}

TEST_F(CudaOps, Optimizer) {
    Rng rng(116);
    for (int64_t n : {int64_t(1), int64_t(8191), int64_t(8193), int64_t(1000003)}) {
        const std::string what = "n=" + std::to_string(n);
        const auto x = randn_f(n, rng);
        auto d_x = to_device(x);
        DeviceArray<double> ss(1);
        double runs[2];
        for (double& r : runs) {
            ss.poison();
            cu::sum_squares(ss.get(), d_x.get(), n, stream);
            r = ss.download()[0];
        }
        expect_close_scalar(what + " sum_squares", runs[0], ops::sum_squares(x.data(), n), 1e-12);
        EXPECT_EQ(std::memcmp(&runs[0], &runs[1], sizeof(double)), 0) << what << ": sum_squares differs between runs";

        auto ref = x;
        ops::scale_inplace(ref.data(), n, 0.37f);
        cu::scale_inplace(d_x.get(), n, 0.37f, stream);
        expect_close(what + " scale_inplace", d_x.download(), ref);

        // Decay everywhere (t = 1), and by tiles of 128 from element 5 of a block (t = 7).
        std::vector<uint8_t> tiles(size_t((5 + n) / 128 + 1));
        for (size_t i = 0; i < tiles.size(); i++) tiles[i] = uint8_t(i % 3 != 1);
        const auto d_tiles = to_device(tiles);
        for (int64_t t : {int64_t(1), int64_t(7)}) {
            const auto grad = randn_f(n, rng), m0 = randn_f(n, rng, 0.1);
            auto v0 = randn_f(n, rng, 0.01);
            for (auto& v : v0) v = std::fabs(v);
            auto p = x, m = m0, v = v0;
            const ops::DecayTiles host_decay = t == 1 ? ops::DecayTiles{} : ops::DecayTiles{tiles.data(), 5, 128};
            const ops::DecayTiles device_decay = t == 1 ? ops::DecayTiles{} : ops::DecayTiles{d_tiles.get(), 5, 128};
            ops::adamw_update(p.data(), grad.data(), m.data(), v.data(), n, 1e-3, 0.9, 0.999, 1e-8, 0.05, host_decay,
                              t);
            auto d_p = to_device(x), d_g = to_device(grad), d_m = to_device(m0), d_v = to_device(v0);
            cu::adamw_update(d_p.get(), d_g.get(), d_m.get(), d_v.get(), n, 1e-3, 0.9, 0.999, 1e-8, 0.05,
                             device_decay, t, stream);
            const std::string step = what + " adamw t=" + std::to_string(t);
            expect_close(step + " param", d_p.download(), p);
            expect_close(step + " m", d_m.download(), m);
            expect_close(step + " v", d_v.download(), v);
        }
    }
}

#endif  // PRISM_CUDA || PRISM_EMULATION
