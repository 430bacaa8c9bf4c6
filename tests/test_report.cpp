// What researchers see (issue 7): metrics.jsonl and routing.json of a short
// CPU run, the router-collapse warning, prism report's PNGs and summary, and
// eval's --report / --channels / --all-subsets.
#include <cmath>
#include <cstdlib>
#include <fstream>
#include <memory>
#include <numeric>
#include <string>
#include <vector>
#include <nlohmann/json.hpp>
#include "data/synth.h"
#include "engine/checkpoint.h"
#include "engine/eval_report.h"
#include "engine/metrics.h"
#include "engine/monitor.h"
#include "engine/report.h"
#include "engine/train.h"
#include "tests/testutil.h"

using namespace prism;
using prism::testing::TmpDir;
using nlohmann::json;

namespace {

// One short moevit run shared by the tests: 128 training images (32 val),
// D=16, 30 steps of 8, logged every 10 steps, evaluated at 15 and 30.
struct TinyRun {
    TmpDir tmp;
    std::string run;
    Config cfg;
    Dataset val;
    TinyRun() {
        synthesize("tiny", tmp / "data", 128, 7, false);
        cfg = load_config("configs/synth_tiny_moevit.json",
                          {"data.train=" + tmp / "data/train-*.shard", "data.val=" + tmp / "data/val-*.shard",
                           "model.dim=16", "model.heads=2", "train.batch=8", "train.steps=30", "train.warmup_steps=5",
                           "train.log_every=10", "train.eval_every=15"});
        run = tmp / "run";
        train(cfg, Device::cpu, run, false);
        val = load_dataset(cfg.data.val);
    }
};

TinyRun& tiny_run() {
    static std::unique_ptr<TinyRun> r(new TinyRun());
    return *r;
}

std::vector<json> read_jsonl(const std::string& path) {
    std::ifstream f(path);
    EXPECT_TRUE(f.good()) << path;
    std::vector<json> out;
    std::string line;
    while (std::getline(f, line)) out.push_back(json::parse(line));  // throws (fails the test) on a bad line
    return out;
}

}  // namespace

TEST(Report, TrainWritesMetricsJsonlWithExpectedKeysAndSaneValues) {
    TinyRun& t = tiny_run();
    const auto lines = read_jsonl(t.run + "/metrics.jsonl");
    std::vector<json> train_lines, eval_lines;
    for (const auto& j : lines) (j.at("type") == "train" ? train_lines : eval_lines).push_back(j);
    ASSERT_EQ(train_lines.size(), 3u);
    ASSERT_EQ(eval_lines.size(), 2u);
    const int C = 4;
    for (size_t i = 0; i < train_lines.size(); i++) {
        const json& j = train_lines[i];
        for (const char* k : {"step", "epoch", "loss", "accuracy", "lr", "grad_norm", "images_per_s", "data_wait_s",
                              "aux_loss", "z_loss", "time_s"})
            ASSERT_TRUE(j.contains(k) && j[k].is_number()) << k << " in " << j.dump();
        EXPECT_FALSE(j.contains("mfu")) << "MFU is GPU-only";
        EXPECT_EQ(j["step"], 10 * (i + 1));
        EXPECT_DOUBLE_EQ(j["epoch"].get<double>(), 10.0 * (i + 1) / 16);  // 128 images / batch 8
        EXPECT_TRUE(std::isfinite(j["loss"].get<double>()) && j["loss"] > 0.5 && j["loss"] < 5) << j["loss"];
        EXPECT_GE(j["accuracy"], 0.0);
        EXPECT_LE(j["accuracy"], 1.0);
        EXPECT_GT(j["lr"], 0.0);
        EXPECT_GT(j["grad_norm"], 0.0);
        EXPECT_GT(j["images_per_s"], 0.0);
        EXPECT_GE(j["data_wait_s"], 0.0);
        EXPECT_GT(j["aux_loss"], 0.0);  // Switch loss, α = 0.01: about α at balance
        EXPECT_LT(j["aux_loss"], 0.05);
        EXPECT_EQ(j["z_loss"], 0.0);    // z_loss_coef = 0
        // Routing: per block, shares over the 4 channels summing to 1, entropy in [0, ln 4].
        ASSERT_EQ(j.at("routing_shares").size(), 2u);
        ASSERT_EQ(j.at("routing_entropy").size(), 2u);
        for (int b = 0; b < 2; b++) {
            const auto shares = j["routing_shares"][b].get<std::vector<double>>();
            ASSERT_EQ(shares.size(), size_t(C));
            EXPECT_NEAR(std::accumulate(shares.begin(), shares.end(), 0.0), 1.0, 1e-9);
            double h = 0;
            for (double s : shares) h -= s > 0 ? s * std::log(s) : 0;
            EXPECT_NEAR(j["routing_entropy"][b].get<double>(), h, 1e-9);
            EXPECT_LE(h, std::log(C) + 1e-12);
        }
    }
    EXPECT_EQ(eval_lines[0]["step"], 15);
    EXPECT_EQ(eval_lines[1]["step"], 30);
    for (const auto& j : eval_lines) {
        EXPECT_EQ(j.at("count"), 32);
        EXPECT_GE(j.at("accuracy"), 0.0);
        EXPECT_LE(j.at("accuracy"), 1.0);
        EXPECT_TRUE(j.at("loss").is_number());
    }
    // config.json: the fully resolved config, read back equal.
    std::ifstream f(t.run + "/config.json");
    EXPECT_EQ(config_to_json(config_from_json(json::parse(f), "config.json")), config_to_json(t.cfg));
}

