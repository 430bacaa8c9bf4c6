// FLOP accounting (DESIGN.md §5). Attention follows the paper's convention
// exactly so `prism flops` reproduces its Tables 1-2 and Figure 3; the rest
// of the model is counted the same way (2 FLOPs per multiply-add) so that
// whole-model numbers can be compared with measured throughput.
//
// What is counted per block: attention as in §5, the MLP's two matmuls, and
// both LayerNorms at 8 FLOPs per element each (mean 1, variance 3, normalize
// 2, affine 2). Not counted (each well under 0.1% of a block): biases,
// residual adds, GELU, the MoE combine weights, the router softmax/top-k,
// positional/channel embedding adds and the final LayerNorm.
#include "engine/flops.h"
#include "engine/common.h"

#include <algorithm>
#include <string>

namespace prism {

namespace {
int checked_subset(const ModelConfig& cfg, int subset) {
    const int s = subset > 0 ? subset : cfg.channels;
    if (s > cfg.channels)
        throw UserError("flops: subset of " + std::to_string(s) + " channels exceeds model.channels " +
                        std::to_string(cfg.channels));
    return s;
}

// Tokens that go through a block (CLS included). vit sees one token per
// spatial patch whatever S is: HCS zeroes channels instead of dropping them.
double block_tokens(const ModelConfig& cfg, int s) {
    const double N = cfg.num_patches();
    return cfg.arch == "vit" ? N + 1 : double(s) * N + 1;
}
}  // namespace

double attention_flops(const ModelConfig& cfg, int subset) {
    const int s = checked_subset(cfg, subset);
    const double C = cfg.channels;
    const double N = cfg.num_patches();
    const double D = cfg.dim;
    const double Hd = cfg.heads;
    const double T = double(s) * N;  // patch tokens of the channel-wise models
    if (cfg.arch == "moevit") {
        const double k = std::min(cfg.top_k, s);
        // q for every token + per-channel k, v + out (4 matmuls D×D), the
        // router scoring all C channels (it is masked, not shrunk, under HCS),
        // then QKᵀ and AV against N keys for each of k routed channels, and
        // one softmax FLOP per score per head.
        double attn = 8 * T * D * D + 2 * T * D * C + 4 * T * k * N * D + T * k * N * Hd;
        // CLS: its q and out projections, dense QKᵀ/AV over all T patches
        attn += 4 * D * D + 4 * T * D + T * Hd;
        return attn;
    }
    // qkv + out projections, QKᵀ + AV, softmax
    const double tokens = block_tokens(cfg, s);
    return 2 * tokens * D * 4 * D + 4 * tokens * tokens * D + tokens * tokens * Hd;
}

FlopCount count_flops(const ModelConfig& cfg, int subset) {
    const double C = cfg.channels;
    const int s = checked_subset(cfg, subset);
    const double N = cfg.num_patches();
    const double D = cfg.dim;
    const double P = cfg.patch;
    const double hidden = cfg.hidden();
    const double T = double(s) * N;
    const double tokens = block_tokens(cfg, s);

    const double attn = attention_flops(cfg, s);
    double mlp = 2 * tokens * D * hidden * 2;
    double norms = 2 * 8 * tokens * D;
    double block = attn + mlp + norms;

    // vit convolves all C channels into one token per patch; the channel-wise
    // models convolve each present channel separately with a 1-channel kernel.
    double embed = cfg.arch == "vit" ? 2 * N * C * P * P * D : 2 * T * P * P * D;
    double head = 2 * D * cfg.num_classes;
    double forward = embed + cfg.depth * block + head;

    FlopCount f;
    f.attention_gflops = attn / 1e9;
    f.block_gflops = block / 1e9;
    f.forward_gflops = forward / 1e9;
    // backward costs two matmuls per forward matmul (dX and dW)
    f.train_step_gflops_per_image = 3 * forward / 1e9;
    return f;
}

}  // namespace prism
