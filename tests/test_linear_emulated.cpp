// The kernels around kernels/cuda/linear.cu's cuBLAS products (linear.cuh)
// run on the CPU through tests/emulator.h, composed as linear.cu
// composes them: MoE-ViT's expert projections, forward and backward, in fp32
// and in the bf16 mode, against kernels/cpu/linear.cpp. cuBLAS itself cannot
// run here; its batched products are modelled below (column-major,
// C += op(A)·op(B)) with the transposes and leading dimensions linear.cuh
// gives linear.cu (whose plain linear layers use the same three shapes), and
// they follow the pointer arrays the emulated kernels wrote, checking that
// each operand lies inside its buffer. What this checks:
// the biases, the bf16 and channel-major copies, the pointers chosen from S,
// the products' shapes, the bias gradients' terms. What it cannot: cuBLAS's
// own results and linear.cu's sequence of calls, which is rewritten here
// (CudaOps.* checks both on a GPU).
#include <cmath>
#include <cstdio>
#include <stdexcept>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "engine/rng.h"
#include "kernels/ops.h"
#include "tests/bf16_host.h"
#include "tests/emulated_testutil.h"
// last: the emulator defines threadIdx and friends as macros
#include "tests/emulator.h"
#include "kernels/cuda/linear.cuh"
#include "tests/reduce_emulated.h"

using namespace prism;
using prism::testing::change;
using prism::testing::expect_close;
using prism::testing::normal;