TEST(Report, RoutingJsonHoldsPerClassHistogramsWhoseTotalsMatch) {
    TinyRun& t = tiny_run();
    std::ifstream f(t.run + "/routing.json");
    ASSERT_TRUE(f.good());
    const json r = json::parse(f);
    EXPECT_EQ(r.at("step"), 30);
    const int C = 4, N = 16, k = 2, K = 4, depth = 2;
    EXPECT_EQ(r.at("patches"), N);
    EXPECT_EQ(r.at("channel_names").size(), size_t(C));
    std::vector<int64_t> per_class(K, 0);
    for (int32_t y : t.val.labels) per_class[y]++;
    EXPECT_EQ(r.at("class_images").get<std::vector<int64_t>>(), per_class);
    ASSERT_EQ(r.at("slots").size(), size_t(depth));
    for (int b = 0; b < depth; b++) {
        ASSERT_EQ(r["slots"][b].size(), size_t(K));
        for (int y = 0; y < K; y++) {
            const auto row = r["slots"][b][y].get<std::vector<int64_t>>();
            ASSERT_EQ(row.size(), size_t(C));
            // every patch token (C channels x N patches) of every image routes k slots
            EXPECT_EQ(std::accumulate(row.begin(), row.end(), int64_t(0)), per_class[y] * C * N * k)
                << "block " << b << " class " << y;
        }
    }
}

TEST(Report, CollapseWarningFiresOnACollapsedRouterOnly) {
    TinyRun& t = tiny_run();
    for (int k : {1, 2}) {
        ModelConfig m = t.cfg.model;
        m.top_k = k;
        Model<float> model(m, 16, false);
        model.init_weights(3);
        Batch b;
        b.images = t.val.images.data();
        b.labels = t.val.labels.data();
        b.size = 16;
        b.channels = {0, 1, 2, 3};
        auto diagnose = [&] {
            model.forward(b, false);
            RoutingWindow w;
            w.add(model.routing_counts());
            w.add(model.routing_counts());  // a window of two steps
            return summarize_routing(w);
        };
        const RoutingSummary balanced = diagnose();
        // A fresh router is not perfectly even (one channel in 81% of the
        // tokens' top-2 here), but under the threshold.
        for (const auto& block : balanced.shares)
            for (double s : block) EXPECT_LT(s * k, 0.9) << "k=" << k;
        EXPECT_EQ(collapse_warning(balanced, 10, k), "") << "k=" << k;

        // Force the collapse: a huge router bias on channel 2 in every block.
        for (const auto& p : model.layout())
            if (p.name.find("attn.router.bias") != std::string::npos) model.params()[p.offset + 2] = 100.0f;
        const RoutingSummary collapsed = diagnose();
        for (size_t i = 0; i < collapsed.shares.size(); i++) EXPECT_DOUBLE_EQ(collapsed.shares[i][2], 1.0 / k);
        if (k == 1) {
            for (double e : collapsed.entropy) EXPECT_DOUBLE_EQ(e, 0.0);
        }
        const std::string w = collapse_warning(collapsed, 20, k);
        EXPECT_NE(w.find("router collapse at step 20"), std::string::npos) << w;
        EXPECT_NE(w.find("block 0: channel 2 chosen by 100.0%"), std::string::npos) << w;
        EXPECT_NE(w.find("block 1: channel 2"), std::string::npos) << w;
        EXPECT_EQ(w.find('\n'), std::string::npos) << "one line";
        // With k = C every token takes every channel: nothing to collapse.
        EXPECT_EQ(collapse_warning(collapsed, 20, 4), "");
    }
}

