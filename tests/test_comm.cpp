// engine/comm: a world of one in this process, and real ranks through
// `mpirun` running build/comm_worker (tests/workers/comm_worker.cpp).
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>
#include <limits.h>
#include <sys/wait.h>
#include <unistd.h>
#include "engine/comm.h"
#include "tests/shellutil.h"
#include "tests/testutil.h"

using namespace prism;
using namespace prism::testing;

TEST(Comm, WorldOfOneWithoutLauncher) {
    for (const char* v : {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"})
        if (std::getenv(v)) GTEST_SKIP() << v << " is set: this test process runs under an MPI launcher";
    Comm c = comm_init();
    EXPECT_EQ(c.rank, 0);
    EXPECT_EQ(c.size, 1);
    EXPECT_EQ(c.local_rank, 0);
    EXPECT_EQ(c.local_size, 1);
    EXPECT_FALSE(c.mpi);
    std::vector<float> f = {1.5f, -2.0f, 1e-30f};
    std::vector<double> d = {3.25, NAN};
    comm_allreduce_sum(c, f.data(), int64_t(f.size()));
    comm_allreduce_sum(c, d.data(), int64_t(d.size()));
    EXPECT_EQ(f, (std::vector<float>{1.5f, -2.0f, 1e-30f}));
    EXPECT_EQ(d[0], 3.25);
    EXPECT_TRUE(std::isnan(d[1]));
    char bytes[] = "unchanged";
    comm_broadcast(c, bytes, sizeof bytes);
    EXPECT_STREQ(bytes, "unchanged");
    EXPECT_EQ(comm_max(c, -4.5), -4.5);
    comm_barrier(c);
    comm_finalize(c);
}

namespace {

// build/comm_worker, next to this test binary.
std::string worker_path() { return build_dir() + "comm_worker"; }

// Runs the worker under mpirun with -np ranks and the given arguments.
ShellRun mpirun_worker(int ranks, const std::string& args) {
    const std::string worker = worker_path();
    EXPECT_TRUE(exists(worker)) << worker << " is missing: run make build";
    return run_shell(std::string(kMpirun) + " -np " + std::to_string(ranks) + " " + worker + " " + args);
}

}  // namespace

TEST(CommMpi, CollectivesAreBitExactAndAlikeOnEveryRank) {
    if (!why_no_mpirun().empty()) GTEST_SKIP() << why_no_mpirun();
    const ShellRun r = mpirun_worker(3, "check");
    std::printf("mpirun -np 3 comm_worker check: %.1f s\n", r.seconds);
    EXPECT_TRUE(exited_ok(r)) << r.output;
    EXPECT_EQ(r.output.find("FAILED"), std::string::npos) << r.output;
    for (int rank = 0; rank < 3; rank++)
        EXPECT_NE(r.output.find("rank " + std::to_string(rank) + ": ok barrier"), std::string::npos) << r.output;
}

// A rank that stalls (sleeps 40 s) or dies before an all-reduce ends the
// whole job with a non-zero exit well before the sleep would, with `line`
// in the output, and no rank gets past the all-reduce.
void expect_job_ends(const std::string& args, const std::string& line) {
    const ShellRun r = mpirun_worker(2, args);
    std::printf("comm_worker %s, timeout 2 s: the job ended after %.1f s\n", args.c_str(), r.seconds);
    EXPECT_FALSE(exited_ok(r)) << r.output;
    EXPECT_LT(r.seconds, 20) << r.output;
    EXPECT_NE(r.output.find(line), std::string::npos) << r.output;
    EXPECT_EQ(r.output.find("allreduce returned"), std::string::npos) << r.output;
}

TEST(CommMpi, StalledRankIsNamedAndTheJobExits) {
    if (!why_no_mpirun().empty()) GTEST_SKIP() << why_no_mpirun();
    expect_job_ends("stall 1 40", "prism: rank 0: comm: rank 1 did not answer within 2 s (allreduce");
}

TEST(CommMpi, StalledRootIsNamedAndTheJobExits) {
    if (!why_no_mpirun().empty()) GTEST_SKIP() << why_no_mpirun();
    expect_job_ends("stall 0 40", "prism: rank 1: comm: rank 0 did not answer within");
}

TEST(CommMpi, DeadRankEndsTheJob) {
    if (!why_no_mpirun().empty()) GTEST_SKIP() << why_no_mpirun();
    expect_job_ends("die 1", "process rank 1");  // mpirun names it
}
