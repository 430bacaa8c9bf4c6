// Training state for exact resume, beside the checkpoint (DESIGN.md §2):
// DIR/train_state.safetensors holds the fp32 master weights, AdamW's first and
// second moments, and in __metadata__ the step counters, the loader position
// and the resolved config.
//
// The state file is complete on its own: resume reads the weights from it,
// not from model.safetensors, so there is no pair of files that a crash could
// leave from different steps. Each file is written to PATH.tmp, fsync'd and
// renamed over the previous one (write_safetensors), so a reader sees either
// the previous complete state or the new one, never a partial file.
// model.safetensors is the export for eval and other tools.
//
// Random numbers need no saved state: every stream is keyed by (seed, purpose,
// step) (engine/rng.h), and the seed is in the config.
#pragma once
#include <cstdint>
#include <string>
#include <vector>
#include "engine/config.h"
#include "engine/model.h"
#include "engine/optimizer.h"

namespace prism {

constexpr const char* kTrainStateFile = "train_state.safetensors";

// Where a run stands after a step: what the loop needs besides the tensors.
struct ResumePoint {
    int64_t step = 0;           // training steps done; the next step to run
    int64_t skipped_steps = 0;  // steps skipped for a non-finite loss or gradient (train.skip_nonfinite)
    int64_t epoch = 0;          // loader position: the next batch to draw
    int64_t batch_index = 0;
};

// Writes the state atomically (PATH.tmp, fsync, rename). The optimizer's step
// count comes from opt. Throws UserError naming the file on I/O failure.
// With a sharded optimizer (ZeRO-1) every rank calls it, as the moments are
// gathered from all ranks; only the rank with write == true writes.
void save_train_state(const std::string& path, Model<float>& model, AdamW<float>& opt, const Config& cfg,
                      const ResumePoint& at, bool write = true);

// Restores the weights, the moments and the optimizer's step count into a
// model and optimizer built from cfg, and returns the counters. Throws
// UserError (one line naming the file) when the file is not a complete state
// file, or when it was written under a config that differs from cfg in a key
// that exact resume depends on (only resume_free_keys() may change).
ResumePoint load_train_state(const std::string& path, const Config& cfg, Model<float>& model, AdamW<float>& opt);

// The config keys a resumed run may change: the length of the run, where the
// data lies, how often it logs, evaluates and checkpoints, fault handling.
const std::vector<std::string>& resume_free_keys();

// A checkpoint of a training run: DIR/model.safetensors, then
// DIR/train_state.safetensors, each replaced atomically. `write` as for
// save_train_state.
void save_training_checkpoint(const std::string& dir, Model<float>& model, AdamW<float>& opt, const Config& cfg,
                              const ResumePoint& at, bool write = true);

}  // namespace prism