TEST(Report, TrainingWarnsOfCollapseOncePerLoggingWindow) {
    Config cfg;
    cfg.train.log_every = 10;
    auto warnings = [&](const std::vector<std::vector<int>>& counts) {
        TrainMonitor monitor(cfg, Device::cpu, "", /*verbose=*/true, TrainOptions{}, 30, 16, {});
        Losses l;
        ::testing::internal::CaptureStderr();
        ::testing::internal::CaptureStdout();
        for (int64_t step = 0; step < 30; step++) monitor.step_done(step, l, 8, 1e-3, 1.0, counts);
        ::testing::internal::GetCapturedStdout();
        const std::string err = ::testing::internal::GetCapturedStderr();
        int lines = 0;
        for (size_t at = err.find("router collapse"); at != std::string::npos; at = err.find("router collapse", at + 1))
            lines++;
        return lines;
    };
    // top_k 2 (the default): a channel with over 45% of the slots is chosen by over 90% of the tokens.
    EXPECT_EQ(warnings({{5, 0, 95, 0}, {30, 20, 25, 25}}), 3);  // block 0 collapsed: one line per window
    EXPECT_EQ(warnings({{48, 2, 47, 3}, {25, 25, 25, 25}}), 3);
    EXPECT_EQ(warnings({{25, 25, 25, 25}, {40, 20, 20, 20}}), 0);
}

TEST(Report, WritesNonEmptyPngsAndSummary) {
    if (!gnuplot_available()) GTEST_SKIP() << "gnuplot is not installed (make deps installs gnuplot-nox)";
    TinyRun& t = tiny_run();
    TmpDir out;
    // The same run twice: labels become "run" and "run-2".
    const ReportOutput r = write_report({t.run, t.run}, out.path);
    EXPECT_EQ(r.dir, out.path);
    for (const char* png : {"curves.png", "accuracy_vs_gflops.png", "run_channel_load.png", "run_class_routing.png",
                            "run-2_channel_load.png", "run-2_class_routing.png"}) {
        const std::string bytes = prism::testing::read_bytes(out / png);
        EXPECT_GT(bytes.size(), 2000u) << png;
        EXPECT_EQ(bytes.substr(0, 8), std::string("\x89PNG\r\n\x1a\n", 8)) << png;
    }
    EXPECT_EQ(r.files.size(), 7u);
    const std::string md = prism::testing::read_bytes(out / "summary.md");
    EXPECT_NE(md.find("| run | arch | top_k | steps | final val acc | attention GFLOPs |"), std::string::npos) << md;
    EXPECT_NE(md.find("| run | moevit | 2 | 30 | "), std::string::npos) << md;
    EXPECT_NE(md.find("| run-2 | moevit | 2 | 30 | "), std::string::npos) << md;
    EXPECT_TRUE(prism::testing::exists(out / "report.gp"));

    // Default directory: the first run's report/.
    EXPECT_EQ(write_report({t.run}, "").dir, t.run + "/report");

    // A missing gnuplot is one clear line, and the report already there stays whole.
    const std::string curves = prism::testing::read_bytes(out / "curves.png");
    setenv("PRISM_GNUPLOT", "/nonexistent/gnuplot", 1);
    try {
        write_report({t.run}, out.path);
        ADD_FAILURE() << "no error without gnuplot";
    } catch (const UserError& e) {
        EXPECT_NE(std::string(e.what()).find("not found; prism report needs gnuplot"), std::string::npos) << e.what();
    }
    unsetenv("PRISM_GNUPLOT");
    EXPECT_EQ(prism::testing::read_bytes(out / "curves.png"), curves);
    EXPECT_TRUE(prism::testing::exists(out / "run-2_class_routing.png"));
    EXPECT_FALSE(prism::testing::exists(out / ".rendering"));
    // Not a run directory.
    prism::testing::expect_error([&] { write_report({out / "nothing"}, out.path); }, out / "nothing/config.json",
                                 "cannot read");
}

