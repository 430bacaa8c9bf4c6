// Device discovery, host-memory helpers and the profiler bracket for the CUDA
// backend (the op kernels are the other files here, declared in
// kernels/cuda_ops.h; the input step is input.cu).
#include <cuda_profiler_api.h>
#include <cuda_runtime.h>
#include <cstdio>
#include <string>
#include "engine/common.h"
#include "engine/device.h"

namespace prism::cuda {

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
    if (cudaProfilerStop() != cudaSuccess) cudaGetLastError();
}

}  // namespace prism::cuda
