// The training loop and evaluation.
#pragma once
#include <string>
#include <vector>
#include "data/loader.h"
#include "data/shard.h"
#include "engine/common.h"
#include "engine/config.h"
#include "engine/model.h"

namespace prism {

struct EvalResult {
    double accuracy = 0, loss = 0;
    int64_t count = 0;
    std::vector<float> logits;  // [count, classes] in data order, when asked for
};

// An evaluation loader over `glob`: the whole set once, in order
// (threads 0 = the default).
LoaderOptions eval_loader_options(const std::string& glob, int batch, int threads = 0);

// Evaluates on all channels, in order, without augmentation or drop path:
// one pass of `loader` (an evaluation loader) from its start.
template <class T>
EvalResult evaluate(Model<T>& model, Loader& loader, bool keep_logits);

struct TrainResult {
    EvalResult val;
    int64_t steps = 0;
    double seconds = 0;
    LoaderPosition position;  // of the training loader at the end (for the resume state)
};

// Trains per the config; writes out_dir/{config.json, metrics.jsonl,
// model.safetensors} when out_dir is not empty.
TrainResult train(const Config& cfg, Device device, const std::string& out_dir, bool verbose);

// The channel subset of one training step: all channels, or under HCS
// m ~ U{1..C} then a uniform m-subset, sorted; drawn from (seed, step) so
// every rank and a resumed run agree.
std::vector<int> channels_for_step(const TrainConfig& t, int C, int64_t step);

// Checks that a data set fits the model (channels, image size, classes);
// throws UserError naming the glob.
void check_data_matches(const ShardHeader& shape, const ModelConfig& m, const std::string& glob);

}  // namespace prism
