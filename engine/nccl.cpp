// engine/nccl.h. Everything that calls CUDA or NCCL is inside PRISM_NCCL
// (the Makefile defines it, with the CUDA and NCCL include paths, when it
// finds nccl.h); a build without NCCL gets the refusal and stubs at the top.
#include "engine/nccl.h"
#include <stdexcept>
#include <string>
#include "engine/common.h"

#ifdef PRISM_NCCL
#ifndef PRISM_EMULATION  // the emulated engine: tests/emulated_runtime.h and emulated_nccl.h
#include <cuda_runtime.h>
#include <nccl.h>
#endif
#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <thread>
#include <vector>
#include <time.h>
#endif

namespace prism {

#ifndef PRISM_NCCL

bool nccl_built() { return false; }

void comm_init_nccl(Comm& c) {
    if (c.size > 1)
        throw UserError("--device cuda under mpirun: this build has no NCCL (nccl.h was not found under NCCL_HOME "
                        "when it was built); run one process per GPU job, or --device cpu for data parallelism "
                        "over MPI");
}
void comm_free_nccl(Comm&) {}
std::string nccl_description(const Comm&) { return ""; }

namespace {
[[noreturn]] void no_nccl() { throw std::logic_error("NCCL call in a build without NCCL"); }
}  // namespace

void nccl_allreduce_sum(const Comm&, float*, int64_t, cudaStream_t) { no_nccl(); }
void nccl_allreduce_sum(const Comm&, double*, int64_t, cudaStream_t) { no_nccl(); }
void nccl_reduce_to_owners(const Comm&, float*, int64_t, int64_t, int64_t, cudaStream_t) { no_nccl(); }
void nccl_allgather(const Comm&, float*, int64_t, cudaStream_t) { no_nccl(); }
void nccl_wait(const Comm&, cudaStream_t, const std::string&) { no_nccl(); }

GradAllReduce::GradAllReduce(const Comm& c, float*, int64_t n, cudaStream_t, bool overlap, bool to_owners)
    : comm_(c), overlap_(overlap), to_owners_(to_owners), n_(n) {
    no_nccl();
}
GradAllReduce::~GradAllReduce() = default;
void GradAllReduce::begin() { no_nccl(); }
void GradAllReduce::ready(int64_t, int64_t) { no_nccl(); }
void GradAllReduce::end() { no_nccl(); }
GradReduceTimes GradAllReduce::wait() { no_nccl(); }

#else  // PRISM_NCCL

using Clock = std::chrono::steady_clock;

struct NcclComm {
    ncclComm_t comm = nullptr;
    int device = 0;
    std::string device_name;
    int version = 0;
    // The watchdog (engine/nccl.h): armed while NCCL work is outstanding;
    // last_ns is when the host last issued NCCL work or began to wait for it.
    std::atomic<bool> armed{false};
    std::atomic<int64_t> last_ns{0};
    std::mutex mutex;
    std::condition_variable wake;
    bool stop = false;
    std::thread watchdog;
};

namespace {

int64_t now_ns() {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now().time_since_epoch()).count();
}

std::string seconds_text(double s) {
    char buf[32];
    std::snprintf(buf, sizeof buf, "%g s", s);
    return buf;
}

// The watchdog's allowance past train.comm_timeout_s, so that the main
// thread's own deadline (which names the problem more precisely and ends
// every rank through MPI_Abort) fires first.
double grace_s(double timeout_s) { return std::min(30.0, 2.0 + 0.1 * timeout_s); }

// Polling the GPU: spin for fast answers, then back off to naps of at most
// 200 µs (the wait at the end of every step must not add much latency).
struct Backoff {
    int polls = 0;
    long nap_ns = 0;
    void operator()() {
        if (++polls <= 200) return;
        nap_ns = nap_ns ? std::min(nap_ns * 2, 200000L) : 5000L;
        timespec ts{0, nap_ns};
        nanosleep(&ts, nullptr);
    }
};

std::string nccl_error(ncclComm_t comm, ncclResult_t r) {
    std::string s = ncclGetErrorString(r);
    const char* last = comm ? ncclGetLastError(comm) : nullptr;
    if (last && *last) s += std::string(" (") + last + ")";
    return s;
}

void cuda_ok(const Comm& c, cudaError_t e, const char* call) {
    if (e != cudaSuccess) comm_abort(c, std::string("CUDA: ") + call + ": " + cudaGetErrorString(e));
}

// A non-blocking communicator's calls may return ncclInProgress: the call
// goes on in the background and ncclCommGetAsyncError tells when it is done.
// Waits for that with the deadline train.comm_timeout_s; returns the final
// result, or ncclInProgress if the deadline passed.
ncclResult_t settle(const Comm& c, ncclComm_t comm, ncclResult_t rc) {
    const auto deadline = Clock::now() + std::chrono::duration<double>(c.timeout_s);
    Backoff backoff;
    while (rc == ncclInProgress) {
        if (Clock::now() > deadline) return ncclInProgress;
        backoff();
        ncclResult_t state = ncclSuccess;
        const ncclResult_t q = ncclCommGetAsyncError(comm, &state);
        rc = q != ncclSuccess ? q : state;
    }
    return rc;
}

// settle(), and the end of the job with one line when the call failed or
// did not complete in time.
void settle_or_abort(const Comm& c, ncclComm_t comm, ncclResult_t rc, const char* call) {
    rc = settle(c, comm, rc);
    if (rc == ncclSuccess) return;
    if (rc == ncclInProgress)
        comm_abort(c, std::string("comm: NCCL ") + call + " did not complete within " + seconds_text(c.timeout_s) +
                          " (train.comm_timeout_s): a rank did not join, stalled or died");
    comm_abort(c, std::string("comm: NCCL ") + call + " failed: " + nccl_error(comm, rc));
}

void touch(NcclComm* nc) {
    nc->last_ns.store(now_ns());
    nc->armed.store(true);
}

void watchdog_loop(NcclComm* nc, int rank, double timeout_s) {
    const double limit = timeout_s + grace_s(timeout_s);
    std::unique_lock<std::mutex> lock(nc->mutex);
    while (!nc->stop) {
        nc->wake.wait_for(lock, std::chrono::milliseconds(200));
        if (nc->stop || !nc->armed.load()) continue;
        const double idle = double(now_ns() - nc->last_ns.load()) * 1e-9;
        if (idle <= limit) continue;
        // The main thread is stuck in a CUDA call behind an NCCL kernel: it
        // cannot be asked to call MPI_Abort, and this thread may not (MPI is
        // initialized for the main thread only). Ending this process makes
        // mpirun end the others.
        std::fprintf(stderr,
                     "prism: rank %d: comm: an NCCL collective has not completed in %.0f s "
                     "(train.comm_timeout_s %g + %g s): a rank stalled or died, or a GPU hangs; ending this rank\n",
                     rank, idle, timeout_s, grace_s(timeout_s));
        std::fflush(stderr);
        std::fflush(stdout);
        std::_Exit(1);
    }
}

void allreduce(const Comm& c, void* data, int64_t n, ncclDataType_t type, cudaStream_t stream) {
    NcclComm* nc = c.nccl;
    if (!nc) throw std::logic_error("nccl_allreduce_sum without a communicator (comm_init_nccl)");
    if (n <= 0) return;
    touch(nc);
    settle_or_abort(c, nc->comm, ncclAllReduce(data, data, size_t(n), type, ncclSum, nc->comm, stream),
                    "ncclAllReduce");
}

}  // namespace

