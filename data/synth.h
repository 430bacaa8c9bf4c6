// Synthetic data sets, written as shards: `prism synth --preset NAME`.
#pragma once
#include <cstdint>
#include <string>

namespace prism {

// Writes DIR/train-00000.shard ... and DIR/val-00000.shard ...
// preset: "tiny" (the channel-interaction task the synth_tiny_* configs
// learn), "so2sat" (18x32x32 float16, 17 classes), "jumpcp" (8x224x224
// uint8, 161 classes). `count` is the number of training images; validation
// gets a quarter as many (at least 1). Throws UserError on a bad preset.
void synthesize(const std::string& preset, const std::string& dir, int64_t count, uint64_t seed,
                bool verbose);

}  // namespace prism
