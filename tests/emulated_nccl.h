// A stand-in for the NCCL calls engine/nccl.cpp makes, for the emulated
// engine (tests/emulated_runtime.h first, then this, then engine/nccl.cpp):
// the ranks are MPI's, and each collective is the MPI collective of the same
// meaning on the emulated device memory (host memory), begun (MPI's
// non-blocking form) when its stream reaches it and complete when MPI says
// so. So `mpirun -np 2 build/prism_emulated train --device cuda` runs the
// NCCL path of data parallelism (the communicator's creation from rank 0's
// id, the per-block gradient all-reduces and their ranges, ZeRO-1's reduce
// to owners and broadcasts, the load-balance statistics) on a machine
// without a GPU. With the runtime's streams asynchronous
// (PRISM_EMULATE_LATE_STREAMS) the all-reduces overlap backward, and a dead
// peer leaves a collective in flight, which the code's own waiting must give
// up at train.comm_timeout_s; synchronous, each completes before its call
// returns. A communicator's collectives must begin in the order they were
// called, as NCCL needs them to on every rank: one reached on its stream
// before an earlier one has begun (two streams not ordered with each other)
// fails.
//
// A non-blocking communicator (config.blocking = 0, as engine/nccl.cpp
// makes it) answers as NCCL's may: its creation, each call outside a group,
// each group's end and its finalization return ncclInProgress, and
// ncclCommGetAsyncError reports ncclInProgress for a few polls before
// ncclSuccess, so the code's waiting (settle) runs and reads the handle the
// call wrote. Not modelled: NCCL's order of summation (MPI's here), and
// every data type but float and double.
#pragma once
#include "tests/emulated_runtime.h"

#define OMPI_SKIP_MPICXX 1  // the C API only, as engine/comm.cpp
#define MPICH_SKIP_MPICXX 1
#include <mpi.h>

#include <cstring>
#include <memory>
#include <string>
#include <vector>

