// The two deterministic reductions that stand in for floating-point atomics
// (DESIGN.md: same seed, same bits): sums over the rows of a matrix, per
// column, and sums of a whole array. Each sum is cut into chunks that depend
// on the sizes alone, each chunk summed by one block in a fixed order, the
// chunks then added in order; so the bits depend on the sizes, never on the
// timing. kernels/cuda/common.cuh launches them (column_sum, device_sum);
// what is summed and where the result goes are functors (a Term and an Out).
//
// Written against primitives.cuh only, so that tests/test_reduce_emulated.cpp
// runs them on the CPU through tests/emulator.h.
#pragma once
#include "kernels/cuda/primitives.cuh"

namespace prism::reduce {
#ifdef PRISM_EMULATION
inline namespace emulated {
#endif

using primitives::block_sync;
using primitives::grid_first;
using primitives::grid_step;
using primitives::ld_shared;
using primitives::st_shared;

// ---- column sums -------------------------------------------------------------------------
// For each batch z < batches and column c < cols: out(z, c, Σ_r term(z, r, c))
// over the rows r < rows. Stage one: block (x, y, z) sums chunk y of the rows
// for 32 columns, 8 threads per column each taking every 8th row, then one
// thread adds the 8 partial sums in order. Stage two: one thread per (z, c)
// adds the chunks in order. Acc is the accumulator (float; double where the
// CPU sums in double, as the load-balance statistics do).
constexpr int kColTile = 32, kColRows = 8, kColThreads = kColTile * kColRows;
constexpr int kFinishThreads = 256;

// At most 1024 chunks of at least 256 rows.
PRISM_HOST_DEVICE int64_t column_chunk_rows(int64_t rows) {
    const int64_t chunk = 256;
    return (rows + chunk - 1) / chunk > 1024 ? (rows + 1023) / 1024 : chunk;
}
PRISM_HOST_DEVICE int column_chunks(int64_t rows) {
    const int64_t chunk = column_chunk_rows(rows);
    return (int)((rows + chunk - 1) / chunk);
}
PRISM_HOST_DEVICE unsigned column_tiles(int cols) { return (unsigned)((cols + kColTile - 1) / kColTile); }
template <class Acc> PRISM_HOST_DEVICE size_t column_partials_smem() { return sizeof(Acc) * kColThreads; }

template <class Acc, class Term>
struct ColumnPartialsParams {
    Acc* partial;  // [batches, chunks, cols]
    int64_t rows, chunk_rows;
    int cols;
    Term term;
};

// Grid (column_tiles(cols), column_chunks(rows), batches) of kColThreads,
// column_partials_smem<Acc>() bytes.
template <class Acc, class Term>
PRISM_KERNEL(kColThreads) column_partials_kernel(ColumnPartialsParams<Acc, Term> p) {
    PRISM_SMEM(smem);
    Acc* red = reinterpret_cast<Acc*>(smem);  // [kColRows][kColTile]
    const int tx = threadIdx.x % kColTile, ty = threadIdx.x / kColTile;
    const int c = blockIdx.x * kColTile + tx;
    const int64_t r0 = (int64_t)blockIdx.y * p.chunk_rows;
    const int64_t r1 = r0 + p.chunk_rows < p.rows ? r0 + p.chunk_rows : p.rows;
    Acc acc = 0;
    if (c < p.cols)
        for (int64_t r = r0 + ty; r < r1; r += kColRows) acc += (Acc)p.term(blockIdx.z, r, c);
    st_shared(&red[ty * kColTile + tx], acc);
    block_sync();
    if (ty == 0 && c < p.cols) {
        Acc s = 0;
        for (int y = 0; y < kColRows; y++) s += ld_shared(&red[y * kColTile + tx]);
        p.partial[((int64_t)blockIdx.z * gridDim.y + blockIdx.y) * p.cols + c] = s;
    }
}

template <class Acc, class Out>
struct ColumnFinishParams {
    const Acc* partial;
    int chunks, cols, batches;
    Out out;
};

// finish_blocks(batches·cols) blocks of kFinishThreads. With no rows
// (chunks == 0) every column gets out(z, c, 0).
PRISM_HOST_DEVICE unsigned finish_blocks(int64_t n) { return primitives::grid_stride_blocks(n, kFinishThreads); }

template <class Acc, class Out>
PRISM_KERNEL(kFinishThreads) column_finish_kernel(ColumnFinishParams<Acc, Out> p) {
    for (int64_t i = grid_first(); i < (int64_t)p.batches * p.cols; i += grid_step()) {
        const int z = (int)(i / p.cols), c = (int)(i % p.cols);
        Acc s = 0;
        for (int k = 0; k < p.chunks; k++) s += p.partial[((int64_t)z * p.chunks + k) * p.cols + c];
        p.out(z, c, s);
    }
}

// ---- whole-array sums, in double ---------------------------------------------------------
// Stage one: block b sums items [b·kSumChunk, (b+1)·kSumChunk), each thread
// every kSumThreads-th item, then a shared-memory tree. Stage two: one block
// sums the blocks' results the same way and one thread calls out(sum).
constexpr int kSumThreads = 256;
constexpr int64_t kSumChunk = 8192;
PRISM_HOST_DEVICE int64_t sum_parts(int64_t n) { return (n + kSumChunk - 1) / kSumChunk; }
PRISM_HOST_DEVICE size_t sum_smem() { return sizeof(double) * kSumThreads; }

// Every thread passes its v and gets the block's total.
PRISM_DEVICE double block_sum(double v, double* red /* kSumThreads */) {
    const int t = threadIdx.x;
    st_shared(&red[t], v);
    block_sync();
    for (int o = kSumThreads / 2; o > 0; o >>= 1) {
        if (t < o) st_shared(&red[t], ld_shared(&red[t]) + ld_shared(&red[t + o]));
        block_sync();
    }
    return ld_shared(&red[0]);
}

template <class Term>
struct SumPartialsParams {
    double* partial;  // [sum_parts(n)]
    int64_t n;
    Term term;
};

// sum_parts(n) blocks of kSumThreads, sum_smem() bytes.
template <class Term>
PRISM_KERNEL(kSumThreads) sum_partials_kernel(SumPartialsParams<Term> p) {
    PRISM_SMEM(smem);
    const int64_t i0 = (int64_t)blockIdx.x * kSumChunk;
    const int64_t i1 = i0 + kSumChunk < p.n ? i0 + kSumChunk : p.n;
    double acc = 0;
    for (int64_t i = i0 + threadIdx.x; i < i1; i += kSumThreads) acc += p.term(i);
    const double s = block_sum(acc, reinterpret_cast<double*>(smem));
    if (threadIdx.x == 0) p.partial[blockIdx.x] = s;
}

template <class Out>
struct SumFinishParams {
    const double* partial;
    int64_t parts;
    Out out;
};

// One block of kSumThreads, sum_smem() bytes.
template <class Out>
PRISM_KERNEL(kSumThreads) sum_finish_kernel(SumFinishParams<Out> p) {
    PRISM_SMEM(smem);
    double acc = 0;
    for (int64_t i = threadIdx.x; i < p.parts; i += kSumThreads) acc += p.partial[i];
    const double s = block_sum(acc, reinterpret_cast<double*>(smem));
    if (threadIdx.x == 0) p.out(s);
}

// ---- the common terms and outputs --------------------------------------------------------
struct AddTo {  // out[z*cols + c] += v   (or out[row[z]*cols + c] when row != nullptr)
    float* dst;
    int cols;
    const int* row;
    PRISM_DEVICE void operator()(int z, int c, float v) const {
        dst[(int64_t)(row ? row[z] : z) * cols + c] += v;
    }
};
struct RowMajor {  // term = x[(z*rows + r)*cols + c]
    const float* x;
    int64_t rows;
    int cols;
    PRISM_DEVICE float operator()(int z, int64_t r, int c) const { return x[((int64_t)z * rows + r) * cols + c]; }
};

#ifdef PRISM_EMULATION
}  // inline namespace emulated
#endif
}  // namespace prism::reduce
