// Device discovery for the CUDA backend (the op kernels are the other files
// here, declared in kernels/cuda_ops.h).
#include <cuda_profiler_api.h>
#include <cuda_runtime.h>
#include <cstdio>
#include <string>

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
