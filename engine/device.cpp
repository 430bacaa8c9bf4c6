#include "engine/device.h"
#include <string>

#ifdef PRISM_CUDA
namespace prism::cuda {
int device_count();
std::string device_name(int index);
void profiler_start();
void profiler_stop();
}
#endif

namespace prism {

// The CUDA op kernels exist (kernels/cuda_ops.h) but the model does not call
// them yet (the CUDA backend issue); device discovery works, so `--device
// cuda` can say precisely what is missing.
constexpr bool kCudaKernelsBuilt = false;

Device resolve_device(const std::string& flag) {
    if (flag != "cpu" && flag != "cuda" && flag != "auto")
        throw UserError("--device " + flag + ": expected cpu, cuda or auto");
    if (flag == "cpu") return Device::cpu;
#ifdef PRISM_CUDA
    const int gpus = cuda::device_count();
#else
    const int gpus = 0;
#endif
    if (flag == "auto") return (kCudaKernelsBuilt && gpus > 0) ? Device::cuda : Device::cpu;
#ifndef PRISM_CUDA
    throw UserError("--device cuda: this build has no CUDA backend (nvcc was not found at build time)");
#else
    if (gpus == 0) throw UserError("--device cuda: no CUDA device is visible");
    if (!kCudaKernelsBuilt)
        throw UserError("--device cuda: found " + cuda::device_name(0) +
                        ", but the model does not run on the CUDA kernels yet; use --device cpu");
    return Device::cuda;
#endif
}

const char* device_label(Device d) { return d == Device::cuda ? "cuda" : "cpu"; }

#ifdef PRISM_CUDA
void profiler_start() { cuda::profiler_start(); }
void profiler_stop() { cuda::profiler_stop(); }
#else
void profiler_start() {}
void profiler_stop() {}
#endif

}  // namespace prism
