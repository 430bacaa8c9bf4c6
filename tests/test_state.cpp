// Exact-resume state (engine/state), crash-safe checkpoint writes, stop
// signals and the non-finite guard (engine/faults).
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstring>
#include <string>
#include <vector>
#include <signal.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <nlohmann/json.hpp>
#include "engine/checkpoint.h"
#include "engine/faults.h"
#include "engine/rng.h"
#include "engine/state.h"
#include "tests/testutil.h"

using namespace prism;
using namespace prism::testing;

namespace {

Config small_config() {
    Config c;  // the defaults: a 2-block moevit on 4 channels of 32x32
    c.train.seed = 3;
    return c;
}

// A model and optimizer whose tensors are a function of `tag`, with values
// that a lossy round trip would change (tiny, huge, negative zero).
struct Trainee {
    Model<float> model;
    AdamW<float> opt;
    explicit Trainee(const Config& c) : model(c.model, 1, false), opt(c.train, model.param_elems(), false) {}
    int64_t n() { return model.param_elems(); }
    void fill(uint64_t tag) {
        Rng rng(tag, 99);
        std::vector<float> t[3];
        for (auto& p : t) {
            p.resize(n());
            for (int64_t i = 0; i < n(); i++) p[i] = float(rng.normal() * std::pow(10.0, rng.uniform() * 60 - 30));
        }
        t[0][0] = -0.0f;
        t[2][1] = 1e-45f;  // a denormal
        // The padding between tensors is zero in a real run (model.h), and
        // model.safetensors holds only the tensors.
        std::vector<bool> in_tensor(size_t(n()), false);
        for (const auto& p : model.layout()) std::fill_n(in_tensor.begin() + p.offset, p.numel, true);
        for (auto& p : t)
            for (int64_t i = 0; i < n(); i++)
                if (!in_tensor[size_t(i)]) p[size_t(i)] = 0.0f;
        model.params_from_host(t[0].data());
        opt.moments_from_host(t[1].data(), t[2].data(), model);
        opt.set_steps_taken(int64_t(tag) - int64_t(tag) / 3);  // as point(tag): a third skipped
    }
    // params, first and second moments, one after the other.
    std::vector<float> tensors() {
        std::vector<float> all(3 * n());
        model.params_to_host(all.data());
        opt.moments_to_host(all.data() + n(), all.data() + 2 * n(), model);
        return all;
    }
    bool equals(Trainee& o) {
        const std::vector<float> a = tensors(), b = o.tensors();
        return std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0 &&
               opt.steps_taken() == o.opt.steps_taken();
    }
};

ResumePoint point(int64_t step) { return {step, step / 3, step / 5, step % 5}; }

void expect_point(const ResumePoint& a, const ResumePoint& b) {
    EXPECT_EQ(a.step, b.step);
    EXPECT_EQ(a.skipped_steps, b.skipped_steps);
    EXPECT_EQ(a.epoch, b.epoch);
    EXPECT_EQ(a.batch_index, b.batch_index);
}


}  // namespace

TEST(State, RoundTripIsBitExact) {
    TmpDir dir;
    const Config cfg = small_config();
    Trainee a(cfg), b(cfg);
    a.fill(7);
    const ResumePoint at = {123, 4, 5, 678};
    save_train_state(dir / kTrainStateFile, a.model, a.opt, cfg, at);
    expect_point(load_train_state(dir / kTrainStateFile, cfg, b.model, b.opt), at);
    EXPECT_TRUE(b.equals(a));
    EXPECT_EQ(b.opt.steps_taken(), 5);
}

