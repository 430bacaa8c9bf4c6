// Data-parallel training with mpirun, exact resume, stop signals and a dead
// rank, through `prism train` itself (build/prism) and train().
#include <cmath>
#include <csignal>
#include <string>
#include <vector>
#include <nlohmann/json.hpp>
#include "engine/train.h"
#include "tests/runutil.h"
#include "tests/shellutil.h"
#include "tests/testutil.h"

using namespace prism;
using namespace prism::testing;

namespace {

// Options for `prism train` on it; `extra` adds --set flags.
std::string train_flags(const std::string& out, const std::string& extra) {
    return "--config configs/synth_tiny_moevit.json --device cpu --out " + out +
           " --set 'data.train=" + tiny_data_dir() + "/train-*.shard' --set 'data.val=" + tiny_data_dir() +
           "/val-*.shard' --set train.batch=16 --set train.warmup_steps=3 --set train.eval_every=0 " + extra;
}

}  // namespace

// Two ranks with batch 8 each train to the weights of one process with batch
// 16: the gradients are averaged, drop path and HCS draw per global image and
// per step, and the load-balance loss is that of the global batch. Every rank
// checks that the ranks' weights are identical bit for bit.
TEST(Distributed, TwoRanksTrainLikeOneProcess) {
    if (!why_no_mpirun().empty()) GTEST_SKIP() << why_no_mpirun();
    const std::string prism = build_dir() + "prism";
    for (const std::string extra : {"--set train.hcs=true --set model.drop_path=0.1",
                                    "--set train.hcs=false --set model.drop_path=0"}) {
        TmpDir one, two;
        const std::string flags = "--set train.steps=8 " + extra;
        const ShellRun a = run_shell(prism + " train " + train_flags(one.path, flags));
        ASSERT_TRUE(exited_ok(a)) << a.output;
        const ShellRun b = run_shell("OMP_NUM_THREADS=1 " + std::string(kMpirun) + " -np 2 " + prism + " train " +
                                     train_flags(two.path, flags));
        ASSERT_TRUE(exited_ok(b)) << b.output;
        EXPECT_NE(b.output.find("weights identical on all 2 ranks"), std::string::npos) << b.output;
        EXPECT_NE(b.output.find("\"ranks\":2"), std::string::npos) << b.output;
        const double diff = relative_difference(run_weights(one.path), run_weights(two.path));
        std::printf("%s: 1 vs 2 ranks, relative difference %.2e\n", extra.c_str(), diff);
        EXPECT_LE(diff, 1e-4) << extra;
        EXPECT_GT(diff, 0.0) << "two ranks sum in another order: identical bits would be a surprise";
        // routing.json covers the whole validation set, not rank 0's share.
        const nlohmann::json r1 = nlohmann::json::parse(read_bytes(one.path + "/routing.json"));
        const nlohmann::json r2 = nlohmann::json::parse(read_bytes(two.path + "/routing.json"));
        EXPECT_EQ(r1["class_images"], r2["class_images"]);
        int64_t slots1 = 0, slots2 = 0;
        for (const auto& block : r1["slots"]) for (const auto& cls : block) for (const auto& n : cls) slots1 += n.get<int64_t>();
        for (const auto& block : r2["slots"]) for (const auto& cls : block) for (const auto& n : cls) slots2 += n.get<int64_t>();
        EXPECT_EQ(slots1, slots2);
        EXPECT_GT(slots1, 0);
    }
}

