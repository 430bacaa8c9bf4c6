// Which backend runs: `--device cpu|cuda|auto`.
#pragma once
#include <string>
#include "engine/common.h"

namespace prism {

// Resolves the flag: "auto" picks CUDA when it is built, a device is present
// and its kernels exist, else the CPU. Throws UserError for an impossible choice.
Device resolve_device(const std::string& flag);
const char* device_label(Device d);
// train.precision on a device: the bf16 mode (Model's bf16 argument) runs on
// CUDA only, where "auto" chooses it; "fp32" is fp32 everywhere.
inline bool bf16_mode(const std::string& precision, Device d) {
    return d == Device::cuda && (precision == "bf16" || precision == "auto");
}
// "cpu" or "cuda (NVIDIA H100 80GB HBM3)".
std::string device_description(Device d);

// cudaProfilerStart / cudaProfilerStop: what `nsys profile
// --capture-range=cudaProfilerApi` waits for (`prism train --profile-steps`).
// No-ops in a build without CUDA.
void profiler_start();
void profiler_stop();
// Host memory for data on its way to a GPU (the loader's batches). Asked for
// pinned and with a CUDA device present, it is page-locked, so that copies
// from it can run asynchronously; otherwise (no GPU, or the CPU backend) it
// is plain 64-byte-aligned memory. Move-only; throws UserError when memory
// runs out.
class HostBuffer {
public:
    HostBuffer() = default;
    HostBuffer(size_t bytes, bool pinned);
    ~HostBuffer();
    HostBuffer(HostBuffer&& o) noexcept;
    HostBuffer& operator=(HostBuffer&& o) noexcept;
    HostBuffer(const HostBuffer&) = delete;
    HostBuffer& operator=(const HostBuffer&) = delete;

    void* data() const { return p_; }
    size_t size() const { return bytes_; }
    bool pinned() const { return pinned_; }

private:
    void* p_ = nullptr;
    size_t bytes_ = 0;
    bool pinned_ = false;
};

#ifdef PRISM_CUDA
namespace cuda {
// Queues a host-to-device copy on `stream` (a cudaStream_t); asynchronous
// when `src` is pinned. Throws UserError if CUDA refuses.
void copy_to_device_async(void* dst, const void* src, size_t bytes, void* stream);
}  // namespace cuda
#endif

}  // namespace prism
