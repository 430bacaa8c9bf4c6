// `prism bench attention` off the GPU: option checks, the --k list, the
// default batch rule (bench/torch_peer.py repeats it, so it is pinned here),
// the FLOP helper it divides by, and the clean refusal without a CUDA device.
// The timing itself needs a GPU and is run there by hand (README).
// `prism bench step` and `prism bench loader` run here; their numbers are not
// checked, only what they print.
#include <nlohmann/json.hpp>
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "bench/bench.h"
#include "engine/common.h"
#include "engine/config.h"
#include "engine/flops.h"
#include "tests/shellutil.h"
#include "tests/testutil.h"

using namespace prism;
using prism::testing::build_dir;
using prism::testing::run_shell;
using prism::testing::ShellRun;

namespace {

int exit_code(const ShellRun& r) { return WIFEXITED(r.status) ? WEXITSTATUS(r.status) : -1; }

// The output minus trailing newlines, and how many lines that is.
int lines_of(const std::string& s) {
    std::string t = s;
    while (!t.empty() && t.back() == '\n') t.pop_back();
    if (t.empty()) return 0;
    int n = 1;
    for (char c : t) n += c == '\n';
    return n;
}

}  // namespace

TEST(BenchAttention, KList) {
    EXPECT_EQ(parse_k_list("1,2,4,C", 8), (std::vector<int>{1, 2, 4, 8}));
    EXPECT_EQ(parse_k_list("1,2,4,C", 4), (std::vector<int>{1, 2, 4}));  // C = 4: no second 4
    EXPECT_EQ(parse_k_list("C,1", 18), (std::vector<int>{18, 1}));
    EXPECT_EQ(parse_k_list("3", 18), (std::vector<int>{3}));
    for (const char* bad : {"0", "9", "1,,2", "", "x", "2.5", "-1", "1,2,"}) {
        SCOPED_TRACE(bad);
        EXPECT_THROW(parse_k_list(bad, 8), UserError);
    }
}

// The helper is the §5 count count_flops reports: same numbers for every arch.
TEST(BenchAttention, AttentionFlopsIsTheSection5Count) {
    for (const char* cfg : {"configs/jumpcp_vit.json", "configs/jumpcp_chvit.json", "configs/jumpcp_moevit_k2.json",
                            "configs/so2sat_moevit_k1.json"}) {
        const ModelConfig m = load_config(cfg).model;
        EXPECT_DOUBLE_EQ(attention_flops(m) / 1e9, count_flops(m).attention_gflops) << cfg;
        EXPECT_DOUBLE_EQ(attention_flops(m, 3) / 1e9, count_flops(m, 3).attention_gflops) << cfg;
    }
    // moevit at k = C does the dense block's attention work plus the router
    // and the CLS row's extra projections (the paper's k=8 equals chvit: 5.65).
    ModelConfig m = load_config("configs/jumpcp_moevit_k8.json").model;
    ModelConfig dense = m;
    dense.arch = "chvit";
    EXPECT_NEAR(attention_flops(m) / attention_flops(dense), 1.0, 0.02);
}

// The default batch is part of what bench/torch_peer.py must reproduce; these
// are the numbers it prints for the three shapes of the README's commands.
TEST(BenchAttention, DefaultBatch) {
    const std::vector<int> ks8 = {1, 2, 4, 8}, ks18 = {1, 2, 4, 18};
    const ModelConfig p16 = load_config("configs/jumpcp_chvit.json").model;
    const ModelConfig p8 = load_config("configs/jumpcp_chvit.json", {"model.patch=8"}).model;
    const ModelConfig so2sat = load_config("configs/so2sat_chvit.json").model;
    EXPECT_EQ(default_attention_batch(p16, ks8), 73);
    EXPECT_EQ(default_attention_batch(p8, ks8), 18);
    EXPECT_EQ(default_attention_batch(so2sat, ks18), 218);
    // Never 0, whatever the shape.
    const ModelConfig huge = load_config("configs/jumpcp_chvit.json", {"model.patch=1"}).model;
    EXPECT_EQ(default_attention_batch(huge, {1}), 1);
    // The biggest variant decides: k = C needs more than the dense block here.
    EXPECT_GT(attention_bench_bytes_per_image(p16, 8), attention_bench_bytes_per_image(p16, 0));
}

// --impl bf16 runs the block as the bf16 mode does: on the flash kernels
// where the head dim is 64 (every shipped JUMP-CP and So2Sat config), else on
// the fp32 ones, as the model would.
TEST(BenchAttention, KernelsFollowTheMode) {
    AttentionBenchOptions o;
    o.model = load_config("configs/jumpcp_chvit.json").model;
    ASSERT_EQ(o.model.dim, 64 * o.model.heads);
    EXPECT_EQ(o.impl, "bf16");  // the default, as train.precision's on CUDA
    EXPECT_EQ(attention_bench_kernels(o), "flash");
    EXPECT_EQ(attention_bench_json(o, AttentionBenchRow{})["precision"], "bf16");
    o.impl = "reference";
    EXPECT_EQ(attention_bench_kernels(o), "reference");
    EXPECT_EQ(attention_bench_json(o, AttentionBenchRow{})["precision"], "fp32");
    o.impl = "bf16";
    o.model.heads *= 2;  // head dim 32
    EXPECT_EQ(attention_bench_kernels(o), "reference");
}

