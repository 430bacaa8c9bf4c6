// The element-wise kernels run on the CPU through tests/emulator.h, with
// the launch geometry their launchers give them: GELU and the residual add
// (kernels/cuda/activation.cuh), patch embedding (embed.cuh), the input step
// (input.cuh) and AdamW (adamw.cuh), against the CPU reference ops of
// kernels/cpu/. Data movement (patchify, the sequence's assembly, the CLS
// rows, the input step) must give the CPU's bits; sums in another order and
// the transcendental functions within 1e-5, as DESIGN.md §7's fp32 tolerance.
// Outputs start as NaN, so an element left unwritten fails. CudaOps.* checks
// the compiled kernels on a GPU.
#include <climits>
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "data/shard.h"
#include "engine/rng.h"
#include "kernels/ops.h"
#include "tests/bf16_host.h"
#include "tests/emulated_testutil.h"
// last: the emulator defines threadIdx and friends as macros
#include "tests/emulator.h"
#include "kernels/cuda/activation.cuh"
#include "kernels/cuda/adamw.cuh"
#include "kernels/cuda/embed.cuh"
#include "kernels/cuda/input.cuh"
#include "tests/reduce_emulated.h"

using namespace prism;
using prism::testing::change;
using prism::testing::expect_close;
using prism::testing::normal;
using prism::testing::to_bf16;
using prism::testing::widen;

namespace {

// got == ref, bit for bit (NaN never equals).
void expect_same(const std::string& what, const std::vector<float>& got, const std::vector<float>& ref) {
    ASSERT_EQ(got.size(), ref.size()) << what;
    size_t differ = 0, first = got.size();
    for (size_t i = 0; i < got.size(); i++)
        if (!(got[i] == ref[i])) {
            if (!differ) first = i;
            differ++;
        }
    std::printf("[ emulated   ] %-56s %zu of %zu differ\n", what.c_str(), differ, got.size());
    EXPECT_EQ(differ, 0u) << what << ": first at " << first << ": " << got[first] << " vs " << ref[first];
}

std::vector<float> nans(size_t n) { return std::vector<float>(n, NAN); }

}  // namespace

TEST(ActivationEmulated, GeluForwardAndBackwardOnEveryOperandType) {
    namespace act = prism::activation;
    Rng rng(11);
    for (const int64_t n : {int64_t(1), int64_t(255), int64_t(70001)}) {
        const std::string at = " n=" + std::to_string(n);
        const unsigned grid = act::element_blocks(n);
        const auto x = normal(n, rng, 2.0), dout = normal(n, rng);
        const auto x16 = to_bf16(x), dout16 = to_bf16(dout);
        const auto xw = widen(x16), doutw = widen(dout16);  // what the bf16 operands hold

        // forward: fp32 and bf16 inputs, fp32 and bf16 outputs at once
        std::vector<float> ref(n), ref_w(n);
        ops::gelu_forward(ref.data(), x.data(), n);
        ops::gelu_forward(ref_w.data(), xw.data(), n);
        auto out = nans(n);
        std::vector<uint16_t> out16(n, 0x7fc0);
        emu::launch({grid}, act::kElementThreads, 0, act::gelu_forward_kernel<float>,
                    act::GeluForwardParams<float>{out.data(), out16.data(), x.data(), n});
        expect_close("gelu forward fp32" + at, out, ref);
        expect_same("gelu forward's bf16 copy is its fp32 output rounded" + at, widen(out16),
                    widen(to_bf16(out)));
        auto out_w = nans(n);
        emu::launch({grid}, act::kElementThreads, 0, act::gelu_forward_kernel<uint16_t>,
                    act::GeluForwardParams<uint16_t>{out_w.data(), nullptr, x16.data(), n});
        expect_close("gelu forward, bf16 x" + at, out_w, ref_w);

        // backward, fp32: added into dx, and overwriting it
        const auto dx0 = normal(n, rng);
        auto ref_add = dx0;
        ops::gelu_backward(ref_add.data(), dout.data(), x.data(), n);
        auto dx = dx0;
        emu::launch({grid}, act::kElementThreads, 0, act::gelu_backward_kernel<float, float>,
                    act::GeluBackwardParams<float, float>{dx.data(), nullptr, false, dout.data(), x.data(), n});
        expect_close("gelu backward, dx added into" + at, dx, ref_add);
        std::vector<float> ref_set(n, 0.f);
        ops::gelu_backward(ref_set.data(), dout.data(), x.data(), n);
        auto dx_set = nans(n);
        emu::launch({grid}, act::kElementThreads, 0, act::gelu_backward_kernel<float, float>,
                    act::GeluBackwardParams<float, float>{dx_set.data(), nullptr, true, dout.data(), x.data(), n});
        expect_close("gelu backward, dx overwritten" + at, dx_set, ref_set);
        std::vector<uint16_t> dx16(n, 0x7fc0);
        emu::launch({grid}, act::kElementThreads, 0, act::gelu_backward_kernel<float, float>,
                    act::GeluBackwardParams<float, float>{nullptr, dx16.data(), true, dout.data(), x.data(), n});
        expect_same("gelu backward's bf16 dx is the fp32 one rounded" + at, widen(dx16),
                    widen(to_bf16(dx_set)));

        // backward with bf16 operands: dout, x, or both
        auto check_bf16_operands = [&](auto g, auto xs, const std::vector<float>& gw, const std::vector<float>& xv,
                                       const std::string& what) {
            using G = std::remove_const_t<std::remove_pointer_t<decltype(g)>>;
            using X = std::remove_const_t<std::remove_pointer_t<decltype(xs)>>;
            std::vector<float> r(n, 0.f);
            ops::gelu_backward(r.data(), gw.data(), xv.data(), n);
            auto got = nans(n);
            emu::launch({grid}, act::kElementThreads, 0, act::gelu_backward_kernel<G, X>,
                        act::GeluBackwardParams<G, X>{got.data(), nullptr, true, g, xs, n});
            expect_close("gelu backward, " + what + at, got, r);
        };
        check_bf16_operands(dout16.data(), x.data(), doutw, x, "bf16 dout");
        check_bf16_operands(dout.data(), x16.data(), dout, xw, "bf16 x");
        check_bf16_operands(dout16.data(), x16.data(), doutw, xw, "bf16 dout and x");
    }
}

