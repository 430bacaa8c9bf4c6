// The streaming loader: batches straight from shards (DESIGN.md §3), read by
// background threads into a bounded queue of ready batches, for training
// (shuffled every epoch, full batches only, endless) and evaluation (the
// whole set once, in order).
//
// What a batch holds is a pure function of (seed, epoch, batch index, rank,
// world): never of the thread count or of timing.
// - Training, epoch e: one permutation of all samples of all shards, from
//   Rng(seed, kShuffleStream, e) (shard order and sample order shuffled
//   together, so shards written in label order still mix). Global batch k is
//   positions [k*batch, (k+1)*batch) of it, and rank r of R takes the r-th
//   batch/R of those: the ranks' slices are disjoint and their union is the
//   global batch. A tail shorter than a batch is dropped (drop_last).
// - Evaluation: rank r takes the contiguous samples [N*r/R, N*(r+1)/R) in
//   shard order, in batches of batch/R with a short last one.
// - Augmentation (training only) of the image at position j of global batch
//   `step` draws from Rng(seed, kAugmentStream, step*batch + j): the same on
//   every rank and in a resumed run.
//
// Shards are opened and checked up front (headers, shapes, labels, and that
// the statistics cannot overflow integer pixels); pixels are read with
// pread when their batch is built, and a NaN or Inf among them is refused
// then, naming the file. Every refusal is a UserError of one line.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>
#include <nlohmann/json.hpp>
#include "data/shard.h"
#include "kernels/ops.h"

namespace prism {

enum class Augment { none, so2sat, jumpcp };
Augment augment_from_name(const std::string& name);  // none | so2sat | jumpcp; throws UserError

// The augmentation of one image, drawn from Rng(seed, kAugmentStream, index):
// - jumpcp: pad by H*16/224 pixels on each side (16 at 224, the paper's
//   pad-to-256) and crop back to H x W at a random offset, then one of the 8
//   flips/quarter turns, then 10 dropout holes of 10 x 10 (clipped to the image);
// - so2sat: one of the 8 flips/quarter turns;
// - none: nothing.
// Non-square images get only the 4 transforms that keep their shape.
ops::InputAug draw_augmentation(Augment a, int H, int W, uint64_t seed, uint64_t index);

// Where a loader is: the batch that next() returns next.
struct LoaderPosition {
    int64_t epoch = 0;  // always 0 for evaluation
    int64_t batch = 0;  // index within the epoch
    bool operator==(const LoaderPosition& o) const { return epoch == o.epoch && batch == o.batch; }
    bool operator!=(const LoaderPosition& o) const { return !(*this == o); }
};
nlohmann::json position_to_json(const LoaderPosition& p);           // {"epoch": E, "batch": K}
LoaderPosition position_from_json(const nlohmann::json& j, const std::string& origin);  // throws UserError

struct LoaderOptions {
    std::string pattern;             // glob of shards
    int batch = 64;                  // global batch; each rank gets batch / world
    bool train = true;               // training (see above) or evaluation
    uint64_t seed = 0;               // the run's seed
    Augment augment = Augment::none; // training only; evaluation never augments
    int rank = 0, world = 1;
    int threads = 0;                 // reader threads; 0 = default_loader_threads()
    int prefetch = 0;                // ready batches queued ahead; 0 = threads + 2
    // true: batches carry the stored pixels, per-image statistics and
    // augmentation for the device's input step (cuda_ops::input_forward), in
    // pinned memory; false: normalized (and augmented) float images.
    bool device_input = false;
    LoaderPosition start;            // where to begin (a resumed run's saved position)
};

// min(cores, 4), at least 1: 2 on a 2-core machine.
int default_loader_threads();

// The input step's name for a shard's pixel type.
ops::Pixel pixel_of(DType d);

// One batch of this rank, valid until the next call to next() or seek().
struct LoaderBatch {
    int size = 0;                 // images; 0 = the evaluation pass is over
    LoaderPosition position;      // which batch this is
    int64_t step = 0;             // epoch * batches_per_epoch + batch (augmentation key)
    const int32_t* labels = nullptr;     // [size]
    const int64_t* samples = nullptr;    // [size]: each image's index in the set (shard order)
    const float* images = nullptr;       // [size, C, H, W], normalized (not in device_input mode)
    // device_input mode only:
    ops::Pixel pixel = ops::Pixel::f32;  // the shards' pixel type
    const void* raw = nullptr;           // [size, C, H, W] stored pixels
    const float* mean = nullptr;         // [size, C]: the image's shard statistics
    const float* inv_std = nullptr;      // [size, C]
    const ops::InputAug* aug = nullptr;  // [size], or nullptr: no augmentation
};

class Loader {
public:
    // Opens and checks every shard of the glob; threads start on the first next().
    explicit Loader(const LoaderOptions& options);
    ~Loader();
    Loader(const Loader&) = delete;
    Loader& operator=(const Loader&) = delete;

    const ShardHeader& shape() const;   // the first shard's header, count = all images
    int64_t count() const;              // images in the set (all ranks)
    int local_batch() const;            // batch / world
    int64_t batches_per_epoch() const;  // this rank's batches per epoch (evaluation: per pass)
    const LoaderOptions& options() const;

    // The next batch, waiting for it if the readers are behind. Throws the
    // UserError of a bad shard when the batch that reads it comes up.
    const LoaderBatch& next();
    LoaderPosition position() const;    // of the batch next() returns next
    void seek(LoaderPosition p);        // next() continues at p; throws UserError if p is out of range
    // Throws the UserError that names the shard, sample and channel of image
    // `image` of `batch` (the current one), which the device's input step
    // (device_input mode) found not finite after normalization.
    [[noreturn]] void refuse_nonfinite(const LoaderBatch& batch, int image) const;

private:
    struct Impl;
    std::unique_ptr<Impl> impl_;
};

}  // namespace prism