namespace prism {

enum ncclResult_t { ncclSuccess = 0, ncclInternalError = 3, ncclInvalidArgument = 4, ncclInProgress = 7 };
enum ncclDataType_t { ncclFloat = 7, ncclDouble = 8 };
enum ncclRedOp_t { ncclSum = 0 };
struct ncclUniqueId {
    char internal[128];
};
struct ncclConfig_t {
    int blocking = 1;
};
#define NCCL_CONFIG_INITIALIZER \
    {}
struct EmulatedNcclComm {
    MPI_Comm comm;
    int rank, size;
    bool blocking;
    int polls_in_progress = 0;  // how many more ncclCommGetAsyncError calls say ncclInProgress
    uint64_t called = 0, begun = 0;  // collectives called, and begun in MPI (in that order)
    int64_t unfinished = 0;          // collectives called and not yet complete
    bool finalizing = false;         // ncclCommFinalize was called
    int mpi_error = MPI_SUCCESS;     // the first failed MPI call's code, reported as an asynchronous error
    bool aborted = false;            // ncclCommAbort: queued collectives do nothing
};
typedef EmulatedNcclComm* ncclComm_t;

inline const char* ncclGetErrorString(ncclResult_t r) {
    return r == ncclSuccess ? "no error" : r == ncclInvalidArgument ? "invalid argument" : "internal error (MPI)";
}
inline const char* ncclGetLastError(ncclComm_t) { return ""; }
inline ncclResult_t ncclGetVersion(int* version) {
    *version = 0;  // "NCCL 0.0.0": the emulation
    return ncclSuccess;
}

namespace emulated_nccl {
inline MPI_Datatype mpi_type(ncclDataType_t t) { return t == ncclDouble ? MPI_DOUBLE : MPI_FLOAT; }
inline bool known(ncclDataType_t t, ncclRedOp_t op) { return (t == ncclFloat || t == ncclDouble) && op == ncclSum; }
inline size_t bytes_of(ncclDataType_t t) { return t == ncclDouble ? 8 : 4; }
constexpr int kPollsInProgress = 2;
struct Group {
    int depth = 0;
    std::vector<ncclComm_t> comms;  // the non-blocking ones called inside it
};
inline Group& group() {
    static Group g;
    return g;
}
// What a call whose work is done answers: ncclSuccess, or on a non-blocking
// communicator outside a group ncclInProgress (done at a later poll).
inline ncclResult_t issued(ncclComm_t c, ncclResult_t done) {
    if (done != ncclSuccess || c->blocking) return done;
    if (group().depth > 0) {
        group().comms.push_back(c);
        return ncclSuccess;
    }
    c->polls_in_progress = kPollsInProgress;
    return ncclInProgress;
}
// One attempt at a queued collective: begins it (if every collective called
// before it on c has begun), then asks MPI whether it is complete.
struct InFlight {
    MPI_Request request = MPI_REQUEST_NULL;
    bool begun = false;
};
template <class Begin>
bool step(ncclComm_t c, InFlight& state, uint64_t number, const char* what, const Begin& begin, bool forced) {
    if (c->aborted || c->mpi_error != MPI_SUCCESS) return true;
    if (!state.begun) {
        if (c->begun != number) {
            if (!forced) return false;  // an eager stream: the earlier one's stream may yet begin it
            emu::fail(std::string("NCCL: ") + what + " (call " + std::to_string(number) +
                      " on its communicator) was reached on its stream before call " + std::to_string(c->begun) +
                      " had begun: collectives on one communicator from streams not ordered with each other "
                      "may begin in another order on another rank, and hang");
        }
        state.begun = true;
        c->begun++;
        const int rc = begin(&state.request);
        if (rc != MPI_SUCCESS) {
            c->mpi_error = rc;
            return true;
        }
    }
    int flag = 0;
    const int rc = MPI_Test(&state.request, &flag, MPI_STATUS_IGNORE);
    if (rc != MPI_SUCCESS) c->mpi_error = rc;
    return rc != MPI_SUCCESS || flag != 0;
}

// Queues collective `what` on `stream`: begin(&request) starts it in MPI
// when the stream reaches it (and every collective called before it on c has
// begun); it is complete when MPI_Test says so.
template <class Begin>
ncclResult_t enqueue(ncclComm_t c, cudaStream_t stream, const char* what, Begin begin) {
    auto state = std::make_shared<InFlight>();
    const uint64_t number = c->called++;
    c->unfinished++;
    emulated_streams::submit(stream, [c, state, number, what, begin](bool forced) {
        const bool complete = step(c, *state, number, what, begin, forced);
        if (complete) c->unfinished--;
        return complete;
    });
    return issued(c, ncclSuccess);
}

// Device buffers are the emulated runtime's allocations: a collective on
// memory outside them is what would fault on a GPU.
inline bool on_device(const void* p, size_t count, ncclDataType_t t) {
    return emulated_in_allocation(p, count * bytes_of(t));
}
}  // namespace emulated_nccl

// The id only has to reach every rank unchanged (engine/nccl.cpp broadcasts it).
inline ncclResult_t ncclGetUniqueId(ncclUniqueId* id) {
    std::memset(id->internal, 0, sizeof id->internal);
    std::strcpy(id->internal, "prism emulated NCCL");
    return ncclSuccess;
}

inline ncclResult_t ncclCommInitRankConfig(ncclComm_t* comm, int nranks, ncclUniqueId id, int rank,
                                           ncclConfig_t* config) {
    int initialized = 0, world_size = 1, world_rank = 0;
    MPI_Initialized(&initialized);
    if (std::strcmp(id.internal, "prism emulated NCCL") != 0) return ncclInvalidArgument;
    if (initialized) {
        MPI_Comm_size(MPI_COMM_WORLD, &world_size);
        MPI_Comm_rank(MPI_COMM_WORLD, &world_rank);
    }
    if (nranks != world_size || rank != world_rank) return ncclInvalidArgument;
    auto* c = new EmulatedNcclComm{MPI_COMM_NULL, rank, nranks, !config || config->blocking != 0};
    if (initialized && MPI_Comm_dup(MPI_COMM_WORLD, &c->comm) != MPI_SUCCESS) {
        delete c;
        return ncclInternalError;
    }
    *comm = c;
    if (c->blocking) return ncclSuccess;
    c->polls_in_progress = emulated_nccl::kPollsInProgress + 1;
    return ncclInProgress;
}
inline ncclResult_t ncclCommGetAsyncError(ncclComm_t c, ncclResult_t* state) {
    if (!c) return ncclInvalidArgument;
    if (c->finalizing && c->unfinished > 0) emulated_streams::progress_all();
    if (c->finalizing && c->unfinished > 0 && c->mpi_error == MPI_SUCCESS) {
        *state = ncclInProgress;
        return ncclSuccess;
    }
    *state = c->mpi_error != MPI_SUCCESS  ? ncclInternalError
             : c->polls_in_progress > 0 ? ncclInProgress
                                        : ncclSuccess;
    if (c->polls_in_progress > 0) c->polls_in_progress--;
    return ncclSuccess;
}
// Finalizing lets what is queued complete: ncclCommGetAsyncError answers
// ncclInProgress until the communicator's collectives have (a blocking one
// waits here), so that a peer gone at the end meets the code's deadline.
inline ncclResult_t ncclCommFinalize(ncclComm_t c) {
    c->finalizing = true;
    if (c->blocking)
        while (c->unfinished > 0) emulated_streams::progress_all();
    return emulated_nccl::issued(c, ncclSuccess);
}
inline ncclResult_t ncclCommDestroy(ncclComm_t c) {
    if (c->comm != MPI_COMM_NULL) MPI_Comm_free(&c->comm);
    delete c;
    return ncclSuccess;
}
// Queued collectives may still name an aborted communicator: it is kept,
// and they do nothing.
inline ncclResult_t ncclCommAbort(ncclComm_t c) {
    c->aborted = true;
    return ncclSuccess;
}
inline ncclResult_t ncclGroupStart() {
    emulated_nccl::group().depth++;
    return ncclSuccess;
}
inline ncclResult_t ncclGroupEnd() {
    emulated_nccl::Group& g = emulated_nccl::group();
    if (g.depth == 0) return ncclInvalidArgument;
    if (--g.depth > 0) return ncclSuccess;
    for (ncclComm_t c : g.comms) c->polls_in_progress = emulated_nccl::kPollsInProgress;
    const bool in_progress = !g.comms.empty();
    g.comms.clear();
    return in_progress ? ncclInProgress : ncclSuccess;
}

// In place, as engine/nccl.cpp calls them (send and receive buffers the same).
inline ncclResult_t ncclAllReduce(const void* send, void* recv, size_t count, ncclDataType_t type, ncclRedOp_t op,
                                  ncclComm_t c, cudaStream_t stream) {
    using namespace emulated_nccl;
    if (send != recv || !known(type, op) || !on_device(recv, count, type)) return ncclInvalidArgument;
    if (c->size == 1) return issued(c, ncclSuccess);
    return enqueue(c, stream, "ncclAllReduce", [=](MPI_Request* r) {
        return MPI_Iallreduce(MPI_IN_PLACE, recv, (int)count, mpi_type(type), MPI_SUM, c->comm, r);
    });
}
inline ncclResult_t ncclReduce(const void* send, void* recv, size_t count, ncclDataType_t type, ncclRedOp_t op,
                               int root, ncclComm_t c, cudaStream_t stream) {
    using namespace emulated_nccl;
    if (send != recv || !known(type, op) || !on_device(recv, count, type) || root < 0 || root >= c->size)
        return ncclInvalidArgument;
    if (c->size == 1) return issued(c, ncclSuccess);
    return enqueue(c, stream, "ncclReduce", [=](MPI_Request* r) {
        if (c->rank == root)
            return MPI_Ireduce(MPI_IN_PLACE, recv, (int)count, mpi_type(type), MPI_SUM, root, c->comm, r);
        return MPI_Ireduce(send, nullptr, (int)count, mpi_type(type), MPI_SUM, root, c->comm, r);
    });
}
inline ncclResult_t ncclBroadcast(const void* send, void* recv, size_t count, ncclDataType_t type, int root,
                                  ncclComm_t c, cudaStream_t stream) {
    using namespace emulated_nccl;
    if (send != recv || !known(type, ncclSum) || !on_device(recv, count, type) || root < 0 || root >= c->size)
        return ncclInvalidArgument;
    if (c->size == 1) return issued(c, ncclSuccess);
    return enqueue(c, stream, "ncclBroadcast", [=](MPI_Request* r) {
        return MPI_Ibcast(recv, (int)count, mpi_type(type), root, c->comm, r);
    });
}

}  // namespace prism