// A damaged metrics.jsonl or routing.json is named (a routing_shares of []
// divided by zero before); a diverged run, whose windows with skipped steps
// hold null losses, is drawn with gaps.
TEST(Report, DamagedFilesAreNamedAndDivergedRunsAreDrawn) {
    TinyRun& t = tiny_run();
    TmpDir run;
    auto copy_run = [&](const std::string& metrics, const std::string& routing) {
        prism::testing::write_bytes(run / "config.json", prism::testing::read_bytes(t.run + "/config.json"));
        prism::testing::write_bytes(run / "metrics.jsonl", metrics);
        if (!routing.empty()) prism::testing::write_bytes(run / "routing.json", routing);
    };
    copy_run(R"({"type":"train","step":10,"loss":1.3,"accuracy":0.3,"routing_shares":[]})" "\n", "");
    prism::testing::expect_error([&] { write_report({run.path}, ""); }, run / "metrics.jsonl: line 1",
                                 "routing_shares is not [2 blocks][4 channels] of numbers");
    copy_run(R"({"type":"train","step":10,"loss":1.3,"accuracy":0.3,"routing_shares":[[1,2,3,4],[1,null,3,4]]})" "\n",
             "");
    prism::testing::expect_error([&] { write_report({run.path}, ""); }, run / "metrics.jsonl: line 1",
                                 "routing_shares is not");
    copy_run(R"({"type":"train","step":10,"loss":1.3,"accuracy":"high"})" "\n", "");
    prism::testing::expect_error([&] { write_report({run.path}, ""); }, run / "metrics.jsonl: line 1",
                                 "\"accuracy\" is neither a number nor null");
    const std::string good = R"({"type":"train","step":10,"loss":1.3,"accuracy":0.3})" "\n";
    copy_run(good, R"({"step":30,"slots":[[[1,2,3,4]],[[1,2,"a",4]]]})");
    prism::testing::expect_error([&] { write_report({run.path}, ""); }, run / "routing.json",
                                 "no \"slots\" [2 blocks][4 classes][4 channels] of numbers");
    if (!gnuplot_available()) GTEST_SKIP() << "gnuplot is not installed (make deps installs gnuplot-nox)";
    ::unlink((run / "routing.json").c_str());
    copy_run(R"({"type":"train","step":10,"loss":null,"accuracy":0.3})" "\n"
             R"({"type":"train","step":20,"loss":null,"accuracy":0.25})" "\n"
             R"({"type":"eval","step":20,"loss":null,"accuracy":0.25,"count":32})" "\n", "");
    write_report({run.path}, "");
    EXPECT_GT(prism::testing::read_bytes(run / "report/curves.png").size(), 2000u);
    EXPECT_NE(prism::testing::read_bytes(run / "report/summary.md").find("| 20 | 0.2500 |"), std::string::npos)
        << prism::testing::read_bytes(run / "report/summary.md");
}

TEST(Report, EvalConfusionMatrixSumsToCountAndItsDiagonalIsTheAccuracy) {
    TinyRun& t = tiny_run();
    const Checkpoint ck = load_checkpoint(t.run + "/model.safetensors");
    Model<float> model(ck.config.model, 8, false);
    load_weights(model, ck);
    const int K = 4;
    for (const std::vector<int>& channels : {std::vector<int>{}, std::vector<int>{0, 2}}) {
        EvalOptions o;
        o.channels = channels;
        Loader val(eval_loader_options(t.cfg.data.val, 8));
        const EvalResult r = evaluate(model, val, false, o);
        ASSERT_EQ(r.confusion.size(), size_t(K * K));
        int64_t sum = 0, diag = 0;
        for (int y = 0; y < K; y++)
            for (int p = 0; p < K; p++) {
                sum += r.confusion[y * K + p];
                diag += y == p ? r.confusion[y * K + p] : 0;
            }
        EXPECT_EQ(sum, r.count);
        EXPECT_DOUBLE_EQ(double(diag) / double(r.count), r.accuracy);
        json j;
        add_report(j, r, K);
        ASSERT_EQ(j.at("confusion").size(), size_t(K));
        ASSERT_EQ(j.at("per_class_accuracy").size(), size_t(K));
        for (int y = 0; y < K; y++) {
            const auto row = j["confusion"][y].get<std::vector<int64_t>>();
            const int64_t n = std::accumulate(row.begin(), row.end(), int64_t(0));
            if (n) EXPECT_DOUBLE_EQ(j["per_class_accuracy"][y].get<double>(), double(row[y]) / n);
            else EXPECT_TRUE(j["per_class_accuracy"][y].is_null());
        }
    }
    // A class with no images has no accuracy, rather than an accuracy of 0.
    EvalResult two;
    two.count = 4;
    two.confusion = {3, 1, 0, 0};
    json j;
    add_report(j, two, 2);
    EXPECT_EQ(j["per_class_accuracy"].dump(), "[0.75,null]");
}

