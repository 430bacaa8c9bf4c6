#include "engine/arena.h"
#include <cstdlib>
#include <cstring>
#include "engine/common.h"
#ifdef PRISM_CUDA
#include "kernels/cuda_ops.h"
#endif

namespace prism {

namespace {

bool poison_requested() {
    const char* v = std::getenv("PRISM_POISON_ARENAS");
    return v && *v && std::strcmp(v, "0") != 0;
}

}  // namespace

void Arena::allocate(bool device) {
    capacity = (used + 63) & ~size_t(63);
    if (capacity == 0) capacity = 64;
    on_device = device;
    const uint8_t fill = !starts_zeroed && poison_requested() ? 0xff : 0;
    if (device) {
#ifdef PRISM_CUDA
        base = static_cast<char*>(cuda::device_alloc(capacity, "arena " + name));
        cuda::fill_bytes_async(base, fill, capacity, nullptr);
        cuda::stream_sync(nullptr);
        used = 0;
        return;
#else
        throw UserError("arena " + name + ": this build has no CUDA backend");
#endif
    }
    base = static_cast<char*>(std::aligned_alloc(64, capacity));
    if (!base)
        throw UserError("arena " + name + ": cannot allocate " + format_bytes(capacity) +
                        " of host memory: lower the batch (train.batch, or eval's --batch) or the model size");
    std::memset(base, fill, capacity);
    used = 0;
}

void Arena::release() {
#ifdef PRISM_CUDA
    if (on_device) cuda::device_free(base);
    else
#endif
        std::free(base);
    base = nullptr;
    capacity = used = 0;
}

void Arena::overflow() const {
    panic(__FILE__, __LINE__, "arena " + name + " carved beyond its measured size");
}

std::string format_bytes(size_t bytes) {
    const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
    double v = double(bytes);
    int u = 0;
    while (v >= 1024 && u < 4) { v /= 1024; u++; }
    char buf[32];
    std::snprintf(buf, sizeof buf, u == 0 ? "%.0f %s" : "%.1f %s", v, units[u]);
    return buf;
}

}  // namespace prism
