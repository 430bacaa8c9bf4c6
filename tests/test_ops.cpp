// Every op's backward against float64 central differences of its forward.
// The scalar checked is Σ out ⊙ R for a fixed random R, so dout = R.
#include <algorithm>
#include <numeric>
#include "kernels/ops.h"
#include "tests/gradcheck.h"

using namespace prism;
using namespace prism::testing;

namespace {
Vec zeros(size_t n) { return Vec(n, 0.0); }
}

TEST(OpGrad, LayerNorm) {
    Rng rng(1);
    const int rows = 5, D = 7;
    Vec x = randn(rows * D, rng), w = randn(D, rng), b = randn(D, rng), R = randn(rows * D, rng);
    Vec out(rows * D), mean(rows), rstd(rows);
    auto loss = [&] { ops::layernorm_forward(out.data(), mean.data(), rstd.data(), x.data(), w.data(), b.data(), rows, D); return dot(out, R); };
    loss();
    Vec dx = zeros(x.size()), dw = zeros(D), db = zeros(D);
    ops::layernorm_backward(dx.data(), dw.data(), db.data(), R.data(), x.data(), w.data(), mean.data(), rstd.data(), rows, D);
    expect_gradient("layernorm dx", x, dx, loss, rng);
    expect_gradient("layernorm dw", w, dw, loss, rng);
    expect_gradient("layernorm db", b, db, loss, rng);
}

TEST(OpGrad, Linear) {
    Rng rng(2);
    const int rows = 19, in = 6, outd = 5;  // rows not a multiple of the row block
    Vec x = randn(rows * in, rng), W = randn(outd * in, rng), b = randn(outd, rng), R = randn(rows * outd, rng);
    Vec out(rows * outd);
    auto loss = [&] { ops::linear_forward(out.data(), x.data(), W.data(), b.data(), rows, in, outd); return dot(out, R); };
    loss();
    Vec dx = zeros(x.size()), dW = zeros(W.size()), db = zeros(outd);
    ops::linear_backward(dx.data(), dW.data(), db.data(), R.data(), x.data(), W.data(), rows, in, outd);
    expect_gradient("linear dx", x, dx, loss, rng);
    expect_gradient("linear dW", W, dW, loss, rng);
    expect_gradient("linear db", b, db, loss, rng);
}

TEST(OpGrad, ExpertLinear) {
    Rng rng(3);
    const int B = 2, C = 4, N = 3, in = 5, outd = 4, L = 1 + 2 * N;
    const int S[] = {1, 3}, nS = 2;
    Vec x = randn(B * L * in, rng), W = randn(C * outd * in, rng), b = randn(C * outd, rng);
    Vec R = randn(B * nS * N * outd, rng), out(R.size());
    auto loss = [&] {
        ops::expert_linear_forward(out.data(), x.data() + in, L * in, W.data(), b.data(), S, B, nS, N, in, outd);
        return dot(out, R);
    };
    loss();
    Vec dx = zeros(x.size()), dW = zeros(W.size()), db = zeros(b.size());
    ops::expert_linear_backward(dx.data() + in, dW.data(), db.data(), R.data(), x.data() + in, L * in, W.data(), S, B, nS, N, in, outd);
    expect_gradient("expert dx", x, dx, loss, rng, 40);
    expect_gradient("expert dW", W, dW, loss, rng, 60);
    expect_gradient("expert db", b, db, loss, rng, 40);
    for (int i = 0; i < outd * in; i++) EXPECT_EQ(dW[0 * outd * in + i], 0.0) << "channel 0 is not in S";
}

