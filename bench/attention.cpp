// `prism bench attention`: wall-clock forward + backward of one attention
// sublayer on the CUDA ops, dense (chvit) against channel-MoE (moevit) at
// several k, with the FLOPs of DESIGN.md §5 beside each time, so that the
// measured speedup can be read against the ideal one (the FLOP ratio).
//
// The block runs as the model runs it in one of its two modes (--impl):
// - reference: train.precision = fp32. fp32 products (no TF32), and the
//   fused fp32 attention kernels (kernels/cuda/attention.cu), which keep only
//   each query row's logsumexp.
// - bf16: train.precision = bf16, the default on CUDA. bf16 products with
//   fp32 accumulation, the matrices the model stores in bf16 stored so here
//   (LN1's output; at head dim 64 also qkv and the attention output, and
//   moevit's q, k, v, gathered queries and routed output), and at head dim 64
//   the flash kernels (kernels/cuda/flash_attention.cu: bf16 tensor cores).
//   The router's product stays fp32, as in the model.
//
// The op sequence is engine/model.cpp's block_forward / block_backward for
// the attention branch, through the same op interface (kernels/backend.h),
// from LN1's output to the projection's output and back (the gradient
// buffers the model zeroes are zeroed here too, inside the timed region: the
// engine pays for them). The model object is not used, so no LayerNorm, MLP
// or residual work enters the time.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <memory>

#include "bench/bench.h"
#include "engine/common.h"
#include "engine/flops.h"

#include "kernels/backend.h"

#ifdef PRISM_CUDA
#include "kernels/cuda_ops.h"
#include "kernels/cuda_util.h"
#endif

