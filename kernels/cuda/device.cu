// Device discovery, host-memory helpers and the profiler bracket for the CUDA
// backend (the op kernels are the other files here, declared in
// kernels/cuda_ops.h; the input step is input.cu).
#ifndef PRISM_EMULATION  // tests/emulated_runtime.h stands in for them
#include <cuda_profiler_api.h>
#include <cuda_runtime.h>
#include <nvtx3/nvToolsExt.h>
#endif
#include <cstdio>
#include <string>
#include "engine/arena.h"
#include "engine/common.h"
#include "engine/device.h"
#include "kernels/cuda_ops.h"

namespace prism::cuda {

namespace {
void check(cudaError_t e, const char* what) {
    if (e != cudaSuccess) throw UserError(std::string("CUDA: ") + what + ": " + cudaGetErrorString(e));
}
}  // namespace

void* device_alloc(size_t bytes, const std::string& what) {
    void* p = nullptr;
    const cudaError_t e = cudaMalloc(&p, bytes);
    if (e == cudaSuccess) return p;
    cudaGetLastError();
    size_t free_bytes = 0, total_bytes = 0;
    cudaMemGetInfo(&free_bytes, &total_bytes);
    cudaGetLastError();
    throw UserError(what + ": cannot allocate " + format_bytes(bytes) + " on the GPU (" +
                    format_bytes(free_bytes) + " of " + format_bytes(total_bytes) +
                    " free): lower the batch (train.batch, or eval's --batch) or the model size");
}

// Called from destructors: a failure is reported, not thrown.
void device_free(void* p) {
    if (!p) return;
    const cudaError_t e = cudaFree(p);
    if (e != cudaSuccess) std::fprintf(stderr, "prism: cudaFree failed: %s\n", cudaGetErrorString(e));
}

cudaStream_t stream_create() {
    cudaStream_t s = nullptr;
    check(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), "cudaStreamCreate");
    return s;
}

void stream_destroy(cudaStream_t s) {
    if (!s) return;
    const cudaError_t e = cudaStreamDestroy(s);
    if (e != cudaSuccess) std::fprintf(stderr, "prism: cudaStreamDestroy failed: %s\n", cudaGetErrorString(e));
}

// Kernel faults surface at the next synchronization: this is where a step's
// errors are reported.
void stream_sync(cudaStream_t s) { check(cudaStreamSynchronize(s), "a queued kernel or copy failed"); }

void copy_async(void* dst, const void* src, size_t bytes, cudaStream_t s) {
    if (bytes) check(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, s), "cudaMemcpyAsync");
}

void zero_async(void* p, size_t bytes, cudaStream_t s) { fill_bytes_async(p, 0, bytes, s); }

void fill_bytes_async(void* p, uint8_t byte, size_t bytes, cudaStream_t s) {
    if (bytes) check(cudaMemsetAsync(p, byte, bytes, s), "cudaMemsetAsync");
}

void range_push(const char* name) { nvtxRangePushA(name); }
void range_pop() { nvtxRangePop(); }

// Number of usable CUDA devices; 0 when there is no driver or no device
// (which is not an error: the CPU backend runs then).
int device_count() {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
        cudaGetLastError();  // clear the sticky "no driver" error
        return 0;
    }
    return n;
}

// Page-locked host memory, so copies from it to the device are asynchronous.
void* host_alloc_pinned(size_t bytes) {
    void* p = nullptr;
    if (cudaHostAlloc(&p, bytes, cudaHostAllocDefault) != cudaSuccess) {
        cudaGetLastError();
        return nullptr;
    }
    return p;
}

void host_free_pinned(void* p) { cudaFreeHost(p); }

void copy_to_device_async(void* dst, const void* src, size_t bytes, void* stream) {
    const cudaError_t e = cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, (cudaStream_t)stream);
    if (e != cudaSuccess) throw UserError(std::string("CUDA copy to the device failed: ") + cudaGetErrorString(e));
}

std::string device_name(int index) {
    cudaDeviceProp prop{};
    if (cudaGetDeviceProperties(&prop, index) != cudaSuccess) return "unknown CUDA device";
    return prop.name;
}

// The bracket of `prism train --profile-steps A:B`. Errors (no device, or
// no profiler attached) are cleared: profiling is best effort.
void profiler_start() {
    if (cudaProfilerStart() != cudaSuccess) cudaGetLastError();
}
void profiler_stop() {
    // The last profiled step's kernels may still be queued: let them finish
    // inside the range, or the profile cuts them off. A failure here is the
    // run's own (a sticky error the next checked call reports), and this
    // also runs while a failed run unwinds: not thrown from here.
    if (cudaDeviceSynchronize() != cudaSuccess) cudaGetLastError();
    if (cudaProfilerStop() != cudaSuccess) cudaGetLastError();
}

}  // namespace prism::cuda