bool nccl_built() { return true; }

void comm_init_nccl(Comm& c) {
    if (c.nccl) return;
    int visible = 0;
    const cudaError_t e = cudaGetDeviceCount(&visible);
    if (e != cudaSuccess || visible == 0)
        comm_abort(c, std::string("--device cuda: no CUDA device is visible to this rank") +
                          (e != cudaSuccess ? std::string(" (") + cudaGetErrorString(e) + ")" : ""));
    // One GPU per rank of a node, in node-local rank order; CUDA_VISIBLE_DEVICES
    // (or a launcher that sets it per rank) decides which GPUs those are.
    const int device = c.local_rank % visible;
    cuda_ok(c, cudaSetDevice(device), "cudaSetDevice");
    cudaDeviceProp prop{};
    cuda_ok(c, cudaGetDeviceProperties(&prop, device), "cudaGetDeviceProperties");

    // NCCL does not support two ranks on one GPU (it fails or hangs in
    // obscure ways): compare the GPUs' UUIDs over the whole job, so that a
    // per-rank CUDA_VISIBLE_DEVICES is judged by what it really selects.
    if (c.size > 1) {
        constexpr int kUuid = sizeof prop.uuid.bytes;
        std::vector<double> ids(size_t(c.size) * kUuid, 0.0);
        for (int i = 0; i < kUuid; i++) ids[size_t(c.rank) * kUuid + i] = double((unsigned char)prop.uuid.bytes[i]);
        comm_allreduce_sum(c, ids.data(), int64_t(ids.size()));  // small integers: exact
        for (int a = 0; a < c.size; a++)
            for (int b = a + 1; b < c.size; b++) {
                if (!std::equal(ids.begin() + size_t(a) * kUuid, ids.begin() + size_t(a + 1) * kUuid,
                                ids.begin() + size_t(b) * kUuid))
                    continue;
                const std::string line =
                    "comm: ranks " + std::to_string(a) + " and " + std::to_string(b) +
                    " would share one GPU, and NCCL needs a GPU per rank: start at most as many ranks per node as "
                    "it has GPUs (rank " + std::to_string(c.rank) + " sees " + std::to_string(visible) +
                    "; CUDA_VISIBLE_DEVICES selects them)";
                if (c.rank == 0) comm_abort(c, line);
                comm_barrier(c);  // rank 0 ends the job; this returns only if it could not
                comm_abort(c, line);
            }
    }

    ncclUniqueId id{};
    if (c.rank == 0) {
        const ncclResult_t rc = ncclGetUniqueId(&id);
        if (rc != ncclSuccess) comm_abort(c, std::string("comm: ncclGetUniqueId failed: ") + ncclGetErrorString(rc));
    }
    comm_broadcast(c, &id, sizeof id);

    auto* nc = new NcclComm;
    nc->device = device;
    nc->device_name = prop.name;
    if (ncclGetVersion(&nc->version) != ncclSuccess) nc->version = 0;
    // Non-blocking: creation (which waits for every rank to join) can be
    // given up at the deadline instead of hanging.
    ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
    config.blocking = 0;
    // The call first: it writes nc->comm, which settle_or_abort must read
    // after it (the order of a call's arguments is unspecified).
    const ncclResult_t init = ncclCommInitRankConfig(&nc->comm, c.size, id, c.rank, &config);
    settle_or_abort(c, nc->comm, init, "ncclCommInitRankConfig");
    nc->watchdog = std::thread(watchdog_loop, nc, c.rank, c.timeout_s);
    c.nccl = nc;
}

