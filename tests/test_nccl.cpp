// Data parallel on GPUs (engine/nccl.h) through `prism train --device cuda`
// itself: a world of one under mpirun takes the NCCL path (communicator,
// gradient all-reduce on its own stream overlapped with backward, the
// load-balance statistics all-reduced on the device) and must train to the
// weights of a plain single-GPU run; with two GPUs, two ranks train like one
// process. Each test skips, saying why, without a CUDA device, NCCL in the
// build, or a working mpirun (and the two-rank ones without two GPUs). The
// same world-of-one check also runs in this process through train(), which
// needs no mpirun (a GPU machine may have NCCL but no MPI).
//
// build/prism_emulated_tests runs this file on the emulated engine
// (PRISM_EMULATED_ENGINE: build/prism_emulated, whose GPUs, kernels, cuBLAS
// and NCCL are CPU models, two GPUs visible; see tests/emulated_nccl.h) at
// the same sizes, its runtime's streams asynchronous where a test needs
// them to be (PRISM_EMULATE_LATE_STREAMS).
#include <cmath>
#include <cstring>
#include <string>
#include <vector>
#include "engine/config.h"
#include "engine/nccl.h"
#include "engine/train.h"
#include "tests/runutil.h"
#include "tests/shellutil.h"
#include "tests/testutil.h"
#ifdef PRISM_CUDA
#include "kernels/cuda_ops.h"
#endif

using namespace prism;
using namespace prism::testing;

namespace {

int visible_gpus() {
#ifdef PRISM_CUDA
    return cuda::device_count();
#else
    return 0;
#endif
}

// Why the NCCL path cannot run in this process ("" when it can).
std::string why_no_nccl() {
#ifndef PRISM_CUDA
    return "this build has no CUDA backend";
#else
    if (visible_gpus() == 0) return "no CUDA device";
    if (!nccl_built()) return "this build has no NCCL (nccl.h was not found under NCCL_HOME)";
    if (!cuda_ops::has_cublas()) return "this build has no cuBLAS (CUBLAS_HOME)";
    return "";
#endif
}

// ... nor under mpirun.
std::string why_no_nccl_run() { return why_no_nccl().empty() ? why_no_mpirun() : why_no_nccl(); }

#ifdef PRISM_EMULATED_ENGINE
const char* kPrism = "prism_emulated";
#else
const char* kPrism = "prism";
#endif
constexpr int kSteps = 8, kBatch = 16;
const bool kValidate = true;

// `prism train` on the tiny MoE-ViT task: HCS, drop path and the load-balance
// loss on, so every data-parallel piece is used.
std::string train_flags(const std::string& out, const std::string& extra = "") {
    return "--config configs/synth_tiny_moevit.json --device cuda --out " + out + " --set 'data.train=" + tiny_data_dir() +
           "/train-*.shard' --set 'data.val=" + (kValidate ? tiny_data_dir() + "/val-*.shard" : "") + "' --set train.batch=" +
           std::to_string(kBatch) + " --set train.steps=" + std::to_string(kSteps) +
           " --set train.warmup_steps=3 --set train.eval_every=0 --set train.hcs=true --set model.drop_path=0.1 " +
           extra;
}

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
    return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

void report(const char* what, const std::vector<float>& a, const std::vector<float>& b) {
    std::printf("[ nccl ] %-52s relative difference %.3g, bit-identical: %s\n", what, relative_difference(a, b),
                same_bits(a, b) ? "yes" : "no");
}

}  // namespace