TEST(OpGrad, GeluAndResidual) {
    Rng rng(4);
    const int B = 3, per = 5;
    Vec x = randn(B * per, rng, 2.0), R = randn(B * per, rng), out(B * per);
    auto loss = [&] { ops::gelu_forward(out.data(), x.data(), B * per); return dot(out, R); };
    Vec dx = zeros(x.size());
    ops::gelu_backward(dx.data(), R.data(), x.data(), B * per);
    expect_gradient("gelu", x, dx, loss, rng);

    Vec base = randn(B * per, rng), branch = randn(B * per, rng), scale = {0.0, 1.25, 1.0}, y(B * per);
    auto rloss = [&] { ops::residual_forward(y.data(), base.data(), branch.data(), scale.data(), B, per); return dot(y, R); };
    Vec dbranch = zeros(branch.size());
    ops::residual_backward(dbranch.data(), R.data(), scale.data(), B, per);
    expect_gradient("residual", branch, dbranch, rloss, rng);
}

TEST(OpGrad, Embed) {
    Rng rng(5);
    const int B = 2, C = 3, N = 4, D = 3, nS = 2, S[] = {0, 2};
    const int L = 1 + nS * N;
    Vec patch = randn(B * nS * N * D, rng), cls = randn(D, rng), pos = randn((1 + N) * D, rng), chan = randn(C * D, rng);
    Vec R = randn(B * L * D, rng), seq(B * L * D);
    auto loss = [&] { ops::embed_forward(seq.data(), patch.data(), cls.data(), pos.data(), chan.data(), S, B, nS, N, D); return dot(seq, R); };
    Vec dpatch = zeros(patch.size()), dcls = zeros(D), dpos = zeros(pos.size()), dchan = zeros(chan.size());
    ops::embed_backward(dpatch.data(), dcls.data(), dpos.data(), dchan.data(), R.data(), S, B, nS, N, D);
    expect_gradient("embed dpatch", patch, dpatch, loss, rng);
    expect_gradient("embed dcls", cls, dcls, loss, rng);
    expect_gradient("embed dpos", pos, dpos, loss, rng);
    expect_gradient("embed dchan", chan, dchan, loss, rng);
}

// lse of query row q (head h of D = Hd·dh columns) over M key rows K (stride
// kv_stride), straight from the definition: log Σ_m exp(q_h·k_m/√dh).
static double direct_lse(const double* q, const double* K, int64_t kv_stride, int M, int h, int dh) {
    double sum = 0;
    for (int m = 0; m < M; m++) {
        double s = 0;
        for (int d = 0; d < dh; d++) s += q[h * dh + d] * K[m * kv_stride + h * dh + d];
        sum += std::exp(s / std::sqrt(double(dh)));
    }
    return std::log(sum);
}

TEST(OpGrad, DenseAttention) {
    Rng rng(6);
    const int B = 2, L = 5, D = 6, Hd = 2, dh = D / Hd;
    Vec qkv = randn(B * L * 3 * D, rng), R = randn(B * L * D, rng), out(B * L * D), lse(B * Hd * L);
    auto loss = [&] { ops::attention_forward(out.data(), lse.data(), qkv.data(), B, L, D, Hd); return dot(out, R); };
    loss();
    for (int b = 0; b < B; b++)
        for (int h = 0; h < Hd; h++)
            for (int i = 0; i < L; i++) {
                const double* base = qkv.data() + b * L * 3 * D;
                EXPECT_NEAR(lse[(b * Hd + h) * L + i], direct_lse(base + i * 3 * D, base + D, 3 * D, L, h, dh), 1e-12)
                    << "b=" << b << " h=" << h << " i=" << i;
            }
    // backward adds to what the gradient holds
    const Vec g0 = randn(qkv.size(), rng);
    Vec dqkv = g0;
    ops::attention_backward(dqkv.data(), R.data(), qkv.data(), out.data(), lse.data(), B, L, D, Hd);
    for (size_t i = 0; i < dqkv.size(); i++) dqkv[i] -= g0[i];
    expect_gradient("attention dqkv", qkv, dqkv, loss, rng, 60);
}

