// `prism bench step`: training steps per second and images/s of one config.
#pragma once
#include <string>
#include <nlohmann/json.hpp>
#include "engine/common.h"
#include "engine/config.h"

namespace prism {

struct StepBenchOptions {
    Device device = Device::cuda;
    int batch = 0;      // 0: the config's train.batch
    int warmup = 5;
    int iters = 20;
    // "float": normalized float32 images uploaded; a shard pixel type
    // ("uint8", "uint16", "float16", "float32"): stored pixels through the
    // model's input step, as prism train passes them on CUDA (data.device_input).
    std::string pixels = "float";
};

struct StepBenchResult {
    Device device = Device::cpu;
    std::string gpu;                     // the CUDA device's name (CUDA only): which card the numbers are from
    std::string pixels;                  // StepBenchOptions::pixels
    int batch = 0;
    bool bf16_matmul = false;            // the bf16 mode (train.precision bf16 on CUDA)
    double step_ms = 0;                  // median over the timed steps
    double images_per_s = 0;
    double train_gflops_per_image = 0;   // DESIGN.md §5 count, forward + backward
    double tflops = 0;                   // model FLOPs per second achieved
    double peak_fp32_tflops = 0, peak_bf16_tflops = 0;  // measured 8192³ GEMMs (CUDA only)
};

// Times whole steps (batch upload, forward, backward, AdamW) on random images
// with every channel present; the median of `iters` after `warmup`.
StepBenchResult bench_step(const Config& cfg, const StepBenchOptions& o, bool verbose);
nlohmann::json step_bench_json(const Config& cfg, const StepBenchResult& r);

}  // namespace prism
