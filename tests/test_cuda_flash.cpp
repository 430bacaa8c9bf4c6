// The flash attention ops (kernels/cuda/flash_attention.cu) against the CPU
// reference ops in float, on the GPU: dense self-attention at the tiny,
// So2Sat (L = 17, 289), JUMP-CP (L = 197, 1569) and JUMP-CP P=8 (L = 6273,
// forward) shapes; routed attention at N = 15, 16 (So2Sat), 196 (JUMP-CP) and
// 784 (JUMP-CP P=8: key tiles streamed), with empty groups.
//
// Inputs are bf16-representable (the ops round q, k, v, dO to bf16), so what
// is measured is the ops' own rounding (P and dS in bf16): DESIGN.md §7's 2e-2.
// Forward outputs are poisoned first; lse is compared with the CPU op's;
// gradients start from random values (the ops accumulate) and the error is
// relative to what the op added; every op runs twice and must give the same
// bits. Without a CUDA device every test is skipped.
// The sanitizer runs use the *Small* tests, tiny shapes (bench/gpu/flash_check.sh).
//
// tests/emulated/cuda_flash.cpp compiles this file again for the emulator
// (EmulatedCudaFlash.*): the small shapes, through the launchers, without a GPU.
#if defined(PRISM_CUDA) || defined(PRISM_EMULATION)
#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "kernels/cuda_ops.h"
#include "kernels/ops.h"
#include "tests/cuda_testutil.h"

using namespace prism;
using namespace prism::testing;
namespace cu = prism::cuda_ops;

namespace {

constexpr double kTol = 2e-2;     // bf16 (DESIGN.md §7)
constexpr double kLseTol = 1e-4;  // the scores themselves are exact products of bf16 values

std::vector<float> bf16_randn(size_t n, Rng& rng) { return widen(to_bf16(randn_f(n, rng))); }

// ‖got − ref‖ / ‖ref − base‖ (the error in what a backward op added to base);
// NaN when got has a non-finite element.
void expect_increment_close(const std::string& what, const std::vector<float>& got,
                            const std::vector<float>& ref, const std::vector<float>& base) {
    ASSERT_EQ(got.size(), ref.size()) << what;
    double d2 = 0, r2 = 0;
    size_t bad = 0;
    for (size_t i = 0; i < ref.size(); i++) {
        bad += !std::isfinite(got[i]);
        const double d = double(got[i]) - ref[i], r = double(ref[i]) - base[i];
        d2 += d * d;
        r2 += r * r;
    }
    const double rel = bad ? NAN : std::sqrt(d2) / (r2 > 0 ? std::sqrt(r2) : 1.0);
    std::printf("[ cuda-vs-cpu ] %-48s rel %.3g\n", what.c_str(), rel);
    EXPECT_LE(rel, kTol) << what << ": relative error " << rel << " (" << bad << " non-finite)";
}


class CudaFlash : public CudaStreamTest {
protected:

