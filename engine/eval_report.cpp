#include "engine/eval_report.h"
#include <cmath>
#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <set>
#include "engine/rng.h"

namespace prism {

std::vector<int> parse_channel_list(const std::string& text, int C) {
    const std::string what = "--channels " + printable(text);
    std::vector<int> out;
    size_t start = 0;
    while (start <= text.size()) {
        const size_t comma = std::min(text.find(',', start), text.size());
        const std::string item = text.substr(start, comma - start);
        char* end = nullptr;
        errno = 0;
        const long c = item.empty() ? -1 : std::strtol(item.c_str(), &end, 10);
        if (item.empty() || *end != '\0' || errno != 0)
            throw UserError(what + ": expected channel numbers separated by commas, like 0,3,5");
        if (c < 0 || c >= C)
            throw UserError(what + ": channel " + item + " is out of range (the model has " + std::to_string(C) +
                            " channels, 0.." + std::to_string(C - 1) + ")");
        if (std::find(out.begin(), out.end(), int(c)) != out.end())
            throw UserError(what + ": channel " + item + " is listed twice");
        out.push_back(int(c));
        start = comma + 1;
    }
    std::sort(out.begin(), out.end());
    return out;
}

std::vector<std::vector<int>> channel_subsets(int C, int m, int max_subsets, uint64_t seed) {
    double count = 1;  // C choose m, as a double so that large C cannot overflow
    for (int i = 0; i < m; i++) count = count * (C - i) / (i + 1);
    std::vector<std::vector<int>> out;
    if (count <= max_subsets + 0.5) {
        std::vector<int> s(m);
        for (int i = 0; i < m; i++) s[i] = i;
        for (;;) {  // lexicographic enumeration
            out.push_back(s);
            int i = m - 1;
            while (i >= 0 && s[i] == C - m + i) i--;
            if (i < 0) break;
            s[i]++;
            for (int j = i + 1; j < m; j++) s[j] = s[j - 1] + 1;
        }
        return out;
    }
    Rng rng(seed, kEvalSubsetStream, uint64_t(m));
    std::set<std::vector<int>> seen;
    while (int(out.size()) < max_subsets) {
        std::vector<int> all(C);
        for (int c = 0; c < C; c++) all[c] = c;
        for (int i = 0; i < m; i++) std::swap(all[i], all[i + rng.below(uint64_t(C - i))]);
        all.resize(m);
        std::sort(all.begin(), all.end());
        if (seen.insert(all).second) out.push_back(all);
    }
    return out;
}

SubsetSweep evaluate_all_subsets(Model<float>& model, Loader& data,
                                 const std::function<void(const SubsetSweep::Size&)>& on_size) {
    const int C = model.config().channels;
    SubsetSweep sweep;
    for (int m = 1; m <= C; m++) {
        SubsetSweep::Size s;
        s.size = m;
        for (const auto& subset : channel_subsets(C, m)) {
            EvalOptions o;
            o.channels = subset;
            s.accuracy += evaluate(model, data, false, o).accuracy;
            s.subsets++;
        }
        s.accuracy /= s.subsets;
        sweep.mean_accuracy += s.accuracy / C;
        sweep.sizes.push_back(s);
        if (on_size) on_size(s);
    }
    return sweep;
}

void add_report(nlohmann::json& j, const EvalResult& r, int K) {
    // A class with no images has no accuracy: null, not a 0 that reads as "all wrong".
    nlohmann::json acc = nlohmann::json::array();
    for (double a : per_class_accuracy(r.confusion, K))
        acc.push_back(std::isnan(a) ? nlohmann::json() : nlohmann::json(a));
    j["per_class_accuracy"] = acc;
    nlohmann::json rows = nlohmann::json::array();
    for (int y = 0; y < K; y++)
        rows.push_back(std::vector<int64_t>(r.confusion.begin() + int64_t(y) * K, r.confusion.begin() + int64_t(y + 1) * K));
    j["confusion"] = rows;
}

nlohmann::json subsets_json(const SubsetSweep& s) {
    nlohmann::json sizes = nlohmann::json::array();
    for (const auto& z : s.sizes) sizes.push_back({{"size", z.size}, {"subsets", z.subsets}, {"accuracy", z.accuracy}});
    return {{"sizes", sizes}, {"mean_accuracy", s.mean_accuracy}};
}

}  // namespace prism