// ZeRO-1 (train.zero=1): each of 2 ranks keeps AdamW's moments of half the
// parameters, and the run ends at the weights of the unsharded run: the
// gradients are summed in the same order, only the gradient norm is summed
// shard by shard. A run stopped after 6 steps resumes (the shards' moments
// gathered into one state file) to the bits of 12 steps straight.
TEST(Distributed, ZeroOneShardsTheOptimizerAndTrainsLikeAllReduce) {
    if (!why_no_mpirun().empty()) GTEST_SKIP() << why_no_mpirun();
    const std::string prism = build_dir() + "prism";
    const std::string mpirun = "OMP_NUM_THREADS=1 " + std::string(kMpirun) + " -np 2 " + prism + " train ";
    TmpDir plain, zero, stopped;
    const std::string flags = "--set train.steps=12 --set train.hcs=true --set model.drop_path=0.1 "
                              "--set train.grad_clip=0.05";  // clipping on: the sharded norm matters
    const ShellRun a = run_shell(mpirun + train_flags(plain.path, flags));
    ASSERT_TRUE(exited_ok(a)) << a.output;
    const ShellRun b = run_shell(mpirun + train_flags(zero.path, flags + " --set train.zero=1"));
    ASSERT_TRUE(exited_ok(b)) << b.output;
    EXPECT_NE(b.output.find("ZeRO-1 over 2 ranks"), std::string::npos) << b.output;
    EXPECT_NE(b.output.find("weights identical on all 2 ranks"), std::string::npos) << b.output;
    EXPECT_NE(b.output.find("gradient reduce-scatter"), std::string::npos) << b.output;
    const double diff = relative_difference(run_weights(plain.path), run_weights(zero.path));
    std::printf("ZeRO-1 vs all-reduce, 2 ranks: relative difference %.2e\n", diff);
    EXPECT_LE(diff, 1e-6);

    const ShellRun c = run_shell(mpirun + train_flags(stopped.path, flags + " --set train.zero=1 --set train.stop_after=6"));
    ASSERT_TRUE(exited_ok(c)) << c.output;
    EXPECT_NE(run_weights(zero.path), run_weights(stopped.path));
    const ShellRun d = run_shell(mpirun + "--resume " + stopped.path + " --device cpu");
    ASSERT_TRUE(exited_ok(d)) << d.output;
    EXPECT_NE(d.output.find("at step 6"), std::string::npos) << d.output;
    EXPECT_EQ(run_weights(zero.path), run_weights(stopped.path));

    // Three ranks: shards of unequal size whose edges cut through tensors.
    const std::string mpirun3 = "OMP_NUM_THREADS=1 " + std::string(kMpirun) + " -np 3 " + prism + " train ";
    const std::string flags3 = flags + " --set train.batch=24 --set train.steps=6";
    TmpDir plain3, zero3;
    const ShellRun e = run_shell(mpirun3 + train_flags(plain3.path, flags3));
    ASSERT_TRUE(exited_ok(e)) << e.output;
    const ShellRun f = run_shell(mpirun3 + train_flags(zero3.path, flags3 + " --set train.zero=1"));
    ASSERT_TRUE(exited_ok(f)) << f.output;
    EXPECT_NE(f.output.find("ZeRO-1 over 3 ranks"), std::string::npos) << f.output;
    const double diff3 = relative_difference(run_weights(plain3.path), run_weights(zero3.path));
    std::printf("ZeRO-1 vs all-reduce, 3 ranks: relative difference %.2e\n", diff3);
    EXPECT_LE(diff3, 1e-6);
}

// 6 steps, stop (train.stop_after), --resume to 12: the same bits as 12 steps
// straight, with HCS, drop path and the load-balance loss on.
TEST(Distributed, StopAndResumeGivesTheBitsOfAStraightRun) {
    const std::string prism = build_dir() + "prism";
    TmpDir straight, resumed;
    const std::string flags = "--set train.steps=12 --set train.hcs=true --set model.drop_path=0.1";
    const ShellRun a = run_shell(prism + " train " + train_flags(straight.path, flags));
    ASSERT_TRUE(exited_ok(a)) << a.output;
    const ShellRun b = run_shell(prism + " train " + train_flags(resumed.path, flags + " --set train.stop_after=6"));
    ASSERT_TRUE(exited_ok(b)) << b.output;
    EXPECT_NE(b.output.find("stopped after step 6 of 12"), std::string::npos) << b.output;
    // The short logging window before the stop (log_every is 10) is in
    // metrics.jsonl: a train line at step 6, the keys in order.
    EXPECT_NE(read_bytes(resumed.path + "/metrics.jsonl").find("\"step\":6,\"time_s\""), std::string::npos)
        << read_bytes(resumed.path + "/metrics.jsonl");
    EXPECT_NE(run_weights(straight.path), run_weights(resumed.path));
    const ShellRun c = run_shell(prism + " train --resume " + resumed.path + " --device cpu");
    ASSERT_TRUE(exited_ok(c)) << c.output;
    EXPECT_NE(c.output.find("at step 6"), std::string::npos) << c.output;
    EXPECT_EQ(run_weights(straight.path), run_weights(resumed.path));
    // A key that exact resume depends on cannot change.
    const ShellRun d = run_shell(prism + " train --resume " + resumed.path + " --device cpu --set train.lr=0.5");
    EXPECT_EQ(WEXITSTATUS(d.status), 1) << d.output;
    EXPECT_NE(d.output.find("train.lr"), std::string::npos) << d.output;
}