void comm_free_nccl(Comm& c) {
    NcclComm* nc = c.nccl;
    if (!nc) return;
    {
        std::lock_guard<std::mutex> lock(nc->mutex);
        nc->stop = true;
    }
    nc->wake.notify_all();
    nc->watchdog.join();
    // Finalize flushes what is queued and tells the peers; at the deadline
    // (a peer gone) abort instead. The run's results are written by now, so
    // a failure here is reported, not fatal.
    ncclResult_t rc = settle(c, nc->comm, ncclCommFinalize(nc->comm));
    if (rc == ncclSuccess) {
        rc = ncclCommDestroy(nc->comm);
    } else {
        std::fprintf(stderr, "prism: rank %d: comm: ncclCommFinalize: %s; aborting the communicator\n", c.rank,
                     rc == ncclInProgress ? ("no answer within " + seconds_text(c.timeout_s)).c_str()
                                          : nccl_error(nc->comm, rc).c_str());
        rc = ncclCommAbort(nc->comm);
    }
    if (rc != ncclSuccess && rc != ncclInProgress)
        std::fprintf(stderr, "prism: rank %d: comm: destroying the NCCL communicator: %s\n", c.rank,
                     ncclGetErrorString(rc));
    delete nc;
    c.nccl = nullptr;
}

std::string nccl_description(const Comm& c) {
    const NcclComm* nc = c.nccl;
    if (!nc) return "";
    const int v = nc->version;  // 22809 for 2.28.9 (since 2.9: major*10000 + minor*100 + patch)
    return "NCCL " + std::to_string(v / 10000) + "." + std::to_string(v / 100 % 100) + "." + std::to_string(v % 100) +
           ", rank " + std::to_string(c.rank) + " of " + std::to_string(c.size) + " on GPU " +
           std::to_string(nc->device) + " (" + nc->device_name + ")";
}

void nccl_allreduce_sum(const Comm& c, float* data, int64_t n, cudaStream_t stream) {
    allreduce(c, data, n, ncclFloat, stream);
}
void nccl_allreduce_sum(const Comm& c, double* data, int64_t n, cudaStream_t stream) {
    allreduce(c, data, n, ncclDouble, stream);
}

