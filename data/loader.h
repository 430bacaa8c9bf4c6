// The synchronous loader: batches from an in-memory Dataset, sample order
// shuffled per epoch from the run's seed, drop_last for training, in order
// for evaluation. (The streaming loader replaces it for large data sets.)
#pragma once
#include <cstdint>
#include <vector>
#include "data/shard.h"

namespace prism {

struct Loader {
    const Dataset* data = nullptr;
    int batch = 0;
    bool shuffle = false;        // training: a new permutation every epoch
    uint64_t seed = 0;
    int64_t epoch = 0;           // position: epoch and the next index into `order`
    int64_t cursor = 0;
    std::vector<int64_t> order;

    Loader(const Dataset& d, int batch_size, bool shuffle_each_epoch, uint64_t run_seed);
    // Full batches only while training (drop_last); eval gets a short last one.
    int64_t batches_per_epoch() const;
    // Copies the next batch into images [batch, C, H, W] and labels; returns its
    // size. Training wraps to the next epoch; eval returns 0 at the end.
    int next(std::vector<float>& images, std::vector<int32_t>& labels);

private:
    void start_epoch();
};

}  // namespace prism
