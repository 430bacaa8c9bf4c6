// Started by tests/test_comm.cpp under `mpirun -np N`; each rank runs one mode:
//   comm_worker check             the collectives: results bit-exact and alike on all ranks
//   comm_worker stall RANK SECS   RANK sleeps SECS before an all-reduce (train.comm_timeout_s = 2)
//   comm_worker die RANK          RANK kills itself before an all-reduce
// Prints "rank R: ..." lines; exits 0 when every check passed, 2 otherwise.
#include <cmath>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>
#include <unistd.h>
#include "engine/comm.h"
#include "engine/common.h"
#include "engine/rng.h"

using namespace prism;

namespace {

int failures = 0;

void expect(const Comm& c, bool ok, const std::string& what) {
    std::printf("rank %d: %s %s\n", c.rank, ok ? "ok" : "FAILED", what.c_str());
    if (!ok) failures++;
}

// Values over eight orders of magnitude, so that the order of a sum shows in its bits.
template <class T>
std::vector<T> rank_values(int rank, int64_t n) {
    Rng rng(7, 100, uint64_t(rank));
    std::vector<T> v(n);
    for (auto& x : v) x = T(rng.normal() * std::pow(10.0, rng.uniform() * 8 - 4));
    return v;
}

template <class T>
void check_allreduce(const Comm& c, int64_t n, const char* type) {
    std::vector<T> data = rank_values<T>(c.rank, n);
    comm_allreduce_sum(c, data.data(), n);
    std::vector<T> in_order = rank_values<T>(0, n), reversed = rank_values<T>(c.size - 1, n);
    for (int r = 1; r < c.size; r++) {
        const std::vector<T> v = rank_values<T>(r, n), w = rank_values<T>(c.size - 1 - r, n);
        for (int64_t i = 0; i < n; i++) in_order[i] += v[i], reversed[i] += w[i];
    }
    expect(c, std::memcmp(data.data(), in_order.data(), n * sizeof(T)) == 0,
           std::string("allreduce of ") + std::to_string(n) + " " + type + " equals the rank-order sum bit for bit");
    if (c.size >= 3)  // with two ranks a + b == b + a exactly; with three the order shows
        expect(c, std::memcmp(in_order.data(), reversed.data(), n * sizeof(T)) != 0,
               std::string("the reverse-order sum of ") + type + " differs (the check above can fail)");
    // every rank holds rank 0's bytes
    std::vector<T> root = data;
    comm_broadcast(c, root.data(), int64_t(root.size() * sizeof(T)));
    expect(c, std::memcmp(root.data(), data.data(), n * sizeof(T)) == 0,
           std::string("allreduce of ") + type + " is identical on every rank");
}

// ZeRO-1's pair: each rank's shard of the reduce-scatter holds the bits the
// all-reduce gives there, the rest of its buffer is untouched; the all-gather
// then gives every rank the whole all-reduced vector.
void check_shards(const Comm& c, int64_t n) {
    std::vector<float> reduced = rank_values<float>(c.rank, n), data = reduced;
    comm_allreduce_sum(c, reduced.data(), n);
    const Shard mine = comm_shard(c, n, c.rank);
    int64_t covered = 0;
    for (int r = 0; r < c.size; r++) covered += comm_shard(c, n, r).size();
    expect(c, covered == n && comm_shard(c, n, 0).begin == 0 && comm_shard(c, n, c.size - 1).end == n,
           "the shards partition " + std::to_string(n) + " values");
    comm_reduce_scatter_sum(c, data.data(), n);
    const std::vector<float> own = rank_values<float>(c.rank, n);
    bool shard_ok = true, rest_ok = true;
    for (int64_t i = 0; i < n; i++) {
        const bool in = i >= mine.begin && i < mine.end;
        if (in) shard_ok = shard_ok && std::memcmp(&data[i], &reduced[i], sizeof(float)) == 0;
        else rest_ok = rest_ok && std::memcmp(&data[i], &own[i], sizeof(float)) == 0;
    }
    expect(c, shard_ok, "reduce-scatter of " + std::to_string(n) + " floats: this rank's shard [" +
                            std::to_string(mine.begin) + ", " + std::to_string(mine.end) +
                            ") equals the all-reduce bit for bit");
    expect(c, rest_ok, "reduce-scatter leaves the other shards as they were");
    comm_allgather(c, data.data(), n);
    expect(c, std::memcmp(data.data(), reduced.data(), n * sizeof(float)) == 0,
           "allgather after reduce-scatter gives the whole all-reduce");
}

int check(Comm& c) {
    expect(c, c.mpi && c.size >= 2, "MPI world of " + std::to_string(c.size) + " ranks");
    expect(c, c.local_rank == c.rank && c.local_size == c.size, "local rank on one node");
    check_allreduce<float>(c, 3 * (int64_t(1) << 20) + 123, "floats");  // crosses 4 MiB chunks
    check_allreduce<double>(c, 100003, "doubles");
    check_shards(c, 4 * (int64_t(1) << 20) + 7);  // shards cross 4 MiB chunks, sizes differ by one
    check_shards(c, 2);                            // fewer values than ranks: some shards are empty
    std::vector<char> bytes(5 << 20);
    for (size_t i = 0; i < bytes.size(); i++) bytes[i] = char(c.rank == 0 ? i * 31 + 7 : 0);
    comm_broadcast(c, bytes.data(), int64_t(bytes.size()));
    bool same = true;
    for (size_t i = 0; i < bytes.size(); i++) same = same && bytes[i] == char(i * 31 + 7);
    expect(c, same, "broadcast of 5 MiB from rank 0");
    expect(c, comm_max(c, 1.5 * c.rank) == 1.5 * (c.size - 1), "max");
    expect(c, std::isnan(comm_max(c, c.rank == 1 ? NAN : 1.0)), "max with a NaN on rank 1 is NaN");
    comm_barrier(c);
    expect(c, true, "barrier");
    return failures ? 2 : 0;
}

}  // namespace

int main(int argc, char** argv) {
    std::setvbuf(stdout, nullptr, _IOLBF, 0);
    const std::string mode = argc > 1 ? argv[1] : "";
    Comm c;
    try {
        c = comm_init();
    } catch (const UserError& e) {
        std::fprintf(stderr, "comm_worker: %s\n", e.what());
        return 2;
    }
    c.timeout_s = 30;  // generous while ranks start up on a busy machine
    int rc = 0;
    if (mode == "check") {
        rc = check(c);
    } else if ((mode == "stall" && argc == 4) || (mode == "die" && argc == 3)) {
        comm_barrier(c);
        c.timeout_s = 2;
        if (c.rank == std::atoi(argv[2])) {
            std::printf("rank %d: %s\n", c.rank, mode == "die" ? "killing myself" : "stalling");
            if (mode == "die") raise(SIGKILL);
            sleep(unsigned(std::atoi(argv[3])));
        }
        float x = 1;
        comm_allreduce_sum(c, &x, 1);
        std::printf("rank %d: allreduce returned %g\n", c.rank, x);
    } else {
        std::fprintf(stderr, "usage: comm_worker check | stall RANK SECONDS | die RANK\n");
        rc = 2;
    }
    comm_finalize(c);
    return rc;
}
