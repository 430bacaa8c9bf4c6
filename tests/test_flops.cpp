// `prism flops` must reproduce the paper's attention GFLOPs (DESIGN.md §5)
// from the shipped configs, within 2%.
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "engine/common.h"
#include "engine/config.h"
#include "engine/flops.h"

using namespace prism;

static double attention(const std::string& config, const std::vector<std::string>& sets = {}) {
    return count_flops(load_config(config, sets).model).attention_gflops;
}

// The paper prints two decimals, so So2Sat ViT's 0.0205 appears as "0.02":
// 2.5% off the printed value, yet exactly its formula. A number passes when it
// is within 2% or prints as the paper's number.
static bool matches_paper(double got, double paper) {
    return std::fabs(got - paper) <= 0.02 * paper || std::lround(got * 100) == std::lround(paper * 100);
}
#define EXPECT_WITHIN_2PCT(got, paper) \
    EXPECT_TRUE(matches_paper((got), (paper))) << "got " << (got) << ", paper " << (paper)

TEST(Flops, JumpcpTable1) {
    EXPECT_WITHIN_2PCT(attention("configs/jumpcp_vit.json"), 0.29);
    EXPECT_WITHIN_2PCT(attention("configs/jumpcp_chvit.json"), 5.65);
    EXPECT_WITHIN_2PCT(attention("configs/jumpcp_moevit_k1.json"), 2.33);
    EXPECT_WITHIN_2PCT(attention("configs/jumpcp_moevit_k2.json"), 2.81);
    EXPECT_WITHIN_2PCT(attention("configs/jumpcp_moevit_k8.json"), 5.65);
}

TEST(Flops, So2satTable2) {
    EXPECT_WITHIN_2PCT(attention("configs/so2sat_vit.json"), 0.02);
    EXPECT_WITHIN_2PCT(attention("configs/so2sat_chvit.json"), 0.47);
    EXPECT_WITHIN_2PCT(attention("configs/so2sat_moevit_k1.json"), 0.35);
    EXPECT_WITHIN_2PCT(attention("configs/so2sat_moevit_k2.json"), 0.36);
}

TEST(Flops, JumpcpPatch8Figure3) {
    const double paper[] = {15.02, 22.61, 30.19, 37.77};
    for (int k = 1; k <= 4; k++)
        EXPECT_WITHIN_2PCT(attention("configs/jumpcp_moevit_k1.json",
                                     {"model.patch=8", "model.top_k=" + std::to_string(k)}),
                           paper[k - 1]);
}

TEST(Flops, WholeModel) {
    ModelConfig m = load_config("configs/jumpcp_chvit.json").model;
    FlopCount f = count_flops(m);
    // T' = 1569 tokens: MLP 2·T'·D·4D·2 and two LayerNorms of 8·T'·D each
    double T = 1569, D = 384;
    double block = f.attention_gflops + (2 * T * D * 4 * D * 2 + 16 * T * D) / 1e9;
    EXPECT_NEAR(f.block_gflops, block, 1e-9);
    // embedding: a 1-channel 16x16 conv for each of the 8·196 channel patches
    double forward = 2 * (8 * 196) * 256 * D / 1e9 + 12 * block + 2 * D * 161 / 1e9;
    EXPECT_NEAR(f.forward_gflops, forward, 1e-9);
    EXPECT_NEAR(f.train_step_gflops_per_image, 3 * f.forward_gflops, 1e-9);
    // vit embeds all channels into one token per patch: same conv FLOPs, far fewer tokens
    FlopCount v = count_flops(load_config("configs/jumpcp_vit.json").model);
    EXPECT_LT(v.forward_gflops, f.forward_gflops / 4);
}

TEST(Flops, Subset) {
    ModelConfig m = load_config("configs/jumpcp_moevit_k2.json").model;
    // with |S| = 1 the effective k is 1, and |S| = C is the default
    FlopCount one = count_flops(m, 1);
    EXPECT_LT(one.attention_gflops, count_flops(m).attention_gflops / 4);
    EXPECT_DOUBLE_EQ(count_flops(m, 8).forward_gflops, count_flops(m).forward_gflops);
    // vit zeroes missing channels rather than dropping tokens
    ModelConfig v = load_config("configs/jumpcp_vit.json").model;
    EXPECT_DOUBLE_EQ(count_flops(v, 3).forward_gflops, count_flops(v).forward_gflops);
    EXPECT_THROW(count_flops(m, 9), UserError);
}
