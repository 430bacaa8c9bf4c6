// Comparing runs of `prism train` on the tiny task (tests/test_distributed.cpp
// on the CPU, tests/test_nccl.cpp on GPUs).
#pragma once
#include <cmath>
#include <string>
#include <vector>
#include "data/synth.h"
#include "engine/checkpoint.h"
#include "tests/testutil.h"

namespace prism::testing {

// A small tiny-task data set, made once per test process and removed when it exits.
inline const std::string& tiny_data_dir() {
    static const TmpDir dir;
    static const bool made = (synthesize("tiny", dir.path, 512, 2, false), true);
    (void)made;
    return dir.path;
}

// The weights a run wrote to DIR/model.safetensors.
inline std::vector<float> run_weights(const std::string& dir) {
    return load_checkpoint(dir + "/model.safetensors").params;
}

// ‖a − b‖ / ‖a‖; infinite when the sizes differ.
inline double relative_difference(const std::vector<float>& a, const std::vector<float>& b) {
    if (a.size() != b.size()) return INFINITY;
    double num = 0, den = 0;
    for (size_t i = 0; i < a.size(); i++) num += double(a[i] - b[i]) * (a[i] - b[i]), den += double(a[i]) * a[i];
    return std::sqrt(num / den);
}

}  // namespace prism::testing