// SIGTERM mid-run: a checkpoint, exit code 128+15, and a resume that ends
// where a straight run does.
TEST(Distributed, SigtermWritesACheckpointThatResumes) {
    const std::string prism = build_dir() + "prism";
    TmpDir run, straight;
    const std::string flags = "--set train.steps=3000 --set train.log_every=1";
    const ShellRun a = run_shell("(" + prism + " train " + train_flags(run.path, flags) +
                                 " > " + run.path + "/log 2>&1 & pid=$!; "
                                 "for i in $(seq 600); do grep -q 'step *3/' " + run.path + "/log && break; sleep 0.1; done; "
                                 "kill -TERM $pid; wait $pid; echo rc=$?)");
    ASSERT_NE(a.output.find("rc=143"), std::string::npos) << a.output << read_bytes(run.path + "/log");
    const std::string log = read_bytes(run.path + "/log");
    EXPECT_NE(log.find("stopped by signal 15"), std::string::npos) << log;
    ASSERT_TRUE(exists(run.path + "/train_state.safetensors")) << log;
    // It goes on from the step it stopped at (two more steps are enough to see it).
    const size_t at = log.find("stopped by signal 15 after step ");
    ASSERT_NE(at, std::string::npos) << log;
    const long stopped = std::atol(log.c_str() + at + 32);
    EXPECT_GE(stopped, 3);
    const ShellRun b = run_shell(prism + " train --resume " + run.path + " --device cpu --set train.stop_after=2");
    ASSERT_TRUE(exited_ok(b)) << b.output;
    EXPECT_NE(b.output.find("at step " + std::to_string(stopped) + " "), std::string::npos) << b.output;
    EXPECT_NE(b.output.find("\"steps\":" + std::to_string(stopped + 2)), std::string::npos) << b.output;
}

// The checkpoint is written before the final evaluation, and the stop
// signals are back at their defaults for it: SIGTERM during the evaluation
// ends the process at once and loses no training; --resume then runs the
// evaluation alone. (Before, the signal arrived before any checkpoint of a
// run with train.checkpoint_every = 0, and all its steps were lost.)
TEST(Distributed, ASignalDuringTheFinalEvaluationLosesNoTraining) {
    const std::string prism = build_dir() + "prism";
    TmpDir run;
    // A wide model evaluated on all 512 training images on 2 threads: about
    // 8 s of evaluation here, seconds on any machine, against a kill that
    // follows the checkpoint line within a tenth of one.
    const std::string flags = "--set train.steps=2 --set model.dim=192 --set model.depth=6 --set model.heads=4 "
                              "--set 'data.val=" + tiny_data_dir() + "/train-*.shard'";
    const ShellRun a = run_shell("(OMP_NUM_THREADS=2 " + prism + " train " + train_flags(run.path, flags) + " > " +
                                 run.path + "/log 2>&1 & pid=$!; "
                                 "for i in $(seq 1200); do grep -q '^wrote ' " + run.path + "/log && break; sleep 0.05; done; "
                                 "kill -TERM $pid; wait $pid; echo rc=$?)");
    const std::string log = read_bytes(run.path + "/log");
    ASSERT_NE(a.output.find("rc=143"), std::string::npos) << a.output << log;
    EXPECT_EQ(log.find("eval  step"), std::string::npos) << log;  // it was cut short
    ASSERT_TRUE(exists(run.path + "/train_state.safetensors")) << log;
    // The evaluation alone, on the 128 validation images to be quick.
    const std::string state = read_bytes(run.path + "/train_state.safetensors");
    const ShellRun b = run_shell(prism + " train --resume " + run.path + " --device cpu --set 'data.val=" +
                                 tiny_data_dir() + "/val-*.shard'");
    ASSERT_TRUE(exited_ok(b)) << b.output;
    EXPECT_NE(b.output.find("at step 2 (epoch 0, batch 2); the run has all its steps, only the final evaluation is left"),
              std::string::npos) << b.output;
    EXPECT_NE(b.output.find("\"steps\":2,"), std::string::npos) << b.output;
    EXPECT_NE(b.output.find("\"val_count\":128"), std::string::npos) << b.output;
    EXPECT_EQ(read_bytes(run.path + "/train_state.safetensors"), state);  // nothing new to write
}