    // Dense self-attention: out and lse, then (unless forward_only) dqkv.
    void dense(int B, int L, int Hd, bool forward_only, uint64_t seed) {
        const int D = 64 * Hd;
        const int64_t rows = (int64_t)B * L;
        const std::string what = "flash dense B=" + std::to_string(B) + " L=" + std::to_string(L);
        Rng rng(seed);
        const auto qkv = bf16_randn(rows * 3 * D, rng);
        auto d_qkv = to_device(qkv);
        auto ref = poisoned<float>(rows * D), ref_lse = poisoned<float>(rows * Hd);
        ops::attention_forward(ref.data(), ref_lse.data(), qkv.data(), B, L, D, Hd);
        DeviceArray<float> out(ref.size()), lse(ref_lse.size());
        const auto fwd = run_twice(what + " forward", {{&out, {}}, {&lse, {}}}, [&] {
            cu::flash_attention_forward(out.get(), nullptr, lse.get(), d_qkv.get(), nullptr, B, L, D, Hd, stream);
        });
        expect_close(what + " out", fwd[0], ref, kTol);
        expect_close(what + " lse", fwd[1], ref_lse, kLseTol);
        // qkv as the bf16 mode stores it: the same tiles, the same bits
        auto d_qkv16 = to_device(to_bf16(qkv));
        const auto fwd16 = run_twice(what + " forward, qkv stored bf16", {{&out, {}}, {&lse, {}}}, [&] {
            cu::flash_attention_forward(out.get(), nullptr, lse.get(), nullptr, d_qkv16.get(), B, L, D, Hd, stream);
        });
        expect_bit_identical(what + " out, qkv stored bf16", fwd16[0], fwd[0]);
        expect_bit_identical(what + " lse, qkv stored bf16", fwd16[1], fwd[1]);
        // the output stored in bf16 alone (the bf16 mode): the rounding of the fp32 one
        DeviceArray<uint16_t> out16(ref.size());
        out16.poison();
        cu::flash_attention_forward(nullptr, out16.get(), lse.get(), nullptr, d_qkv16.get(), B, L, D, Hd, stream);
        const auto out16_host = out16.download();
        expect_rounding_of(what + " out stored bf16", out16_host, fwd[0]);
        if (forward_only) return;

        const auto dout = bf16_randn(rows * D, rng), g = randn_f(qkv.size(), rng);
        auto r = g;
        ops::attention_backward(r.data(), dout.data(), qkv.data(), ref.data(), ref_lse.data(), B, L, D, Hd);
        // the op reads the forward's own out and lse, as the model will
        auto d_dout = to_device(dout);
        DeviceArray<float> dqkv(qkv.size());
        const std::vector<float> got = run_twice(what + " backward", {{&dqkv, g}}, [&] {
            cu::flash_attention_backward(dqkv.get(), d_dout.get(), d_qkv.get(), nullptr, out.get(), nullptr, lse.get(), B,
                                         L, D, Hd, false, stream);
        })[0];
        {  // dqkv written (the model's dense backward): from a poisoned dqkv, the
           // values accumulated into zeros (== : a written −0 equals an added +0)
            DeviceArray<float> zeroed(qkv.size());
            const std::vector<float> zeros(qkv.size(), 0.f);
            const auto added = run_twice(what + " backward into zeros", {{&zeroed, zeros}}, [&] {
                cu::flash_attention_backward(zeroed.get(), d_dout.get(), d_qkv.get(), nullptr, out.get(), nullptr,
                                             lse.get(), B, L, D, Hd, false, stream);
            })[0];
            const auto written = run_twice(what + " backward, dqkv overwritten", {{&dqkv, {}}}, [&] {
                cu::flash_attention_backward(dqkv.get(), d_dout.get(), d_qkv.get(), nullptr, out.get(), nullptr,
                                             lse.get(), B, L, D, Hd, true, stream);
            })[0];
            size_t differ = 0;
            for (size_t e = 0; e < added.size(); e++) differ += !(written[e] == added[e]);
            EXPECT_EQ(differ, 0u) << what << ": the overwritten dqkv differs from the one accumulated into zeros";
        }
        const std::vector<float> got16 = run_twice(what + " backward, qkv stored bf16", {{&dqkv, g}}, [&] {
            cu::flash_attention_backward(dqkv.get(), d_dout.get(), nullptr, d_qkv16.get(), out.get(), nullptr,
                                         lse.get(), B, L, D, Hd, false, stream);
        })[0];
        expect_bit_identical(what + " dqkv, qkv stored bf16", got16, got);
        // O read in bf16: the same as its widened values in fp32, bit for bit
        auto d_out_widened = to_device(widen(out16_host));
        const auto from_widened = run_twice(what + " backward, out widened", {{&dqkv, g}}, [&] {
            cu::flash_attention_backward(dqkv.get(), d_dout.get(), nullptr, d_qkv16.get(), d_out_widened.get(), nullptr,
                                         lse.get(), B, L, D, Hd, false, stream);
        })[0];
        const auto from_bf16 = run_twice(what + " backward, out stored bf16", {{&dqkv, g}}, [&] {
            cu::flash_attention_backward(dqkv.get(), d_dout.get(), nullptr, d_qkv16.get(), nullptr, out16.get(),
                                         lse.get(), B, L, D, Hd, false, stream);
        })[0];
        expect_bit_identical(what + " dqkv, out stored bf16", from_bf16, from_widened);
        for (int part = 0; part < 3; part++) {  // dq, dk, dv separately: each has its own kernel
            std::vector<float> gp, rp, bp;
            for (int64_t row = 0; row < rows; row++)
                for (int c = 0; c < D; c++) {
                    const int64_t e = row * 3 * D + part * D + c;
                    gp.push_back(got[e]);
                    rp.push_back(r[e]);
                    bp.push_back(g[e]);
                }
            expect_increment_close(what + (part == 0 ? " dq" : part == 1 ? " dk" : " dv"), gp, rp, bp);
        }
    }

