// Checked CUDA runtime calls for host tools (kernels/cuda_util.h).
#include <cstdint>
#include <cstdio>
#include <utility>

#include "kernels/cuda/common.cuh"
#include "kernels/cuda_util.h"

namespace prism::cuda {
using namespace cuda_detail;

namespace {
// Destructors cannot throw, and after a failed kernel every later call fails
// too (the error is sticky): say so and go on, so the first error, already
// thrown, stays the one the user sees.
void report_in_destructor(cudaError_t e, const char* call) {
    if (e != cudaSuccess) std::fprintf(stderr, "prism: %s: %s\n", call, cudaGetErrorString(e));
}
}  // namespace

DeviceMemory::DeviceMemory(size_t bytes) : bytes_(bytes) {
    if (bytes) PRISM_CUDA_CHECK(cudaMalloc(&p_, bytes));
}
DeviceMemory::~DeviceMemory() {
    if (p_) report_in_destructor(cudaFree(p_), "cudaFree");
}
DeviceMemory::DeviceMemory(DeviceMemory&& o) noexcept
    : p_(std::exchange(o.p_, nullptr)), bytes_(std::exchange(o.bytes_, 0)) {}
DeviceMemory& DeviceMemory::operator=(DeviceMemory&& o) noexcept {
    std::swap(p_, o.p_);
    std::swap(bytes_, o.bytes_);
    return *this;
}

Stream::Stream() { PRISM_CUDA_CHECK(cudaStreamCreateWithFlags(&s_, cudaStreamNonBlocking)); }
Stream::~Stream() {
    if (s_) report_in_destructor(cudaStreamDestroy(s_), "cudaStreamDestroy");
}
void Stream::synchronize() const { PRISM_CUDA_CHECK(cudaStreamSynchronize(s_)); }

Event::Event() { PRISM_CUDA_CHECK(cudaEventCreate(&e_)); }
Event::~Event() {
    if (e_) report_in_destructor(cudaEventDestroy(e_), "cudaEventDestroy");
}
void Event::record(cudaStream_t stream) { PRISM_CUDA_CHECK(cudaEventRecord(e_, stream)); }
float Event::ms_since(const Event& start) const {
    float ms = 0;
    PRISM_CUDA_CHECK(cudaEventElapsedTime(&ms, start.e_, e_));
    return ms;
}

void set_device(int index) { PRISM_CUDA_CHECK(cudaSetDevice(index)); }

size_t device_total_memory() {
    size_t free_bytes = 0, total = 0;
    PRISM_CUDA_CHECK(cudaMemGetInfo(&free_bytes, &total));
    return total;
}

void memset_async(void* p, int value, size_t bytes, cudaStream_t stream) {
    if (bytes) PRISM_CUDA_CHECK(cudaMemsetAsync(p, value, bytes, stream));
}

void copy_to_device(void* dst, const void* src, size_t bytes, cudaStream_t stream) {
    if (!bytes) return;
    PRISM_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, stream));
    PRISM_CUDA_CHECK(cudaStreamSynchronize(stream));
}

void copy_to_host(void* dst, const void* src, size_t bytes, cudaStream_t stream) {
    if (!bytes) return;
    PRISM_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, stream));
    PRISM_CUDA_CHECK(cudaStreamSynchronize(stream));
}

namespace {
// SplitMix64's finalizer: a counter-based generator, so every element is
// independent of the launch shape.
PRISM_DEVICE uint64_t mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

PRISM_KERNEL(kThreads) fill_uniform_kernel(float* p, int64_t n, float lo, float span, uint64_t seed) {
    const uint64_t key = mix64(seed + 0x9e3779b97f4a7c15ull);
    PRISM_GRID_STRIDE(i, n) {
        const uint64_t r = mix64(key ^ ((uint64_t)i * 0x9e3779b97f4a7c15ull));
        // top 24 bits: exactly representable, in [0, 1)
        const float u = (float)(r >> 40) * (1.f / 16777216.f);
        p[i] = lo + span * u;
    }
}
}  // namespace

void fill_uniform(float* p, int64_t n, float lo, float hi, uint64_t seed, cudaStream_t stream) {
    if (n <= 0) return;
    PRISM_LAUNCH(grid_for(n), kThreads, 0, stream, fill_uniform_kernel)(p, n, lo, hi - lo, seed);
    PRISM_LAUNCH_CHECK();
}

void keep_pool_memory() {
    int device = 0;
    PRISM_CUDA_CHECK(cudaGetDevice(&device));
    cudaMemPool_t pool;
    PRISM_CUDA_CHECK(cudaDeviceGetDefaultMemPool(&pool, device));
    uint64_t threshold = UINT64_MAX;
    PRISM_CUDA_CHECK(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &threshold));
}

void release_pool_memory() noexcept {
    // The pool only gives back what no queued work still uses: wait first.
    // Errors are dropped on purpose: this runs in destructors, also while a
    // failed run unwinds, whose own error has been reported where it arose;
    // what is lost is only memory returned early.
    int device = 0;
    cudaMemPool_t pool;
    if (cudaDeviceSynchronize() != cudaSuccess || cudaGetDevice(&device) != cudaSuccess ||
        cudaDeviceGetDefaultMemPool(&pool, device) != cudaSuccess || cudaMemPoolTrimTo(pool, 0) != cudaSuccess)
        cudaGetLastError();
}

}  // namespace prism::cuda
