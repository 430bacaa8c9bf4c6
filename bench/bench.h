// Benchmarks behind `prism bench` (bench/results/ records what they measured).
#pragma once
#include <algorithm>
#include <vector>
#include <cstdint>
#include <string>
#include <vector>
#include <nlohmann/json.hpp>
#include "data/loader.h"
#include "engine/config.h"

namespace prism {

// The median of timed runs (the mean of the two middle ones for an even count).
inline double median(std::vector<double> v) {
    std::sort(v.begin(), v.end());
    const size_t n = v.size();
    if (n == 0) return 0;
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

struct LoaderBenchOptions {
    std::string data;                  // glob of shards
    int batch = 256;                   // global batch
    int threads = 0;                   // reader threads; 0 = default_loader_threads()
    double seconds = 10;               // measuring time, after the first batch
    Augment augment = Augment::none;
    // The batches prism train takes on CUDA: stored pixels, statistics and
    // augmentation draws, normalized later on the device (not here).
    bool device_input = false;
};

struct LoaderBenchResult {
    ShardHeader shape;                 // count = images in the set
    int threads = 0;
    double first_batch_s = 0;          // opening the shards and the first batch
    int64_t images = 0;                // delivered after the first batch
    double seconds = 0;
    double images_per_s = 0;
    double mb_per_s = 0;               // stored bytes read per second, 1 MB = 1e6 bytes
    double out_mb_per_s = 0;           // written into batches per second: float32, or (device_input) stored pixels
    double cpu_s = 0;                  // CPU time of the process (all threads) while measuring
    double images_per_cpu_s = 0;       // images / cpu_s: the rate per busy core, whatever else runs
};

// Pulls training batches (shuffled, augmented as asked, normalized into the
// batch buffer: the path a training step waits on) for `seconds` and
// reports the rate, with a progress line every second when verbose.
LoaderBenchResult bench_loader(const LoaderBenchOptions& o, bool verbose);
nlohmann::json loader_bench_json(const LoaderBenchOptions& o, const LoaderBenchResult& r);

// ---- `prism bench attention` (bench/attention.cpp) ---------------------------------
// Forward + backward of one attention sublayer (what DESIGN.md §5 counts: the
// projections, the router, the attention core; no LayerNorm, no MLP) on the
// CUDA ops, at the config's shapes with all C channels present: the chvit
// (dense) block, then a moevit block for each k.

struct AttentionBenchOptions {
    ModelConfig model;        // shapes (image, channels, patch, dim, heads) and the
                              // moevit settings (combine, aux, aux_coef, z_loss_coef, depth)
    std::vector<int> ks;      // top-k of the moevit variants, each in 1..channels
    int batch = 0;            // 0: default_attention_batch(model, ks)
    int iters = 50;           // timed iterations (the median is reported)
    int warmup = 10;          // untimed iterations first
    uint64_t seed = 1;        // of the random inputs and weights
    std::string impl = "bf16";  // the block as a training mode runs it: "bf16" (bf16 products and
                              // storage, the flash kernels at head dim 64) or "reference" (fp32);
                              // the default batch follows the fp32 buffers either way, so both compare
};

struct AttentionBenchRow {
    std::string arch;         // "chvit" (dense) or "moevit"
    int k = 0;                // moevit's top-k; 0 for the dense block
    int batch = 0;
    double ms = 0;            // median over the timed iterations, forward + backward
    double ms_min = 0, ms_max = 0;
    double train_gflop = 0;   // 3 × attention_flops × batch: forward + backward, one iteration
    double tflops = 0;        // train_gflop over the median time
    double speedup = 0;       // dense ms / this ms
    double ideal_speedup = 0; // dense FLOPs / this variant's FLOPs
    double buffer_gib = 0;    // device buffers this variant allocated (without the ops' scratch)
    std::string device;       // the GPU's name
};

// The values of k `prism bench attention` runs unless told (--k).
constexpr const char* kDefaultAttentionKs = "1,2,4,C";
// "1,2,4,C" → {1, 2, 4, channels}; each value in 1..channels, duplicates
// dropped, order kept. Throws UserError naming the bad entry.
std::vector<int> parse_k_list(const std::string& list, int channels);

// Device memory one image adds to a variant's buffers (k = 0: the dense
// block), in bytes, with the ops' largest scratch: the rule behind the
// default batch, which bench/torch_peer.py repeats.
double attention_bench_bytes_per_image(const ModelConfig& m, int k);
constexpr double kAttentionBenchBudget = 8.0 * (1u << 30);  // bytes
constexpr int kAttentionBenchMaxBatch = 256;
// The largest batch ≤ kAttentionBenchMaxBatch whose biggest variant stays
// within kAttentionBenchBudget (at least 1).
int default_attention_batch(const ModelConfig& m, const std::vector<int>& ks);

// The attention kernels the block runs on: "flash" (the bf16 mode at head
// dim 64, kernels/cuda/flash_attention.cu) or "reference" (the fused fp32 ones).
std::string attention_bench_kernels(const AttentionBenchOptions& o);
// False in a build without CUDA or on a machine without a CUDA device.
bool attention_bench_has_device();
// Runs every variant (throws std::runtime_error on a CUDA error, UserError
// on a bad option). Progress lines go to stderr when verbose.
std::vector<AttentionBenchRow> bench_attention(const AttentionBenchOptions& o, bool verbose);
// The table: variant, ms fwd+bwd, TFLOP/s, speedup over dense, ideal speedup.
std::string attention_bench_table(const std::vector<AttentionBenchRow>& rows);
nlohmann::json attention_bench_json(const AttentionBenchOptions& o, const AttentionBenchRow& r);

}  // namespace prism
