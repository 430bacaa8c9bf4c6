// The deterministic reductions (kernels/cuda/reduce.cuh), the LayerNorm kernels
// (layernorm.cuh) and the cross-entropy kernels (loss.cuh) run on the CPU
// through tests/emulator.h, with the launch geometry their launchers
// give them (common.cuh's column_sum_as and device_sum are mirrored in
// tests/reduce_emulated.h), against the CPU reference ops in double:
// relative L2 error within DESIGN.md §7's fp32 tolerance (1e-5); the
// reductions also bit for bit against a host model of their documented order,
// which is what makes them deterministic. Shapes cross the boundaries: rows
// not a multiple of a block's 8 warps, D below and above 32 lanes, several
// row chunks and column tiles, more than 1024 chunks' worth of rows, argmax
// ties. Outputs start as NaN, so an element left unwritten fails.
// CudaOps.LayerNorm*, .CrossEntropy and the training steps check the compiled
// kernels on a GPU.
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "engine/rng.h"
#include "kernels/ops.h"
#include "tests/bf16_host.h"
#include "tests/emulated_testutil.h"
// last: the emulator defines threadIdx and friends as macros
#include "tests/emulator.h"
#include "kernels/cuda/adamw.cuh"
#include "kernels/cuda/layernorm.cuh"
#include "kernels/cuda/loss.cuh"
#include "kernels/cuda/reduce.cuh"
#include "tests/reduce_emulated.h"

using namespace prism;
namespace rd = prism::reduce;
namespace ln = prism::layernorm;
namespace ce = prism::cross_entropy;
using prism::testing::expect_close;
using prism::testing::normal;
using prism::testing::column_sum;
using prism::testing::device_sum;

namespace {

std::vector<double> wide(const std::vector<float>& v) { return {v.begin(), v.end()}; }

// The documented order of the column sums, on the host: chunks of
// column_chunk_rows rows, in each 8 strided partial sums added in order, then
// the chunks in order.
template <class Acc, class Term>
Acc column_sum_model(int z, int64_t rows, int c, Term term) {
    const int64_t chunk = rd::column_chunk_rows(rows);
    Acc total = 0;
    for (int64_t r0 = 0; r0 < rows; r0 += chunk) {
        const int64_t r1 = std::min(r0 + chunk, rows);
        Acc s = 0;
        for (int y = 0; y < rd::kColRows; y++) {
            Acc acc = 0;
            for (int64_t r = r0 + y; r < r1; r += rd::kColRows) acc += (Acc)term(z, r, c);
            s += acc;
        }
        total += s;
    }
    return total;
}
// A block's tree sum of 256 thread partials, on the host.
double tree_model(std::vector<double> v) {
    for (size_t o = v.size() / 2; o > 0; o >>= 1)
        for (size_t t = 0; t < o; t++) v[t] += v[t + o];
    return v[0];
}
template <class Term>
double device_sum_model(int64_t n, Term term) {
    std::vector<double> parts;
    for (int64_t i0 = 0; i0 < n; i0 += rd::kSumChunk) {
        std::vector<double> acc(rd::kSumThreads, 0.0);
        for (int64_t i = i0; i < std::min(i0 + rd::kSumChunk, n); i++) acc[(i - i0) % rd::kSumThreads] += term(i);
        parts.push_back(tree_model(acc));
    }
    std::vector<double> acc(rd::kSumThreads, 0.0);
    for (size_t i = 0; i < parts.size(); i++) acc[i % rd::kSumThreads] += parts[i];
    return tree_model(acc);
}

struct DoubleTerm {  // an Acc = double term, as the load-balance statistics' probabilities
    const float* x;
    int64_t rows;
    int cols;
    double operator()(int z, int64_t r, int c) const { return double(x[((int64_t)z * rows + r) * cols + c]) * 0.5; }
};
struct StoreAcc {
    double* dst;
    int cols;
    void operator()(int z, int c, double v) const { dst[(int64_t)z * cols + c] = v; }
};

}  // namespace