TEST(ActivationEmulated, ResidualWithAndWithoutDropPathScale) {
    namespace act = prism::activation;
    Rng rng(12);
    const int B = 5;
    const int64_t per_image = 777, n = B * per_image;
    const auto x = normal(n, rng), branch = normal(n, rng), dx = normal(n, rng), dbranch0 = normal(n, rng);
    const std::vector<float> scale = {0.f, 1.25f, 1.25f, 0.f, 1.25f};  // drop path: dropped or rescaled
    for (const float* sc : {static_cast<const float*>(nullptr), scale.data()}) {
        const std::string at = sc ? " (drop path scale)" : " (no scale)";
        std::vector<float> ref(n);
        ops::residual_forward(ref.data(), x.data(), branch.data(), sc, B, per_image);
        auto out = nans(n);
        emu::launch({act::element_blocks(n)}, act::kElementThreads, 0, act::residual_kernel,
                    act::ResidualParams{out.data(), x.data(), branch.data(), sc, per_image, n});
        expect_close("residual forward" + at, out, ref, 1e-6);
        auto ref_d = dbranch0;
        ops::residual_backward(ref_d.data(), dx.data(), sc, B, per_image);
        auto dbranch = dbranch0;
        emu::launch({act::element_blocks(n)}, act::kElementThreads, 0, act::residual_kernel,
                    act::ResidualParams{dbranch.data(), dbranch.data(), dx.data(), sc, per_image, n});
        expect_close("residual backward (added into dbranch)" + at, dbranch, ref_d, 1e-6);
    }
}