    // Routed attention over groups from a real dispatch: `allowed` < nS leaves
    // the groups of the other channel positions empty.
    void routed(int B, int nS, int N, int Hd, int k, int allowed, uint64_t seed) {
        const int D = 64 * Hd, sets = B * nS;
        const int64_t T = (int64_t)sets * N, rows = T * k;
        const std::string what = "flash routed B=" + std::to_string(B) + " nS=" + std::to_string(nS) +
                                 " N=" + std::to_string(N) + " k=" + std::to_string(k) +
                                 (allowed < nS ? " (empty groups)" : "");
        Rng rng(seed);
        // experts: k distinct positions per token among the first `allowed`
        std::vector<int> experts(T * k), pool(allowed);
        for (int64_t t = 0; t < T; t++) {
            for (int i = 0; i < allowed; i++) pool[i] = i;
            for (int j = 0; j < k; j++) {
                std::swap(pool[j], pool[j + rng.below(allowed - j)]);
                experts[t * k + j] = pool[j];
            }
        }
        std::vector<int> offsets(sets + 1), por(T * k), rop(T * k), counts(nS);
        ops::moe_dispatch(offsets.data(), por.data(), rop.data(), counts.data(), experts.data(), B, nS, N, k);
        ASSERT_EQ(offsets.back(), rows);

        const auto qg = bf16_randn(rows * D, rng), kk = bf16_randn(T * D, rng), vv = bf16_randn(T * D, rng);
        auto d_qg = to_device(qg), d_k = to_device(kk), d_v = to_device(vv);
        auto d_off = to_device(offsets);
        auto ref = poisoned<float>(rows * D), ref_lse = poisoned<float>(rows * Hd);
        ops::routed_attention_forward(ref.data(), ref_lse.data(), qg.data(), kk.data(), vv.data(), offsets.data(),
                                      B, nS, N, D, Hd);
        DeviceArray<float> og(ref.size()), lse(ref_lse.size());
        const auto fwd = run_twice(what + " forward", {{&og, {}}, {&lse, {}}}, [&] {
            cu::flash_routed_attention_forward(og.get(), lse.get(), d_qg.get(), d_k.get(), d_v.get(), d_off.get(), B,
                                               nS, N, k, D, Hd, stream);
        });
        expect_close(what + " og", fwd[0], ref, kTol);
        expect_close(what + " lse", fwd[1], ref_lse, kLseTol);

        const auto dog = bf16_randn(ref.size(), rng), g_q = randn_f(qg.size(), rng), g_k = randn_f(kk.size(), rng),
                   g_v = randn_f(vv.size(), rng);
        auto r_q = g_q, r_k = g_k, r_v = g_v;
        ops::routed_attention_backward(r_q.data(), r_k.data(), r_v.data(), dog.data(), qg.data(), kk.data(),
                                       vv.data(), ref.data(), ref_lse.data(), offsets.data(), B, nS, N, D, Hd);
        auto d_dog = to_device(dog);
        DeviceArray<float> dqg(qg.size()), dk(kk.size()), dv(vv.size());
        const auto got = run_twice(what + " backward", {{&dqg, g_q}, {&dk, g_k}, {&dv, g_v}}, [&] {
            cu::flash_routed_attention_backward(dqg.get(), dk.get(), dv.get(), d_dog.get(), d_qg.get(), d_k.get(),
                                                d_v.get(), og.get(), lse.get(), d_off.get(), B, nS, N, k, D, Hd, false,
                                                stream);
        });
        expect_increment_close(what + " dqg", got[0], r_q, g_q);
        {  // dqg written (the model's): from a poisoned dqg, the values added into zeros
            const std::vector<float> zeros(qg.size(), 0.f);
            const auto added = run_twice(what + " backward into zeros", {{&dqg, zeros}, {&dk, g_k}, {&dv, g_v}}, [&] {
                cu::flash_routed_attention_backward(dqg.get(), dk.get(), dv.get(), d_dog.get(), d_qg.get(), d_k.get(),
                                                    d_v.get(), og.get(), lse.get(), d_off.get(), B, nS, N, k, D, Hd,
                                                    false, stream);
            });
            const auto written = run_twice(what + " backward, dqg written", {{&dqg, {}}, {&dk, g_k}, {&dv, g_v}}, [&] {
                cu::flash_routed_attention_backward(dqg.get(), dk.get(), dv.get(), d_dog.get(), d_qg.get(), d_k.get(),
                                                    d_v.get(), og.get(), lse.get(), d_off.get(), B, nS, N, k, D, Hd,
                                                    true, stream);
            });
            size_t differ = 0;
            for (size_t e = 0; e < added[0].size(); e++) differ += !(written[0][e] == added[0][e]);
            EXPECT_EQ(differ, 0u) << what << ": the written dqg differs from the one added into zeros";
            expect_bit_identical(what + " dk with dqg written", written[1], added[1]);
            expect_bit_identical(what + " dv with dqg written", written[2], added[2]);
        }
        expect_increment_close(what + " dk", got[1], r_k, g_k);
        expect_increment_close(what + " dv", got[2], r_v, g_v);

        // The bf16 mode's stored operands (qg, k, v, og, dog in bf16): the same
        // values as bf16 give the same bits, og in bf16 is the rounding of og,
        // and backward from it equals the fp32 operands' backward from its
        // widened values.
        auto d_qg16 = to_device(to_bf16(qg)), d_k16 = to_device(to_bf16(kk)), d_v16 = to_device(to_bf16(vv));
        DeviceArray<uint16_t> og16(ref.size());
        og16.poison();
        lse.poison();
        cu::flash_routed_attention_forward_bf16(og16.get(), lse.get(), d_qg16.get(), d_k16.get(), d_v16.get(),
                                                d_off.get(), B, nS, N, k, D, Hd, stream);
        const auto og16_host = og16.download();
        expect_rounding_of(what + " og stored bf16", og16_host, fwd[0]);
        expect_bit_identical(what + " lse, operands stored bf16", lse.download(), fwd[1]);
        auto d_og_widened = to_device(widen(og16_host));
        auto d_dog16 = to_device(to_bf16(dog));
        const RunBuffers grads = {{&dqg, g_q}, {&dk, g_k}, {&dv, g_v}};
        const auto from_widened = run_twice(what + " backward from widened og", grads, [&] {
            cu::flash_routed_attention_backward(dqg.get(), dk.get(), dv.get(), d_dog.get(), d_qg.get(), d_k.get(),
                                                d_v.get(), d_og_widened.get(), lse.get(), d_off.get(), B, nS, N, k,
                                                D, Hd, false, stream);
        });
        const auto stored = run_twice(what + " backward, operands stored bf16", grads, [&] {
            cu::flash_routed_attention_backward_bf16(dqg.get(), dk.get(), dv.get(), d_dog16.get(), d_qg16.get(),
                                                     d_k16.get(), d_v16.get(), og16.get(), lse.get(), d_off.get(), B,
                                                     nS, N, k, D, Hd, false, stream);
        });
        for (int i = 0; i < 3; i++)
            expect_bit_identical(what + " backward, operands stored bf16, buffer " + std::to_string(i), stored[i],
                                 from_widened[i]);
    }

};

}  // namespace