TEST(State, ResumeMayChangeOnlyTheFreeKeys) {
    TmpDir dir;
    const Config cfg = small_config();
    Trainee a(cfg);
    a.fill(1);
    save_train_state(dir / kTrainStateFile, a.model, a.opt, cfg, point(6));

    Config longer = cfg;  // resume --set train.steps=12, elsewhere, logging more
    longer.train.steps = 12;
    longer.data.train = "/elsewhere/train-*.shard";
    longer.train.log_every = 1;
    longer.train.comm_timeout_s = 60;
    Trainee b(longer);
    expect_point(load_train_state(dir / kTrainStateFile, longer, b.model, b.opt), point(6));
    EXPECT_TRUE(b.equals(a));

    Config lr = cfg;
    lr.train.lr = 1e-3;
    Trainee c(lr);
    expect_error([&] { load_train_state(dir / kTrainStateFile, lr, c.model, c.opt); }, dir / kTrainStateFile,
                 "cannot resume: it was written with train.lr=0.0005, this run has 0.001");
    Config seed = cfg;
    seed.train.seed = 4;
    expect_error([&] { load_train_state(dir / kTrainStateFile, seed, c.model, c.opt); }, dir / kTrainStateFile,
                 "train.seed=3, this run has 4");
    Config wide = cfg;
    wide.model.dim = 32;
    Trainee d(wide);
    expect_error([&] { load_train_state(dir / kTrainStateFile, wide, d.model, d.opt); }, dir / kTrainStateFile,
                 "model.dim=64, this run has 32");
}

TEST(State, RefusesFilesThatAreNotACompleteState) {
    TmpDir dir;
    const Config cfg = small_config();
    Trainee a(cfg), b(cfg);
    a.fill(2);
    save_training_checkpoint(dir.path, a.model, a.opt, cfg, point(6));
    const std::string state = dir / kTrainStateFile, model = dir / "model.safetensors";
    expect_error([&] { load_train_state(model, cfg, b.model, b.opt); }, model, "not a Prism training state");
    const std::string bytes = read_bytes(state);
    write_bytes(state, bytes.substr(0, bytes.size() - 4));
    expect_error([&] { load_train_state(state, cfg, b.model, b.opt); }, state, "lies outside the file");
    write_bytes(state, bytes.substr(0, 100));
    expect_error([&] { load_train_state(state, cfg, b.model, b.opt); }, state, "bad header length");
    std::string bad = bytes;
    const size_t at = bad.find("\"step\":\"6\"");
    ASSERT_NE(at, std::string::npos);
    bad.replace(at, 10, "\"step\":\"x\"");
    write_bytes(state, bad);
    expect_error([&] { load_train_state(state, cfg, b.model, b.opt); }, state, "step is not a non-negative integer");
}

// model.safetensors is also what users hand to `prism eval`: damage to it
// gets one line naming the file, never an abort or NaN logits.
TEST(State, CheckpointRefusalsNameTheProblem) {
    TmpDir dir;
    const Config cfg = small_config();
    Trainee a(cfg);
    a.fill(2);
    save_training_checkpoint(dir.path, a.model, a.opt, cfg, point(6));
    const std::string model = dir / "model.safetensors", bad = dir / "bad.safetensors";
    const std::string bytes = read_bytes(model);
    uint64_t len = 0;
    std::memcpy(&len, bytes.data(), 8);
    const nlohmann::json header = nlohmann::json::parse(bytes.substr(8, len));
    // The file with its header replaced (padded to the same length, so the offsets hold).
    auto with_header = [&](nlohmann::json h) {
        std::string text = h.dump();
        EXPECT_LE(text.size(), len);
        text.resize(len, ' ');
        return bytes.substr(0, 8) + text + bytes.substr(8 + len);
    };
    nlohmann::json h = header;
    h["__metadata__"] = "config";
    write_bytes(bad, with_header(h));
    expect_error([&] { load_checkpoint(bad); }, bad, "__metadata__ is not a JSON object");
    // A NaN in the head's bias.
    std::string nan = bytes;
    const uint64_t at = 8 + len + header["head.bias"]["data_offsets"][0].get<uint64_t>() + 4;
    const float value = NAN;
    std::memcpy(&nan[at], &value, 4);
    write_bytes(bad, nan);
    expect_error([&] { load_checkpoint(bad); }, bad, "head.bias holds a non-finite value (element 1)");
    load_checkpoint(model);  // the undamaged file loads
    expect_error([&] { load_checkpoint(dir.path); }, dir.path, "is a directory");
    const std::string fifo = dir / "fifo.safetensors";
    ASSERT_EQ(::mkfifo(fifo.c_str(), 0600), 0);
    expect_error([&] { load_checkpoint(fifo); }, fifo, "not a regular file");  // not a hang
}

