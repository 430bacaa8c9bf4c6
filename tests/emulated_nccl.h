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
// Not modelled: asynchrony (every call completes before it returns, so the
// overlap with backward, ncclInProgress and the deadlines of
// train.comm_timeout_s are never exercised: a dead peer leaves the survivor
// blocked inside MPI, where only the watchdog or mpirun ends it), NCCL's
// order of summation (MPI's here), and every data type but float and double.
#pragma once
#include "tests/emulated_runtime.h"

#define OMPI_SKIP_MPICXX 1  // the C API only, as engine/comm.cpp
#define MPICH_SKIP_MPICXX 1
#include <mpi.h>

#include <cstring>

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
                                           ncclConfig_t*) {
    int initialized = 0, world_size = 1, world_rank = 0;
    MPI_Initialized(&initialized);
    if (std::strcmp(id.internal, "prism emulated NCCL") != 0) return ncclInvalidArgument;
    if (initialized) {
        MPI_Comm_size(MPI_COMM_WORLD, &world_size);
        MPI_Comm_rank(MPI_COMM_WORLD, &world_rank);
    }
    if (nranks != world_size || rank != world_rank) return ncclInvalidArgument;
    auto* c = new EmulatedNcclComm{MPI_COMM_NULL, rank, nranks};
    if (initialized && MPI_Comm_dup(MPI_COMM_WORLD, &c->comm) != MPI_SUCCESS) {
        delete c;
        return ncclInternalError;
    }
    *comm = c;
    return ncclSuccess;
}
inline ncclResult_t ncclCommGetAsyncError(ncclComm_t, ncclResult_t* state) {
    *state = ncclSuccess;
    return ncclSuccess;
}
inline ncclResult_t ncclCommFinalize(ncclComm_t) { return ncclSuccess; }
inline ncclResult_t ncclCommDestroy(ncclComm_t c) {
    if (c->comm != MPI_COMM_NULL) MPI_Comm_free(&c->comm);
    delete c;
    return ncclSuccess;
}
inline ncclResult_t ncclCommAbort(ncclComm_t c) { return ncclCommDestroy(c); }
inline ncclResult_t ncclGroupStart() { return ncclSuccess; }
inline ncclResult_t ncclGroupEnd() { return ncclSuccess; }

// In place, as engine/nccl.cpp calls them (send and receive buffers the same).
inline ncclResult_t ncclAllReduce(const void* send, void* recv, size_t count, ncclDataType_t type, ncclRedOp_t op,
                                  ncclComm_t c, cudaStream_t) {
    using namespace emulated_nccl;
    if (send != recv || !known(type, op) || !on_device(recv, count, type)) return ncclInvalidArgument;
    if (c->size == 1) return ncclSuccess;
    return result(MPI_Allreduce(MPI_IN_PLACE, recv, (int)count, mpi_type(type), MPI_SUM, c->comm));
}
inline ncclResult_t ncclReduce(const void* send, void* recv, size_t count, ncclDataType_t type, ncclRedOp_t op,
                               int root, ncclComm_t c, cudaStream_t) {
    using namespace emulated_nccl;
    if (send != recv || !known(type, op) || !on_device(recv, count, type) || root < 0 || root >= c->size)
        return ncclInvalidArgument;
    if (c->size == 1) return ncclSuccess;
    if (c->rank == root)
        return result(MPI_Reduce(MPI_IN_PLACE, recv, (int)count, mpi_type(type), MPI_SUM, root, c->comm));
    return result(MPI_Reduce(send, nullptr, (int)count, mpi_type(type), MPI_SUM, root, c->comm));
}
inline ncclResult_t ncclBroadcast(const void* send, void* recv, size_t count, ncclDataType_t type, int root,
                                  ncclComm_t c, cudaStream_t) {
    using namespace emulated_nccl;
    if (send != recv || !known(type, ncclSum) || !on_device(recv, count, type) || root < 0 || root >= c->size)
        return ncclInvalidArgument;
    if (c->size == 1) return ncclSuccess;
    return result(MPI_Bcast(recv, (int)count, mpi_type(type), root, c->comm));
}

}  // namespace prism
