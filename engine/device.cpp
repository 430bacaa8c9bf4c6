#include "engine/device.h"
#include <cstdlib>
#include <string>
#include <utility>
#include <sys/mman.h>

#ifdef PRISM_CUDA
#include "kernels/cuda_ops.h"  // device_count, device_name, has_cublas
// The rest of kernels/cuda/device.cu, used only here.
namespace prism::cuda {
void profiler_start();
void profiler_stop();
void* host_alloc_pinned(size_t bytes);  // nullptr when there is no device or it fails
void host_free_pinned(void* p);
}
#endif

namespace prism {

Device resolve_device(const std::string& flag) {
    if (flag != "cpu" && flag != "cuda" && flag != "auto")
        throw UserError("--device " + flag + ": expected cpu, cuda or auto");
    if (flag == "cpu") return Device::cpu;
#ifdef PRISM_CUDA
    const int gpus = cuda::device_count();
#else
    const int gpus = 0;
#endif
#ifndef PRISM_CUDA
    if (flag == "auto") return Device::cpu;
    throw UserError("--device cuda: this build has no CUDA backend (nvcc was not found at build time)");
#else
    // The linear layers need cuBLAS: a build without it cannot train on the GPU.
    if (flag == "auto") return (gpus > 0 && cuda_ops::has_cublas()) ? Device::cuda : Device::cpu;
    if (gpus == 0) throw UserError("--device cuda: no CUDA device is visible");
    if (!cuda_ops::has_cublas())
        throw UserError("--device cuda: this build found no cuBLAS (set CUBLAS_HOME when building)");
    return Device::cuda;
#endif
}

const char* device_label(Device d) { return d == Device::cuda ? "cuda" : "cpu"; }

std::string device_description(Device d) {
#ifdef PRISM_CUDA
    if (d == Device::cuda) return "cuda (" + cuda::device_name(0) + ")";
#endif
    return device_label(d);
}

#ifdef PRISM_CUDA
void profiler_start() { cuda::profiler_start(); }
void profiler_stop() { cuda::profiler_stop(); }
#else
void profiler_start() {}
void profiler_stop() {}
#endif
HostBuffer::HostBuffer(size_t bytes, bool pinned) : bytes_(bytes) {
    if (bytes == 0) return;
#ifdef PRISM_CUDA
    if (pinned && cuda::device_count() > 0) {
        p_ = cuda::host_alloc_pinned(bytes);
        pinned_ = p_ != nullptr;
    }
#endif
    if (!p_) {
        // Batches run to hundreds of MB (256 JUMP-CP images are 411 MB as
        // float): huge pages spare the first touch hundreds of thousands of
        // page faults. Only a hint; small buffers get plain alignment.
        const size_t huge = size_t(2) << 20, align = bytes >= 4 * huge ? huge : 64;
        p_ = std::aligned_alloc(align, (bytes + align - 1) / align * align);
        if (p_ && align == huge) ::madvise(p_, (bytes + align - 1) / align * align, MADV_HUGEPAGE);
    }
    if (!p_)
        throw UserError("out of host memory: cannot allocate " + std::to_string(bytes >> 20) + " MiB for data batches");
}

HostBuffer::~HostBuffer() {
#ifdef PRISM_CUDA
    if (pinned_) {
        cuda::host_free_pinned(p_);
        return;
    }
#endif
    std::free(p_);
}

HostBuffer::HostBuffer(HostBuffer&& o) noexcept { *this = std::move(o); }

HostBuffer& HostBuffer::operator=(HostBuffer&& o) noexcept {
    std::swap(p_, o.p_);
    std::swap(bytes_, o.bytes_);
    std::swap(pinned_, o.pinned_);
    return *this;
}

}  // namespace prism