// tiny (one tile; partial tiles): the sanitizers' shapes
TEST_F(CudaFlash, DenseSmall) {
    dense(3, 17, 2, false, 200);
    dense(1, 75, 2, false, 201);
}

#ifndef PRISM_EMULATION  // the larger shapes: hours in the emulator
// So2Sat vit (1 + 16) and chvit (1 + 18·16)
TEST_F(CudaFlash, DenseSo2sat) {
    dense(2, 17, 6, false, 202);
    dense(2, 289, 6, false, 206);
}

// JUMP-CP vit (1 + 196) and chvit (1 + 8·196)
TEST_F(CudaFlash, DenseJumpcp) {
    dense(2, 197, 6, false, 203);
    dense(1, 1569, 6, false, 204);
}

// JUMP-CP P=8 chvit (1 + 8·784): forward only (the CPU backward would take long)
TEST_F(CudaFlash, DenseLongForward) { dense(1, 6273, 6, true, 205); }

#endif

// tiny (N = 15, 40; Hd = 2), k = 1, 2, all; empty groups: the sanitizers' shapes
TEST_F(CudaFlash, RoutedSmall) {
    for (int k : {1, 2, 3}) routed(3, 3, 15, 2, k, 3, 210 + k);
    routed(3, 3, 15, 2, 1, 2, 214);
    routed(2, 3, 40, 2, 2, 3, 217);
}

