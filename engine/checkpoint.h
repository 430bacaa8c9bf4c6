// Checkpoints (DESIGN.md §2): DIR/model.safetensors holds the float32 weights
// under timm-compatible names and the resolved config in __metadata__.config.
#pragma once
#include <string>
#include <vector>
#include "engine/config.h"
#include "engine/model.h"

namespace prism {

template <class T>
void save_checkpoint(const std::string& path, Model<T>& model, const Config& cfg);

struct Checkpoint {
    Config config;
    std::vector<float> params;  // the parameter block: each tensor at its param_layout offset, zero padding
};

// Throws UserError naming the file when a tensor is missing, has the wrong
// shape or dtype, or the config is absent or invalid.
Checkpoint load_checkpoint(const std::string& path);

// Copies checkpoint weights into a model built from the same config.
template <class T>
void load_weights(Model<T>& model, const Checkpoint& ckpt);

}  // namespace prism