// `mpirun -np 1 prism train --device cuda` is the NCCL path with one rank:
// NCCL's sum over one rank is a copy and the 1/1 scaling exact, and the
// load-balance statistics are the same doubles, so the final weights should
// be those of a plain run bit for bit (required: relative difference <= 1e-6),
// with and without overlap.
TEST(Nccl, WorldOfOneTrainsLikeOneProcess) {
    if (!why_no_nccl_run().empty()) GTEST_SKIP() << why_no_nccl_run();
    const std::string prism = build_dir() + kPrism;
    TmpDir plain, one, one_serial;
    const ShellRun a = run_shell(prism + " train " + train_flags(plain.path));
    ASSERT_TRUE(exited_ok(a)) << a.output;
    EXPECT_EQ(a.output.find("comm: NCCL"), std::string::npos) << "a plain run uses no NCCL\n" << a.output;
    const ShellRun b = run_shell(std::string(kMpirun) + " -np 1 " + prism + " train " + train_flags(one.path));
    ASSERT_TRUE(exited_ok(b)) << b.output;
    EXPECT_NE(b.output.find("comm: NCCL"), std::string::npos) << b.output;
    EXPECT_NE(b.output.find("overlapped with backward"), std::string::npos) << b.output;
    EXPECT_NE(b.output.find("step phases"), std::string::npos) << b.output;
    const ShellRun c = run_shell(std::string(kMpirun) + " -np 1 " + prism + " train " +
                                 train_flags(one_serial.path, "--set train.overlap_comm=false"));
    ASSERT_TRUE(exited_ok(c)) << c.output;
    EXPECT_NE(c.output.find("train.overlap_comm=false"), std::string::npos) << c.output;

    const auto w_plain = run_weights(plain.path), w_one = run_weights(one.path), w_serial = run_weights(one_serial.path);
    report("plain vs mpirun -np 1 (NCCL, overlap)", w_plain, w_one);
    report("mpirun -np 1: overlap vs train.overlap_comm=false", w_one, w_serial);
    EXPECT_LE(relative_difference(w_plain, w_one), 1e-6);
    EXPECT_LE(relative_difference(w_one, w_serial), 1e-6);
    // The step phases reach metrics.jsonl.
    const std::string metrics = read_bytes(one.path + "/metrics.jsonl");
    EXPECT_NE(metrics.find("\"allreduce_s\""), std::string::npos) << metrics;
}

// The same check without mpirun: train() in this process, once plainly and
// once with a world of one's NCCL communicator made by comm_init_nccl.
TEST(Nccl, WorldOfOneInProcessTrainsLikeOneProcess) {
    if (!why_no_nccl().empty()) GTEST_SKIP() << why_no_nccl();
    TmpDir plain, one;
    const Config cfg = load_config("configs/synth_tiny_moevit.json",
                                   {"data.train=" + tiny_data_dir() + "/train-*.shard", "data.val=",
                                    "train.batch=" + std::to_string(kBatch), "train.steps=" + std::to_string(kSteps),
                                    "train.warmup_steps=3", "train.hcs=true", "model.drop_path=0.1"});
    train(cfg, Device::cuda, plain.path, false);
    Comm comm;  // a world of one, no MPI
    comm.timeout_s = 60;
    comm_init_nccl(comm);
    ASSERT_NE(comm.nccl, nullptr);
    std::printf("[ nccl ] %s\n", nccl_description(comm).c_str());
    TrainOptions o;
    o.comm = &comm;
    train(cfg, Device::cuda, one.path, false, o);
    comm_free_nccl(comm);
    EXPECT_EQ(comm.nccl, nullptr);
    const auto w_plain = run_weights(plain.path), w_one = run_weights(one.path);
    report("plain vs in-process world of one (NCCL, overlap)", w_plain, w_one);
    EXPECT_LE(relative_difference(w_plain, w_one), 1e-6);
}

// Two ranks, one GPU each, with batch 8 each train to the weights of one
// process with batch 16 (to the tolerance of the CPU's two-rank test: the sums
// run in another order), and every rank checks that the ranks' weights are
// bit-identical. With two ranks each sum has two terms, so overlap does not
// change the bits.
TEST(Nccl, TwoGpusTrainLikeOneProcess) {
    if (!why_no_nccl_run().empty()) GTEST_SKIP() << why_no_nccl_run();
    if (visible_gpus() < 2) GTEST_SKIP() << "needs two GPUs (" << visible_gpus() << " visible)";
    const std::string prism = build_dir() + kPrism;
    TmpDir one, two, two_serial;
    const ShellRun a = run_shell(prism + " train " + train_flags(one.path));
    ASSERT_TRUE(exited_ok(a)) << a.output;
    const ShellRun b = run_shell(std::string(kMpirun) + " -np 2 " + prism + " train " + train_flags(two.path));
    ASSERT_TRUE(exited_ok(b)) << b.output;
    EXPECT_NE(b.output.find("weights identical on all 2 ranks"), std::string::npos) << b.output;
    EXPECT_NE(b.output.find("\"ranks\":2"), std::string::npos) << b.output;
    const ShellRun c = run_shell(std::string(kMpirun) + " -np 2 " + prism + " train " +
                                 train_flags(two_serial.path, "--set train.overlap_comm=false"));
    ASSERT_TRUE(exited_ok(c)) << c.output;
    const auto w_one = run_weights(one.path), w_two = run_weights(two.path), w_serial = run_weights(two_serial.path);
    report("1 process vs 2 ranks (NCCL)", w_one, w_two);
    report("2 ranks: overlap vs train.overlap_comm=false", w_two, w_serial);
    EXPECT_LE(relative_difference(w_one, w_two), 1e-4);
    EXPECT_GT(relative_difference(w_one, w_two), 0.0) << "two ranks sum in another order: identical bits would be a surprise";
    EXPECT_LE(relative_difference(w_two, w_serial), 1e-6);
}