namespace {

namespace lin = prism::linear;
using prism::testing::to_bf16;
using prism::testing::widen;


std::vector<float> rounded(const std::vector<float>& v) { return widen(to_bf16(v)); }

// One operand's buffer: a pointer the kernels chose must leave the whole
// matrix inside it.
template <class T>
struct Buffer {
    const T* base;
    size_t size;
};

// The last element of a column-major rows×cols matrix with leading dimension ld.
int64_t extent(int64_t rows, int64_t cols, int64_t ld) { return (rows - 1) + (cols - 1) * ld + 1; }

template <class T>
void expect_inside(const char* what, const T* p, int64_t elements, Buffer<T> buf, int g) {
    const bool inside = p >= buf.base && p + elements <= buf.base + buf.size;
    if (!inside)
        throw std::runtime_error(std::string("batched product ") + std::to_string(g) + ": " + what +
                                 " outside its buffer");
}

// cuBLAS's batched product as linear.cu asks for it, on the host: for each
// g < count, C[g] = op(A[g])·op(B[g]) + C[g] (alpha = beta = 1), column-major,
// op(A) m×k and op(B) k×n; A, B and C of their stored types, accumulated
// in double, C rounded to its type once.
template <class TA, class TB, class TC>
void batched_product(const lin::Product& p, TA* const* A, TB* const* B, TC* const* C, int count, Buffer<TA> a_buf,
                     Buffer<TB> b_buf, Buffer<TC> c_buf) {
    for (int g = 0; g < count; g++) {
        expect_inside("A", (const TA*)A[g], p.trans_a ? extent(p.k, p.m, p.lda) : extent(p.m, p.k, p.lda), a_buf, g);
        expect_inside("B", (const TB*)B[g], p.trans_b ? extent(p.n, p.k, p.ldb) : extent(p.k, p.n, p.ldb), b_buf, g);
        expect_inside("C", (const TC*)C[g], extent(p.m, p.n, p.ldc), c_buf, g);
        for (int64_t j = 0; j < p.n; j++)
            for (int64_t i = 0; i < p.m; i++) {
                double acc = primitives::load_elem(&C[g][i + j * p.ldc]);
                for (int64_t l = 0; l < p.k; l++) {
                    const float a = primitives::load_elem(p.trans_a ? &A[g][l + i * p.lda] : &A[g][i + l * p.lda]);
                    const float b = primitives::load_elem(p.trans_b ? &B[g][j + l * p.ldb] : &B[g][l + j * p.ldb]);
                    acc += (double)a * b;
                }
                primitives::store_elem(&C[g][i + j * p.ldc], (float)acc);
            }
    }
}
template <class T>
Buffer<T> whole(const std::vector<T>& v) {
    return {v.data(), v.size()};
}

// The shape of one expert layer and its inputs: x's patch rows sit in a
// sequence buffer after each image's CLS row (as the model keeps them), so
// the image stride is (1 + nS·N)·in.
struct Layer {
    int B, C, nS, N, in_dim, out_dim;
    std::vector<int> S;
    int64_t image_stride() const { return (1 + (int64_t)nS * N) * in_dim; }
    size_t seq_size() const { return (size_t)B * image_stride(); }
    size_t out_size() const { return (size_t)B * nS * N * out_dim; }
    size_t weight_size() const { return (size_t)C * out_dim * in_dim; }
    int G() const { return B * nS; }
    int64_t per_channel() const { return (int64_t)B * N; }
    std::string name() const {
        std::string s = " B=" + std::to_string(B) + " C=" + std::to_string(C) + " N=" + std::to_string(N) + " " +
                        std::to_string(in_dim) + "->" + std::to_string(out_dim) + " S={";
        for (int i = 0; i < nS; i++) s += (i ? "," : "") + std::to_string(S[i]);
        return s + "}";
    }
};

// ---- linear.cu's expert launchers, rewritten over the emulator -----------------------------
// expert_linear_forward: the bias, then y += x·Wᵀ per group, in fp32.
void forward_fp32(const Layer& L, std::vector<float>& out, const std::vector<float>& seq,
                  const std::vector<float>& W, const std::vector<float>& bias) {
    const int G = L.G();
    emu::launch({lin::element_blocks((int64_t)out.size())}, lin::kElementThreads, 0,
                lin::fill_expert_bias_kernel<float>,
                lin::ExpertBiasParams<float>{out.data(), bias.data(), L.S.data(), L.B, L.nS, L.N, L.out_dim});
    std::vector<float*> ptrs(3 * G, nullptr);
    const float* x = seq.data() + L.in_dim;
    emu::launch({lin::element_blocks(G)}, lin::kElementThreads, 0, lin::group_pointers_kernel<float, float, float>,
                lin::GroupPointersParams<float, float, float>{
                    ptrs.data(), ptrs.data() + G, ptrs.data() + 2 * G, W.data(), (int64_t)L.out_dim * L.in_dim,
                    L.S.data(), x, {L.image_stride(), (int64_t)L.N * L.in_dim}, out.data(),
                    {(int64_t)L.nS * L.N * L.out_dim, (int64_t)L.N * L.out_dim}, L.B, L.nS});
    batched_product(lin::forward_product(L.N, L.in_dim, L.out_dim), ptrs.data(), ptrs.data() + G,
                    ptrs.data() + 2 * G, G, whole(W), whole(seq), whole(out));
}

// expert_linear_backward: dx per group, then the channel-major copies, dW per
// channel and the bias gradient's column sums, in fp32.
void backward_fp32(const Layer& L, std::vector<float>& dseq, std::vector<float>& dW, std::vector<float>& dbias,
                   const std::vector<float>& dout, const std::vector<float>& seq, const std::vector<float>& W) {
    const int G = L.G();
    const int64_t per_expert = (int64_t)L.out_dim * L.in_dim, per_channel = L.per_channel();
    std::vector<float*> ptrs(3 * G, nullptr);
    emu::launch({lin::element_blocks(G)}, lin::kElementThreads, 0, lin::group_pointers_kernel<float, float, float>,
                lin::GroupPointersParams<float, float, float>{
                    ptrs.data(), ptrs.data() + G, ptrs.data() + 2 * G, W.data(), per_expert, L.S.data(), dout.data(),
                    {(int64_t)L.nS * L.N * L.out_dim, (int64_t)L.N * L.out_dim}, dseq.data() + L.in_dim,
                    {L.image_stride(), (int64_t)L.N * L.in_dim}, L.B, L.nS});
    batched_product(lin::dx_product(L.N, L.in_dim, L.out_dim), ptrs.data(), ptrs.data() + G,
                    ptrs.data() + 2 * G, G, whole(W), whole(dout), whole(dseq));

    std::vector<float> xp(L.nS * per_channel * L.in_dim, NAN), gp(L.nS * per_channel * L.out_dim, NAN);
    emu::launch({lin::element_blocks(L.nS * per_channel * (L.in_dim + L.out_dim))}, lin::kElementThreads, 0,
                lin::channel_major_kernel<float, float>,
                lin::ChannelMajorParams<float, float>{xp.data(), gp.data(), seq.data() + L.in_dim, L.image_stride(),
                                                      dout.data(), L.B, L.nS, L.N, L.in_dim, L.out_dim});
    std::vector<float*> wptrs(3 * L.nS, nullptr);
    emu::launch({lin::element_blocks(L.nS)}, lin::kElementThreads, 0, lin::weight_pointers_kernel<float>,
                lin::WeightPointersParams<float>{wptrs.data(), wptrs.data() + L.nS, wptrs.data() + 2 * L.nS,
                                                 dW.data(), xp.data(), gp.data(), L.S.data(), L.nS, per_channel,
                                                 L.in_dim, L.out_dim});
    batched_product(lin::dw_product(per_channel, L.in_dim, L.out_dim), wptrs.data() + L.nS,
                    wptrs.data() + 2 * L.nS, wptrs.data(), L.nS, whole(xp), whole(gp), whole(dW));
    prism::testing::column_sum<float>(L.nS, per_channel, L.out_dim, reduce::RowMajor{gp.data(), per_channel, L.out_dim},
                               reduce::AddTo{dbias.data(), L.out_dim, L.S.data()});
}

// expert_linear_forward_mixed: the patch rows in bf16 (x_bf16's as they are,
// or a compact copy of x's), the used experts in bf16, the bias (rounded for
// a bf16 result), then the products. O: the result's type.
template <class O>
void forward_mixed(const Layer& L, std::vector<O>& out, const std::vector<float>* seq,
                   const std::vector<uint16_t>* seq_bf16, const std::vector<float>& W, const std::vector<float>& bias) {
    const int G = L.G();
    const int64_t per_image = (int64_t)L.nS * L.N * L.in_dim, per_expert = (int64_t)L.out_dim * L.in_dim;
    std::vector<uint16_t> xs;
    const uint16_t* xb;
    int64_t xb_image_stride;
    Buffer<uint16_t> x_buf;
    if (seq_bf16) {
        xb = seq_bf16->data() + L.in_dim;
        xb_image_stride = L.image_stride();
        x_buf = whole(*seq_bf16);
    } else {
        xs.assign(L.B * per_image, 0x7fc0);
        emu::launch({lin::element_blocks(L.B * per_image)}, lin::kElementThreads, 0, lin::patch_rows_bf16_kernel,
                    lin::PatchRowsParams{xs.data(), seq->data() + L.in_dim, L.image_stride(), L.B, per_image});
        xb = xs.data();
        xb_image_stride = per_image;
        x_buf = whole(xs);
    }
    std::vector<uint16_t> wb(L.nS * per_expert, 0x7fc0);
    emu::launch({lin::element_blocks(L.nS * per_expert)}, lin::kElementThreads, 0, lin::used_experts_bf16_kernel,
                lin::UsedExpertsParams{wb.data(), W.data(), L.S.data(), L.nS, per_expert});
    emu::launch({lin::element_blocks((int64_t)out.size())}, lin::kElementThreads, 0, lin::fill_expert_bias_kernel<O>,
                lin::ExpertBiasParams<O>{out.data(), bias.data(), L.S.data(), L.B, L.nS, L.N, L.out_dim});
    std::vector<uint16_t*> w_ptr(G, nullptr), x_ptr(G, nullptr);
    std::vector<O*> y_ptr(G, nullptr);
    emu::launch({lin::element_blocks(G)}, lin::kElementThreads, 0, lin::group_pointers_kernel<uint16_t, uint16_t, O>,
                lin::GroupPointersParams<uint16_t, uint16_t, O>{
                    w_ptr.data(), x_ptr.data(), y_ptr.data(), wb.data(), per_expert, nullptr, xb,
                    {xb_image_stride, (int64_t)L.N * L.in_dim}, out.data(),
                    {(int64_t)L.nS * L.N * L.out_dim, (int64_t)L.N * L.out_dim}, L.B, L.nS});
    batched_product(lin::forward_product(L.N, L.in_dim, L.out_dim), w_ptr.data(), x_ptr.data(), y_ptr.data(),
                    G, whole(wb), x_buf, whole(out));
}

// expert_linear_backward_mixed: channel-major bf16 copies of x (fp32 or the
// stored bf16) and dout, dx per group from them, dW per channel, and the
// bias gradient from the fp32 dout.
template <class X>
void backward_mixed(const Layer& L, std::vector<float>& dseq, std::vector<float>& dW, std::vector<float>& dbias,
                    const std::vector<float>& dout, const std::vector<X>& seq, const std::vector<float>& W) {
    const int G = L.G();
    const int64_t per_expert = (int64_t)L.out_dim * L.in_dim, per_channel = L.per_channel();
    std::vector<uint16_t> xp(L.nS * per_channel * L.in_dim, 0x7fc0), gp(L.nS * per_channel * L.out_dim, 0x7fc0);
    emu::launch({lin::element_blocks(L.nS * per_channel * (L.in_dim + L.out_dim))}, lin::kElementThreads, 0,
                lin::channel_major_kernel<uint16_t, X>,
                lin::ChannelMajorParams<uint16_t, X>{xp.data(), gp.data(), seq.data() + L.in_dim, L.image_stride(),
                                                     dout.data(), L.B, L.nS, L.N, L.in_dim, L.out_dim});
    std::vector<uint16_t> wb(L.nS * per_expert, 0x7fc0);
    emu::launch({lin::element_blocks(L.nS * per_expert)}, lin::kElementThreads, 0, lin::used_experts_bf16_kernel,
                lin::UsedExpertsParams{wb.data(), W.data(), L.S.data(), L.nS, per_expert});
    std::vector<uint16_t*> w_ptr(G, nullptr), g_ptr(G, nullptr);
    std::vector<float*> dx_ptr(G, nullptr);
    emu::launch({lin::element_blocks(G)}, lin::kElementThreads, 0,
                lin::group_pointers_kernel<uint16_t, uint16_t, float>,
                lin::GroupPointersParams<uint16_t, uint16_t, float>{
                    w_ptr.data(), g_ptr.data(), dx_ptr.data(), wb.data(), per_expert, nullptr, gp.data(),
                    {(int64_t)L.N * L.out_dim, per_channel * L.out_dim}, dseq.data() + L.in_dim,
                    {L.image_stride(), (int64_t)L.N * L.in_dim}, L.B, L.nS});
    batched_product(lin::dx_product(L.N, L.in_dim, L.out_dim), w_ptr.data(), g_ptr.data(), dx_ptr.data(), G,
                    whole(wb), whole(gp), whole(dseq));

    std::vector<float*> dw_ptr(L.nS, nullptr);
    std::vector<uint16_t*> xp_ptr(L.nS, nullptr), gp_ptr(L.nS, nullptr);
    emu::launch({lin::element_blocks(L.nS)}, lin::kElementThreads, 0, lin::weight_pointers_kernel<uint16_t>,
                lin::WeightPointersParams<uint16_t>{dw_ptr.data(), xp_ptr.data(), gp_ptr.data(), dW.data(),
                                                    xp.data(), gp.data(), L.S.data(), L.nS, per_channel, L.in_dim,
                                                    L.out_dim});
    batched_product(lin::dw_product(per_channel, L.in_dim, L.out_dim), xp_ptr.data(), gp_ptr.data(),
                    dw_ptr.data(), L.nS, whole(xp), whole(gp), whole(dW));
    prism::testing::column_sum<float>(L.nS, per_channel, L.out_dim, lin::ChannelRows{dout.data(), L.nS, L.N, L.out_dim},
                               reduce::AddTo{dbias.data(), L.out_dim, L.S.data()});
}

// The CPU reference on the patch rows of `seq` (after each CLS row).
void reference_forward(const Layer& L, std::vector<float>& out, const std::vector<float>& seq,
                       const std::vector<float>& W, const std::vector<float>& bias) {
    ops::expert_linear_forward(out.data(), seq.data() + L.in_dim, L.image_stride(), W.data(), bias.data(), L.S.data(),
                               L.B, L.nS, L.N, L.in_dim, L.out_dim);
}
void reference_backward(const Layer& L, std::vector<float>& dseq, std::vector<float>& dW, std::vector<float>& dbias,
                        const std::vector<float>& dout, const std::vector<float>& seq, const std::vector<float>& W) {
    ops::expert_linear_backward(dseq.data() + L.in_dim, dW.data(), dbias.data(), dout.data(), seq.data() + L.in_dim,
                                L.image_stride(), W.data(), L.S.data(), L.B, L.nS, L.N, L.in_dim, L.out_dim);
}

// What an expert backward adds into (dx in the sequence buffer, dW, dbias),
// starting from random values.
struct Gradients {
    std::vector<float> dseq, dW, dbias;
};
Gradients random_gradients(const Layer& L, Rng& rng) {
    Gradients g;
    g.dseq = normal(L.seq_size(), rng);
    g.dW = normal(L.weight_size(), rng);
    g.dbias = normal((size_t)L.C * L.out_dim, rng);
    return g;
}
// What the op added against what the reference added to the same start.
void expect_added(const std::string& op, const std::string& at, const Gradients& got, const Gradients& ref,
                  const Gradients& start) {
    expect_close(op + " dx (CLS rows untouched)" + at, change(got.dseq, start.dseq), change(ref.dseq, start.dseq));
    expect_close(op + " dW (unused experts untouched)" + at, change(got.dW, start.dW), change(ref.dW, start.dW));
    expect_close(op + " dbias" + at, change(got.dbias, start.dbias), change(ref.dbias, start.dbias));
}

// Shapes: a channel subset out of order (HCS's, with unused experts whose
// gradients must stay as they were), every channel, one channel, one patch.
std::vector<Layer> layers() {
    return {{2, 5, 3, 4, 16, 24, {3, 0, 4}},
            {3, 4, 4, 6, 24, 16, {0, 1, 2, 3}},
            {1, 3, 1, 9, 8, 8, {2}},
            {4, 6, 2, 1, 16, 8, {5, 1}}};
}

}  // namespace

