// Collectives on a star around rank 0, from non-blocking point-to-point calls:
// rank 0 receives every rank's part, combines them in rank order, and sends
// the result back. That fixes the order of the sums (MPI_Allreduce leaves it
// to the implementation) and, because each receive is its own request, tells
// rank 0 exactly which rank did not answer. Rank 0 moves every byte, which is
// fine for the CPU backend; the GPU path all-reduces through NCCL.
#include "engine/comm.h"
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <vector>
#include <time.h>
#include <unistd.h>
#include "engine/common.h"
#include "engine/nccl.h"
#ifdef PRISM_MPI
#define OMPI_SKIP_MPICXX 1  // the C API only: no C++ bindings, no libmpi_cxx
#define MPICH_SKIP_MPICXX 1
#include <mpi.h>
#endif

namespace prism {

namespace {

// Set by the launchers that start MPI ranks: Open MPI's mpirun, MPICH's
// hydra, and PMIx (srun --mpi=pmix).
const char* kLauncherVars[] = {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"};

bool launched_by_mpi() {
    for (const char* v : kLauncherVars)
        if (std::getenv(v)) return true;
    return false;
}

std::string seconds_text(double s) {
    char buf[32];
    std::snprintf(buf, sizeof buf, "%g s", s);
    return buf;
}

}  // namespace

[[noreturn]] void comm_abort(const Comm& c, const std::string& line) {
    std::fprintf(stderr, "prism: rank %d: %s\n", c.rank, line.c_str());
    std::fflush(stderr);
    std::fflush(stdout);
#ifdef PRISM_MPI
    if (c.mpi) MPI_Abort(MPI_COMM_WORLD, 1);
#endif
    std::_Exit(1);
}

Shard comm_shard(const Comm& c, int64_t n, int rank) {
    auto edge = [&](int r) { return n * r / c.size; };  // n·size stays far below 2^63
    return {edge(rank), edge(rank + 1)};
}

#ifndef PRISM_MPI

Comm comm_init() {
    if (launched_by_mpi()) {
        const char* n = std::getenv("OMPI_COMM_WORLD_SIZE");
        if (!n) n = std::getenv("PMI_SIZE");
        if (!n || std::atoi(n) != 1)
            throw UserError(std::string("an MPI launcher started ") + (n ? n : "several") +
                            " ranks, but this build has no MPI (mpicxx was not found when it was built)");
    }
    return Comm{};
}
void comm_finalize(Comm& c) { comm_free_nccl(c); }
void comm_allreduce_sum(const Comm&, float*, int64_t) {}
void comm_reduce_scatter_sum(const Comm&, float*, int64_t) {}
void comm_allgather(const Comm&, float*, int64_t) {}
void comm_allreduce_sum(const Comm&, double*, int64_t) {}
void comm_broadcast(const Comm&, void*, int64_t) {}
void comm_barrier(const Comm&) {}
double comm_max(const Comm&, double x) { return x; }

#else  // PRISM_MPI

namespace {

MPI_Comm g_comm = MPI_COMM_NULL;  // a duplicate of MPI_COMM_WORLD, errors returned
bool g_started = false;            // comm_init called MPI_Init

// One tag per kind of message, so that ranks calling different collectives
// (a bug) time out instead of exchanging the wrong bytes.
enum Tag { kTagPart = 1, kTagResult, kTagBroadcast, kTagShardPart, kTagShard };

// Each message carries at most this many bytes (counts are int in MPI, and
// rank 0 buffers one chunk per rank).
constexpr int64_t kChunkBytes = int64_t(4) << 20;

void check(const Comm& c, int rc, const char* call) {
    if (rc == MPI_SUCCESS) return;
    char text[MPI_MAX_ERROR_STRING];
    int len = 0;
    if (MPI_Error_string(rc, text, &len) != MPI_SUCCESS) len = std::snprintf(text, sizeof text, "error %d", rc);
    comm_abort(c, std::string("comm: ") + call + " failed: " + std::string(text, size_t(len)));
}

// Waits for every request; peers[i] is the rank on the other side of reqs[i].
// At the deadline, names the ranks whose requests are still open and aborts.
void wait_all(const Comm& c, std::vector<MPI_Request>& reqs, const std::vector<int>& peers, double timeout_s,
              const char* what) {
    using Clock = std::chrono::steady_clock;
    const auto deadline = Clock::now() + std::chrono::duration<double>(timeout_s);
    long nap_ns = 0;
    for (int polls = 0;; polls++) {
        bool open = false;
        for (size_t i = 0; i < reqs.size(); i++) {
            if (reqs[i] == MPI_REQUEST_NULL) continue;
            int done = 0;
            const int rc = MPI_Test(&reqs[i], &done, MPI_STATUS_IGNORE);
            if (rc != MPI_SUCCESS) {
                const std::string call = std::string("MPI_Test (") + what + " with rank " + std::to_string(peers[i]) + ")";
                check(c, rc, call.c_str());
            }
            open = open || !done;
        }
        if (!open) return;
        if (Clock::now() > deadline) {
            std::string missing;
            int count = 0;
            for (size_t i = 0; i < reqs.size(); i++)
                if (reqs[i] != MPI_REQUEST_NULL) {
                    missing += (count++ ? ", " : "") + std::to_string(peers[i]);
                }
            std::string line = std::string("comm: ") + (count > 1 ? "ranks " : "rank ") + missing +
                               " did not answer within " + seconds_text(timeout_s) + " (" + what +
                               "; train.comm_timeout_s)";
            if (c.rank != 0) line += ": rank 0 or a rank it waits for stalled or died";
            comm_abort(c, line);
        }
        // Spin briefly for fast answers, then back off to at most 1 ms naps so
        // a long wait (rank 0 writing a checkpoint) does not burn a core.
        if (polls > 64) {
            nap_ns = nap_ns ? std::min(nap_ns * 2, 1000000L) : 20000L;
            timespec ts{0, nap_ns};
            nanosleep(&ts, nullptr);
        }
    }
}

// A rank other than 0 waits a little longer than rank 0, so that when some
// rank stalls, rank 0 (which knows which one) is the first to report it.
double follower_timeout(const Comm& c) { return c.timeout_s + std::min(30.0, 1.0 + 0.1 * c.timeout_s); }

template <class T> MPI_Datatype mpi_type();
template <> MPI_Datatype mpi_type<float>() { return MPI_FLOAT; }
template <> MPI_Datatype mpi_type<double>() { return MPI_DOUBLE; }

// Every rank's data[0..n) combined on rank 0 by combine(acc, other) in rank
// order, the result sent back to all ranks, chunk by chunk.
template <class T, class Combine>
void star_reduce(const Comm& c, T* data, int64_t n, Combine combine, const char* what) {
    if (c.size == 1) return;
    const int64_t chunk = kChunkBytes / int64_t(sizeof(T));
    std::vector<T> parts;
    std::vector<MPI_Request> reqs;
    std::vector<int> peers;
    for (int64_t start = 0; start < n; start += chunk) {
        const int count = int(std::min(chunk, n - start));
        T* buf = data + start;
        reqs.clear();
        peers.clear();
        if (c.rank == 0) {
            parts.resize(size_t(c.size - 1) * size_t(count));
            for (int r = 1; r < c.size; r++) {
                reqs.emplace_back();
                peers.push_back(r);
                check(c, MPI_Irecv(parts.data() + size_t(r - 1) * count, count, mpi_type<T>(), r, kTagPart, g_comm,
                                   &reqs.back()), "MPI_Irecv");
            }
            wait_all(c, reqs, peers, c.timeout_s, what);
            for (int r = 1; r < c.size; r++) {
                const T* part = parts.data() + size_t(r - 1) * count;
                for (int i = 0; i < count; i++) buf[i] = combine(buf[i], part[i]);
            }
            reqs.clear();
            peers.clear();
            for (int r = 1; r < c.size; r++) {
                reqs.emplace_back();
                peers.push_back(r);
                check(c, MPI_Isend(buf, count, mpi_type<T>(), r, kTagResult, g_comm, &reqs.back()), "MPI_Isend");
            }
            wait_all(c, reqs, peers, c.timeout_s, what);
        } else {
            reqs.resize(1);
            peers.assign(1, 0);
            check(c, MPI_Isend(buf, count, mpi_type<T>(), 0, kTagPart, g_comm, &reqs[0]), "MPI_Isend");
            wait_all(c, reqs, peers, follower_timeout(c), what);
            check(c, MPI_Irecv(buf, count, mpi_type<T>(), 0, kTagResult, g_comm, &reqs[0]), "MPI_Irecv");
            wait_all(c, reqs, peers, follower_timeout(c), what);
        }
    }
}

template <class T>
T add(T a, T b) { return a + b; }

double max_or_nan(double a, double b) { return std::isnan(a) || std::isnan(b) ? NAN : std::max(a, b); }

// Shards between every pair of ranks, point to point (no star: each rank
// moves its own bytes). For every other rank p, this rank sends
// data[send_shard(p)] and receives recv_shard(p) bytes into recv_into(p), in
// messages of at most kChunkBytes (MPI keeps the order of messages between
// two ranks with one tag, so chunk j meets chunk j).
template <class SendShard, class RecvShard, class RecvInto>
void exchange_shards(const Comm& c, float* data, SendShard send_shard, RecvShard recv_shard, RecvInto recv_into,
                     int tag, const char* what) {
    const int64_t chunk = kChunkBytes / int64_t(sizeof(float));
    std::vector<MPI_Request> reqs;
    std::vector<int> peers;
    for (int p = 0; p < c.size; p++) {
        if (p == c.rank) continue;
        const Shard in = recv_shard(p), out = send_shard(p);
        float* into = recv_into(p);
        for (int64_t at = 0; at < in.size(); at += chunk) {
            reqs.emplace_back();
            peers.push_back(p);
            check(c, MPI_Irecv(into + at, int(std::min(chunk, in.size() - at)), MPI_FLOAT, p, tag, g_comm,
                               &reqs.back()), "MPI_Irecv");
        }
        for (int64_t at = 0; at < out.size(); at += chunk) {
            reqs.emplace_back();
            peers.push_back(p);
            check(c, MPI_Isend(data + out.begin + at, int(std::min(chunk, out.size() - at)), MPI_FLOAT, p, tag,
                               g_comm, &reqs.back()), "MPI_Isend");
        }
    }
    wait_all(c, reqs, peers, c.rank == 0 ? c.timeout_s : follower_timeout(c), what);
}

}  // namespace

Comm comm_init() {
    Comm c;
    if (!launched_by_mpi()) return c;
    if (!g_started) {
        int provided = 0;
        check(c, MPI_Init_thread(nullptr, nullptr, MPI_THREAD_FUNNELED, &provided), "MPI_Init_thread");
        g_started = true;
        c.mpi = true;
        check(c, MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN), "MPI_Comm_set_errhandler");
        if (provided < MPI_THREAD_FUNNELED) comm_abort(c, "comm: MPI does not support MPI_THREAD_FUNNELED");
        check(c, MPI_Comm_dup(MPI_COMM_WORLD, &g_comm), "MPI_Comm_dup");
        check(c, MPI_Comm_set_errhandler(g_comm, MPI_ERRORS_RETURN), "MPI_Comm_set_errhandler");
    }
    c.mpi = true;
    check(c, MPI_Comm_rank(g_comm, &c.rank), "MPI_Comm_rank");
    check(c, MPI_Comm_size(g_comm, &c.size), "MPI_Comm_size");
    MPI_Comm node = MPI_COMM_NULL;
    check(c, MPI_Comm_split_type(g_comm, MPI_COMM_TYPE_SHARED, c.rank, MPI_INFO_NULL, &node), "MPI_Comm_split_type");
    check(c, MPI_Comm_rank(node, &c.local_rank), "MPI_Comm_rank");
    check(c, MPI_Comm_size(node, &c.local_size), "MPI_Comm_size");
    check(c, MPI_Comm_free(&node), "MPI_Comm_free");
    return c;
}

void comm_finalize(Comm& c) {
    comm_free_nccl(c);  // before MPI: destroying the communicator may still talk to the other ranks
    if (!c.mpi || !g_started) return;
    check(c, MPI_Comm_free(&g_comm), "MPI_Comm_free");
    check(c, MPI_Finalize(), "MPI_Finalize");
    g_started = false;
    c.mpi = false;
}

void comm_allreduce_sum(const Comm& c, float* data, int64_t n) { star_reduce(c, data, n, add<float>, "allreduce"); }
void comm_allreduce_sum(const Comm& c, double* data, int64_t n) { star_reduce(c, data, n, add<double>, "allreduce"); }

void comm_reduce_scatter_sum(const Comm& c, float* data, int64_t n) {
    if (c.size == 1) return;
    const Shard mine = comm_shard(c, n, c.rank);
    // parts[p]: rank p's values of this rank's shard (this rank's own stay in
    // data). Kept between steps: the gradients' shard is the same size each time.
    static std::vector<float> parts;
    parts.resize(size_t(c.size) * size_t(mine.size()));
    exchange_shards(
        c, data, [&](int p) { return comm_shard(c, n, p); }, [&](int) { return mine; },
        [&](int p) { return parts.data() + size_t(p) * size_t(mine.size()); }, kTagShardPart, "reduce-scatter");
    auto part = [&](int r) { return r == c.rank ? data + mine.begin : parts.data() + size_t(r) * size_t(mine.size()); };
    // In rank order, as star_reduce sums: rank 0's value, then rank 1's added, ...
    float* out = data + mine.begin;
    for (int64_t i = 0; i < mine.size(); i++) {
        float sum = part(0)[i];
        for (int r = 1; r < c.size; r++) sum += part(r)[i];
        out[i] = sum;
    }
}

void comm_allgather(const Comm& c, float* data, int64_t n) {
    if (c.size == 1) return;
    const Shard mine = comm_shard(c, n, c.rank);
    exchange_shards(
        c, data, [&](int) { return mine; }, [&](int p) { return comm_shard(c, n, p); },
        [&](int p) { return data + comm_shard(c, n, p).begin; }, kTagShard, "allgather");
}

void comm_broadcast(const Comm& c, void* data, int64_t bytes) {
    if (c.size == 1) return;
    char* p = static_cast<char*>(data);
    std::vector<MPI_Request> reqs;
    std::vector<int> peers;
    for (int64_t start = 0; start < bytes; start += kChunkBytes) {
        const int count = int(std::min(kChunkBytes, bytes - start));
        reqs.clear();
        peers.clear();
        if (c.rank == 0) {
            for (int r = 1; r < c.size; r++) {
                reqs.emplace_back();
                peers.push_back(r);
                check(c, MPI_Isend(p + start, count, MPI_BYTE, r, kTagBroadcast, g_comm, &reqs.back()), "MPI_Isend");
            }
            wait_all(c, reqs, peers, c.timeout_s, "broadcast");
        } else {
            reqs.resize(1);
            peers.assign(1, 0);
            check(c, MPI_Irecv(p + start, count, MPI_BYTE, 0, kTagBroadcast, g_comm, &reqs[0]), "MPI_Irecv");
            wait_all(c, reqs, peers, follower_timeout(c), "broadcast");
        }
    }
}

void comm_barrier(const Comm& c) {
    double nothing = 0;
    star_reduce(c, &nothing, 1, max_or_nan, "barrier");
}

double comm_max(const Comm& c, double x) {
    star_reduce(c, &x, 1, max_or_nan, "max");
    return x;
}

#endif  // PRISM_MPI

}  // namespace prism