// ZeRO-1 on two GPUs: each rank gets its shard of the summed gradients by
// ncclReduce, updates it and broadcasts it; the weights are those of the
// all-reduce run (two-term sums: the same bits are expected, 1e-6 required),
// and a run stopped halfway resumes (moments gathered into one state
// file) to the bits of the straight run.
TEST(Nccl, TwoGpusZeroOneTrainsLikeAllReduce) {
    if (!why_no_nccl_run().empty()) GTEST_SKIP() << why_no_nccl_run();
    if (visible_gpus() < 2) GTEST_SKIP() << "needs two GPUs (" << visible_gpus() << " visible)";
    const std::string mpirun = std::string(kMpirun) + " -np 2 " + build_dir() + kPrism + " train ";
    TmpDir plain, zero, stopped;
    const ShellRun a = run_shell(mpirun + train_flags(plain.path));
    ASSERT_TRUE(exited_ok(a)) << a.output;
    const ShellRun b = run_shell(mpirun + train_flags(zero.path, "--set train.zero=1"));
    ASSERT_TRUE(exited_ok(b)) << b.output;
    EXPECT_NE(b.output.find("ZeRO-1 over 2 ranks"), std::string::npos) << b.output;
    EXPECT_NE(b.output.find("weights identical on all 2 ranks"), std::string::npos) << b.output;
    const ShellRun c = run_shell(mpirun + train_flags(stopped.path, "--set train.zero=1 --set train.stop_after=" + std::to_string(kSteps / 2)));
    ASSERT_TRUE(exited_ok(c)) << c.output;
    const ShellRun d = run_shell(mpirun + "--resume " + stopped.path + " --device cuda");
    ASSERT_TRUE(exited_ok(d)) << d.output;
    const auto w_plain = run_weights(plain.path), w_zero = run_weights(zero.path), w_resumed = run_weights(stopped.path);
    report("2 ranks: all-reduce vs ZeRO-1 (NCCL)", w_plain, w_zero);
    report("2 ranks, ZeRO-1: straight vs stopped halfway + resumed", w_zero, w_resumed);
    EXPECT_LE(relative_difference(w_plain, w_zero), 1e-6);
    EXPECT_TRUE(same_bits(w_zero, w_resumed));
}

// NCCL cannot put two ranks on one GPU: with one GPU visible, two ranks are
// refused with one line instead of failing somewhere inside NCCL.
TEST(Nccl, TwoRanksOnOneGpuAreRefused) {
    if (!why_no_nccl_run().empty()) GTEST_SKIP() << why_no_nccl_run();
    const std::string prism = build_dir() + kPrism;
    TmpDir run;
    const ShellRun r = run_shell(std::string(kMpirun) + " -x CUDA_VISIBLE_DEVICES=0 -np 2 " + prism + " train " +
                                 train_flags(run.path));
    EXPECT_FALSE(exited_ok(r)) << r.output;
    EXPECT_NE(r.output.find("ranks 0 and 1 would share one GPU"), std::string::npos) << r.output;
}