TEST(LinearEmulated, ExpertProjectionsInFp32) {
    Rng rng(21);
    for (const Layer& L : layers()) {
        const std::string at = L.name();
        const auto seq = normal(L.seq_size(), rng), W = normal(L.weight_size(), rng, 0.25);
        const auto bias = normal((size_t)L.C * L.out_dim, rng), dout = normal(L.out_size(), rng);

        std::vector<float> ref(L.out_size(), NAN), out(L.out_size(), NAN);
        reference_forward(L, ref, seq, W, bias);
        forward_fp32(L, out, seq, W, bias);
        expect_close("expert forward" + at, out, ref);

        const Gradients start = random_gradients(L, rng);
        Gradients grad_ref = start, got = start;
        reference_backward(L, grad_ref.dseq, grad_ref.dW, grad_ref.dbias, dout, seq, W);
        backward_fp32(L, got.dseq, got.dW, got.dbias, dout, seq, W);
        expect_added("expert", at, got, grad_ref, start);
    }
}

// The bf16 mode: the products read bf16 operands, so the reference reads the
// same operands rounded; sums are fp32 (within 1e-5 of the reference) but
// for a bf16 result, rounded twice (the bias, then the sum).
TEST(LinearEmulated, ExpertProjectionsInTheBf16Mode) {
    Rng rng(22);
    for (const Layer& L : layers()) {
        const std::string at = L.name();
        const auto seq = normal(L.seq_size(), rng), W = normal(L.weight_size(), rng, 0.25);
        const auto bias = normal((size_t)L.C * L.out_dim, rng, 0.5), dout = normal(L.out_size(), rng);
        const auto seq_bf16 = to_bf16(seq);
        const auto seq_r = rounded(seq), W_r = rounded(W), dout_r = rounded(dout);

        std::vector<float> ref(L.out_size(), NAN);
        reference_forward(L, ref, seq_r, W_r, bias);
        std::vector<float> out(L.out_size(), NAN);
        forward_mixed<float>(L, out, &seq, nullptr, W, bias);
        expect_close("bf16 expert forward, fp32 x" + at, out, ref);
        std::vector<float> out_x16(L.out_size(), NAN);
        forward_mixed<float>(L, out_x16, nullptr, &seq_bf16, W, bias);
        expect_close("bf16 expert forward, stored bf16 x" + at, out_x16, ref);
        std::vector<uint16_t> out16(L.out_size(), 0x7fc0);
        forward_mixed<uint16_t>(L, out16, nullptr, &seq_bf16, W, bias);
        expect_close("bf16 expert forward, bf16 result" + at, widen(out16), ref, 5e-3);

        const Gradients start = random_gradients(L, rng);
        // dx and dW from the rounded operands, the bias gradient from fp32 dout
        Gradients grad_ref = start, fp32 = start;
        reference_backward(L, grad_ref.dseq, grad_ref.dW, grad_ref.dbias, dout_r, seq_r, W_r);
        reference_backward(L, fp32.dseq, fp32.dW, fp32.dbias, dout, seq, W);
        grad_ref.dbias = fp32.dbias;
        for (const bool stored_x : {false, true}) {
            Gradients got = start;
            if (stored_x) backward_mixed<uint16_t>(L, got.dseq, got.dW, got.dbias, dout, seq_bf16, W);
            else backward_mixed<float>(L, got.dseq, got.dW, got.dbias, dout, seq, W);
            expect_added("bf16 expert", stored_x ? ", stored bf16 x" + at : ", fp32 x" + at, got, grad_ref, start);
        }
    }
}

