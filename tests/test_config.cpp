// Config loading: every shipped config loads, --set behaves as documented
// (DESIGN.md §4), and each kind of bad input is refused with one line naming
// the file or the --set that caused it.
#include <gtest/gtest.h>

#include <cstdio>
#include <dirent.h>
#include <functional>
#include <string>
#include <vector>

#include "engine/common.h"
#include "engine/config.h"
#include "engine/device.h"
#include "tests/testutil.h"

using namespace prism;
using nlohmann::json;

// One directory for the whole file's configs, removed when the tests exit.
static const prism::testing::TmpDir config_dir;

static std::string write_temp(const std::string& name, const std::string& text) {
    std::string path = config_dir / name;
    FILE* f = std::fopen(path.c_str(), "wb");
    EXPECT_TRUE(f != nullptr) << path;
    if (f) {
        std::fwrite(text.data(), 1, text.size(), f);
        std::fclose(f);
    }
    return path;
}

// Runs fn, which must throw UserError; returns the message (empty if it did not throw).
static std::string user_error(const std::function<void()>& fn) {
    try {
        fn();
    } catch (const UserError& e) {
        return e.what();
    }
    ADD_FAILURE() << "expected a UserError";
    return "";
}

static bool has(const std::string& msg, const std::string& part) {
    return msg.find(part) != std::string::npos;
}

static const char* kSmall = R"({
  "model": {"arch": "moevit", "image": 32, "channels": 4, "patch": 8, "dim": 64,
            "depth": 2, "heads": 4, "top_k": 2},
  "train": {"batch": 8, "lr": 0.001}
})";

TEST(Config, ShippedConfigsLoad) {
    DIR* dir = opendir("configs");
    ASSERT_TRUE(dir != nullptr) << "run the tests from the repository root";
    std::vector<std::string> files;
    while (dirent* e = readdir(dir)) {
        std::string n = e->d_name;
        if (n.size() > 5 && n.substr(n.size() - 5) == ".json") files.push_back("configs/" + n);
    }
    closedir(dir);
    EXPECT_GE(files.size(), 12u);
    for (const std::string& f : files) {
        try {
            Config c = load_config(f);
            EXPECT_FALSE(c.data.train.empty()) << f;
            EXPECT_FALSE(c.data.val.empty()) << f;
        } catch (const UserError& e) {
            ADD_FAILURE() << e.what();
        }
    }
}

TEST(Config, ShippedJumpcpRecipe) {
    Config c = load_config("configs/jumpcp_moevit_k2.json");
    EXPECT_EQ(c.model.arch, "moevit");
    EXPECT_EQ(c.model.image, 224);
    EXPECT_EQ(c.model.channels, 8);
    EXPECT_EQ(c.model.patch, 16);
    EXPECT_EQ(c.model.dim, 384);
    EXPECT_EQ(c.model.depth, 12);
    EXPECT_EQ(c.model.heads, 6);
    EXPECT_EQ(c.model.num_classes, 161);
    EXPECT_EQ(c.model.top_k, 2);
    EXPECT_EQ(c.model.hidden(), 1536);
    EXPECT_EQ(c.model.num_patches(), 196);
    EXPECT_EQ(c.train.precision, "bf16");
    EXPECT_TRUE(c.train.hcs);
    EXPECT_EQ(c.data.augment, "jumpcp");
}

TEST(Config, DefaultsForMissingKeys) {
    Config c = load_config(write_temp("defaults.json", kSmall));
    Config d;
    EXPECT_EQ(c.model.combine, d.model.combine);
    EXPECT_EQ(c.model.aux, d.model.aux);
    EXPECT_EQ(c.model.aux_coef, d.model.aux_coef);
    EXPECT_EQ(c.model.mlp_ratio, d.model.mlp_ratio);
    EXPECT_EQ(c.train.beta2, d.train.beta2);
    EXPECT_EQ(c.train.batch, 8);
    EXPECT_EQ(c.data.train, "");  // validate does not need data (prism flops)
}

// DESIGN.md §7 and issue 4: bf16 is the default on CUDA, fp32 on the CPU.
TEST(Config, PrecisionAutoIsBf16OnCudaOnly) {
    const Config c = load_config(write_temp("defaults.json", kSmall));
    EXPECT_EQ(c.train.precision, "auto");
    EXPECT_TRUE(bf16_mode("auto", Device::cuda));
    EXPECT_FALSE(bf16_mode("auto", Device::cpu));
    EXPECT_TRUE(bf16_mode("bf16", Device::cuda));
    EXPECT_FALSE(bf16_mode("bf16", Device::cpu));
    EXPECT_FALSE(bf16_mode("fp32", Device::cuda));
    EXPECT_FALSE(bf16_mode("fp32", Device::cpu));
}