TEST(OpGrad, ClsAttention) {
    Rng rng(7);
    const int B = 2, M = 6, D = 4, Hd = 2, L = 3;
    Vec q = randn(B * L * D, rng), k = randn(B * M * D, rng), v = randn(B * M * D, rng);
    Vec R = randn(B * L * D, rng), out = zeros(B * L * D), probs(B * Hd * M);
    auto loss = [&] { ops::cls_attention_forward(out.data(), L * D, probs.data(), q.data(), L * D, k.data(), v.data(), B, M, D, Hd); return dot(out, R); };
    loss();
    Vec dq = zeros(q.size()), dk = zeros(k.size()), dv = zeros(v.size());
    ops::cls_attention_backward(dq.data(), L * D, dk.data(), dv.data(), R.data(), L * D, q.data(), L * D, k.data(), v.data(), probs.data(), B, M, D, Hd);
    expect_gradient("cls dq", q, dq, loss, rng);
    expect_gradient("cls dk", k, dk, loss, rng);
    expect_gradient("cls dv", v, dv, loss, rng);
}

// Router → dispatch → gather → routed attention → combine, each op's backward
// checked through the whole routed path and on its own.
TEST(OpGrad, RoutedPath) {
    Rng rng(8);
    const int B = 2, C = 4, N = 3, D = 4, Hd = 2;
    const int S[] = {0, 1, 3}, nS = 3;
    const uint8_t in_S[] = {1, 1, 0, 1};
    const int L = 1 + nS * N, T = B * nS * N;
    for (int k : {1, 2, 3})
        for (auto combine : {ops::Combine::softmax, ops::Combine::renorm}) {
            SCOPED_TRACE("k=" + std::to_string(k) + (combine == ops::Combine::renorm ? " renorm" : " softmax"));
            Vec z = randn(B * L * C, rng, 2.0), q = randn(B * L * D, rng), kk = randn(B * nS * N * D, rng), vv = randn(B * nS * N * D, rng);
            Vec R = randn(B * L * D, rng);
            Vec probs(T * C), weights(T * k), lse(T), qg(T * k * D), og(T * k * D), rlse(T * k * Hd), a = zeros(B * L * D);
            std::vector<int> experts(T * k), offsets(B * nS + 1), por(T * k), rop(T * k), counts(nS);
            auto loss = [&] {
                ops::router_forward(probs.data(), experts.data(), weights.data(), lse.data(), z.data() + C, L * C, in_S, S, B, nS, N, C, k, combine);
                ops::moe_dispatch(offsets.data(), por.data(), rop.data(), counts.data(), experts.data(), B, nS, N, k);
                ops::moe_gather_forward(qg.data(), q.data() + D, L * D, por.data(), B, nS, N, k, D);
                ops::routed_attention_forward(og.data(), rlse.data(), qg.data(), kk.data(), vv.data(), offsets.data(), B, nS, N, D, Hd);
                ops::combine_forward(a.data() + D, L * D, og.data(), weights.data(), rop.data(), B, nS, N, k, D);
                return dot(a, R);
            };
            loss();
            // the experts are distinct, ordered by probability, and inside S
            for (int t = 0; t < T; t++)
                for (int j = 0; j < k; j++) {
                    EXPECT_GE(experts[t * k + j], 0);
                    EXPECT_LT(experts[t * k + j], nS);
                    if (j) { EXPECT_GE(probs[t * C + S[experts[t * k + j - 1]]], probs[t * C + S[experts[t * k + j]]]); }
                }
            EXPECT_EQ(offsets[B * nS], T * k);
            for (int g = 0; g < B * nS; g++)
                for (int i = offsets[g]; i < offsets[g + 1]; i++)
                    for (int h = 0; h < Hd; h++)
                        EXPECT_NEAR(rlse[i * Hd + h], direct_lse(qg.data() + i * D, kk.data() + g * N * D, D, N, h, D / Hd), 1e-12);
            EXPECT_EQ(std::accumulate(counts.begin(), counts.end(), 0), T * k);
            Vec dog = zeros(og.size()), dw = zeros(weights.size()), dqg = zeros(qg.size()), dk = zeros(kk.size()), dv = zeros(vv.size());
            Vec dq = zeros(q.size()), dz = zeros(z.size());
            ops::combine_backward(dog.data(), dw.data(), R.data() + D, L * D, og.data(), weights.data(), rop.data(), B, nS, N, k, D);
            ops::routed_attention_backward(dqg.data(), dk.data(), dv.data(), dog.data(), qg.data(), kk.data(), vv.data(), og.data(), rlse.data(), offsets.data(), B, nS, N, D, Hd);
            ops::moe_gather_backward(dq.data() + D, L * D, dqg.data(), rop.data(), B, nS, N, k, D);
            ops::router_backward(dz.data() + C, L * C, probs.data(), experts.data(), weights.data(), dw.data(), (const double*)nullptr, S, B, nS, N, C, k, combine);
            expect_gradient("routed dq", q, dq, loss, rng, 40);
            expect_gradient("routed dk", kk, dk, loss, rng, 40);
            expect_gradient("routed dv", vv, dv, loss, rng, 40);
            // h small enough that no top-k choice flips
            expect_gradient("router dz", z, dz, loss, rng, 60, 1e-6, 1e-7);
        }
}

