// The extras of `prism eval`: --report (per-class accuracy and the confusion
// matrix), --channels (one channel subset, ChannelViT's protocol) and
// --all-subsets (accuracy averaged over every subset size).
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <vector>
#include <nlohmann/json.hpp>
#include "engine/train.h"

namespace prism {

// "0,3,5" for a model with C channels: the channels, sorted. Throws
// UserError("--channels TEXT: ...") for a non-number, a channel outside
// 0..C-1, a duplicate or an empty list.
std::vector<int> parse_channel_list(const std::string& text, int C);

// The channel subsets of size m that --all-subsets evaluates: every one, in
// lexicographic order, when C choose m <= max_subsets; else max_subsets
// distinct ones drawn from `seed` (the same every run), each sorted.
std::vector<std::vector<int>> channel_subsets(int C, int m, int max_subsets = 64, uint64_t seed = 0);

struct SubsetSweep {
    struct Size {
        int size = 0, subsets = 0;
        double accuracy = 0;  // mean over the subsets of this size
    };
    std::vector<Size> sizes;  // m = 1..C
    double mean_accuracy = 0; // mean over the sizes
};
SubsetSweep evaluate_all_subsets(Model<float>& model, Loader& data,
                                 const std::function<void(const SubsetSweep::Size&)>& on_size = {});

// Additions to eval's JSON line: "per_class_accuracy" [K] and "confusion"
// [K][K] (row = label, column = prediction).
void add_report(nlohmann::json& j, const EvalResult& r, int K);
// "subsets": {"sizes": [{"size", "subsets", "accuracy"}...], "mean_accuracy"}.
nlohmann::json subsets_json(const SubsetSweep& s);

}  // namespace prism