// Ranks started with different configs (a stale file on one node, a --set
// on one rank) stop before any collective whose size depends on the config;
// they used to corrupt the heap on MPI_ERR_TRUNCATE.
TEST(Distributed, RanksWithDifferentConfigsStopAtOnce) {
    if (!why_no_mpirun().empty()) GTEST_SKIP() << why_no_mpirun();
    const std::string prism = build_dir() + "prism";
    TmpDir run;
    const std::string flags = "--set train.steps=2 --set train.batch=8";
    const ShellRun r = run_shell("OMP_NUM_THREADS=1 " + std::string(kMpirun) + " -np 1 " + prism + " train " +
                                 train_flags(run.path, flags) + " : -np 1 " + prism + " train " +
                                 train_flags(run.path, flags + " --set model.dim=32"));
    EXPECT_FALSE(exited_ok(r)) << r.output;
    EXPECT_NE(r.output.find("train: the config of rank 1 differs from rank 0's (another file, or another --set)"),
              std::string::npos) << r.output;
    EXPECT_FALSE(exists(run.path + "/model.safetensors"));
}

// A repeated command loses nothing: a new run refuses a directory that holds
// one (it would truncate its metrics, then overwrite its checkpoint). Stray
// words and repeated options are refused instead of dropped, and a run with
// nothing to evaluate reports null, not a loss of 0.
TEST(Distributed, TheCommandLineRefusesWhatWouldLoseARun) {
    const std::string prism = build_dir() + "prism";
    TmpDir run;
    const ShellRun a = run_shell(prism + " train " + train_flags(run.path, "--set train.steps=2 --set data.val="));
    ASSERT_TRUE(exited_ok(a)) << a.output;
    EXPECT_NE(a.output.find("\"val_accuracy\":null,\"val_count\":0,\"val_loss\":null"), std::string::npos) << a.output;
    const std::string metrics = read_bytes(run.path + "/metrics.jsonl");
    ASSERT_FALSE(metrics.empty());
    const ShellRun b = run_shell(prism + " train " + train_flags(run.path, "--set train.steps=4"));
    EXPECT_EQ(WEXITSTATUS(b.status), 1) << b.output;
    EXPECT_NE(b.output.find("prism: --out " + run.path + ": holds a run already (train_state.safetensors); "
                            "continue it with --resume " + run.path), std::string::npos) << b.output;
    EXPECT_EQ(read_bytes(run.path + "/metrics.jsonl"), metrics);
    // eval checks --save-logits before it evaluates, not after.
    const ShellRun f = run_shell(prism + " eval --checkpoint " + run.path + "/model.safetensors --device cpu --data '" +
                                 tiny_data_dir() + "/val-*.shard' --save-logits " + run.path);
    EXPECT_EQ(WEXITSTATUS(f.status), 1) << f.output;
    EXPECT_NE(f.output.find("prism: " + run.path + ": is a directory"), std::string::npos) << f.output;
    TmpDir other;
    const ShellRun c = run_shell(prism + " train " + train_flags(other.path, "--set train.steps=2 model.top_k=9"));
    EXPECT_EQ(WEXITSTATUS(c.status), 1) << c.output;
    EXPECT_NE(c.output.find("prism: train: unexpected argument 'model.top_k=9'"), std::string::npos) << c.output;
    const ShellRun d = run_shell(prism + " train " + train_flags(other.path, "--device cpu"));
    EXPECT_EQ(WEXITSTATUS(d.status), 1) << d.output;
    EXPECT_NE(d.output.find("prism: train: --device is given more than once"), std::string::npos) << d.output;
    const ShellRun e = run_shell(prism + " train " + train_flags(other.path, "--set data.train="));
    EXPECT_EQ(WEXITSTATUS(e.status), 1) << e.output;
    EXPECT_NE(e.output.find("prism: configs/synth_tiny_moevit.json with --set data.train="), std::string::npos)
        << e.output;
    EXPECT_NE(e.output.find(", --set data.train=: data.train is empty"), std::string::npos) << e.output;
    EXPECT_FALSE(exists(other.path + "/metrics.jsonl"));
    // A value cxxopts cannot read is named with its option, either spelling.
    const ShellRun g = run_shell(prism + " eval --checkpoint x --data y --batch 1e3");
    EXPECT_EQ(WEXITSTATUS(g.status), 1) << g.output;
    EXPECT_NE(g.output.find("prism: eval: --batch '1e3': not a valid value (a number in range, like its default 64)"),
              std::string::npos) << g.output;
    const ShellRun h = run_shell(prism + " synth --preset tiny --out " + other.path + "/d --seed=-1");
    EXPECT_EQ(WEXITSTATUS(h.status), 1) << h.output;
    EXPECT_NE(h.output.find("prism: synth: --seed '-1': not a valid value"), std::string::npos) << h.output;
    EXPECT_FALSE(exists(other.path + "/d"));
    // The text given to two options: which one refused it is not known.
    const ShellRun i = run_shell(prism + " bench loader --data x --seconds 2.5 --batch 2.5");
    EXPECT_NE(i.output.find("prism: bench loader: '2.5': not a valid value for --seconds or --batch"),
              std::string::npos) << i.output;
    const ShellRun j = run_shell(prism + " eval --checkpoint x --data y --report=maybe");
    EXPECT_NE(j.output.find("prism: eval: --report 'maybe': not a valid value (true or false)"), std::string::npos)
        << j.output;
}

