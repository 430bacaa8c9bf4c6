// Benchmarks behind `prism bench` (bench/results/ records what they measured).
#pragma once
#include <cstdint>
#include <string>
#include <nlohmann/json.hpp>
#include "data/loader.h"

namespace prism {

struct LoaderBenchOptions {
    std::string data;                  // glob of shards
    int batch = 256;                   // global batch
    int threads = 0;                   // reader threads; 0 = default_loader_threads()
    double seconds = 10;               // measuring time, after the first batch
    Augment augment = Augment::none;
};

struct LoaderBenchResult {
    ShardHeader shape;                 // count = images in the set
    int threads = 0;
    double first_batch_s = 0;          // opening the shards and the first batch
    int64_t images = 0;                // delivered after the first batch
    double seconds = 0;
    double images_per_s = 0;
    double mb_per_s = 0;               // stored bytes read per second, 1 MB = 1e6 bytes
    double out_mb_per_s = 0;           // float32 written into batches per second
    double cpu_s = 0;                  // CPU time of the process (all threads) while measuring
    double images_per_cpu_s = 0;       // images / cpu_s: the rate per busy core, whatever else runs
};

// Pulls training batches (shuffled, augmented as asked, normalized into the
// batch buffer: the path a training step waits on) for `seconds` and
// reports the rate, with a progress line every second when verbose.
LoaderBenchResult bench_loader(const LoaderBenchOptions& o, bool verbose);
nlohmann::json loader_bench_json(const LoaderBenchOptions& o, const LoaderBenchResult& r);

}  // namespace prism
