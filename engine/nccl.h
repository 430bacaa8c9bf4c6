// The GPU side of data parallelism: one NCCL communicator beside the MPI world
// of engine/comm.h, one rank per GPU. MPI still starts the ranks, carries
// NCCL's unique id, and does the small host reductions (the loss, the stop
// signal, evaluation counts, barriers); NCCL sums device memory: the
// gradients, and the load-balance statistics of moevit.
//
// Built with NCCL (PRISM_NCCL, see the Makefile) the calls below are real;
// without it comm_init_nccl refuses more than one rank and the rest is never
// reached. A plain header: no CUDA or NCCL headers.
//
// Errors and hangs. The communicator is non-blocking (ncclCommInitRankConfig
// with blocking = 0), so that creating it and enqueuing collectives can be
// waited for with a deadline (train.comm_timeout_s). The host waits for the
// GPU in two kinds of place:
// - GradAllReduce::wait, after each step's gradients: it polls the stream and
//   ncclCommGetAsyncError, and on an NCCL error or at the deadline ends the
//   job through comm_abort (MPI_Abort) with one line naming the problem;
// - any other synchronization of the model's stream (the losses at the end of
//   forward, which follow the load-balance all-reduces): these are plain CUDA
//   calls that would block forever behind an NCCL kernel whose peer died. A
//   watchdog thread covers them: while NCCL work is outstanding and the host
//   has not moved on for train.comm_timeout_s (plus a grace period that lets
//   the main thread's own deadline fire first), it prints one line and ends
//   the process with exit code 1; mpirun then ends the other ranks.
// Not covered: NCCL cannot say which rank died (the line names the rank that
// noticed); a GPU that hangs outside NCCL is only caught by the watchdog
// while a collective is outstanding.
#pragma once
#include <cstdint>
#include <string>
#include "engine/comm.h"

typedef struct CUstream_st* cudaStream_t;  // as <driver_types.h> declares it

namespace prism {

// True when this build has NCCL.
bool nccl_built();

// On every rank, after comm_init, when the device is CUDA and an MPI launcher
// started the run (c.mpi), even for a world of one: selects this rank's GPU
// (local_rank % the visible devices, so CUDA_VISIBLE_DEVICES is respected),
// refuses with one line when two ranks of the job would share a GPU, then
// creates the communicator (rank 0's ncclUniqueId broadcast over MPI) and
// sets c.nccl. Every wait has the deadline c.timeout_s.
// Without NCCL in the build: a world of one goes on without it (one process,
// one GPU); more ranks throw UserError.
void comm_init_nccl(Comm& c);
// Destroys the communicator (comm_finalize calls it). No-op without one.
void comm_free_nccl(Comm& c);
// "NCCL 2.28.9, rank 0 of 2 on GPU 0 (NVIDIA H100 80GB HBM3)"; "" without a communicator.
std::string nccl_description(const Comm& c);

// In place on device memory, queued on `stream`: the sum over the ranks.
// Every rank receives the same bytes (NCCL's order of the sum, not rank
// order: a GPU run is not bit-identical to the CPU's MPI path).
void nccl_allreduce_sum(const Comm& c, float* data, int64_t n, cudaStream_t stream);
void nccl_allreduce_sum(const Comm& c, double* data, int64_t n, cudaStream_t stream);

// ZeRO-1 (train.zero), with comm_shard's shards of n values. In place on
// device memory, queued on `stream`:
// - reduce to owners: for data[offset, offset + count), each rank's shard
//   part of it becomes the sum over the ranks (one ncclReduce per owner, in
//   one group); the rest is left as it was;
// - all-gather: every rank's shard of data to every rank (one ncclBroadcast
//   per rank, in one group).
void nccl_reduce_to_owners(const Comm& c, float* data, int64_t offset, int64_t count, int64_t n,
                           cudaStream_t stream);
void nccl_allgather(const Comm& c, float* data, int64_t n, cudaStream_t stream);
// Host: waits for `stream` to finish what is queued on it, with the deadline
// train.comm_timeout_s and NCCL's asynchronous errors checked (as
// GradAllReduce::wait); `what` names the wait in the line that ends the job.
void nccl_wait(const Comm& c, cudaStream_t stream, const std::string& what);

// What GradAllReduce::wait measured on the GPU for one step.
struct GradReduceTimes {
    double backward_s = 0;  // the backward pass on the model's stream
    double exposed_s = 0;   // after backward, the model's stream waiting for the all-reduces
};

// The gradient all-reduce of one training step, on a communication stream of
// its own. With overlap, each range is reduced as soon as backward has written
// it (Model::set_on_grads_ready calls ready()), while backward goes on with
// the blocks before it; without, end() reduces all gradients at once.
// With ZeRO-1 (to_owners) each range is reduced only to the ranks whose
// shards it covers (nccl_reduce_to_owners), not all-reduced.
// A step: begin(); model.backward(); end(); scale the gradients by 1/ranks on
// the model's stream; wait().
class GradAllReduce {
public:
    // grads: the model's gradients (device memory, n floats); model_stream:
    // the stream the model computes on.
    GradAllReduce(const Comm& c, float* grads, int64_t n, cudaStream_t model_stream, bool overlap,
                  bool to_owners = false);
    ~GradAllReduce();
    GradAllReduce(const GradAllReduce&) = delete;
    GradAllReduce& operator=(const GradAllReduce&) = delete;

    bool overlap() const { return overlap_; }
    void begin();
    // grads[offset, offset + count) is final on the model's stream: the
    // communication stream waits for it there, then sums it over the ranks.
    void ready(int64_t offset, int64_t count);
    // After backward: the model's stream waits for every all-reduce. Checks
    // that the step reduced each gradient exactly once.
    void end();
    // Host: waits for the model's stream to pass end(), with the deadline
    // train.comm_timeout_s; returns the step's GPU times.
    GradReduceTimes wait();
    int64_t calls_per_step() const { return last_calls_; }

private:
    struct Impl;
    Impl* impl_ = nullptr;
    const Comm& comm_;
    bool overlap_, to_owners_;
    int64_t n_, reduced_ = 0, calls_ = 0, last_calls_ = 0;
};

}  // namespace prism