namespace {

// Two ranks of a long `prism train` in `dir` (the communication timeout 3
// s), one of them sent SIG`signal` after step 2; the job's output is in
// dir/log.
DeadRankRun signal_a_rank_of_a_long_run(const std::string& signal, const std::string& dir) {
    return signal_a_rank_mid_run(
        signal,
        "OMP_NUM_THREADS=1 " + std::string(kMpirun) + " -np 2 " + build_dir() + "prism train " +
            train_flags(dir, "--set train.steps=100000 --set train.comm_timeout_s=3 "
                             "--set train.log_every=1 --set data.val=") +
            " --set 'data.threads=1'",
        dir);
}

}  // namespace

// A rank that dies mid-run ends the job with a non-zero exit, within the
// communication timeout, instead of leaving the other rank waiting forever.
TEST(Distributed, ADeadRankEndsTheJob) {
    if (!why_no_mpirun().empty()) GTEST_SKIP() << why_no_mpirun();
    TmpDir run;
    const DeadRankRun d = signal_a_rank_of_a_long_run("KILL", run.path);
    ASSERT_TRUE(d.found) << d.output;
    EXPECT_NE(d.rc, 0) << d.output << d.log;
    EXPECT_LE(d.waited, 20) << d.output;
    std::printf("dead rank: %s", d.output.c_str());
}

// A rank that stalls (SIGSTOP: mpirun sees nothing wrong) leaves the other
// waiting on it: the job must end, non-zero, within train.comm_timeout_s and
// its slack, with a line naming the rank that did not answer.
TEST(Distributed, AStalledRankEndsTheJob) {
    if (!why_no_mpirun().empty()) GTEST_SKIP() << why_no_mpirun();
    TmpDir run;
    const DeadRankRun d = signal_a_rank_of_a_long_run("STOP", run.path);
    ASSERT_TRUE(d.found) << d.output;
    EXPECT_NE(d.rc, 0) << d.output << d.log;
    EXPECT_LE(d.waited, 20) << d.output << d.log;
    EXPECT_NE(d.log.find("did not answer within"), std::string::npos) << "no line names the stalled rank\n" << d.log;
    std::printf("stalled rank: %s\n", d.output.c_str());
}