// The plain linear's bias fill (cuBLAS's product then adds into it), in fp32
// and rounded to bf16 for a bf16 result; its bias gradient from a gradient
// that exists in bf16 only (the column sums of its rows, widened).
TEST(LinearEmulated, BiasFillAndGradient) {
    Rng rng(23);
    for (const auto& [rows, out_dim] : {std::pair<int64_t, int>{1, 1}, {7, 33}, {300, 64}}) {
        const auto bias = normal(out_dim, rng);
        std::vector<float> out(rows * out_dim, NAN);
        std::vector<uint16_t> out16(rows * out_dim, 0x7fc0);
        const unsigned blocks = lin::element_blocks(rows * out_dim);
        emu::launch({blocks}, lin::kElementThreads, 0, lin::fill_bias_kernel<float>,
                    lin::FillBiasParams<float>{out.data(), bias.data(), rows, out_dim});
        emu::launch({blocks}, lin::kElementThreads, 0, lin::fill_bias_kernel<uint16_t>,
                    lin::FillBiasParams<uint16_t>{out16.data(), bias.data(), rows, out_dim});
        size_t differ = 0, differ16 = 0;
        for (int64_t r = 0; r < rows; r++)
            for (int o = 0; o < out_dim; o++) {
                differ += !(out[r * out_dim + o] == bias[o]);
                differ16 += out16[r * out_dim + o] != bf16_bits(bias[o]);
            }
        std::printf("[ emulated   ] bias fill %lldx%d: %zu fp32 and %zu bf16 elements differ\n", (long long)rows,
                    out_dim, differ, differ16);
        EXPECT_EQ(differ, 0u);
        EXPECT_EQ(differ16, 0u);

        const auto dout16 = to_bf16(normal(rows * out_dim, rng));
        const auto db0 = normal(out_dim, rng);
        std::vector<double> ref(out_dim, 0.0);
        for (int64_t r = 0; r < rows; r++)
            for (int o = 0; o < out_dim; o++) ref[o] += bf16_value(dout16[r * out_dim + o]);
        auto db = db0;
        prism::testing::column_sum<float>(1, rows, out_dim, lin::Bf16RowMajor{dout16.data(), out_dim},
                                          reduce::AddTo{db.data(), out_dim, nullptr});
        expect_close("bias gradient of a bf16 gradient " + std::to_string(rows) + "x" + std::to_string(out_dim),
                     change(db, db0), ref);
    }
}
