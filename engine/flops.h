// FLOP accounting (DESIGN.md §5): 2 FLOPs per multiply-add, inference.
#pragma once
#include "engine/config.h"

namespace prism {

struct FlopCount {
    double attention_gflops = 0;  // one block's attention, all channels (|S| = C), per image
    double block_gflops = 0;      // one whole block (attention + LayerNorms + MLP), per image
    double forward_gflops = 0;    // the whole model's forward pass, per image
    double train_step_gflops_per_image = 0;  // forward + backward (3x forward), per image
};

// Per-image counts for `cfg` with all C channels present. `subset` > 0 counts
// with |S| = subset channels instead.
FlopCount count_flops(const ModelConfig& cfg, int subset = 0);

// DESIGN.md §5's attention count of one block for one image, in FLOPs (not
// GFLOPs), with |S| = subset channels (0: all C): what count_flops reports as
// attention_gflops, and what `prism bench attention` divides its time into.
double attention_flops(const ModelConfig& cfg, int subset = 0);

}  // namespace prism