TEST(EmbedEmulated, PatchesSequenceAndClsRowsForwardAndBackward) {
    namespace em = prism::embed;
    Rng rng(13);
    // A grid of 3 × 2 patches (H ≠ W), a channel subset out of order, and a
    // D above one block's threads' worth of a row.
    const int B = 3, C = 5, H = 12, W = 8, P = 4, N = (H / P) * (W / P), D = 40;
    const std::vector<int> S = {3, 0, 4};
    const int nS = (int)S.size();
    const auto images = normal((size_t)B * C * H * W, rng);

    const size_t n_chan = (size_t)B * nS * N * P * P;
    std::vector<float> ref_chan(n_chan);
    ops::patchify_channels(ref_chan.data(), images.data(), B, C, H, W, P, S.data(), nS);
    auto chan_patches = nans(n_chan);
    emu::launch({em::element_blocks(n_chan)}, em::kElementThreads, 0, em::patchify_channels_kernel,
                em::PatchifyParams{chan_patches.data(), images.data(), B, C, H, W, P, S.data(), nS, nullptr, 1.f});
    expect_same("patchify_channels", chan_patches, ref_chan);

    const std::vector<uint8_t> keep = {1, 0, 1, 1, 0};
    for (const uint8_t* k : {static_cast<const uint8_t*>(nullptr), keep.data()}) {
        const size_t n_all = (size_t)B * N * C * P * P;
        const float scale = k ? 5.f / 3.f : 1.f;  // HCS: the kept channels rescaled
        std::vector<float> ref_all(n_all);
        ops::patchify_all(ref_all.data(), images.data(), B, C, H, W, P, k, scale);
        auto all = nans(n_all);
        emu::launch({em::element_blocks(n_all)}, em::kElementThreads, 0, em::patchify_all_kernel,
                    em::PatchifyParams{all.data(), images.data(), B, C, H, W, P, nullptr, 0, k, scale});
        expect_same(std::string("patchify_all") + (k ? ", two channels dropped" : ""), all, ref_all);
    }

    const int64_t L = 1 + (int64_t)nS * N;
    const auto patch = normal((size_t)B * nS * N * D, rng), cls = normal(D, rng);
    const auto pos = normal((size_t)(1 + N) * D, rng), chan = normal((size_t)C * D, rng);
    const auto dseq = normal((size_t)B * L * D, rng);
    const auto dpatch0 = normal(patch.size(), rng), dcls0 = normal(D, rng), dpos0 = normal(pos.size(), rng);
    const auto dchan0 = normal(chan.size(), rng);
    for (const bool with_chan : {false, true}) {
        const std::string at = with_chan ? " (channel embedding)" : " (none)";
        const float* ch = with_chan ? chan.data() : nullptr;
        std::vector<float> ref_seq((size_t)B * L * D);
        ops::embed_forward(ref_seq.data(), patch.data(), cls.data(), pos.data(), ch, S.data(), B, nS, N, D);
        auto seq = nans(ref_seq.size());
        emu::launch({em::element_blocks((int64_t)seq.size())}, em::kElementThreads, 0, em::forward_kernel,
                    em::ForwardParams{seq.data(), patch.data(), cls.data(), pos.data(), ch, S.data(), B, nS, N, D});
        expect_same("embed forward" + at, seq, ref_seq);

        auto rp = dpatch0, rc = dcls0, rpos = dpos0, rch = dchan0;
        ops::embed_backward(rp.data(), rc.data(), rpos.data(), with_chan ? rch.data() : nullptr, dseq.data(), S.data(),
                            B, nS, N, D);
        auto gp = dpatch0, gc = dcls0, gpos = dpos0, gch = dchan0;
        const em::BackwardParams bp{gp.data(), gc.data(), gpos.data(), with_chan ? gch.data() : nullptr,
                                    dseq.data(), S.data(), B, nS, N, D};
        emu::launch({em::element_blocks((int64_t)B * nS * N * D)}, em::kElementThreads, 0, em::dpatch_kernel, bp);
        emu::launch({em::element_blocks((int64_t)(1 + N) * D)}, em::kElementThreads, 0, em::dpos_kernel, bp);
        if (with_chan) emu::launch({em::element_blocks((int64_t)nS * D)}, em::kElementThreads, 0, em::dchan_kernel, bp);
        expect_same("embed backward: dpatch" + at, gp, rp);
        expect_close("embed backward: dcls" + at, gc, rc);
        expect_close("embed backward: dpos" + at, gpos, rpos);
        // channel 1 and 2 are not in S: their gradient stays as it was
        expect_close("embed backward: dchan" + at, gch, rch);
    }

    // The CLS rows: every L-th row of the sequence.
    std::vector<float> ref_rows((size_t)B * D);
    ops::select_rows(ref_rows.data(), dseq.data(), L * D, B, D);
    auto rows = nans(ref_rows.size());
    emu::launch({em::element_blocks((int64_t)B * D)}, em::kElementThreads, 0, em::select_rows_kernel,
                em::SelectParams{rows.data(), dseq.data(), L * D, B, D});
    expect_same("select_rows", rows, ref_rows);
    const auto drows = normal(rows.size(), rng);
    auto ref_dx = dseq;
    ops::select_rows_backward(ref_dx.data(), drows.data(), L * D, B, D);
    auto dx = dseq;
    emu::launch({em::element_blocks((int64_t)B * D)}, em::kElementThreads, 0, em::select_rows_backward_kernel,
                em::SelectBackwardParams{dx.data(), drows.data(), L * D, B, D});
    expect_same("select_rows backward", dx, ref_dx);
}