TEST(Config, SetOverrides) {
    std::string path = write_temp("set.json", kSmall);
    Config c = load_config(path, {"model.top_k=1", "train.hcs=true", "data.train=/tmp/x-*.shard",
                                  "model.arch=chvit", "train.lr=2e-4", "train.steps=1e3",
                                  "model.combine=\"renorm\""});
    EXPECT_EQ(c.model.top_k, 1);
    EXPECT_TRUE(c.train.hcs);
    EXPECT_EQ(c.data.train, "/tmp/x-*.shard");  // not JSON: taken as a string
    EXPECT_EQ(c.model.arch, "chvit");
    EXPECT_DOUBLE_EQ(c.train.lr, 2e-4);
    EXPECT_EQ(c.train.steps, 1000);
    EXPECT_EQ(c.model.combine, "renorm");
    // later overrides win
    c = load_config(path, {"model.top_k=1", "model.top_k=3"});
    EXPECT_EQ(c.model.top_k, 3);
    // an override can repair a file that would not validate on its own
    std::string bad = write_temp("set_repair.json",
                                 R"({"model": {"channels": 4, "top_k": 9}})");
    EXPECT_EQ(load_config(bad, {"model.top_k=4"}).model.top_k, 4);
}

TEST(Config, ApplySetOnJson) {
    json j = json::object();
    apply_set(j, "model.dim=128");
    apply_set(j, "train.hcs=false");
    apply_set(j, "data.val=val.shard");
    EXPECT_EQ(j["model"]["dim"], 128);
    EXPECT_EQ(j["train"]["hcs"], false);
    EXPECT_EQ(j["data"]["val"], "val.shard");
}

TEST(Config, SetRefusals) {
    std::string path = write_temp("set_bad.json", kSmall);
    std::string m = user_error([&] { load_config(path, {"model.topk=2"}); });
    EXPECT_EQ(m, "--set model.topk=2: unknown key model.topk");
    m = user_error([&] { load_config(path, {"foo"}); });
    EXPECT_TRUE(has(m, "--set foo")) << m;
    m = user_error([&] { load_config(path, {"optim.lr=1"}); });
    EXPECT_TRUE(has(m, "--set optim.lr=1")) << m;
    m = user_error([&] { load_config(path, {"model=3"}); });
    EXPECT_TRUE(has(m, "--set model=3")) << m;
    // wrong type from --set blames the --set, not the file
    m = user_error([&] { load_config(path, {"model.dim=abc"}); });
    EXPECT_TRUE(has(m, "--set model.dim=abc")) << m;
    EXPECT_TRUE(has(m, "model.dim must be an integer")) << m;
    // impossible value after --set names both
    m = user_error([&] { load_config(path, {"model.top_k=5"}); });
    EXPECT_TRUE(has(m, path)) << m;
    EXPECT_TRUE(has(m, "--set model.top_k=5")) << m;
    EXPECT_TRUE(has(m, "model.top_k")) << m;
}

