// The training loop and evaluation.
#pragma once
#include <functional>
#include <string>
#include <vector>
#include "data/loader.h"
#include "data/shard.h"
#include "engine/common.h"
#include "engine/comm.h"
#include "engine/config.h"
#include "engine/metrics.h"
#include "engine/model.h"

namespace prism {

struct EvalResult {
    double accuracy = 0, loss = 0;
    int64_t count = 0;
    std::vector<float> logits;  // [count, classes] in data order, when asked for
    std::vector<int64_t> confusion;  // [classes, classes]: row = label, column = prediction
};

struct EvalOptions {
    std::vector<int> channels;                  // the channel subset S (sorted); empty = all
    ClassRouting* routing = nullptr;            // moevit: add the per-class routing histogram
    std::function<void(int64_t)> on_batch;      // called with the images done so far
};

// An evaluation loader over `glob`: the whole set once, in order
// (threads 0 = the default; device_input: see stored_input).
LoaderOptions eval_loader_options(const std::string& glob, int batch, int threads = 0, bool device_input = false);

// Whether a model on `device` takes the loader's stored pixels and runs the
// input step itself (data.device_input, CUDA only).
bool stored_input(const DataConfig& data, Device device);

// Evaluates without augmentation or drop path: one pass of `loader` (an
// evaluation loader) from its start.
template <class T>
EvalResult evaluate(Model<T>& model, Loader& loader, bool keep_logits, const EvalOptions& opts = {});

struct TrainResult {
    EvalResult val;
    int64_t steps = 0;
    double seconds = 0;
    LoaderPosition position;  // of the training loader at the end (for the resume state)
    int stop_signal = 0;      // SIGINT/SIGTERM that ended the run early (a checkpoint was written)
    int64_t skipped_steps = 0;  // non-finite steps skipped (train.skip_nonfinite)
};

struct TrainOptions {
    int rank = 0;  // only rank 0 prints progress and writes metrics (train() sets it from comm)
    // The ranks of a data-parallel run (engine/comm.h); nullptr = a world of one.
    const Comm* comm = nullptr;
    // --resume DIR: continue from DIR/train_state.safetensors ("" = a fresh run).
    std::string resume_dir;
    // --profile-steps A:B: steps A..B (1-based, inclusive) run between
    // cudaProfilerStart and cudaProfilerStop on CUDA; 0 = off.
    int64_t profile_first = 0, profile_last = 0;
    // The device's peak FLOP/s, for the MFU in metrics.jsonl; 0 = unknown
    // (the CPU): no "mfu" key. The CUDA backend is to fill it in.
    double peak_flops = 0;
    // Where the config came from (prism train: the file and its --set), to
    // name in the errors about keys that only training needs.
    std::string config_origin = "config";
};

// Trains per the config; writes out_dir/{config.json, metrics.jsonl,
// routing.json (moevit), model.safetensors} when out_dir is not empty.
TrainResult train(const Config& cfg, Device device, const std::string& out_dir, bool verbose,
                  const TrainOptions& opts = {});

// The channel subset of one training step: all channels, or under HCS
// m ~ U{1..C} then a uniform m-subset, sorted; drawn from (seed, step) so
// every rank and a resumed run agree.
std::vector<int> channels_for_step(const TrainConfig& t, int C, int64_t step);

// Checks that a data set fits the model (channels, image size, classes);
// throws UserError naming the glob.
void check_data_matches(const ShardHeader& shape, const ModelConfig& m, const std::string& glob);

}  // namespace prism