namespace {

// One NCCL call per rank r (one_call(r) returns its result, or ncclSuccess
// for nothing to do), as one group: NCCL runs them together, and the group
// either completes on every rank or the deadline ends the job.
template <class OneCall>
void grouped(const Comm& c, const char* call, OneCall one_call) {
    NcclComm* nc = c.nccl;
    if (!nc) throw std::logic_error(std::string(call) + " without a communicator (comm_init_nccl)");
    touch(nc);
    settle_or_abort(c, nc->comm, ncclGroupStart(), "ncclGroupStart");
    for (int r = 0; r < c.size; r++) {
        const ncclResult_t rc = one_call(r);
        if (rc != ncclSuccess && rc != ncclInProgress)
            comm_abort(c, std::string("comm: NCCL ") + call + " failed: " + nccl_error(nc->comm, rc));
    }
    settle_or_abort(c, nc->comm, ncclGroupEnd(), call);
}

// Polls query() (a cudaEventQuery or cudaStreamQuery) until it reports
// done, checking NCCL's asynchronous errors; at an error or the deadline
// train.comm_timeout_s, ends the job with one line naming `what`. Then the
// watchdog stands down: no NCCL work is outstanding.
template <class Query>
void wait_until_done(const Comm& c, Query query, const std::string& what) {
    NcclComm* nc = c.nccl;
    touch(nc);
    const auto deadline = Clock::now() + std::chrono::duration<double>(c.timeout_s);
    Backoff backoff;
    for (;;) {
        const cudaError_t e = query();
        if (e == cudaSuccess) break;
        if (e != cudaErrorNotReady) cuda_ok(c, e, ("a kernel, copy or NCCL call before " + what + " failed").c_str());
        ncclResult_t state = ncclSuccess;
        const ncclResult_t q = ncclCommGetAsyncError(nc->comm, &state);
        if (q != ncclSuccess || (state != ncclSuccess && state != ncclInProgress))
            comm_abort(c, "comm: NCCL: " + nccl_error(nc->comm, q != ncclSuccess ? q : state) + " during " + what);
        if (Clock::now() > deadline)
            comm_abort(c, "comm: " + what + " did not complete within " + seconds_text(c.timeout_s) +
                              " (train.comm_timeout_s): a rank stalled or died, or a GPU hangs");
        backoff();
    }
    nc->armed.store(false);
}

}  // namespace

void nccl_reduce_to_owners(const Comm& c, float* data, int64_t offset, int64_t count, int64_t n,
                           cudaStream_t stream) {
    grouped(c, "ncclReduce (ZeRO-1 gradients)", [&](int r) {
        const Shard s = comm_shard(c, n, r);
        const int64_t begin = std::max(offset, s.begin), end = std::min(offset + count, s.end);
        if (begin >= end) return ncclSuccess;
        return ncclReduce(data + begin, data + begin, size_t(end - begin), ncclFloat, ncclSum, r, c.nccl->comm,
                          stream);
    });
}

void nccl_allgather(const Comm& c, float* data, int64_t n, cudaStream_t stream) {
    grouped(c, "ncclBroadcast (ZeRO-1 parameters)", [&](int r) {
        const Shard s = comm_shard(c, n, r);
        if (s.size() == 0) return ncclSuccess;
        return ncclBroadcast(data + s.begin, data + s.begin, size_t(s.size()), ncclFloat, r, c.nccl->comm, stream);
    });
}

void nccl_wait(const Comm& c, cudaStream_t stream, const std::string& what) {
    if (!c.nccl) throw std::logic_error("nccl_wait without a communicator (comm_init_nccl)");
    wait_until_done(c, [&] { return cudaStreamQuery(stream); }, what);
}

// ---- the gradient all-reduce ---------------------------------------------------------------

struct GradAllReduce::Impl {
    float* grads = nullptr;
    cudaStream_t model = nullptr, comm = nullptr;
    // Ordering (no timing): a range is final on the model's stream; every
    // all-reduce is done on the communication stream. Each is re-recorded
    // as often as needed: a wait uses the record made before it.
    cudaEvent_t range_ready = nullptr, comm_done = nullptr;
    // Timing, on the model's stream: backward begins, backward ends, the
    // gradients are reduced.
    cudaEvent_t t_begin = nullptr, t_backward = nullptr, t_reduced = nullptr;
};