TEST(Config, FileRefusals) {
    struct Case { const char* name; const char* text; const char* expect; };
    const Case cases[] = {
        {"unknown_key.json", R"({"model": {"top_kk": 2}})", "unknown key model.top_kk"},
        {"unknown_section.json", R"({"optim": {"lr": 1}})", "unknown section optim"},
        {"section_type.json", R"({"model": 3})", "section model"},
        {"not_object.json", R"([1, 2])", "JSON object"},
        {"wrong_type.json", R"({"model": {"dim": "abc"}})", "model.dim must be an integer, got \"abc\""},
        {"fraction.json", R"({"model": {"dim": 64.5}})", "model.dim must be an integer"},
        {"bool_type.json", R"({"train": {"hcs": 1}})", "train.hcs must be true or false"},
        {"string_type.json", R"({"model": {"arch": 3}})", "model.arch must be a string"},
        {"double_type.json", R"({"train": {"lr": "fast"}})", "train.lr must be a finite number"},
        {"int_range.json", R"({"model": {"dim": 3000000000}})", "out of range"},
        {"top_k.json", R"({"model": {"arch": "moevit", "channels": 4, "top_k": 5}})", "model.top_k 5"},
        {"top_k0.json", R"({"model": {"arch": "moevit", "top_k": 0}})", "model.top_k 0"},
        {"patch.json", R"({"model": {"image": 30, "patch": 8}})",
         "model.image 30 is not divisible by model.patch 8"},
        {"heads.json", R"({"model": {"dim": 64, "heads": 5}})", "model.dim 64 is not divisible by model.heads 5"},
        {"arch.json", R"({"model": {"arch": "resnet"}})", "model.arch must be one of"},
        {"combine.json", R"({"model": {"combine": "max"}})", "model.combine"},
        {"aux.json", R"({"model": {"aux": "zloss"}})", "model.aux"},
        {"coef.json", R"({"model": {"aux_coef": -1}})", "model.aux_coef"},
        {"drop_path.json", R"({"model": {"drop_path": 1.0}})", "model.drop_path"},
        {"mlp_ratio.json", R"({"model": {"mlp_ratio": 0}})", "model.mlp_ratio"},
        {"depth.json", R"({"model": {"depth": 0}})", "model.depth must be >= 1"},
        {"augment.json", R"({"data": {"augment": "flip"}})", "data.augment"},
        {"batch.json", R"({"train": {"batch": 0}})", "train.batch"},
        {"lr.json", R"({"train": {"lr": 0}})", "train.lr"},
        {"steps.json", R"({"train": {"steps": -1}})", "train.steps"},
        {"epochs.json", R"({"train": {"epochs": -1}})", "train.epochs"},
        {"precision.json", R"({"train": {"precision": "fp16"}})", "train.precision"},
        {"beta.json", R"({"train": {"beta2": 1.0}})", "train.beta2"},
        {"eps.json", R"({"train": {"eps": 0}})", "train.eps"},
        {"seed.json", R"({"train": {"seed": -1}})", "train.seed"},
        {"bad_json.json", R"({"model": {"dim": 64,}})", "invalid JSON"},
        {"empty.json", "", "invalid JSON"},
        {"repeated_key.json", R"({"train": {"lr": -1, "lr": 0.001}})", "key \"lr\" appears twice in one object"},
        {"repeated_section.json", R"({"model": {"dim": 64}, "model": {"depth": 2}})", "key \"model\" appears twice"},
        {"array_value.json", R"({"model": {"dim": [64, 128]}})", "model.dim must be an integer, got an array"},
        {"object_section.json", R"({"model": [{"dim": 64}]})", "section model must be a JSON object, got an array"},
        {"deep_depth.json", R"({"model": {"depth": 2000000000}})", "model.depth must be <= 1024"},
        {"huge_epochs.json", R"({"train": {"steps": 0, "epochs": 1e300}})", "train.epochs must be in [0, 1e6]"},
        {"huge_warmup.json", R"({"train": {"warmup_epochs": 1e300}})", "train.warmup_epochs must be in [0, 1e6]"},
    };
    for (const Case& c : cases) {
        std::string path = write_temp(c.name, c.text);
        std::string m = user_error([&] { load_config(path); });
        EXPECT_EQ(m.rfind(path + ": ", 0), 0u) << c.name << ": " << m;
        EXPECT_TRUE(has(m, c.expect)) << c.name << ": " << m;
        EXPECT_EQ(m.find('\n'), std::string::npos) << c.name << ": " << m;
    }
}

// A value is quoted in an error by its kind or cut short: dumping a deeply
// nested one recursed until the stack ran out, and a long string came back whole.
TEST(Config, RefusalsQuoteValuesShortly) {
    const int depth = 200000;
    std::string path = write_temp("deep.json", R"({"model": {"dim": )" + std::string(depth, '[') +
                                                   std::string(depth, ']') + "}}");
    std::string m = user_error([&] { load_config(path); });
    EXPECT_TRUE(has(m, "model.dim must be an integer, got an array")) << m.substr(0, 200);
    path = write_temp("long.json", R"({"model": {"arch": ")" + std::string(100000, 'x') + R"("}})");
    m = user_error([&] { load_config(path); });
    EXPECT_TRUE(has(m, "model.arch must be one of")) << m.substr(0, 200);
    EXPECT_LT(m.size(), 300u) << m.substr(0, 400);
    // The same key in two different objects is no repeat.
    path = write_temp("same_key_twice.json", R"({"data": {"train": "t-*.shard"}, "train": {"seed": 1}})");
    EXPECT_EQ(load_config(path).data.train, "t-*.shard");
}