// A process that dies while writing a checkpoint (here: the file-size limit
// kills it with SIGXFSZ at a chosen byte) leaves the previous state intact.
TEST(State, CrashMidWriteKeepsThePreviousCheckpoint) {
    TmpDir dir;
    const Config cfg = small_config();
    Trainee first(cfg), second(cfg);
    first.fill(6);
    second.fill(12);
    save_training_checkpoint(dir.path, first.model, first.opt, cfg, point(6));
    const int64_t model_bytes = int64_t(read_bytes(dir / "model.safetensors").size());
    const int64_t state_bytes = int64_t(read_bytes(dir / kTrainStateFile).size());
    // in model.safetensors.tmp; in train_state.safetensors.tmp after model.safetensors
    // was replaced; one byte short of a complete state
    for (const int64_t limit : {int64_t(4096), model_bytes + 4096, state_bytes - 1}) {
        const int status = in_child([&] {
            rlimit fsize = {rlim_t(limit), rlim_t(limit)};
            setrlimit(RLIMIT_FSIZE, &fsize);
            save_training_checkpoint(dir.path, second.model, second.opt, cfg, point(12));
        });
        ASSERT_TRUE(WIFSIGNALED(status) && WTERMSIG(status) == SIGXFSZ) << "limit " << limit << ": status " << status;
        EXPECT_TRUE(exists(limit < model_bytes ? dir / "model.safetensors.tmp" : dir / "train_state.safetensors.tmp"));
        Trainee loaded(cfg);
        expect_point(load_train_state(dir / kTrainStateFile, cfg, loaded.model, loaded.opt), point(6));
        EXPECT_TRUE(loaded.equals(first)) << "limit " << limit;
        // the export is one complete checkpoint or the other
        const Checkpoint ck = load_checkpoint(dir / "model.safetensors");
        Trainee& expected = limit < model_bytes ? first : second;
        EXPECT_EQ(std::memcmp(ck.params.data(), expected.model.params(), ck.params.size() * sizeof(float)), 0);
    }
    // and the next checkpoint replaces the leftovers
    save_training_checkpoint(dir.path, second.model, second.opt, cfg, point(12));
    Trainee loaded(cfg);
    expect_point(load_train_state(dir / kTrainStateFile, cfg, loaded.model, loaded.opt), point(12));
    EXPECT_TRUE(loaded.equals(second));
}

// SIGKILL at arbitrary moments of a run that checkpoints back to back: what
// is on disk is always one complete checkpoint, bit for bit. (Most kills land
// in an fsync, after the bytes are written; the test above is the one that
// stops a write at a chosen byte.)
TEST(State, KilledAtAnyMomentLeavesACompleteCheckpoint) {
    const Config cfg = small_config();
    Trainee t(cfg);
    double one_ms = 0;  // how long one step of the child takes here
    {
        TmpDir dir;
        const auto start = std::chrono::steady_clock::now();
        t.fill(1);
        save_training_checkpoint(dir.path, t.model, t.opt, cfg, point(1));
        one_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
    }
    std::vector<int64_t> steps_seen;
    for (double checkpoints : {0.5, 1.3, 2.6, 3.5, 4.8}) {
        const int delay_ms = int(checkpoints * one_ms) + 1;
        TmpDir dir;
        const int status = in_child(
            [&] {
                for (int64_t step = 1; step < 100000; step++) {
                    t.fill(uint64_t(step));
                    save_training_checkpoint(dir.path, t.model, t.opt, cfg, point(step));
                }
            },
            delay_ms);
        ASSERT_TRUE(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL) << status;
        if (!exists(dir / kTrainStateFile)) continue;  // killed before the first one was complete
        Trainee loaded(cfg), expected(cfg);
        const ResumePoint at = load_train_state(dir / kTrainStateFile, cfg, loaded.model, loaded.opt);
        expected.fill(uint64_t(at.step));
        expect_point(at, point(at.step));
        EXPECT_TRUE(loaded.equals(expected)) << "step " << at.step;
        steps_seen.push_back(at.step);
    }
    std::string seen;
    for (int64_t s : steps_seen) seen += " " + std::to_string(s);
    std::printf("one checkpoint takes %.0f ms; killed after 0.5 to 4.8 of them, the state on disk was complete, "
                "at steps:%s\n", one_ms, seen.c_str());
    EXPECT_FALSE(steps_seen.empty());
}

