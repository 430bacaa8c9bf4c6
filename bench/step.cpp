// `prism bench step`: whole training steps (upload of the batch and, for
// stored pixels, the input step; forward, backward, AdamW) per second for one
// config, on random images with all channels present, and the model FLOP
// rate against the device's measured GEMM peaks.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <vector>

#include "bench/bench.h"
#include "bench/step.h"
#include "data/loader.h"
#include "data/shard.h"
#include "engine/common.h"
#include "engine/device.h"
#include "engine/flops.h"
#include "engine/model.h"
#include "engine/optimizer.h"
#include "engine/rng.h"
#ifdef PRISM_CUDA
#include "kernels/cuda_ops.h"
#include "kernels/cuda_util.h"
#endif

namespace prism {

namespace {
using Clock = std::chrono::steady_clock;
double since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

#ifdef PRISM_CUDA
// One n×n×n matrix product through the same cuBLAS paths the engine uses
// (fp32 without TF32, and bf16 through cuBLASLt), timed over `reps` after a
// warm-up, on random data. Returns FLOP/s.
struct GemmPeaks {
    double fp32 = 0, bf16 = 0;
};
GemmPeaks measure_gemm_peaks(int n, int reps) {
    const op::Exec ex{true, cuda::stream_create()};
    const size_t elems = size_t(n) * n;
    float* a = static_cast<float*>(cuda::device_alloc(elems * 4, "GEMM peak A"));
    float* b = static_cast<float*>(cuda::device_alloc(elems * 4, "GEMM peak B"));
    float* c = static_cast<float*>(cuda::device_alloc(elems * 4, "GEMM peak C"));
    uint16_t* a16 = static_cast<uint16_t*>(cuda::device_alloc(elems * 2, "GEMM peak A bf16"));
    uint16_t* b16 = static_cast<uint16_t*>(cuda::device_alloc(elems * 2, "GEMM peak B bf16"));
    uint16_t* c16 = static_cast<uint16_t*>(cuda::device_alloc(elems * 2, "GEMM peak C bf16"));
    // Filled on the device: 64 Mi normals drawn on the host took seconds.
    cuda::fill_uniform(a, int64_t(elems), -1.f, 1.f, 1, ex.stream);
    cuda::fill_uniform(b, int64_t(elems), -1.f, 1.f, 2, ex.stream);
    cuda_ops::to_bf16(a16, a, int64_t(elems), ex.stream);
    cuda_ops::to_bf16(b16, b, int64_t(elems), ex.stream);
    auto time = [&](auto&& gemm) {
        gemm();
        op::sync(ex);
        const auto t = Clock::now();
        for (int i = 0; i < reps; i++) gemm();
        op::sync(ex);
        return 2.0 * n * double(n) * n * reps / since(t);
    };
    GemmPeaks p;
    p.fp32 = time([&] { cuda_ops::linear_forward(c, a, b, nullptr, n, n, n, ex.stream); });
    p.bf16 = time([&] { cuda_ops::linear_forward_bf16(c16, a16, b16, nullptr, n, n, n, ex.stream); });
    for (void* m : {(void*)a, (void*)b, (void*)c, (void*)a16, (void*)b16, (void*)c16}) cuda::device_free(m);
    cuda::stream_destroy(ex.stream);
    return p;
}
#endif
}  // namespace

StepBenchResult bench_step(const Config& cfg, const StepBenchOptions& o, bool verbose) {
    if (o.iters < 1 || o.warmup < 0) throw UserError("bench step: --iters must be >= 1 and --warmup >= 0");
    if (o.batch < 0)
        throw UserError("bench step: --batch " + std::to_string(o.batch) + " must be >= 0 (0: train.batch)");
    // "float", else a shard pixel type: parsed before any work, so a bad one fails at once.
    const bool stored_pixels = o.pixels != "float";
    const DType dtype = stored_pixels ? dtype_from_name(o.pixels, "prism bench step --pixels (or float)") : DType::f32;
    const ModelConfig& m = cfg.model;
    StepBenchResult r;
    r.device = o.device;
    r.pixels = o.pixels;
    r.batch = o.batch > 0 ? o.batch : cfg.train.batch;
    const int B = r.batch, C = m.channels, HW = m.image * m.image;

    // Destroyed after the model, whose teardown synchronizes the device: an
    // upload from it may still be in flight when a step throws.
    HostBuffer stored;
    Model<float> model(m, B, verbose, o.device, bf16_mode(cfg.train.precision, o.device));
    r.bf16_matmul = model.bf16_matmul();
    model.init_weights(cfg.train.seed);
    AdamW<float> opt(cfg.train, model.param_elems(), verbose, o.device);
    // Random images (never zeros: they can run faster than real data) and
    // labels. Stored pixels sit in pinned memory, as the loader keeps them.
    const size_t pixels = size_t(B) * C * HW;
    std::vector<float> images;
    std::vector<float> mean(size_t(B) * C, 100.f), inv_std(size_t(B) * C, 1.f / 50.f);
    std::vector<int32_t> labels(B);
    Rng rng(cfg.train.seed, 3);
    for (auto& y : labels) y = int32_t(rng.below(m.num_classes));
    std::vector<int> all(C);
    for (int c = 0; c < C; c++) all[c] = c;
    Batch batch{nullptr, labels.data(), B, all};
    if (!stored_pixels) {
        images.resize(pixels);
        for (auto& x : images) x = float(rng.normal());
        batch.images = images.data();
    } else {
        stored = HostBuffer(pixels * dtype_size(dtype), /*pinned=*/true);
        for (size_t i = 0; i < pixels; i++) {
            const double v = 100.0 + 50.0 * rng.normal();
            const double clamped = std::clamp(v, 0.0, 255.0);
            switch (dtype) {
                case DType::u8: static_cast<uint8_t*>(stored.data())[i] = uint8_t(clamped); break;
                case DType::u16: static_cast<uint16_t*>(stored.data())[i] = uint16_t(clamped); break;
                case DType::f16: static_cast<uint16_t*>(stored.data())[i] = float_to_half(float(v)); break;
                case DType::f32: static_cast<float*>(stored.data())[i] = float(v); break;
            }
        }
        batch.stored = {stored.data(), pixel_of(dtype), mean.data(), inv_std.data(), nullptr};
    }

    std::vector<double> times;
    for (int i = 0; i < o.warmup + o.iters; i++) {
        const auto t = Clock::now();
        model.forward(batch, true, uint64_t(i));
        model.backward();
        opt.step(model, cfg.train.lr);
        op::sync(model.exec());
        if (i >= o.warmup) times.push_back(since(t));
        if (verbose) progress("bench step: " + std::to_string(i + 1) + "/" + std::to_string(o.warmup + o.iters));
    }
    r.step_ms = 1e3 * median(times);
    r.images_per_s = B / (r.step_ms / 1e3);
    r.train_gflops_per_image = count_flops(m).train_step_gflops_per_image;
    r.tflops = r.images_per_s * r.train_gflops_per_image / 1e3;
#ifdef PRISM_CUDA
    if (o.device == Device::cuda) {
        r.gpu = cuda::device_name(0);
        cuda::release_pool_memory();  // the steps' scratch, before the peak's 1.1 GiB of cudaMalloc
        const GemmPeaks p = measure_gemm_peaks(8192, 10);
        r.peak_fp32_tflops = p.fp32 / 1e12;
        r.peak_bf16_tflops = p.bf16 / 1e12;
    }
#endif
    return r;
}

nlohmann::json step_bench_json(const Config& cfg, const StepBenchResult& r) {
    nlohmann::json j{{"arch", cfg.model.arch},       {"device", device_label(r.device)},
                     {"batch", r.batch},             {"top_k", cfg.model.top_k},
                     {"patch", cfg.model.patch},     {"channels", cfg.model.channels},
                     {"precision", r.bf16_matmul ? "bf16" : "fp32"}, {"step_ms", r.step_ms},
                     {"images_per_s", r.images_per_s}, {"train_gflops_per_image", r.train_gflops_per_image},
                     {"model_tflops", r.tflops}, {"pixels", r.pixels}};
    if (!r.gpu.empty()) j["gpu"] = r.gpu;
    if (r.peak_bf16_tflops > 0) {
        j["gemm_peak_fp32_tflops"] = r.peak_fp32_tflops;
        j["gemm_peak_bf16_tflops"] = r.peak_bf16_tflops;
        j["mfu_vs_bf16_peak"] = r.tflops / r.peak_bf16_tflops;
        j["mfu_vs_fp32_peak"] = r.tflops / r.peak_fp32_tflops;
    }
    return j;
}

}  // namespace prism