TEST(OpGrad, LoadBalanceAndZLoss) {
    Rng rng(9);
    const int B = 2, C = 4, N = 5, k = 2, S[] = {0, 2, 3}, nS = 3;
    const uint8_t in_S[] = {1, 0, 1, 1};
    const int L = 1 + nS * N, T = B * nS * N;
    Vec z = randn(B * L * C, rng), probs(T * C), weights(T * k), lse(T);
    std::vector<int> experts(T * k), offsets(B * nS + 1), por(T * k), rop(T * k), counts(nS);
    for (auto kind : {ops::AuxLoss::switch_, ops::AuxLoss::importance}) {
        auto loss = [&] {
            ops::router_forward(probs.data(), experts.data(), weights.data(), lse.data(), z.data() + C, L * C, in_S, S, B, nS, N, C, k, ops::Combine::softmax);
            ops::moe_dispatch(offsets.data(), por.data(), rop.data(), counts.data(), experts.data(), B, nS, N, k);
            return ops::aux_loss_forward_backward<double>(nullptr, probs.data(), counts.data(), S, T, nS, C, k, kind, 0.3, 0.0) +
                   ops::z_loss_forward_backward<double>(nullptr, 0, probs.data(), lse.data(), B, nS, N, C, 0.2, 0.0);
        };
        loss();
        Vec dprobs = zeros(T * C), dz = zeros(z.size()), dw = zeros(T * k);
        ops::aux_loss_forward_backward(dprobs.data(), probs.data(), counts.data(), S, T, nS, C, k, kind, 0.3, 1.0);
        ops::z_loss_forward_backward(dz.data() + C, L * C, probs.data(), lse.data(), B, nS, N, C, 0.2, 1.0);
        ops::router_backward(dz.data() + C, L * C, probs.data(), experts.data(), weights.data(), dw.data(), dprobs.data(), S, B, nS, N, C, k, ops::Combine::softmax);
        expect_gradient(kind == ops::AuxLoss::switch_ ? "switch + z loss" : "importance + z loss", z, dz, loss, rng, 60, 1e-6, 1e-7);
    }
}