namespace {

// Random stored pixels of the given type, [B, C, H, W].
std::vector<char> random_pixels(ops::Pixel pixel, size_t n, Rng& rng) {
    std::vector<char> raw(n * ops::pixel_size(pixel));
    for (size_t i = 0; i < n; i++) {
        const double u = rng.uniform();
        switch (pixel) {
            case ops::Pixel::u8: ((uint8_t*)raw.data())[i] = uint8_t(u * 255.999); break;
            case ops::Pixel::u16: ((uint16_t*)raw.data())[i] = uint16_t(u * 65535.999); break;
            case ops::Pixel::f16: ((uint16_t*)raw.data())[i] = float_to_half(float(4 * u - 1)); break;
            case ops::Pixel::f32: ((float*)raw.data())[i] = float(4 * u - 1); break;
        }
    }
    return raw;
}

}  // namespace

TEST(InputEmulated, EveryPixelTypeFlipTurnCropAndHole) {
    namespace in = prism::input;
    Rng rng(14);
    const ops::Pixel pixels[] = {ops::Pixel::u8, ops::Pixel::u16, ops::Pixel::f16, ops::Pixel::f32};
    const char* names[] = {"u8", "u16", "f16", "f32"};
    // Square images take all eight dihedral transforms; non-square ones the
    // four without a quarter turn (the loader's rule, asserted by the CPU op).
    const int shapes[][2] = {{10, 10}, {6, 9}};
    for (int t = 0; t < 4; t++)
        for (const auto& hw : shapes) {
            const int B = 8, C = 2, H = hw[0], W = hw[1];
            const size_t n = (size_t)B * C * H * W;
            const std::string at = std::string(" ") + names[t] + " " + std::to_string(H) + "x" + std::to_string(W);
            auto raw = random_pixels(pixels[t], n, rng);
            std::vector<float> mean(B * C), inv_std(B * C);
            for (int q = 0; q < B * C; q++) {
                mean[q] = float(rng.uniform() * 2);
                inv_std[q] = float(0.5 + rng.uniform());
            }
            std::vector<ops::InputAug> aug(B);
            for (int b = 0; b < B; b++) {
                ops::InputAug& a = aug[b];
                a.dihedral = H == W ? b : 4 * (b % 2) + 2 * (b / 2 % 2);
                a.dy = b % 3 - 1;      // crops off either edge, or none
                a.dx = 2 - b % 5;
                a.holes = b % 3;       // 0 to 2 holes, one over the edge
                a.hole_h = 3, a.hole_w = 2;
                a.hole_y[0] = 1, a.hole_x[0] = 2;
                a.hole_y[1] = H - 2, a.hole_x[1] = W - 1;
            }
            // A non-finite pixel in images 3 and 5 (floats only; 5's is cropped away
            // when augmented): the lowest, 3, is reported.
            if (pixels[t] == ops::Pixel::f32) {
                ((float*)raw.data())[(size_t)5 * C * H * W + 7] = INFINITY;
                ((float*)raw.data())[(size_t)3 * C * H * W + H * W + 4] = NAN;
            } else if (pixels[t] == ops::Pixel::f16) {
                ((uint16_t*)raw.data())[(size_t)5 * C * H * W + 7] = 0x7c00;  // +inf
                ((uint16_t*)raw.data())[(size_t)3 * C * H * W + H * W + 4] = 0x7e00;  // NaN
            }
            const bool floats = pixels[t] == ops::Pixel::f32 || pixels[t] == ops::Pixel::f16;
            for (const bool augmented : {false, true}) {
                const ops::InputAug* a = augmented ? aug.data() : nullptr;
                std::vector<float> ref(n);
                const int ref_bad =
                    ops::input_forward(ref.data(), raw.data(), pixels[t], B, C, H, W, mean.data(), inv_std.data(), a);
                ASSERT_EQ(ref_bad, floats ? 3 : -1);
                auto out = nans(n);
                int bad = INT_MAX;
                const in::Params p{out.data(), raw.data(), B, C, H, W, mean.data(), inv_std.data(), a, &bad};
                auto run = [&](auto kernel) {
                    emu::launch({in::element_blocks(n)}, in::kElementThreads, 0, kernel, p);
                };
                switch (pixels[t]) {
                    case ops::Pixel::u8: run(in::forward_kernel<ops::Pixel::u8>); break;
                    case ops::Pixel::u16: run(in::forward_kernel<ops::Pixel::u16>); break;
                    case ops::Pixel::f16: run(in::forward_kernel<ops::Pixel::f16>); break;
                    case ops::Pixel::f32: run(in::forward_kernel<ops::Pixel::f32>); break;
                }
                // Non-finite outputs compare by their class: NaN never equals NaN.
                std::vector<float> o = out, r = ref;
                for (size_t i = 0; i < n; i++)
                    if (!std::isfinite(r[i]) && !std::isfinite(o[i]) && std::isnan(r[i]) == std::isnan(o[i]))
                        o[i] = r[i] = 0;
                expect_same(std::string("input step") + (augmented ? ", augmented" : "") + at, o, r);
                EXPECT_EQ(bad, floats ? 3 : INT_MAX) << at;
            }
        }
}