#ifndef PRISM_EMULATION
// So2Sat (N = 16, 18 channels), k = 1 over all channels, k = 2 over 3 of them
TEST_F(CudaFlash, RoutedSo2sat) {
    routed(2, 18, 16, 6, 1, 18, 215);
    routed(2, 18, 16, 6, 2, 3, 216);
}

// JUMP-CP (N = 196, 8 channels): K/V resident over four key tiles
TEST_F(CudaFlash, RoutedJumpcp) {
    routed(2, 8, 196, 6, 1, 8, 220);
    routed(2, 8, 196, 6, 2, 3, 221);
}

// JUMP-CP P=8 (N = 784 > 256): key tiles streamed
TEST_F(CudaFlash, RoutedLong) { routed(1, 8, 784, 6, 1, 8, 230); }
#endif

// kernels/backend.h may pair a flash forward with an fp32 backward and the
// reverse (the buffers' alignment decides each): both forwards must write the
// same lse in the same layout.
TEST_F(CudaFlash, LseMatchesTheFp32Kernels) {
    Rng rng(240);
    const int B = 2, L = 75, Hd = 2, D = 64 * Hd;
    const auto qkv = bf16_randn((size_t)B * L * 3 * D, rng);
    auto d_qkv = to_device(qkv);
    DeviceArray<float> out(B * L * D), lse_flash(B * Hd * L), lse_fp32(B * Hd * L);
    lse_flash.poison();
    lse_fp32.poison();
    cu::flash_attention_forward(out.get(), nullptr, lse_flash.get(), d_qkv.get(), nullptr, B, L, D, Hd, stream);
    cu::attention_forward(out.get(), lse_fp32.get(), d_qkv.get(), B, L, D, Hd, stream);
    expect_close("dense lse, flash vs fp32", lse_flash.download(), lse_fp32.download(), kLseTol);

    const int nS = 3, N = 16, sets = B * nS;
    std::vector<int> offsets(sets + 1, 0);
    for (int g = 0; g < sets; g++) offsets[g + 1] = offsets[g] + (g % 3 == 1 ? 0 : N);  // some groups empty
    const int rows = offsets.back();
    const auto qg = bf16_randn((size_t)rows * D, rng), kv = bf16_randn((size_t)sets * N * D, rng);
    auto d_qg = to_device(qg), d_kv = to_device(kv);
    auto d_off = to_device(offsets);
    DeviceArray<float> og(rows * D), rl_flash(rows * Hd), rl_fp32(rows * Hd);
    rl_flash.poison();
    rl_fp32.poison();
    cu::flash_routed_attention_forward(og.get(), rl_flash.get(), d_qg.get(), d_kv.get(), d_kv.get(), d_off.get(), B,
                                       nS, N, 1, D, Hd, stream);  // at most N rows per group: k = 1's bound
    cu::routed_attention_forward(og.get(), rl_fp32.get(), d_qg.get(), d_kv.get(), d_kv.get(), d_off.get(), B, nS, N,
                                 D, Hd, stream);
    expect_close("routed lse, flash vs fp32", rl_flash.download(), rl_fp32.download(), kLseTol);
}

TEST_F(CudaFlash, RejectsOtherHeadDims) {
    DeviceArray<float> x(3 * 2 * 17 * 96), out(2 * 17 * 96), lse(2 * 17 * 2);
    EXPECT_THROW(cu::flash_attention_forward(out.get(), nullptr, lse.get(), x.get(), nullptr, 2, 17, 96, 2, stream),
                 std::runtime_error);  // head dim 48
    EXPECT_THROW(cu::flash_routed_attention_forward(out.get(), lse.get(), x.get(), x.get(), x.get(), nullptr, 1, 1,
                                                    17, 1, 96, 1, stream),
                 std::runtime_error);  // head dim 96
}

#endif  // PRISM_CUDA || PRISM_EMULATION