TEST(Config, MissingFile) {
    std::string m = user_error([] { load_config("/nonexistent/prism.json"); });
    EXPECT_EQ(m.rfind("/nonexistent/prism.json: ", 0), 0u) << m;
}

TEST(Config, TopKOnlyCheckedForMoe) {
    std::string path = write_temp("topk_chvit.json",
                                  R"({"model": {"arch": "chvit", "channels": 2, "top_k": 5}})");
    EXPECT_NO_THROW(load_config(path));
}

TEST(Config, JsonRoundTrip) {
    Config c = load_config("configs/jumpcp_moevit_k2.json",
                           {"train.seed=18446744073709551615", "train.min_lr=1.25e-7",
                            "model.z_loss_coef=0.001", "train.warmup_steps=77",
                            "model.combine=renorm", "model.aux=importance"});
    json j = config_to_json(c);
    // every contract key of DESIGN.md §4 is present
    const char* keys[][2] = {
        {"model", "arch"}, {"model", "image"}, {"model", "channels"}, {"model", "patch"},
        {"model", "dim"}, {"model", "depth"}, {"model", "heads"}, {"model", "mlp_ratio"},
        {"model", "num_classes"}, {"model", "top_k"}, {"model", "combine"}, {"model", "aux"},
        {"model", "aux_coef"}, {"model", "z_loss_coef"}, {"model", "drop_path"},
        {"data", "train"}, {"data", "val"}, {"data", "augment"},
        {"train", "batch"}, {"train", "steps"}, {"train", "epochs"}, {"train", "lr"},
        {"train", "weight_decay"}, {"train", "warmup_steps"}, {"train", "seed"},
        {"train", "hcs"}, {"train", "precision"}, {"train", "eval_every"},
        {"train", "checkpoint_every"},
    };
    for (auto& k : keys) EXPECT_TRUE(j[k[0]].contains(k[1])) << k[0] << "." << k[1];
    // through text, as a checkpoint's metadata would carry it
    Config r = config_from_json(json::parse(j.dump()), "checkpoint");
    EXPECT_EQ(config_to_json(r), j);
    EXPECT_EQ(r.train.seed, 18446744073709551615ull);
    EXPECT_EQ(r.train.min_lr, 1.25e-7);
    EXPECT_EQ(r.model.combine, "renorm");
    EXPECT_EQ(r.train.warmup_steps, 77);
    EXPECT_EQ(r.data.train, c.data.train);
}

TEST(Config, FromJsonOrigin) {
    json j = {{"model", {{"heads", 7}}}};
    std::string m = user_error([&] { config_from_json(j, "ckpt/model.safetensors"); });
    EXPECT_EQ(m.rfind("ckpt/model.safetensors: ", 0), 0u) << m;
}

TEST(Config, FaultKeysHaveDefaultsAndAreChecked) {
    const Config c = config_from_json(json::object(), "x.json");
    EXPECT_EQ(c.train.comm_timeout_s, 300);
    EXPECT_FALSE(c.train.skip_nonfinite);
    EXPECT_TRUE(c.train.overlap_comm);
    EXPECT_FALSE(config_from_json({{"train", {{"overlap_comm", false}}}}, "x.json").train.overlap_comm);
    EXPECT_EQ(user_error([] { config_from_json({{"train", {{"overlap_comm", "no"}}}}, "x.json"); }).rfind("x.json: ", 0),
              0u);
    const Config d = config_from_json({{"train", {{"comm_timeout_s", 2.5}, {"skip_nonfinite", true}}}}, "x.json");
    EXPECT_EQ(d.train.comm_timeout_s, 2.5);
    EXPECT_TRUE(d.train.skip_nonfinite);
    EXPECT_EQ(user_error([] { config_from_json({{"train", {{"comm_timeout_s", 0}}}}, "x.json"); }),
              "x.json: train.comm_timeout_s must be > 0, got 0");
    EXPECT_EQ(c.train.zero, 0);
    EXPECT_EQ(config_from_json({{"train", {{"zero", 1}}}}, "x.json").train.zero, 1);
    EXPECT_EQ(user_error([] { config_from_json({{"train", {{"zero", 2}}}}, "x.json"); }),
              "x.json: train.zero must be 0 (off) or 1 (ZeRO-1: shard AdamW's moments over the ranks), got 2");
}