TEST(AdamwEmulated, UpdateScaleAndSumOfSquares) {
    namespace aw = prism::adamw;
    Rng rng(15);
    for (const int64_t n : {int64_t(1), int64_t(5003)}) {
        const std::string at = " n=" + std::to_string(n);
        const auto param0 = normal(n, rng), grad = normal(n, rng, 0.1), m0 = normal(n, rng, 0.01);
        std::vector<float> v0(n);
        for (auto& v : v0) v = float(1e-4 * rng.uniform());
        const double lr = 3e-3, beta1 = 0.9, beta2 = 0.999, eps = 1e-8, wd = 0.05;
        // Decay everywhere (t = 1), and by tiles of 7 from element 3 of a block (t = 7).
        std::vector<uint8_t> tiles(size_t((3 + n) / 7 + 1));
        for (auto& b : tiles) b = uint8_t(rng.uniform() < 0.5);
        for (const int64_t t : {int64_t(1), int64_t(7)}) {
            const ops::DecayTiles decay = t == 1 ? ops::DecayTiles{} : ops::DecayTiles{tiles.data(), 3, 7};
            auto rp = param0, rm = m0, rv = v0;
            ops::adamw_update(rp.data(), grad.data(), rm.data(), rv.data(), n, lr, beta1, beta2, eps, wd, decay, t);
            auto gp = param0, gm = m0, gv = v0;
            const double bc1 = 1.0 - std::pow(beta1, double(t)), bc2 = 1.0 - std::pow(beta2, double(t));
            emu::launch({aw::element_blocks(n)}, aw::kElementThreads, 0, aw::update_kernel,
                        aw::UpdateParams{gp.data(), gm.data(), gv.data(), grad.data(), n, lr, beta1, beta2, eps, wd,
                                         bc1, bc2, decay.decays, decay.first, decay.tile});
            // The step, not the parameter (which is mostly its old value).
            const std::string step = " t=" + std::to_string(t) + at;
            expect_close("adamw: the parameter's step" + step, change(gp, param0), change(rp, param0));
            expect_close("adamw: first moment" + step, gm, rm);
            expect_close("adamw: second moment" + step, gv, rv);
        }

        auto ref = param0;
        ops::scale_inplace(ref.data(), n, 0.37f);
        auto got = param0;
        emu::launch({aw::element_blocks(n)}, aw::kElementThreads, 0, aw::scale_kernel,
                    aw::ScaleParams{got.data(), n, 0.37f});
        expect_same("clipping's scale" + at, got, ref);

        double sum = NAN;
        prism::testing::device_sum(n, aw::Square{param0.data()}, aw::StoreDouble{&sum});
        const double ref_sum = ops::sum_squares(param0.data(), n);
        std::printf("[ emulated   ] %-56s rel %.3g\n", ("sum of squares" + at).c_str(),
                    std::abs(sum - ref_sum) / ref_sum);
        EXPECT_LE(std::abs(sum - ref_sum), 1e-12 * ref_sum) << at;
    }
}
