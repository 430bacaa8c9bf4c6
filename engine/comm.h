// The ranks of a run: `mpirun -np N build/prism train ...` starts N processes
// that talk through MPI; plain `build/prism train` is a world of one and makes
// no MPI calls at all (nor does a build without MPI, see the Makefile).
//
// Every operation below is collective: all ranks call it, in the same order.
// Reductions run in a fixed order (rank 0's value, then rank 1's added, ...)
// and every rank receives the same bytes, so weights stay bit-identical
// across ranks. Every wait has a deadline (timeout_s, from
// train.comm_timeout_s): a rank that stalls or dies makes the others print one
// line naming it and abort the whole job with a non-zero exit, instead of
// hanging.
#pragma once
#include <cstdint>
#include <string>

namespace prism {

struct NcclComm;  // engine/nccl.cpp: the GPU ranks' NCCL communicator

struct Comm {
    int rank = 0;
    int size = 1;
    int local_rank = 0;      // among the ranks on this node: picks the GPU
    int local_size = 1;
    bool mpi = false;        // MPI is initialized (the run was started by an MPI launcher)
    double timeout_s = 300;  // seconds any wait may take; set from train.comm_timeout_s
    // --device cuda under an MPI launcher: the NCCL communicator that sums
    // device memory (engine/nccl.h, comm_init_nccl); null otherwise.
    NcclComm* nccl = nullptr;
};

// A world of one unless an MPI launcher started this process (it sets
// OMPI_COMM_WORLD_SIZE, PMI_SIZE or PMIX_RANK); then MPI is initialized with
// errors returned, not fatal. Throws UserError when a launcher started several
// ranks but this build has no MPI.
Comm comm_init();
// Ends NCCL (if comm_init_nccl started it) and MPI (if comm_init started it).
// Call once, on every rank, at exit.
void comm_finalize(Comm& c);

// In place: every rank ends with the sum over ranks, added in rank order.
void comm_allreduce_sum(const Comm& c, float* data, int64_t n);
void comm_allreduce_sum(const Comm& c, double* data, int64_t n);
// Rank 0's bytes to every rank.
void comm_broadcast(const Comm& c, void* data, int64_t bytes);
void comm_barrier(const Comm& c);
// The largest x over ranks (NaN if any rank's x is NaN).
double comm_max(const Comm& c, double x);

// ZeRO-1 (train.zero): n values split into one contiguous shard per rank,
// shard r = [n·r/size, n·(r+1)/size), so that each rank keeps the optimizer
// state of its shard alone.
struct Shard {
    int64_t begin = 0, end = 0;
    int64_t size() const { return end - begin; }
};
Shard comm_shard(const Comm& c, int64_t n, int rank);
// In place: this rank's shard of data becomes the sum over ranks, added in
// rank order (the bits comm_allreduce_sum gives there); the rest of data is
// left as it was. Point to point between every pair of ranks: each receives
// the other ranks' copies of its shard alone, (size−1)·n/size values, where
// the star all-reduce routes all n through rank 0 and back.
void comm_reduce_scatter_sum(const Comm& c, float* data, int64_t n);
// In place: every rank's shard of data to every other rank.
void comm_allgather(const Comm& c, float* data, int64_t n);

// Prints "prism: rank R: <line>" to stderr and ends every rank of the job
// with exit code 1 (MPI_Abort), or this process alone in a world of one.
[[noreturn]] void comm_abort(const Comm& c, const std::string& line);

}  // namespace prism