TEST(ReduceEmulated, ColumnSumsAreTheirDocumentedOrder) {
    Rng rng(5);
    // batches, rows, cols: one element; two chunks and a partial column tile;
    // several batches; no rows; more rows than 1024 chunks of 256 hold
    const int64_t cases[][3] = {{1, 1, 1}, {1, 300, 40}, {3, 257, 33}, {2, 0, 5}, {1, 1024 * 256 + 77, 1}};
    for (const auto& cs : cases) {
        const int batches = (int)cs[0], cols = (int)cs[2];
        const int64_t rows = cs[1];
        const std::string what = "batches=" + std::to_string(batches) + " rows=" + std::to_string(rows) +
                                 " cols=" + std::to_string(cols);
        const auto x = normal((size_t)batches * rows * cols, rng);
        const rd::RowMajor term{x.data(), rows, cols};
        // AddTo through a row map (the expert biases: batch z adds into row[z])
        std::vector<int> row(batches);
        for (int z = 0; z < batches; z++) row[z] = batches - 1 - z;
        const auto start = normal((size_t)batches * cols, rng);
        auto got = start;
        column_sum<float>(batches, rows, cols, term, rd::AddTo{got.data(), cols, row.data()});
        std::vector<float> model = start;
        std::vector<double> exact(start.size());
        for (int z = 0; z < batches; z++)
            for (int c = 0; c < cols; c++) {
                model[(size_t)row[z] * cols + c] += column_sum_model<float>(z, rows, c, term);
                double s = 0;
                for (int64_t r = 0; r < rows; r++) s += term(z, r, c);
                exact[(size_t)row[z] * cols + c] = start[(size_t)row[z] * cols + c] + s;
            }
        EXPECT_EQ(got, model) << what << ": not the documented order";
        expect_close(what + " float column sums", got, exact);

        std::vector<double> got_d((size_t)batches * cols, NAN);
        column_sum<double>(batches, rows, cols, DoubleTerm{x.data(), rows, cols}, StoreAcc{got_d.data(), cols});
        size_t differ = 0;
        for (int z = 0; z < batches; z++)
            for (int c = 0; c < cols; c++)
                differ += got_d[(size_t)z * cols + c] !=
                          column_sum_model<double>(z, rows, c, DoubleTerm{x.data(), rows, cols});
        EXPECT_EQ(differ, 0u) << what << ": double sums not in the documented order";
    }
}

TEST(ReduceEmulated, DeviceSumIsItsDocumentedOrder) {
    Rng rng(6);
    for (int64_t n : {int64_t(0), int64_t(1), int64_t(8191), int64_t(8192), int64_t(8193), int64_t(3 * 8192 + 5),
                      int64_t(300000)}) {
        const auto x = normal(n, rng);
        double got = NAN;
        device_sum(n, adamw::Square{x.data()}, adamw::StoreDouble{&got});
        EXPECT_EQ(got, device_sum_model(n, adamw::Square{x.data()})) << "n=" << n << ": not the documented order";
        long double exact = 0;
        for (float v : x) exact += (long double)v * v;
        std::printf("[ emulated   ] %-56s rel %.3g\n", ("sum of squares n=" + std::to_string(n)).c_str(),
                    n ? double(std::fabs((long double)got - exact) / exact) : 0.0);
        EXPECT_NEAR(got, (double)exact, 1e-12 * (double)exact + 1e-300) << "n=" << n;
    }
}

TEST(LayerNormEmulated, ForwardResidualAndBackward) {
    Rng rng(7);
    // B, rows per image, D: D of 8 (lanes idle), 40 (a lane's second element), 96
    const int cases[][3] = {{1, 13, 8}, {2, 7, 40}, {3, 5, 96}};
    for (const auto& cs : cases) {
        const int B = cs[0], R = cs[1], D = cs[2];
        const int64_t rows = (int64_t)B * R, n = rows * D;
        const std::string what = "rows=" + std::to_string(rows) + " D=" + std::to_string(D);
        const auto x = normal(n, rng, 2.0, 100.0);  // a large mean: the two-pass variance matters
        const auto branch = normal(n, rng), w = normal(D, rng, 0.5, 1.0), b = normal(D, rng, 0.1);
        std::vector<float> scale(B);
        for (int i = 0; i < B; i++) scale[i] = i == 0 ? 0.f : 1.25f;  // a dropped image, a kept one

        // plain forward, fp32 and bf16 outputs
        std::vector<double> r_out(n), r_mean(rows), r_rstd(rows);
        const auto xd = wide(x), wd = wide(w), bd = wide(b);
        ops::layernorm_forward(r_out.data(), r_mean.data(), r_rstd.data(), xd.data(), wd.data(), bd.data(), rows, D);
        std::vector<float> out(n, NAN), mean(rows, NAN), rstd(rows, NAN);
        std::vector<uint16_t> out16(n, 0xFFFF);
        ln::ForwardParams p{out.data(), out16.data(), mean.data(), rstd.data(), x.data(), w.data(), b.data(),
                            nullptr, nullptr, nullptr, rows, rows, D};
        emu::launch({ln::row_blocks(rows)}, ln::kThreads, 0, ln::forward_kernel, p);
        expect_close(what + " out", out, r_out);
        expect_close(what + " mean", mean, r_mean);
        expect_close(what + " rstd", rstd, r_rstd);
        size_t not_rounding = 0;
        for (int64_t i = 0; i < n; i++) not_rounding += out16[i] != bf16_bits(out[i]);
        EXPECT_EQ(not_rounding, 0u) << what << ": the bf16 output is not the rounding of the fp32 one";

        // the residual add in the same pass: the sum bit for bit as the CPU's float residual
        std::vector<float> r_sum(n);
        ops::residual_forward(r_sum.data(), x.data(), branch.data(), scale.data(), B, (int64_t)R * D);
        std::vector<double> r_out2(n), r_mean2(rows), r_rstd2(rows);
        const auto sumd = wide(r_sum);
        ops::layernorm_forward(r_out2.data(), r_mean2.data(), r_rstd2.data(), sumd.data(), wd.data(), bd.data(),
                               rows, D);
        std::vector<float> sum(n, NAN), out2(n, NAN), mean2(rows, NAN), rstd2(rows, NAN);
        ln::ForwardParams pr{out2.data(), nullptr, mean2.data(), rstd2.data(), x.data(), w.data(), b.data(),
                             sum.data(), branch.data(), scale.data(), rows, R, D};
        emu::launch({ln::row_blocks(rows)}, ln::kThreads, 0, ln::forward_kernel, pr);
        EXPECT_EQ(sum, r_sum) << what << ": the residual sum";
        expect_close(what + " residual+LN out", out2, r_out2);
        expect_close(what + " residual+LN rstd", rstd2, r_rstd2);

        // backward, from the kernel's own statistics, into nonzero gradients
        const auto dout = normal(n, rng), dx0 = normal(n, rng), dw0 = normal(D, rng), db0 = normal(D, rng);
        auto r_dx = wide(dx0), r_dw = wide(dw0), r_db = wide(db0);
        const auto doutd = wide(dout), meand = wide(mean), rstdd = wide(rstd);
        ops::layernorm_backward(r_dx.data(), r_dw.data(), r_db.data(), doutd.data(), xd.data(), wd.data(),
                                meand.data(), rstdd.data(), rows, D);
        auto dx = dx0, dw = dw0, db = db0;
        emu::launch({ln::row_blocks(rows)}, ln::kThreads, 0, ln::dx_kernel,
                    ln::BackwardParams{dx.data(), dout.data(), x.data(), w.data(), mean.data(), rstd.data(), rows, D});
        column_sum<float>(1, rows, D, ln::DwTerm{dout.data(), x.data(), mean.data(), rstd.data(), D},
                          rd::AddTo{dw.data(), D, nullptr});
        column_sum<float>(1, rows, D, rd::RowMajor{dout.data(), rows, D}, rd::AddTo{db.data(), D, nullptr});
        expect_close(what + " dx", dx, r_dx);
        expect_close(what + " dw", dw, r_dw);
        expect_close(what + " db", db, r_db);
    }
}

