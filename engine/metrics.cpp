#include "engine/metrics.h"
#include <algorithm>
#include <cmath>
#include <cstdio>

namespace prism {

void RoutingWindow::add(const std::vector<std::vector<int>>& step_counts) {
    if (counts.empty())
        for (const auto& block : step_counts) counts.emplace_back(block.size(), 0);
    for (size_t i = 0; i < step_counts.size(); i++)
        for (size_t c = 0; c < step_counts[i].size(); c++) counts[i][c] += step_counts[i][c];
}

RoutingSummary summarize_routing(const RoutingWindow& w) {
    RoutingSummary s;
    for (const auto& block : w.counts) {
        int64_t total = 0;
        for (int64_t n : block) total += n;
        std::vector<double> shares(block.size(), 0.0);
        double entropy = 0;
        for (size_t c = 0; c < block.size(); c++) {
            shares[c] = total ? double(block[c]) / double(total) : 0.0;
            if (shares[c] > 0) entropy -= shares[c] * std::log(shares[c]);
        }
        s.shares.push_back(std::move(shares));
        s.entropy.push_back(entropy);
    }
    return s;
}

std::string collapse_warning(const RoutingSummary& s, int64_t step, int top_k, double threshold) {
    std::string blocks;
    for (size_t i = 0; i < s.shares.size(); i++) {
        const int k = std::min<int>(top_k, int(s.shares[i].size()));
        if (k >= int(s.shares[i].size())) continue;  // every token takes every channel
        for (size_t c = 0; c < s.shares[i].size(); c++) {
            const double tokens = s.shares[i][c] * k;  // share of the block's tokens choosing c
            if (tokens > threshold) {
                char buf[96];
                std::snprintf(buf, sizeof buf, "%sblock %zu: channel %zu chosen by %.1f%%", blocks.empty() ? "" : "; ",
                              i, c, 100.0 * tokens);
                blocks += buf;
            }
        }
    }
    if (blocks.empty()) return "";
    char head[128];
    std::snprintf(head, sizeof head, "warning: router collapse at step %lld (one channel chosen by over %.0f%% of a block's tokens): ",
                  (long long)step, 100.0 * threshold);
    return head + blocks;
}

ClassRouting::ClassRouting(int num_classes, int depth_, int channels_)
    : classes(num_classes), depth(depth_), channels(channels_),
      images(size_t(num_classes), 0), slots(size_t(num_classes) * depth_ * channels_, 0) {}

void ClassRouting::add(const std::vector<std::vector<int>>& per_block, const int32_t* labels, int B) {
    for (int b = 0; b < B; b++) images[size_t(labels[b])]++;
    for (int i = 0; i < depth && i < int(per_block.size()); i++)
        for (int b = 0; b < B; b++)
            for (int c = 0; c < channels; c++)
                slots[(size_t(labels[b]) * depth + i) * channels + c] += per_block[i][size_t(b) * channels + c];
}

nlohmann::json routing_json(const ClassRouting& r, int64_t step, int top_k, int patches,
                            const std::vector<std::string>& channel_names) {
    nlohmann::json blocks = nlohmann::json::array();
    for (int i = 0; i < r.depth; i++) {
        nlohmann::json rows = nlohmann::json::array();
        for (int y = 0; y < r.classes; y++) {
            std::vector<int64_t> row(size_t(r.channels));
            for (int c = 0; c < r.channels; c++) row[size_t(c)] = r.at(y, i, c);
            rows.push_back(row);
        }
        blocks.push_back(rows);
    }
    return {{"step", step}, {"top_k", top_k}, {"channels", r.channels}, {"channel_names", channel_names},
            {"patches", patches}, {"class_images", r.images}, {"slots", blocks}};
}

std::vector<double> per_class_accuracy(const std::vector<int64_t>& confusion, int K) {
    std::vector<double> acc(size_t(K), std::nan(""));
    for (int y = 0; y < K; y++) {
        int64_t row = 0;
        for (int p = 0; p < K; p++) row += confusion[size_t(y) * K + p];
        if (row) acc[size_t(y)] = double(confusion[size_t(y) * K + y]) / double(row);
    }
    return acc;
}

}  // namespace prism
