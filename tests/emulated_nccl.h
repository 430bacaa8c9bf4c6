// A stand-in for the NCCL calls engine/nccl.cpp makes, for the emulated
// engine (tests/emulated_runtime.h first, then this, then engine/nccl.cpp):
// the ranks are MPI's, and each collective is the MPI collective of the same
// meaning on the emulated device memory (host memory), run when it is
// enqueued. So `mpirun -np 2 build/prism_emulated train --device cuda` runs
// the NCCL path of data parallelism (the communicator's creation from rank
// 0's id, the per-block gradient all-reduces and their ranges, ZeRO-1's
// reduce to owners and broadcasts, the load-balance statistics) on a machine
// without a GPU.
//
// A non-blocking communicator (config.blocking = 0, as engine/nccl.cpp
// makes it) answers as NCCL's may: its creation, each call outside a group,
// each group's end and its finalization return ncclInProgress, and
// ncclCommGetAsyncError reports ncclInProgress for a few polls before
// ncclSuccess, so the code's waiting (settle) runs and reads the handle the
// call wrote. Not modelled: real asynchrony (every call's work is done before
// it returns, so the overlap with backward and the deadlines of
// train.comm_timeout_s are never exercised: a dead peer leaves the survivor
// blocked inside MPI, where only the watchdog or mpirun ends it), NCCL's
// order of summation (MPI's here), and every data type but float and double.
#pragma once
#include "tests/emulated_runtime.h"

#define OMPI_SKIP_MPICXX 1  // the C API only, as engine/comm.cpp
#define MPICH_SKIP_MPICXX 1
#include <mpi.h>

#include <cstring>
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
inline ncclResult_t result(int mpi_rc) { return mpi_rc == MPI_SUCCESS ? ncclSuccess : ncclInternalError; }
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
    *state = c->polls_in_progress > 0 ? ncclInProgress : ncclSuccess;
    if (c->polls_in_progress > 0) c->polls_in_progress--;
    return ncclSuccess;
}
inline ncclResult_t ncclCommFinalize(ncclComm_t c) { return emulated_nccl::issued(c, ncclSuccess); }
inline ncclResult_t ncclCommDestroy(ncclComm_t c) {
    if (c->comm != MPI_COMM_NULL) MPI_Comm_free(&c->comm);
    delete c;
    return ncclSuccess;
}
inline ncclResult_t ncclCommAbort(ncclComm_t c) { return ncclCommDestroy(c); }
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
                                  ncclComm_t c, cudaStream_t) {
    using namespace emulated_nccl;
    if (send != recv || !known(type, op) || !on_device(recv, count, type)) return ncclInvalidArgument;
    if (c->size == 1) return issued(c, ncclSuccess);
    return issued(c, result(MPI_Allreduce(MPI_IN_PLACE, recv, (int)count, mpi_type(type), MPI_SUM, c->comm)));
}
inline ncclResult_t ncclReduce(const void* send, void* recv, size_t count, ncclDataType_t type, ncclRedOp_t op,
                               int root, ncclComm_t c, cudaStream_t) {
    using namespace emulated_nccl;
    if (send != recv || !known(type, op) || !on_device(recv, count, type) || root < 0 || root >= c->size)
        return ncclInvalidArgument;
    if (c->size == 1) return issued(c, ncclSuccess);
    if (c->rank == root)
        return issued(c, result(MPI_Reduce(MPI_IN_PLACE, recv, (int)count, mpi_type(type), MPI_SUM, root, c->comm)));
    return issued(c, result(MPI_Reduce(send, nullptr, (int)count, mpi_type(type), MPI_SUM, root, c->comm)));
}
inline ncclResult_t ncclBroadcast(const void* send, void* recv, size_t count, ncclDataType_t type, int root,
                                  ncclComm_t c, cudaStream_t) {
    using namespace emulated_nccl;
    if (send != recv || !known(type, ncclSum) || !on_device(recv, count, type) || root < 0 || root >= c->size)
        return ncclInvalidArgument;
    if (c->size == 1) return issued(c, ncclSuccess);
    return issued(c, result(MPI_Bcast(recv, (int)count, mpi_type(type), root, c->comm)));
}

}  // namespace prism