TEST(CrossEntropyEmulated, ForwardAndBackward) {
    Rng rng(8);
    for (int K : {10, 33, 70}) {  // one class per lane or fewer, a lane's second and third class
        const int B = 13;
        const std::string what = "B=13 K=" + std::to_string(K);
        auto logits = normal((size_t)B * K, rng, 2.0);
        // ties for the argmax: a row whose two largest logits are equal, in
        // different lanes, and one whose maximum repeats in the same lane
        float& a = logits[0 * K + 3];
        a = 50.f, logits[0 * K + 7] = 50.f;
        logits[1 * K + K - 1] = 60.f, logits[1 * K + 0] = 60.f;
        std::vector<int32_t> labels(B);
        for (int i = 0; i < B; i++) labels[i] = (int32_t)rng.below(K);
        labels[0] = 3, labels[1] = K - 1;  // a hit, and a miss: the tie goes to class 0

        std::vector<double> r_probs((size_t)B * K);
        int r_correct = -1;
        const auto ld = wide(logits);
        const double r_loss =
            ops::cross_entropy_forward(r_probs.data(), ld.data(), labels.data(), B, K, &r_correct);
        std::vector<float> probs((size_t)B * K, NAN), row_loss(B, NAN);
        std::vector<int> hit(B, -7);
        emu::launch({ce::row_blocks(B)}, ce::kRowThreads, 0, ce::rows_kernel,
                    ce::RowsParams{probs.data(), row_loss.data(), hit.data(), logits.data(), labels.data(), B, K});
        float loss = NAN;
        int correct = -7;
        emu::launch({1}, 32, 0, ce::total_kernel, ce::TotalParams{&loss, &correct, row_loss.data(), hit.data(), B});
        expect_close(what + " probs", probs, r_probs);
        expect_close(what + " loss", std::vector<float>{loss}, std::vector<double>{r_loss});
        EXPECT_EQ(correct, r_correct) << what;
        EXPECT_EQ(hit[0], 1) << what << ": tie across lanes";
        EXPECT_EQ(hit[1], 0) << what << ": tie goes to the lower class";

        // backward from the same probabilities: the CPU's float arithmetic, bit for bit
        const auto start = normal(probs.size(), rng);
        auto r_dlogits = start, dlogits = start;
        ops::cross_entropy_backward(r_dlogits.data(), probs.data(), labels.data(), B, K, 0.75f);
        emu::launch({ce::element_blocks((int64_t)B * K)}, ce::kElementThreads, 0, ce::backward_kernel,
                    ce::BackwardParams{dlogits.data(), probs.data(), labels.data(), B, K, 0.75f});
        EXPECT_EQ(dlogits, r_dlogits) << what << ": dlogits";
    }
}
