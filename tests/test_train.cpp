// Training converges through the whole engine (synth, shards, loader, model,
// AdamW, schedule, eval) with the shipped configs/synth_tiny_*.json on the
// tiny relational task, on a shortened schedule so CI stays quick.
#include <cstdio>
#include <string>
#include "data/synth.h"
#include "engine/train.h"
#include "tests/testutil.h"
#include <gtest/gtest.h>

using namespace prism;

TEST(Train, EveryShippedTinyConfigLearnsTheTinyTask) {
    const prism::testing::TmpDir tmp;
    const std::string dir = tmp / "data";
    synthesize("tiny", dir, 4096, 5, false);  // 4096 train, 1024 val
    for (const char* arch : {"vit", "chvit", "moevit"}) {
        const Config cfg = load_config(std::string("configs/synth_tiny_") + arch + ".json",
                                       {"data.train=" + dir + "/train-*.shard", "data.val=" + dir + "/val-*.shard",
                                        "train.steps=600", "train.eval_every=0"});
        const TrainResult r = train(cfg, Device::cpu, "", false);
        std::printf("%s: val accuracy %.3f, val loss %.3f after %lld steps, %.0f s\n", arch, r.val.accuracy,
                    r.val.loss, (long long)r.steps, r.seconds);
        EXPECT_GE(r.val.accuracy, 0.9) << arch << " reached only " << r.val.accuracy << " (chance 0.25)";
        EXPECT_EQ(r.val.count, 1024);
    }
}