TEST(OpGrad, CrossEntropyAndSelect) {
    Rng rng(10);
    const int B = 4, K = 5, D = 3, L = 2;
    Vec x = randn(B * L * D, rng), sel(B * D), R = randn(B * D, rng);
    auto sloss = [&] { ops::select_rows(sel.data(), x.data(), L * D, B, D); return dot(sel, R); };
    Vec dx = zeros(x.size());
    ops::select_rows_backward(dx.data(), R.data(), L * D, B, D);
    expect_gradient("select rows", x, dx, sloss, rng);

    Vec logits = randn(B * K, rng), probs(B * K);
    const int32_t labels[] = {0, 4, 2, 2};
    auto loss = [&] { return ops::cross_entropy_forward(probs.data(), logits.data(), labels, B, K, nullptr); };
    loss();
    Vec dl = zeros(logits.size());
    ops::cross_entropy_backward(dl.data(), probs.data(), labels, B, K, 1.0);
    expect_gradient("cross entropy", logits, dl, loss, rng);
}

TEST(Ops, TopKTiesGoToLowerChannel) {
    const int B = 1, C = 4, N = 1, k = 2, S[] = {0, 1, 2, 3};
    const uint8_t in_S[] = {1, 1, 1, 1};
    const int T = 4 * N;  // every channel's patch token is routed
    std::vector<double> z(T * C, 0.5), probs(T * C), weights(T * k), lse(T);
    std::vector<int> experts(T * k);
    ops::router_forward(probs.data(), experts.data(), weights.data(), lse.data(), z.data(), C, in_S, S, B, 4, N, C, k, ops::Combine::softmax);
    EXPECT_EQ(experts[0], 0);
    EXPECT_EQ(experts[1], 1);
}

TEST(Ops, DispatchIsAStableCountingSort) {
    // 1 image, 3 channel positions, 2 patches each: tokens t = 0..5, k = 2
    const int experts[] = {2, 0, 0, 1, 2, 1, 0, 2, 1, 0, 2, 0};
    int offsets[4], por[12], rop[12], counts[3];
    ops::moe_dispatch(offsets, por, rop, counts, experts, 1, 3, 2, 2);
    EXPECT_EQ(std::vector<int>(offsets, offsets + 4), (std::vector<int>{0, 5, 8, 12}));
    EXPECT_EQ(std::vector<int>(counts, counts + 3), (std::vector<int>{5, 3, 4}));
    // group 0 holds pairs routed to position 0, in pair order
    EXPECT_EQ(std::vector<int>(por, por + 5), (std::vector<int>{1, 2, 6, 9, 11}));
    for (int p = 0; p < 12; p++) EXPECT_EQ(por[rop[p]], p);
}

TEST(OpGrad, AdamWMatchesTheFormula) {
    double p[2] = {1.0, -2.0}, g[2] = {0.5, 0.25}, m[2] = {0, 0}, v[2] = {0, 0};
    ops::adamw_update(p, g, m, v, 2, 0.1, 0.9, 0.999, 1e-8, 0.01, {}, 1);
    // step 1: m̂ = g, v̂ = g², update = g/|g| = ±1, plus decay
    EXPECT_NEAR(p[0], 1.0 - 0.1 * (1.0 + 0.01 * 1.0), 1e-7);
    EXPECT_NEAR(p[1], -2.0 - 0.1 * (1.0 + 0.01 * -2.0), 1e-7);
    // Decay by tile: elements 3..6 of a block of tiles of 2, whose tiles 1 and
    // 3 decay and tile 2 does not: the first element and the last decay.
    double q[4] = {1.0, 1.0, 1.0, 1.0}, h[4] = {0.5, 0.5, 0.5, 0.5}, mq[4] = {}, vq[4] = {};
    const uint8_t decays[4] = {0, 1, 0, 1};
    ops::adamw_update(q, h, mq, vq, 4, 0.1, 0.9, 0.999, 1e-8, 0.01, ops::DecayTiles{decays, 3, 2}, 1);
    const double with = 1.0 - 0.1 * (1.0 + 0.01), without = 1.0 - 0.1;
    EXPECT_NEAR(q[0], with, 1e-7);
    EXPECT_NEAR(q[1], without, 1e-7);
    EXPECT_NEAR(q[2], without, 1e-7);
    EXPECT_NEAR(q[3], with, 1e-7);
}