GradAllReduce::GradAllReduce(const Comm& c, float* grads, int64_t n, cudaStream_t model_stream, bool overlap,
                             bool to_owners)
    : comm_(c), overlap_(overlap), to_owners_(to_owners), n_(n) {
    if (!c.nccl) throw std::logic_error("GradAllReduce without a communicator (comm_init_nccl)");
    impl_ = new Impl;
    Impl& m = *impl_;
    m.grads = grads;
    m.model = model_stream;
    // The communication stream at the highest priority, so that its NCCL
    // kernels start as soon as their range is ready instead of queueing
    // behind the backward kernels for SMs.
    int least = 0, greatest = 0;
    cuda_ok(c, cudaDeviceGetStreamPriorityRange(&least, &greatest), "cudaDeviceGetStreamPriorityRange");
    cuda_ok(c, cudaStreamCreateWithPriority(&m.comm, cudaStreamNonBlocking, greatest), "cudaStreamCreateWithPriority");
    for (cudaEvent_t* e : {&m.range_ready, &m.comm_done})
        cuda_ok(c, cudaEventCreateWithFlags(e, cudaEventDisableTiming), "cudaEventCreateWithFlags");
    for (cudaEvent_t* e : {&m.t_begin, &m.t_backward, &m.t_reduced}) cuda_ok(c, cudaEventCreate(e), "cudaEventCreate");
}

// Called after wait() or while an error unwinds: failures are printed, not thrown.
GradAllReduce::~GradAllReduce() {
    Impl& m = *impl_;
    for (cudaEvent_t e : {m.range_ready, m.comm_done, m.t_begin, m.t_backward, m.t_reduced}) {
        const cudaError_t rc = e ? cudaEventDestroy(e) : cudaSuccess;
        if (rc != cudaSuccess) std::fprintf(stderr, "prism: cudaEventDestroy failed: %s\n", cudaGetErrorString(rc));
    }
    const cudaError_t rc = m.comm ? cudaStreamDestroy(m.comm) : cudaSuccess;
    if (rc != cudaSuccess) std::fprintf(stderr, "prism: cudaStreamDestroy failed: %s\n", cudaGetErrorString(rc));
    delete impl_;
}

void GradAllReduce::begin() {
    reduced_ = calls_ = 0;
    cuda_ok(comm_, cudaEventRecord(impl_->t_begin, impl_->model), "cudaEventRecord");
}

void GradAllReduce::ready(int64_t offset, int64_t count) {
    Impl& m = *impl_;
    if (offset < 0 || count < 0 || offset + count > n_)
        throw std::logic_error("GradAllReduce::ready: range [" + std::to_string(offset) + ", " +
                               std::to_string(offset + count) + ") outside the " + std::to_string(n_) + " gradients");
    cuda_ok(comm_, cudaEventRecord(m.range_ready, m.model), "cudaEventRecord");
    cuda_ok(comm_, cudaStreamWaitEvent(m.comm, m.range_ready, 0), "cudaStreamWaitEvent");
    if (to_owners_)
        nccl_reduce_to_owners(comm_, m.grads, offset, count, n_, m.comm);
    else
        nccl_allreduce_sum(comm_, m.grads + offset, count, m.comm);
    reduced_ += count;
    calls_++;
}

void GradAllReduce::end() {
    Impl& m = *impl_;
    cuda_ok(comm_, cudaEventRecord(m.t_backward, m.model), "cudaEventRecord");
    if (!overlap_) ready(0, n_);
    // The model's hook partitions the gradients: a range reduced twice would
    // be summed twice, one never reduced would differ between the ranks.
    if (reduced_ != n_)
        throw std::logic_error("GradAllReduce: this step reduced " + std::to_string(reduced_) + " of " +
                               std::to_string(n_) + " gradients");
    cuda_ok(comm_, cudaEventRecord(m.comm_done, m.comm), "cudaEventRecord");
    cuda_ok(comm_, cudaStreamWaitEvent(m.model, m.comm_done, 0), "cudaStreamWaitEvent");
    cuda_ok(comm_, cudaEventRecord(m.t_reduced, m.model), "cudaEventRecord");
    last_calls_ = calls_;
}

GradReduceTimes GradAllReduce::wait() {
    Impl& m = *impl_;
    wait_until_done(comm_, [&] { return cudaEventQuery(m.t_reduced); }, "the gradient all-reduce");
    GradReduceTimes t;
    float ms = 0;
    cuda_ok(comm_, cudaEventElapsedTime(&ms, m.t_begin, m.t_backward), "cudaEventElapsedTime");
    t.backward_s = ms * 1e-3;
    cuda_ok(comm_, cudaEventElapsedTime(&ms, m.t_backward, m.t_reduced), "cudaEventElapsedTime");
    t.exposed_s = ms * 1e-3;
    return t;
}

#endif  // PRISM_NCCL

}  // namespace prism