TEST(Report, AllSubsetsAveragesEverySubsetSize) {
    TinyRun& t = tiny_run();
    const Checkpoint ck = load_checkpoint(t.run + "/model.safetensors");
    Model<float> model(ck.config.model, 32, false);
    load_weights(model, ck);
    Loader val(eval_loader_options(t.cfg.data.val, 32));
    const SubsetSweep s = evaluate_all_subsets(model, val);
    ASSERT_EQ(s.sizes.size(), 4u);
    const int choose[] = {4, 6, 4, 1};
    double mean = 0;
    for (int m = 1; m <= 4; m++) {
        EXPECT_EQ(s.sizes[m - 1].size, m);
        EXPECT_EQ(s.sizes[m - 1].subsets, choose[m - 1]);
        EXPECT_GE(s.sizes[m - 1].accuracy, 0.0);
        EXPECT_LE(s.sizes[m - 1].accuracy, 1.0);
        mean += s.sizes[m - 1].accuracy / 4;
    }
    EXPECT_NEAR(s.mean_accuracy, mean, 1e-12);
    EXPECT_DOUBLE_EQ(s.sizes[3].accuracy, evaluate(model, val, false).accuracy);  // the only 4-subset: all
    EXPECT_EQ(subsets_json(s).at("sizes").size(), 4u);

    // All subsets when C choose m <= 64, in order; else 64 distinct, sorted, from a fixed seed.
    EXPECT_EQ(channel_subsets(4, 2), (std::vector<std::vector<int>>{{0, 1}, {0, 2}, {0, 3}, {1, 2}, {1, 3}, {2, 3}}));
    EXPECT_EQ(channel_subsets(18, 17).size(), 18u);
    const auto drawn = channel_subsets(18, 9);
    ASSERT_EQ(drawn.size(), 64u);
    EXPECT_EQ(drawn, channel_subsets(18, 9));
    for (size_t i = 0; i < drawn.size(); i++) {
        EXPECT_EQ(drawn[i].size(), 9u);
        EXPECT_TRUE(std::is_sorted(drawn[i].begin(), drawn[i].end()));
        EXPECT_EQ(std::adjacent_find(drawn[i].begin(), drawn[i].end()), drawn[i].end());
        for (size_t k = 0; k < i; k++) EXPECT_NE(drawn[i], drawn[k]);
    }
}

TEST(Report, ChannelListIsValidated) {
    EXPECT_EQ(parse_channel_list("0,3,5", 8), (std::vector<int>{0, 3, 5}));
    EXPECT_EQ(parse_channel_list("5,0", 8), (std::vector<int>{0, 5}));
    using prism::testing::expect_error;
    expect_error([] { parse_channel_list("0,9", 8); }, "--channels 0,9", "channel 9 is out of range (the model has 8 channels, 0..7)");
    expect_error([] { parse_channel_list("-1", 8); }, "--channels -1", "out of range");
    expect_error([] { parse_channel_list("1,1", 8); }, "--channels 1,1", "channel 1 is listed twice");
    expect_error([] { parse_channel_list("", 8); }, "--channels ", "expected channel numbers");
    expect_error([] { parse_channel_list("1,,2", 8); }, "--channels 1,,2", "expected channel numbers");
    expect_error([] { parse_channel_list("a", 8); }, "--channels a", "expected channel numbers");
    expect_error([] { parse_channel_list("2x", 8); }, "--channels 2x", "expected channel numbers");
}
