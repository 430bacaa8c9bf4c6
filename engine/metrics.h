// What a run measures beyond its loss: MoE-ViT routing diagnostics over a
// logging window (channel load, entropy, router collapse), the per-class
// routing histogram of an evaluation (RUN/routing.json), and the confusion
// matrix of an evaluation.
#pragma once
#include <cstdint>
#include <string>
#include <vector>
#include <nlohmann/json.hpp>

namespace prism {

// Token-slots routed to each channel, per block, summed over the steps of a
// logging window (Model::routing_counts() of each step).
struct RoutingWindow {
    std::vector<std::vector<int64_t>> counts;  // [depth][C]

    void add(const std::vector<std::vector<int>>& step_counts);
    bool empty() const { return counts.empty(); }
    void clear() { counts.clear(); }
};

struct RoutingSummary {
    std::vector<std::vector<double>> shares;  // [depth][C]: share of the block's slots; sums to 1
    std::vector<double> entropy;              // [depth]: −Σ share·ln share, in nats (at most ln C)
};
RoutingSummary summarize_routing(const RoutingWindow& w);

// Router collapse: one channel is among the choices of more than `threshold`
// of a block's tokens, i.e. holds more than threshold/k of its slots (a token
// picks a channel at most once; k = min(top_k, C)). With k = 1 that is more
// than 90% of the slots. When every token must pick every channel (k = C)
// there is no choice to collapse and it never fires. Returns one warning
// line naming every such block, the channel and its share of the tokens, or
// "" when no block collapsed.
std::string collapse_warning(const RoutingSummary& s, int64_t step, int top_k, double threshold = 0.9);

// The per-class routing histogram of an evaluation: for each class, block and
// channel, the token-slots of that class's images routed to the channel.
struct ClassRouting {
    int classes = 0, depth = 0, channels = 0;
    std::vector<int64_t> images;  // [classes]
    std::vector<int64_t> slots;   // [classes][depth][channels]

    ClassRouting(int num_classes, int depth, int channels);
    // per_block[i] = Model::routing_counts_per_image(i) of a batch of B images.
    void add(const std::vector<std::vector<int>>& per_block, const int32_t* labels, int B);
    int64_t at(int cls, int block, int channel) const {
        return slots[(size_t(cls) * depth + block) * channels + channel];
    }
};

// RUN/routing.json: {"step", "top_k", "channels", "channel_names", "patches",
// "class_images": [classes], "slots": [depth][classes][channels]}.
nlohmann::json routing_json(const ClassRouting& r, int64_t step, int top_k, int patches,
                            const std::vector<std::string>& channel_names);

// Adds one batch's predictions (argmax of logits [B, K], ties to the lower
// class, as the loss counts accuracy) to confusion [K, K]: row = true label,
// column = prediction.
template <class T>
void tally_confusion(std::vector<int64_t>& confusion, const T* logits, const int32_t* labels, int B, int K) {
    for (int b = 0; b < B; b++) {
        const T* z = logits + int64_t(b) * K;
        int argmax = 0;
        for (int c = 1; c < K; c++)
            if (z[c] > z[argmax]) argmax = c;
        confusion[size_t(labels[b]) * K + argmax]++;
    }
}

// Per class: diagonal / row sum (NaN for a class with no images).
std::vector<double> per_class_accuracy(const std::vector<int64_t>& confusion, int K);

}  // namespace prism
