// What every kernels/cuda/*.cu file shares: checked CUDA calls, stream-ordered
// scratch memory, launch sizes, bf16 conversions, and the launchers of the two
// deterministic reductions (column sums and whole-array sums, reduce.cuh)
// that replace atomics.
#pragma once
#ifndef PRISM_EMULATION  // tests/emulated_runtime.h stands in for it
#include <cuda_runtime.h>
#endif
#include <cstdint>
#include <string>

#include "kernels/cuda/reduce.cuh"
#include "kernels/cuda_ops.h"

namespace prism::cuda_detail {

// Throws std::runtime_error "CUDA error at FILE:LINE: CALL: WHAT".
[[noreturn]] void throw_error(const char* kind, const char* file, int line, const char* call,
                              const std::string& what);
// For destructors, which cannot throw: prints the same line and aborts.
void check_or_abort(cudaError_t e, const char* file, int line, const char* call);

#define PRISM_CUDA_CHECK(call)                                                                  \
    do {                                                                                        \
        const cudaError_t prism_e_ = (call);                                                    \
        if (prism_e_ != cudaSuccess)                                                            \
            ::prism::cuda_detail::throw_error("CUDA", __FILE__, __LINE__, #call,                \
                                              cudaGetErrorString(prism_e_));                    \
    } while (0)
// After every kernel launch: a bad configuration is reported here, at the launch.
#define PRISM_LAUNCH_CHECK() PRISM_CUDA_CHECK(cudaGetLastError())
// Argument checks on the host (sizes the kernels do not support).
#define PRISM_CUDA_REQUIRE(cond, what)                                                          \
    do {                                                                                        \
        if (!(cond)) ::prism::cuda_detail::throw_error("CUDA op", __FILE__, __LINE__, #cond, what); \
    } while (0)

// Device scratch for the length of one op, from the stream-ordered allocator:
// freed on the same stream, so it stays valid for the kernels queued before.
class Scratch {
public:
    Scratch(size_t bytes, cudaStream_t stream) : stream_(stream) {
        if (bytes) PRISM_CUDA_CHECK(cudaMallocAsync(&ptr_, bytes, stream));
    }
    ~Scratch() {
        if (ptr_) check_or_abort(cudaFreeAsync(ptr_, stream_), __FILE__, __LINE__, "cudaFreeAsync");
    }
    Scratch(const Scratch&) = delete;
    Scratch& operator=(const Scratch&) = delete;
    template <class T> T* as() const { return static_cast<T*>(ptr_); }

private:
    void* ptr_ = nullptr;
    cudaStream_t stream_;
};

constexpr int kThreads = primitives::kElementThreads;  // block size of the elementwise kernels

// Blocks for a grid-stride loop over n items (at least 1, at most 65536).
inline unsigned grid_for(int64_t n, int threads = kThreads) { return primitives::grid_stride_blocks(n, threads); }

#define PRISM_GRID_STRIDE(i, n)                                                                 \
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < (n);                   \
         i += (int64_t)gridDim.x * blockDim.x)

// ---- the deterministic reductions (kernels/cuda/reduce.cuh) -----------------------------
// For each batch z < batches and column c < cols: out(z, c, Σ_{r<rows} term(z, r, c)),
// in an order fixed by the sizes; Acc is the accumulator (float, or double
// where the CPU sums in double, as aux_stats does); out receives an Acc.
template <class Acc, class Term, class Out>
void column_sum_as(int batches, int64_t rows, int cols, Term term, Out out, cudaStream_t stream) {
    if (batches <= 0 || cols <= 0) return;
    PRISM_CUDA_REQUIRE(batches <= 65535, "column_sum: too many batches");
    const int chunks = rows > 0 ? reduce::column_chunks(rows) : 0;
    Scratch partial(sizeof(Acc) * (size_t)batches * (chunks > 0 ? chunks : 1) * cols, stream);
    if (chunks > 0) {
        const dim3 grid(reduce::column_tiles(cols), chunks, batches);
        const reduce::ColumnPartialsParams<Acc, Term> p{partial.as<Acc>(), rows, reduce::column_chunk_rows(rows),
                                                        cols, term};
        PRISM_LAUNCH(grid, reduce::kColThreads, reduce::column_partials_smem<Acc>(), stream,
                     reduce::column_partials_kernel<Acc, Term>)(p);
        PRISM_LAUNCH_CHECK();
    }
    const reduce::ColumnFinishParams<Acc, Out> p{partial.as<Acc>(), chunks, cols, batches, out};
    PRISM_LAUNCH(reduce::finish_blocks((int64_t)batches * cols), reduce::kFinishThreads, 0, stream,
                 reduce::column_finish_kernel<Acc, Out>)(p);
    PRISM_LAUNCH_CHECK();
}

template <class Term, class Out>
void column_sum(int batches, int64_t rows, int cols, Term term, Out out, cudaStream_t stream) {
    column_sum_as<float>(batches, rows, cols, term, out, stream);
}

// out(Σ_{i<n} term(i)), in double, runs on one device thread.
template <class Term, class Out>
void device_sum(int64_t n, Term term, Out out, cudaStream_t stream) {
    const int64_t parts = reduce::sum_parts(n);
    PRISM_CUDA_REQUIRE(parts <= 0x7fffffff, "device_sum: array too large");
    Scratch partial(sizeof(double) * (size_t)(parts > 0 ? parts : 1), stream);
    if (parts > 0) {
        const reduce::SumPartialsParams<Term> p{partial.as<double>(), n, term};
        PRISM_LAUNCH((unsigned)parts, reduce::kSumThreads, reduce::sum_smem(), stream,
                     reduce::sum_partials_kernel<Term>)(p);
        PRISM_LAUNCH_CHECK();
    }
    const reduce::SumFinishParams<Out> p{partial.as<double>(), parts, out};
    PRISM_LAUNCH(1, reduce::kSumThreads, reduce::sum_smem(), stream, reduce::sum_finish_kernel<Out>)(p);
    PRISM_LAUNCH_CHECK();
}

using reduce::AddTo;
using reduce::RowMajor;

}  // namespace prism::cuda_detail
