// What every kernels/cuda/*.cu file shares: checked CUDA calls, stream-ordered
// scratch memory, launch sizes, warp reductions, and the two deterministic
// reductions (column sums and whole-array sums) that replace atomics.
#pragma once
#include <cuda_runtime.h>
#include <cstdint>
#include <string>

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

constexpr int kThreads = 256;  // block size of the elementwise kernels

// Blocks for a grid-stride loop over n items (at least 1, at most 65536).
inline unsigned grid_for(int64_t n, int threads = kThreads) {
    const int64_t b = (n + threads - 1) / threads;
    return (unsigned)(b < 1 ? 1 : (b > 65536 ? 65536 : b));
}

#define PRISM_GRID_STRIDE(i, n)                                                                 \
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < (n);                   \
         i += (int64_t)gridDim.x * blockDim.x)

// Butterfly reductions: every lane ends with the same bits (each step adds
// a pair in both orders, and float addition is commutative).
__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// bf16 as its 16 bits (the upper half of a float): exact widening, and
// rounding to nearest even (NaN stays NaN).
__device__ __forceinline__ float bf16_to_float(uint16_t b) { return __uint_as_float((uint32_t)b << 16); }
__device__ __forceinline__ uint16_t float_to_bf16(float f) {
    uint32_t u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}
// An element of an fp32 or a bf16 array as float, and stored from one: for
// kernels that take either (the bf16 mode's stored matrices).
__device__ __forceinline__ float load_as(const float* p) { return *p; }
__device__ __forceinline__ float load_as(const uint16_t* p) { return bf16_to_float(*p); }
__device__ __forceinline__ void store_as(float* p, float v) { *p = v; }
__device__ __forceinline__ void store_as(uint16_t* p, float v) { *p = float_to_bf16(v); }

// ---- deterministic column sums -------------------------------------------------
// For each batch z < batches and column c < cols: out(z, c, Σ_r term(z, r, c)),
// the sum over rows r < rows in a fixed order: stage one sums fixed chunks of
// rows (a 32-column × 8-row block, its 8 partial sums added in order), stage
// two adds the chunks in order. The chunking depends on `rows` alone.
// Acc is the accumulator (float; double where the CPU sums in double, as
// aux_stats does); out receives an Acc.
constexpr int kColTile = 32, kColRows = 8;

template <class Acc, class Term>
__global__ void column_partials_kernel(Acc* partial, int64_t rows, int cols,
                                       int64_t chunk_rows, Term term) {
    __shared__ Acc red[kColRows][kColTile];
    const int c = blockIdx.x * kColTile + threadIdx.x;
    const int64_t r0 = (int64_t)blockIdx.y * chunk_rows;
    const int64_t r1 = r0 + chunk_rows < rows ? r0 + chunk_rows : rows;
    Acc acc = 0;
    if (c < cols)
        for (int64_t r = r0 + threadIdx.y; r < r1; r += kColRows) acc += (Acc)term(blockIdx.z, r, c);
    red[threadIdx.y][threadIdx.x] = acc;
    __syncthreads();
    if (threadIdx.y == 0 && c < cols) {
        Acc s = 0;
        for (int y = 0; y < kColRows; y++) s += red[y][threadIdx.x];
        partial[((int64_t)blockIdx.z * gridDim.y + blockIdx.y) * cols + c] = s;
    }
}

template <class Acc, class Out>
__global__ void column_finish_kernel(const Acc* partial, int chunks, int cols, int batches,
                                     Out out) {
    PRISM_GRID_STRIDE(i, (int64_t)batches * cols) {
        const int z = (int)(i / cols), c = (int)(i % cols);
        Acc s = 0;
        for (int k = 0; k < chunks; k++) s += partial[((int64_t)z * chunks + k) * cols + c];
        out(z, c, s);
    }
}