TEST(BenchAttention, BadOptionsFailWithOneLine) {
    const std::string prism = build_dir() + "prism bench attention ";
    const char* cases[][2] = {
        {"--config configs/jumpcp_chvit.json --k 9", "--k 9"},
        {"--config configs/jumpcp_chvit.json --k 1,x", "'x'"},
        {"--config configs/jumpcp_chvit.json --iters 0", "--iters"},
        {"--config configs/jumpcp_chvit.json --batch -1", "--batch"},
        {"--config configs/jumpcp_chvit.json --impl fast", "--impl fast"},
        {"--config configs/jumpcp_chvit.json --impl flash", "expected bf16 or reference"},
        {"--config configs/no_such.json", "no_such.json"},
        {"", "--config is required"},
    };
    for (const auto& c : cases) {
        const ShellRun r = run_shell(prism + c[0]);
        SCOPED_TRACE(c[0]);
        EXPECT_EQ(exit_code(r), 1) << r.output;
        EXPECT_EQ(lines_of(r.output), 1) << r.output;
        EXPECT_NE(r.output.find(c[1]), std::string::npos) << r.output;
    }
}

TEST(BenchAttention, RefusesCleanlyWithoutCudaDevice) {
    if (attention_bench_has_device()) GTEST_SKIP() << "a CUDA device is present: the benchmark would run";
    const ShellRun r = run_shell(build_dir() + "prism bench attention --config configs/jumpcp_chvit.json --iters 2");
    EXPECT_EQ(exit_code(r), 1) << r.output;
    EXPECT_EQ(r.output, "prism bench attention: no CUDA device\n");
}

// `prism bench step` runs on either device; on the CPU a tiny config keeps it quick.
TEST(BenchStep, TimesStepsAndPrintsOneJsonLine) {
    const ShellRun r = run_shell(build_dir() +
                                 "prism bench step --config configs/synth_tiny_moevit.json --device cpu --batch 8 "
                                 "--iters 2 --warmup 1");
    ASSERT_EQ(exit_code(r), 0) << r.output;
    const size_t at = r.output.rfind("{\"arch\"");
    ASSERT_NE(at, std::string::npos) << r.output;
    const nlohmann::json j = nlohmann::json::parse(r.output.substr(at));
    EXPECT_EQ(j["arch"], "moevit");
    EXPECT_EQ(j["batch"], 8);
    EXPECT_EQ(j["device"], "cpu");
    EXPECT_GT(j["images_per_s"].get<double>(), 0);
    EXPECT_GT(j["train_gflops_per_image"].get<double>(), 0);
    EXPECT_EQ(j["pixels"], "float");
}

// --pixels: stored pixels of a shard type through the model's input step.
TEST(BenchStep, TakesStoredPixelsThroughTheInputStep) {
    for (const char* pixels : {"uint8", "float16"}) {
        const ShellRun r = run_shell(build_dir() +
                                     "prism bench step --config configs/synth_tiny_chvit.json --device cpu --batch 4 "
                                     "--iters 1 --warmup 0 --pixels " + pixels);
        ASSERT_EQ(exit_code(r), 0) << r.output;
        const size_t at = r.output.rfind("{\"arch\"");
        ASSERT_NE(at, std::string::npos) << r.output;
        const nlohmann::json j = nlohmann::json::parse(r.output.substr(at));
        EXPECT_EQ(j["pixels"], pixels);
        EXPECT_GT(j["images_per_s"].get<double>(), 0);
    }
}

TEST(BenchStep, BadOptionsFailWithOneLine) {
    for (const std::string args : {"--config configs/synth_tiny_moevit.json --device cpu --iters 0",
                                   "--config configs/synth_tiny_moevit.json --device cpu --pixels int8",
                                   "--config /nonexistent.json --device cpu", "--device cpu"}) {
        const ShellRun r = run_shell(build_dir() + "prism bench step " + args);
        EXPECT_EQ(exit_code(r), 1) << args << ": " << r.output;
        EXPECT_EQ(lines_of(r.output), 1) << args << ": " << r.output;
    }
}

// `prism bench loader` in both modes over a small synthetic set: one JSON line
// whose bytes per image follow the mode (float32 written, or the stored
// pixels handed on for the device's input step).
TEST(BenchLoader, PrintsOneJsonLineInEitherMode) {
    prism::testing::TmpDir dir;
    const ShellRun s = run_shell(build_dir() + "prism synth --preset so2sat --out " + dir.path + " --count 600");
    ASSERT_EQ(exit_code(s), 0) << s.output;
    for (bool device_input : {false, true}) {
        const ShellRun r = run_shell(build_dir() + "prism bench loader --data '" + dir.path +
                                     "/train-*.shard' --batch 64 --seconds 0.3 --augment so2sat" +
                                     (device_input ? " --device-input" : ""));
        ASSERT_EQ(exit_code(r), 0) << r.output;
        const size_t at = r.output.rfind("\n{");
        ASSERT_NE(at, std::string::npos) << r.output;
        const nlohmann::json j = nlohmann::json::parse(r.output.substr(at + 1));
        EXPECT_EQ(j["bench"], "loader");
        EXPECT_EQ(j["device_input"], device_input);
        EXPECT_EQ(j["dtype"], "float16");
        EXPECT_GT(j["images"].get<int64_t>(), 0);
        const double stored = j["mb_per_s"].get<double>(), written = j["out_mb_per_s"].get<double>();
        EXPECT_NEAR(written / stored, device_input ? 1.0 : 2.0, 1e-9);  // float16 pixels, widened or not
    }
}