#ifdef PRISM_EMULATED_ENGINE
// The emulated runtime's asynchronous streams (tests/emulated_runtime.h,
// PRISM_EMULATE_LATE_STREAMS): stream 1 is the model's, 2 the gradient
// all-reduce's. Run late, each lets a missing wait show: with the model's
// late the all-reduces would read gradients backward has not written yet,
// with the communication stream's late the optimizer would update from
// gradients not yet summed. Every run must give the bits of the synchronous
// run: a plain run, two ranks, and two ranks with ZeRO-1.
TEST(Nccl, LateStreamsTrainToTheSameBits) {
    if (!why_no_nccl_run().empty()) GTEST_SKIP() << why_no_nccl_run();
    if (visible_gpus() < 2) GTEST_SKIP() << "needs two GPUs (" << visible_gpus() << " visible)";
    const std::string prism = build_dir() + kPrism + " train ";
    const std::string mpirun = std::string(kMpirun) + " -np 2 ";
    struct Case {
        const char* what;
        std::string launch, flags;
        std::vector<const char*> late;
    };
    const std::vector<Case> cases = {
        {"1 process", "", "", {"1"}},
        {"2 ranks", mpirun, "", {"1", "2"}},
        {"2 ranks, ZeRO-1", mpirun, "--set train.zero=1", {"1", "2"}},
    };
    for (const Case& c : cases) {
        TmpDir in_order;
        const ShellRun a = run_shell(c.launch + prism + train_flags(in_order.path, c.flags));
        ASSERT_TRUE(exited_ok(a)) << a.output;
        const auto w_in_order = run_weights(in_order.path);
        for (const char* late : c.late) {
            TmpDir run;
            const ShellRun b = run_shell(std::string("PRISM_EMULATE_LATE_STREAMS=") + late + " " + c.launch + prism +
                                         train_flags(run.path, c.flags));
            ASSERT_TRUE(exited_ok(b)) << b.output;
            EXPECT_NE(b.output.find(std::string("stream ") + late + " runs late"), std::string::npos) << b.output;
            report((std::string(c.what) + ": stream " + late + " late vs in order").c_str(), w_in_order,
                   run_weights(run.path));
            EXPECT_TRUE(same_bits(w_in_order, run_weights(run.path))) << c.what << ", stream " << late << " late";
        }
    }
}
#endif

// What the emulated engine's runs below need before their command: its
// streams asynchronous, so that a collective waits for its peer as NCCL's
// does (synchronous, the survivor would block inside MPI until mpirun or
// the watchdog ends it, and the code's own deadline would go untested).
#ifdef PRISM_EMULATED_ENGINE
const std::string kPeersWait = "PRISM_EMULATE_LATE_STREAMS=none ";
#else
const std::string kPeersWait;
#endif

namespace {

// Two ranks of a long `prism train --device cuda` in `dir` (the
// communication timeout 3 s), one of them sent SIG`signal` after step 2; the
// job's output is in dir/log.
DeadRankRun signal_a_rank_of_a_long_run(const std::string& signal, const std::string& dir) {
    return signal_a_rank_mid_run(
        signal,
        kPeersWait + kMpirun + " -np 2 " + build_dir() + kPrism + " train " +
            train_flags(dir, "--set train.steps=1000000 --set train.comm_timeout_s=3 "
                             "--set train.log_every=1 --set data.val="),
        dir);
}

}  // namespace

// A rank that dies mid-run ends the job too, within the communication
// timeout, instead of leaving the other rank inside an NCCL collective.
TEST(Nccl, ADeadRankEndsTheJob) {
    if (!why_no_nccl_run().empty()) GTEST_SKIP() << why_no_nccl_run();
    if (visible_gpus() < 2) GTEST_SKIP() << "needs two GPUs (" << visible_gpus() << " visible)";
    TmpDir run;
    const DeadRankRun d = signal_a_rank_of_a_long_run("KILL", run.path);
    ASSERT_TRUE(d.found) << d.output;
    EXPECT_NE(d.rc, 0) << d.output << d.log;
    EXPECT_LE(d.waited, 30) << d.output << d.log;
    std::printf("dead rank: %s%s", d.output.c_str(), d.log.c_str());
}

// A rank that stalls (SIGSTOP: mpirun sees nothing wrong) leaves the other's
// collective in flight: the job must end, non-zero, within
// train.comm_timeout_s and the watchdog's grace (here 3 s + 2.3 s), with a
// line naming the collective or the rank that did not answer.
TEST(Nccl, AStalledRankEndsTheJob) {
    if (!why_no_nccl_run().empty()) GTEST_SKIP() << why_no_nccl_run();
    if (visible_gpus() < 2) GTEST_SKIP() << "needs two GPUs (" << visible_gpus() << " visible)";
    TmpDir run;
    const DeadRankRun d = signal_a_rank_of_a_long_run("STOP", run.path);
    ASSERT_TRUE(d.found) << d.output;
    EXPECT_NE(d.rc, 0) << d.output << d.log;
    EXPECT_LE(d.waited, 20) << d.output << d.log;
    // Where the survivor waits decides who speaks: NCCL's deadline, the
    // watchdog (the host blocked behind a collective), or MPI's deadline (the
    // step's loss reduction on the host).
    EXPECT_TRUE(d.log.find("did not complete within 3 s") != std::string::npos ||
                d.log.find("has not completed in") != std::string::npos ||
                d.log.find("did not answer within") != std::string::npos)
        << "no line names the stalled collective or rank\n" << d.log;
    std::printf("stalled rank: %s%s", d.output.c_str(), d.log.c_str());
}
