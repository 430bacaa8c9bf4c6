// The run configuration: three JSON sections (model / data / train) whose key
// names are a user-facing contract (DESIGN.md §4). Every key has a default
// here; a config file only states what differs.
#pragma once
#include <cstdint>
#include <string>
#include <vector>
#include <nlohmann/json.hpp>

namespace prism {

struct ModelConfig {
    std::string arch = "moevit";     // vit | chvit | moevit
    int image = 32;                  // square images: image x image pixels
    int channels = 4;                // C, channels in the data set
    int patch = 8;                   // P
    int dim = 64;                    // D
    int depth = 2;
    int heads = 4;                   // Hd; dim % heads == 0
    double mlp_ratio = 4.0;          // hidden = round(dim * mlp_ratio)
    int num_classes = 4;
    int top_k = 2;                   // moevit: channels per patch token, 1..channels
    std::string combine = "softmax"; // softmax | renorm
    std::string aux = "switch";      // switch | importance | none
    double aux_coef = 0.01;
    double z_loss_coef = 0.0;
    double drop_path = 0.0;          // stochastic depth rate of the last block
    // Init std of channel_embed (chvit, moevit). 0.02 is ChannelViT's; chvit
    // tells channels apart only through this embedding, and a small model can
    // sit on a long plateau until it grows (README: the tiny task).
    double channel_embed_std = 0.02;

    int num_patches() const { return (image / patch) * (image / patch); }  // N
    int hidden() const;              // MLP width
};

struct DataConfig {
    std::string train;               // glob of training shards
    std::string val;                 // glob of validation shards
    std::string augment = "none";    // none | so2sat | jumpcp
    int threads = 0;                 // loader reader threads; 0 = min(cores, 4)
    // CUDA: the batch goes up as stored pixels and is normalized and augmented
    // on the GPU (the same bits as the host's input step); false: on the
    // loader's threads, uploaded as float32. No effect on the CPU.
    bool device_input = true;
};

struct TrainConfig {
    int batch = 64;                  // global batch (all ranks together)
    int64_t steps = 0;               // > 0 ends the run after this many steps...
    double epochs = 0;               // ...else after this many passes over data.train
    double lr = 5e-4;                // peak learning rate
    double min_lr = 0.0;             // cosine floor
    double weight_decay = 0.05;      // decoupled, on tensors of rank >= 2 only
    double beta1 = 0.9, beta2 = 0.999, eps = 1e-8;
    int64_t warmup_steps = 0;        // linear warmup; if 0, warmup_epochs is used
    double warmup_epochs = 0;
    double grad_clip = 0.0;          // global grad-norm clip; 0 = off
    uint64_t seed = 0;
    bool hcs = false;                // hierarchical channel sampling (training only)
    std::string precision = "auto";  // auto (bf16 on CUDA, fp32 on the CPU) | fp32 | bf16 (bf16 is CUDA only)
    int64_t eval_every = 0;          // 0 = only at the end
    int64_t checkpoint_every = 0;    // 0 = only at the end
    int64_t log_every = 10;          // plain log line every N steps
    int64_t stop_after = 0;          // > 0: run at most this many steps in this invocation, then checkpoint and stop
                                     // (a job's time limit); the schedule still runs to train.steps, --resume continues
    bool skip_nonfinite = false;     // NaN/Inf loss or gradient norm: skip the step (counted) instead of stopping
    double comm_timeout_s = 300;     // a rank that does not answer within this aborts the job (engine/comm.h)
    bool overlap_comm = true;        // GPU ranks: all-reduce each block's gradients during backward (false: all after)
    int64_t zero = 0;                // 1: ZeRO-1, each rank keeps AdamW's moments of its shard of the parameters
};

struct Config {
    ModelConfig model;
    DataConfig data;
    TrainConfig train;
};

// Reads a JSON config file, applies `--set key=value` overrides in order, and
// validates. Throws UserError with one line naming the file (or the --set) and
// the problem: unknown key, wrong type, impossible value.
Config load_config(const std::string& path, const std::vector<std::string>& sets = {});
// How load_config's errors name the config: "FILE with --set a=1, --set b=2".
std::string config_origin(const std::string& path, const std::vector<std::string>& sets);

// Same, from an already-parsed JSON object (checkpoint metadata); `origin`
// names where it came from in error messages.
Config config_from_json(const nlohmann::json& j, const std::string& origin);

// The fully resolved config, every key present (goes into checkpoints).
nlohmann::json config_to_json(const Config& c);

// Applies one "section.key=value" override to a JSON object. The value is
// parsed as JSON when it parses, else taken as a string.
void apply_set(nlohmann::json& j, const std::string& assignment);

// Checks every value; throws UserError("<origin>: <problem>").
void validate(const Config& c, const std::string& origin);

}  // namespace prism