template <class Acc, class Term, class Out>
void column_sum_as(int batches, int64_t rows, int cols, Term term, Out out, cudaStream_t stream) {
    if (batches <= 0 || cols <= 0) return;
    int64_t chunk_rows = 256;
    if ((rows + chunk_rows - 1) / chunk_rows > 1024) chunk_rows = (rows + 1023) / 1024;
    const int chunks = (int)((rows + chunk_rows - 1) / chunk_rows);
    PRISM_CUDA_REQUIRE(batches <= 65535, "column_sum: too many batches");
    Scratch partial(sizeof(Acc) * (size_t)batches * (chunks > 0 ? chunks : 1) * cols, stream);
    if (chunks > 0) {
        const dim3 grid((cols + kColTile - 1) / kColTile, chunks, batches);
        column_partials_kernel<Acc><<<grid, dim3(kColTile, kColRows), 0, stream>>>(
            partial.as<Acc>(), rows, cols, chunk_rows, term);
        PRISM_LAUNCH_CHECK();
    }
    column_finish_kernel<Acc><<<grid_for((int64_t)batches * cols), kThreads, 0, stream>>>(
        partial.as<Acc>(), chunks, cols, batches, out);
    PRISM_LAUNCH_CHECK();
}

template <class Term, class Out>
void column_sum(int batches, int64_t rows, int cols, Term term, Out out, cudaStream_t stream) {
    column_sum_as<float>(batches, rows, cols, term, out, stream);
}

// ---- deterministic whole-array sums, in double ------------------------------------
// Block b sums items [b·kSumChunk, (b+1)·kSumChunk) (threads strided, then a
// shared-memory tree); one block then sums the block results the same way.
constexpr int64_t kSumChunk = 8192;

__device__ __forceinline__ double block_sum(double v, double* red /* kThreads */) {
    red[threadIdx.x] = v;
    __syncthreads();
    for (int o = kThreads / 2; o > 0; o >>= 1) {
        if ((int)threadIdx.x < o) red[threadIdx.x] += red[threadIdx.x + o];
        __syncthreads();
    }
    return red[0];
}

template <class Term>
__global__ void sum_partials_kernel(double* partial, int64_t n, Term term) {
    __shared__ double red[kThreads];
    const int64_t i0 = (int64_t)blockIdx.x * kSumChunk;
    const int64_t i1 = i0 + kSumChunk < n ? i0 + kSumChunk : n;
    double acc = 0;
    for (int64_t i = i0 + threadIdx.x; i < i1; i += kThreads) acc += term(i);
    const double s = block_sum(acc, red);
    if (threadIdx.x == 0) partial[blockIdx.x] = s;
}

template <class Out>
__global__ void sum_finish_kernel(const double* partial, int64_t parts, Out out) {
    __shared__ double red[kThreads];
    double acc = 0;
    for (int64_t i = threadIdx.x; i < parts; i += kThreads) acc += partial[i];
    const double s = block_sum(acc, red);
    if (threadIdx.x == 0) out(s);
}

// out(Σ_{i<n} term(i)) runs on one device thread.
template <class Term, class Out>
void device_sum(int64_t n, Term term, Out out, cudaStream_t stream) {
    const int64_t parts = (n + kSumChunk - 1) / kSumChunk;
    PRISM_CUDA_REQUIRE(parts <= 0x7fffffff, "device_sum: array too large");
    Scratch partial(sizeof(double) * (size_t)(parts > 0 ? parts : 1), stream);
    if (parts > 0) {
        sum_partials_kernel<<<(unsigned)parts, kThreads, 0, stream>>>(partial.as<double>(), n, term);
        PRISM_LAUNCH_CHECK();
    }
    sum_finish_kernel<<<1, kThreads, 0, stream>>>(partial.as<double>(), parts, out);
    PRISM_LAUNCH_CHECK();
}

// Functors for the common cases.
struct AddTo {  // out[z*cols + c] += v   (or out[row[z]*cols + c] when row != nullptr)
    float* dst;
    int cols;
    const int* row;
    __device__ void operator()(int z, int c, float v) const {
        dst[(int64_t)(row ? row[z] : z) * cols + c] += v;
    }
};
struct RowMajor {  // term = x[(z*rows + r)*cols + c]
    const float* x;
    int64_t rows;
    int cols;
    __device__ float operator()(int z, int64_t r, int c) const {
        return x[((int64_t)z * rows + r) * cols + c];
    }
};

}  // namespace prism::cuda_detail