namespace prism {

std::vector<int> parse_k_list(const std::string& list, int channels) {
    std::vector<int> ks;
    // Split by hand: an empty entry ("1,,2", "1,2,") is an error, not skipped.
    std::vector<std::string> items;
    for (size_t start = 0;;) {
        const size_t comma = list.find(',', start);
        items.push_back(list.substr(start, comma == std::string::npos ? std::string::npos : comma - start));
        if (comma == std::string::npos) break;
        start = comma + 1;
    }
    for (const std::string& item : items) {
        int k = 0;
        if (item == "C" || item == "c") {
            k = channels;
        } else {
            size_t used = 0;
            try {
                k = std::stoi(item, &used);
            } catch (const std::exception&) {
                used = 0;
            }
            if (item.empty() || used != item.size())
                throw UserError("--k " + printable(list) + ": '" + printable(item) +
                                "' is not a number or C");
        }
        if (k < 1 || k > channels)
            throw UserError("--k " + printable(list) + ": k = " + std::to_string(k) + " is outside 1.." +
                            std::to_string(channels) + " (model.channels)");
        if (std::find(ks.begin(), ks.end(), k) == ks.end()) ks.push_back(k);
    }
    if (ks.empty()) throw UserError("--k " + printable(list) + ": no value of k");
    return ks;
}

// Mirrors the buffers bench_attention allocates (floats and ints, 4 bytes
// each), per image: inputs and upstream gradients twice (two sets, rotated),
// every activation backward reads, every gradient, and the largest scratch
// an op takes from the stream-ordered allocator.
double attention_bench_bytes_per_image(const ModelConfig& m, int k) {
    const double C = m.channels, N = m.num_patches(), D = m.dim, Hd = m.heads;
    const double T = C * N;   // patch tokens of one image, |S| = C
    const double L = T + 1;   // with CLS
    double floats = 0;
    if (k == 0) {
        // x, dy (2 sets each), qkv, att, out; datt, dqkv, dx: 14·L·D; lse;
        // attention_backward's row sums (δ)
        floats = 14 * L * D + 2 * L * Hd;
    } else {
        floats = 10 * L * D                 // x, dy (2 sets each); q, att, out; datt, dx, dq
                 + 2 * L * C + 2 * T * C    // z, dz; router probs and their gradient
                 + 5 * T * k + T + C        // experts, weights, dweights, pair/row maps; lse; offsets
                 + 4 * T * D                // k, v, dk, dv
                 + 4 * T * k * D            // qg, og, dqg, dog
                 + T * k * Hd               // routed attention lse
                 + Hd * T                   // CLS probs
                 + 2 * T * D + T * C * Hd;  // scratch: expert_linear_backward, routed row sums (δ)
    }
    return 4 * floats;
}

int default_attention_batch(const ModelConfig& m, const std::vector<int>& ks) {
    double per_image = attention_bench_bytes_per_image(m, 0);
    for (int k : ks) per_image = std::max(per_image, attention_bench_bytes_per_image(m, k));
    const double fit = std::floor(kAttentionBenchBudget / per_image);
    return int(std::max(1.0, std::min(double(kAttentionBenchMaxBatch), fit)));
}

std::string attention_bench_table(const std::vector<AttentionBenchRow>& rows) {
    std::string out;
    char line[256];
    std::snprintf(line, sizeof line, "%-12s %12s %10s %9s %9s %9s %8s\n", "variant", "ms fwd+bwd", "(min)",
                  "TFLOP/s", "speedup", "ideal", "GiB");
    out += line;
    for (const auto& r : rows) {
        const std::string name = r.k ? r.arch + " k=" + std::to_string(r.k) : r.arch;
        std::snprintf(line, sizeof line, "%-12s %12.3f %10.3f %9.2f %8.2fx %8.2fx %8.2f\n", name.c_str(), r.ms,
                      r.ms_min, r.tflops, r.speedup, r.ideal_speedup, r.buffer_gib);
        out += line;
    }
    return out;
}

nlohmann::json attention_bench_json(const AttentionBenchOptions& o, const AttentionBenchRow& r) {
    const ModelConfig& m = o.model;
    return {{"bench", "attention"},
            {"impl", "prism"},
            {"variant", r.arch},
            {"k", r.k ? nlohmann::json(r.k) : nlohmann::json(nullptr)},
            {"batch", r.batch},
            {"ms", r.ms},
            {"ms_min", r.ms_min},
            {"ms_max", r.ms_max},
            {"train_gflop", r.train_gflop},
            {"tflops", r.tflops},
            {"speedup", r.speedup},
            {"ideal_speedup", r.ideal_speedup},
            {"buffer_gib", r.buffer_gib},
            {"precision", o.impl == "bf16" ? "bf16" : "fp32"},
            {"attention_kernels", attention_bench_kernels(o)},
            {"device", r.device},
            {"iters", o.iters},
            {"warmup", o.warmup},
            {"image", m.image},
            {"channels", m.channels},
            {"patch", m.patch},
            {"dim", m.dim},
            {"heads", m.heads},
            {"combine", m.combine}};
}

std::string attention_bench_kernels(const AttentionBenchOptions& o) {
    const bool flash = o.impl == "bf16" && op::attention_reads_bf16(true, o.model.dim, o.model.heads);
    return flash ? "flash" : "reference";
}

#ifndef PRISM_CUDA

bool attention_bench_has_device() { return false; }
std::vector<AttentionBenchRow> bench_attention(const AttentionBenchOptions&, bool) {
    throw UserError("bench attention: this build has no CUDA backend");
}

#else

bool attention_bench_has_device() { return cuda::device_count() > 0; }

namespace {
namespace cu = cuda_ops;

// Hands out pieces of one device allocation, 256-byte aligned. The first pass
// (no base) only measures, the second binds: the buffers are declared once.
class Carver {
public:
    explicit Carver(char* base = nullptr) : base_(base) {}
    template <class T>
    T* take(int64_t n) {
        T* p = base_ ? reinterpret_cast<T*>(base_ + used_) : nullptr;
        used_ += (sizeof(T) * size_t(n) + 255) / 256 * 256;
        return p;
    }
    // A float buffer that starts with random values (inputs, weights, and
    // anything else a kernel might read before writing: nothing starts as 0).
    float* random(int64_t n, float scale) {
        float* p = take<float>(n);
        fills.push_back({p, n, scale});
        return p;
    }
    // A matrix the model keeps in fp32, bf16 or both (op::MatrixIn). `full`
    // starts random like every float buffer; a bf16 one is written by its
    // producing op before anything reads it, but for an input, which starts
    // as the rounding of `full` (both kept) or of random values.
    op::MatrixIn<float> matrix(int64_t n, bool full, bool bf16, float scale, bool input = false) {
        op::MatrixIn<float> m;
        if (full) m.full = random(n, scale);
        if (bf16) m.bf16 = take<uint16_t>(n);
        if (bf16 && input) bf16_fills.push_back({m.bf16, m.full, n, scale});
        return m;
    }
    // A weight: fp32, and in the bf16 mode the bf16 copy the model's products
    // read, rounded from it at the start of every step (run_variant), as the
    // model rounds its parameter block once per forward.
    op::MatrixIn<float> weight(int64_t n, bool bf16, float scale) {
        op::MatrixIn<float> w;
        w.full = random(n, scale);
        if (bf16) {
            w.bf16 = take<uint16_t>(n);
            weight_copies.push_back({w.bf16, w.full, n});
        }
        return w;
    }
    size_t used() const { return used_; }
    struct Fill {
        float* p;
        int64_t n;
        float scale;  // uniform in [-scale, scale)
    };
    std::vector<Fill> fills;
    struct Bf16Fill {
        uint16_t* dst;
        const float* src;  // its values rounded, or (null) random ones
        int64_t n;
        float scale;
    };
    std::vector<Bf16Fill> bf16_fills;  // filled after `fills`
    struct WeightCopy {
        uint16_t* bf16;
        const float* full;
        int64_t n;
    };
    std::vector<WeightCopy> weight_copies;

private:
    char* base_;
    size_t used_ = 0;
};

// Uniform in [-a, a) has standard deviation a/√3.
constexpr float kUnit = 1.7320508f;            // unit variance: LN1's output, the upstream gradient
constexpr float kWeight = 0.02f * 1.7320508f;  // the model's init std, 0.02

struct Shapes {
    int B, C, N, D, Hd, L;
    int64_t rows, tokens;  // B·L sequence rows; B·C·N patch tokens
    bool bf16;             // the bf16 mode (--impl bf16)
    bool attention_bf16;   // and its attention operands in bf16 (head dim 64)
    op::Exec exec(cudaStream_t s) const {
        op::Exec ex;
        ex.cuda = true;
        ex.stream = s;
        ex.bf16_matmul = bf16;
        return ex;
    }
};

// One variant: its buffers, and one forward + backward on input set `set`.
class Variant {
public:
    virtual ~Variant() = default;
    virtual void carve(Carver& c) = 0;
    virtual void step(int set, cudaStream_t s) = 0;
    virtual const float* input_gradient() const = 0;  // dx, checked to be finite
};

class DenseBlock : public Variant {
public:
    explicit DenseBlock(const Shapes& sh) : sh_(sh) {}
    void carve(Carver& c) override {
        const int64_t rows = sh_.rows, D = sh_.D, Hd = sh_.Hd, L = sh_.L, B = sh_.B;
        const bool a16 = sh_.attention_bf16;
        for (int i = 0; i < 2; i++) {
            x_[i] = c.matrix(rows * D, !sh_.bf16, sh_.bf16, kUnit, /*input=*/true);  // LN1's output
            dy_[i] = c.random(rows * D, kUnit);
        }
        w_qkv_ = c.weight(3 * D * D, sh_.bf16, kWeight);
        b_qkv_ = c.weight(3 * D, sh_.bf16, kWeight);
        w_o_ = c.weight(D * D, sh_.bf16, kWeight);
        b_o_ = c.random(D, kWeight);
        g_qkv_ = c.random(3 * D * D, kWeight);
        gb_qkv_ = c.random(3 * D, kWeight);
        g_o_ = c.random(D * D, kWeight);
        gb_o_ = c.random(D, kWeight);
        qkv_ = c.matrix(rows * 3 * D, !a16, a16, kUnit);
        lse_ = c.random(B * Hd * L, kUnit);
        att_ = c.matrix(rows * D, !a16, a16, kUnit);
        out_ = c.random(rows * D, kUnit);
        datt_ = c.random(rows * D, kUnit);
        dqkv_ = c.random(rows * 3 * D, kUnit);
        dx_ = c.random(rows * D, kUnit);
    }
    void step(int set, cudaStream_t s) override {
        const int B = sh_.B, L = sh_.L, D = sh_.D, Hd = sh_.Hd;
        const int64_t rows = sh_.rows;
        const op::Exec ex = sh_.exec(s);
        const op::MatrixIn<float>& x = x_[set];
        // forward: qkv, attention, projection
        op::linear_forward(ex, qkv_, x, w_qkv_, b_qkv_.full, rows, D, 3 * D, b_qkv_.bf16);
        op::attention_forward(ex, att_, lse_, qkv_, B, L, D, Hd);
        op::linear_forward(ex, out_, att_, w_o_, b_o_, rows, D, D);
        // backward as the model does it: the gradients with one writer are written by it
        op::linear_backward(ex, op::overwrite(datt_), g_o_, gb_o_, dy_[set], att_, w_o_, rows, D, D);
        op::attention_backward(ex, op::overwrite(dqkv_), datt_, qkv_, att_, lse_, B, L, D, Hd);
        op::linear_backward(ex, op::overwrite(dx_), g_qkv_, gb_qkv_, dqkv_, x, w_qkv_, rows, D, 3 * D);
    }
    const float* input_gradient() const override { return dx_; }

private:
    Shapes sh_;
    op::MatrixIn<float> x_[2], qkv_, att_, w_qkv_, b_qkv_, w_o_;
    float* dy_[2];
    float *b_o_, *g_qkv_, *gb_qkv_, *g_o_, *gb_o_;
    float *lse_, *out_, *datt_, *dqkv_, *dx_;
};

class MoeBlock : public Variant {
public:
    MoeBlock(const Shapes& sh, const ModelConfig& m, int k) : sh_(sh), k_(k) {
        combine_ = m.combine == "renorm" ? op::Combine::renorm : op::Combine::softmax;
        aux_ = m.aux == "switch" ? op::AuxLoss::switch_
             : m.aux == "importance" ? op::AuxLoss::importance : op::AuxLoss::none;
        aux_coef_ = float(m.aux_coef);
        z_coef_ = float(m.z_loss_coef);
        per_block_ = 1.f / float(std::max(1, m.depth));  // the model's aux losses are means over blocks
    }
    void carve(Carver& c) override {
        const int64_t rows = sh_.rows, T = sh_.tokens, D = sh_.D, C = sh_.C, Hd = sh_.Hd;
        const int64_t B = sh_.B, k = k_;
        const bool a16 = sh_.attention_bf16;
        for (int i = 0; i < 2; i++) {
            // LN1's output: fp32 for the router, and bf16 for the other products in the bf16 mode
            x_[i] = c.matrix(rows * D, true, sh_.bf16, kUnit, /*input=*/true);
            dy_[i] = c.random(rows * D, kUnit);
        }
        w_r_ = c.random(C * D, kWeight);       b_r_ = c.random(C, kWeight);
        w_q_ = c.weight(D * D, sh_.bf16, kWeight);       b_q_ = c.weight(D, sh_.bf16, kWeight);
        w_k_ = c.weight(C * D * D, sh_.bf16, kWeight);   b_k_ = c.random(C * D, kWeight);
        w_v_ = c.weight(C * D * D, sh_.bf16, kWeight);   b_v_ = c.random(C * D, kWeight);
        w_o_ = c.weight(D * D, sh_.bf16, kWeight);       b_o_ = c.random(D, kWeight);
        g_r_ = c.random(C * D, kWeight);       gb_r_ = c.random(C, kWeight);
        g_q_ = c.random(D * D, kWeight);       gb_q_ = c.random(D, kWeight);
        g_k_ = c.random(C * D * D, kWeight);   gb_k_ = c.random(C * D, kWeight);
        g_v_ = c.random(C * D * D, kWeight);   gb_v_ = c.random(C * D, kWeight);
        g_o_ = c.random(D * D, kWeight);       gb_o_ = c.random(D, kWeight);
        z_ = c.random(rows * C, kUnit);
        rprobs_ = c.random(T * C, kUnit);
        weights_ = c.random(T * k, kUnit);
        lse_ = c.random(T, kUnit);
        q_ = c.matrix(rows * D, !a16, a16, kUnit);
        kb_ = c.matrix(T * D, !a16, a16, kUnit);
        vb_ = c.matrix(T * D, !a16, a16, kUnit);
        qg_ = c.matrix(T * k * D, !a16, a16, kUnit);
        og_ = c.matrix(T * k * D, !a16, a16, kUnit);
        route_lse_ = c.random(T * k * Hd, kUnit);
        cls_probs_ = c.random(Hd * T, kUnit);  // [B, Hd, C·N]
        att_ = c.matrix(rows * D, !a16, a16, kUnit);
        out_ = c.random(rows * D, kUnit);
        datt_ = c.random(rows * D, kUnit);
        dx_ = c.random(rows * D, kUnit);
        dq_ = c.random(rows * D, kUnit);
        dk_ = c.random(T * D, kUnit);
        dv_ = c.random(T * D, kUnit);
        dqg_ = c.random(T * k * D, kUnit);
        dog_ = c.matrix(T * k * D, !a16, a16, kUnit);
        dweights_ = c.random(T * k, kUnit);
        drprobs_ = c.random(T * C, kUnit);
        dz_ = c.random(rows * C, kUnit);
        losses_ = c.random(2, kUnit);
        experts_ = c.take<int>(T * k);
        offsets_ = c.take<int>(B * C + 1);
        pair_of_row_ = c.take<int>(T * k);
        row_of_pair_ = c.take<int>(T * k);
        counts_ = c.take<int>(C);
        S_ = c.take<int>(C);
        in_S_ = c.take<uint8_t>(C);
    }
    // All C channels present: S = 0..C-1.
    void upload_channels(cudaStream_t s) {
        std::vector<int> S(sh_.C);
        for (int c = 0; c < sh_.C; c++) S[c] = c;
        std::vector<uint8_t> in_S(sh_.C, 1);
        cuda::copy_to_device(S_, S.data(), sizeof(int) * S.size(), s);
        cuda::copy_to_device(in_S_, in_S.data(), in_S.size(), s);
    }
    void step(int set, cudaStream_t s) override {
        const int B = sh_.B, C = sh_.C, N = sh_.N, D = sh_.D, Hd = sh_.Hd, k = k_;
        const int64_t rows = sh_.rows, T = sh_.tokens, L = sh_.L;
        const op::Exec ex = sh_.exec(s);
        op::Exec ex32 = ex;  // the router's products stay fp32
        ex32.bf16_matmul = false;
        const op::MatrixIn<float>& x = x_[set];  // LN1's output: the row of CLS, then the patch rows
        // ---- forward (block_forward, moevit branch) ----
        op::linear_forward(ex32, z_, x.full, w_r_, b_r_, rows, D, C);
        op::router_forward(ex, rprobs_, experts_, weights_, lse_, z_ + C, L * C, in_S_, S_, B, C, N, C, k, combine_);
        op::moe_dispatch(ex, offsets_, pair_of_row_, row_of_pair_, counts_, experts_, B, C, N, k);
        op::linear_forward(ex, q_, x, w_q_, b_q_.full, rows, D, D, b_q_.bf16);
        op::expert_linear_forward(ex, kb_, x.at(D), L * D, w_k_, b_k_, S_, B, C, N, D, D);
        op::expert_linear_forward(ex, vb_, x.at(D), L * D, w_v_, b_v_, S_, B, C, N, D, D);
        op::moe_gather_forward(ex, qg_, q_.at(D), L * D, pair_of_row_, B, C, N, k, D);
        op::routed_attention_forward(ex, og_, route_lse_, qg_, kb_, vb_, offsets_, B, C, N, k, D, Hd);
        op::combine_forward(ex, att_.at(D), L * D, og_, weights_, row_of_pair_, B, C, N, k, D);
        op::cls_attention_forward(ex, att_, L * D, cls_probs_, q_, L * D, kb_, vb_, B, C * N, D, Hd);
        op::aux_loss_forward_backward<float>(ex, losses_, nullptr, rprobs_, counts_, S_, T, C, C, k, aux_, aux_coef_,
                                             0.f, nullptr);
        op::z_loss_forward_backward<float>(ex, losses_ + 1, nullptr, 0, rprobs_, lse_, B, C, N, C, z_coef_, 0.f);
        op::linear_forward(ex, out_, att_, w_o_, b_o_, rows, D, D);
        // ---- backward (block_backward, moevit branch) ----
        op::linear_backward(ex, op::overwrite(datt_), g_o_, gb_o_, dy_[set], att_, w_o_, rows, D, D);
        op::zero(ex, dx_, rows * D);
        op::zero(ex, dq_, rows * D);
        op::zero(ex, dk_, T * D);
        op::zero(ex, dv_, T * D);
        op::zero(ex, dweights_, T * k);
        op::zero(ex, drprobs_, T * C);
        op::zero(ex, dz_, rows * C);
        op::cls_attention_backward(ex, dq_, L * D, dk_, dv_, datt_, L * D, q_, L * D, kb_, vb_, cls_probs_, B, C * N,
                                   D, Hd);
        op::combine_backward(ex, op::overwrite(dog_), dweights_, datt_ + D, L * D, og_, weights_, row_of_pair_, B, C,
                             N, k, D);
        op::routed_attention_backward(ex, op::overwrite(dqg_), dk_, dv_, dog_, qg_, kb_, vb_, og_, route_lse_,
                                      offsets_, B, C, N, k, D, Hd);
        op::moe_gather_backward(ex, dq_ + D, L * D, dqg_, row_of_pair_, B, C, N, k, D);
        op::expert_linear_backward(ex, dx_ + D, g_k_, gb_k_, dk_, x.at(D), L * D, w_k_, S_, B, C, N, D, D);
        op::expert_linear_backward(ex, dx_ + D, g_v_, gb_v_, dv_, x.at(D), L * D, w_v_, S_, B, C, N, D, D);
        op::linear_backward(ex, dx_, g_q_, gb_q_, dq_, x, w_q_, rows, D, D);
        op::aux_loss_forward_backward(ex, losses_, drprobs_, rprobs_, counts_, S_, T, C, C, k, aux_, aux_coef_,
                                      per_block_, nullptr);
        op::z_loss_forward_backward(ex, losses_ + 1, dz_ + C, L * C, rprobs_, lse_, B, C, N, C, z_coef_, per_block_);
        op::router_backward(ex, dz_ + C, L * C, rprobs_, experts_, weights_, dweights_, drprobs_, S_, B, C, N, C, k,
                            combine_);
        op::linear_backward(ex32, dx_, g_r_, gb_r_, dz_, x.full, w_r_, rows, D, C);
    }
    const float* input_gradient() const override { return dx_; }

private:
    Shapes sh_;
    int k_;
    op::Combine combine_;
    op::AuxLoss aux_;
    float aux_coef_, z_coef_, per_block_;
    op::MatrixIn<float> x_[2], q_, kb_, vb_, qg_, og_, att_, dog_, w_q_, b_q_, w_k_, w_v_, w_o_;
    float* dy_[2];
    float *w_r_, *b_r_, *b_k_, *b_v_, *b_o_;
    float *g_r_, *gb_r_, *g_q_, *gb_q_, *g_k_, *gb_k_, *g_v_, *gb_v_, *g_o_, *gb_o_;
    float *z_, *rprobs_, *weights_, *lse_, *route_lse_, *cls_probs_;
    float *out_, *datt_, *dx_, *dq_, *dk_, *dv_, *dqg_, *dweights_, *drprobs_, *dz_;
    float* losses_;
    int *experts_, *offsets_, *pair_of_row_, *row_of_pair_, *counts_, *S_;
    uint8_t* in_S_;
};

// Allocates the variant's buffers, fills them, and times warm-up + timed
// iterations on one stream, an event pair around each timed one. Fills in
// the times and the buffer size of `row`.
void run_variant(Variant& v, MoeBlock* moe, const AttentionBenchOptions& o, uint64_t seed,
                 const cuda::Stream& stream, AttentionBenchRow& row) {
    cudaStream_t s = stream.get();
    Carver measure;
    v.carve(measure);
    cuda::DeviceMemory mem(measure.used());
    Carver bind(mem.as<char>());
    v.carve(bind);
    for (size_t i = 0; i < bind.fills.size(); i++) {
        const auto& f = bind.fills[i];
        cuda::fill_uniform(f.p, f.n, -f.scale, f.scale, seed * 1000003u + i, s);
    }
    // bf16 inputs: rounded from their fp32 copy, or from random values in
    // scratch outside the variant's buffers
    for (size_t i = 0; i < bind.bf16_fills.size(); i++) {
        const auto& f = bind.bf16_fills[i];
        cuda::DeviceMemory scratch(f.src ? 0 : sizeof(float) * size_t(f.n));
        if (!f.src)
            cuda::fill_uniform(scratch.as<float>(), f.n, -f.scale, f.scale, seed * 1000003u + bind.fills.size() + i, s);
        cu::to_bf16(f.dst, f.src ? f.src : scratch.as<float>(), f.n, s);
        stream.synchronize();  // before the scratch goes
    }
    if (moe) moe->upload_channels(s);
    row.buffer_gib = double(measure.used()) / double(1u << 30);

    // A step rounds the bf16 weight copies first (inside the timed region).
    auto step = [&](int set) {
        for (const auto& w : bind.weight_copies) cu::to_bf16(w.bf16, w.full, w.n, s);
        v.step(set, s);
    };
    for (int i = 0; i < o.warmup; i++) step(i % 2);
    std::unique_ptr<cuda::Event[]> start(new cuda::Event[o.iters]), stop(new cuda::Event[o.iters]);
    for (int i = 0; i < o.iters; i++) {
        start[i].record(s);
        step((o.warmup + i) % 2);  // the two input sets alternate
        stop[i].record(s);
    }
    // The input gradient, reduced on the device: a NaN or Inf means a kernel
    // misbehaved, and then the time means nothing.
    cuda::DeviceMemory sq(sizeof(double));
    const int64_t dx_count = int64_t(row.batch) * (1 + int64_t(o.model.channels) * o.model.num_patches()) *
                             o.model.dim;
    cu::sum_squares(sq.as<double>(), v.input_gradient(), dx_count, s);
    stream.synchronize();  // reports any error of the queued kernels
    double dx2 = 0;
    cuda::copy_to_host(&dx2, sq.as<double>(), sizeof dx2, s);
    if (!std::isfinite(dx2) || dx2 == 0)
        throw std::runtime_error("the input gradient is " + std::string(dx2 == 0 ? "all zero" : "not finite") +
                                 ": a kernel is broken, the time is not reported");

    std::vector<double> ms(o.iters);
    for (int i = 0; i < o.iters; i++) ms[i] = stop[i].ms_since(start[i]);
    row.ms = median(ms);
    row.ms_min = *std::min_element(ms.begin(), ms.end());
    row.ms_max = *std::max_element(ms.begin(), ms.end());
}

std::string shape_line(const AttentionBenchOptions& o, int batch, const std::string& device) {
    const ModelConfig& m = o.model;
    char buf[512];
    std::snprintf(buf, sizeof buf,
                  "bench attention: %s, %s, %s attention kernels; image %d, C=%d, P=%d: N=%d, "
                  "dense sequence %d; D=%d, %d heads; |S|=C; batch %d; %d warm-up + %d timed iterations (median)",
                  device.c_str(),
                  o.impl == "bf16" ? "the bf16 mode (bf16 products and storage)" : "fp32 (no TF32)",
                  attention_bench_kernels(o) == "flash" ? "flash (bf16 tensor cores)" : "reference (fused fp32)", m.image,
                  m.channels, m.patch, m.num_patches(), 1 + m.channels * m.num_patches(), m.dim, m.heads, batch,
                  o.warmup, o.iters);
    return buf;
}

}  // namespace

std::vector<AttentionBenchRow> bench_attention(const AttentionBenchOptions& o, bool verbose) {
    if (o.iters < 1) throw UserError("bench attention: --iters must be at least 1");
    if (o.warmup < 0) throw UserError("bench attention: --warmup must be at least 0");
    if (o.ks.empty()) throw UserError("bench attention: no value of k");
    if (o.impl != "reference" && o.impl != "bf16")
        throw UserError("bench attention: --impl " + printable(o.impl) + ": expected reference or bf16");
    if (!attention_bench_has_device()) throw UserError("bench attention: no CUDA device");
    if (!cu::has_cublas()) throw UserError("bench attention: this build has no cuBLAS (the linear ops need it)");
    cuda::set_device(0);
    cuda::keep_pool_memory();
    const ModelConfig& m = o.model;
    const int batch = o.batch > 0 ? o.batch : default_attention_batch(m, o.ks);
    const std::string device = cuda::device_name(0);
    if (verbose) std::fprintf(stderr, "%s\n", shape_line(o, batch, device).c_str());

    Shapes sh;
    sh.B = batch;
    sh.C = m.channels;
    sh.N = m.num_patches();
    sh.D = m.dim;
    sh.Hd = m.heads;
    sh.L = 1 + sh.C * sh.N;
    sh.rows = int64_t(sh.B) * sh.L;
    sh.tokens = int64_t(sh.B) * sh.C * sh.N;
    sh.bf16 = o.impl == "bf16";
    sh.attention_bf16 = op::attention_reads_bf16(sh.bf16, sh.D, sh.Hd);

    ModelConfig dense_cfg = m;
    dense_cfg.arch = "chvit";
    const double dense_flops = attention_flops(dense_cfg);

    cuda::Stream stream;
    std::vector<AttentionBenchRow> rows;
    std::vector<int> variants = {0};  // 0: the dense block
    variants.insert(variants.end(), o.ks.begin(), o.ks.end());
    for (int k : variants) {
        AttentionBenchRow row;
        row.arch = k ? "moevit" : "chvit";
        row.k = k;
        row.batch = batch;
        row.device = device;
        ModelConfig cfg = m;
        cfg.arch = row.arch;
        cfg.top_k = k ? k : cfg.top_k;
        const double flops = attention_flops(cfg);
        // backward: two matmuls (dX, dW) per forward one
        row.train_gflop = 3 * flops * batch / 1e9;
        row.ideal_speedup = dense_flops / flops;
        const std::string name = k ? "moevit k=" + std::to_string(k) : "chvit";
        try {
            if (k == 0) {
                DenseBlock v(sh);
                run_variant(v, nullptr, o, o.seed, stream, row);
            } else {
                MoeBlock v(sh, m, k);
                run_variant(v, &v, o, o.seed, stream, row);
            }
        } catch (const UserError&) {
            throw;
        } catch (const std::runtime_error& e) {  // say which variant, and what to try on a full device
            const std::string what = e.what();
            const bool oom = what.find("out of memory") != std::string::npos;
            throw std::runtime_error(name + ", batch " + std::to_string(batch) + ": " + what +
                                     (oom ? " (try a smaller --batch)" : ""));
        }
        row.tflops = row.train_gflop / row.ms;  // GFLOP per ms = TFLOP/s
        row.speedup = rows.empty() ? 1.0 : rows.front().ms / row.ms;
        if (verbose)
            std::fprintf(stderr, "bench attention: %s: %.3f ms, %.2f TFLOP/s, %.2f GiB of buffers\n", name.c_str(),
                         row.ms, row.tflops, row.buffer_gib);
        rows.push_back(row);
    }
    return rows;
}

#endif  // PRISM_CUDA

}  // namespace prism