TEST(Faults, StopSignalSetsTheFlag) {
    struct sigaction before = {};
    sigaction(SIGTERM, nullptr, &before);
    install_stop_signals();
    EXPECT_EQ(stop_signal(), 0);
    raise(SIGTERM);
    EXPECT_EQ(stop_signal(), SIGTERM);
    remove_stop_signals();
    EXPECT_EQ(stop_signal(), 0);
    struct sigaction after = {};
    sigaction(SIGTERM, nullptr, &after);
    EXPECT_EQ(after.sa_handler, before.sa_handler);

    install_stop_signals();
    raise(SIGINT);
    EXPECT_EQ(stop_signal(), SIGINT);
    remove_stop_signals();
}

TEST(Faults, SecondStopSignalEndsTheProcess) {
    const int status = in_child([] {
        install_stop_signals();
        raise(SIGINT);
        if (stop_signal() != SIGINT) _exit(3);
        raise(SIGINT);
        _exit(4);  // not reached
    });
    EXPECT_TRUE(WIFSIGNALED(status) && WTERMSIG(status) == SIGINT) << status;
}

TEST(Faults, NonFinitePolicy) {
    TrainConfig t;
    NonfiniteSkips skips;
    EXPECT_TRUE(guard_nonfinite(t, 7, 2.5, 1e3, &skips, "", 0));
    EXPECT_EQ(skips.total, 0);
    expect_error([&] { guard_nonfinite(t, 7, NAN, 1.0, &skips, "out/train_state.safetensors", 5); }, "train",
                 "loss nan, gradient norm 1 at step 7; stopped before updating the weights; the last checkpoint, "
                 "out/train_state.safetensors, holds the weights after step 5, untouched by this stop");
    expect_error([&] { guard_nonfinite(t, 0, 1.0, INFINITY, &skips, "", 0); }, "train",
                 "no checkpoint was written yet");
    EXPECT_EQ(skips.total, 0);
    t.skip_nonfinite = true;
    EXPECT_FALSE(guard_nonfinite(t, 8, NAN, NAN, &skips, "", 0));
    EXPECT_FALSE(guard_nonfinite(t, 9, 1.0, -INFINITY, &skips, "", 0));
    EXPECT_TRUE(guard_nonfinite(t, 10, 1.0, 1.0, &skips, "", 0));
    EXPECT_EQ(skips.total, 2);
    EXPECT_EQ(skips.in_a_row, 0);
    // A finite step resets the run of skips; kMaxSkipsInARow in a row stop it.
    for (int64_t i = 1; i < kMaxSkipsInARow; i++) EXPECT_FALSE(guard_nonfinite(t, 10 + i, NAN, 1.0, &skips, "", 0));
    EXPECT_TRUE(guard_nonfinite(t, 30, 1.0, 1.0, &skips, "", 0));
    for (int64_t i = 1; i < kMaxSkipsInARow; i++) EXPECT_FALSE(guard_nonfinite(t, 30 + i, NAN, 1.0, &skips, "", 0));
    expect_error([&] { guard_nonfinite(t, 50, NAN, 1.0, &skips, "out/train_state.safetensors", 40); }, "train",
                 "loss nan, gradient norm 1 at step 50, 20 non-finite steps in a row");
    EXPECT_EQ(skips.total, 2 + 2 * kMaxSkipsInARow - 1);
}
