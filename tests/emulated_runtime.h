// kernels/cuda's launchers compiled on the host for the emulator, so that
// the CUDA ops themselves, from their entry points in kernels/cuda_ops.h down
// to every kernel they launch, run on a machine without a GPU: the launch
// geometry, the parameters each launcher fills in, the order of its launches
// and its scratch memory are the ones the device gets. A translation unit
// includes this first, then one .cu file (tests/emulated/*.cpp,
// tests/emulated_engine/*.cpp) or a test of the CUDA ops.
//
// What stands in for the CUDA runtime: kEmulatedGpus devices of
// emulated_device_bytes() whose memory is host memory (one pool shared by all) (aligned as cudaMalloc aligns it,
// starting as 0xFF bytes, so that reading what was never written gives NaN or -1; in the geometry-only mode
// of emulator.h, never written at all);
// streams are one synchronous queue (a launch runs when it is made, an event
// has always completed); a bad launch throws from the emulator where the
// device would report it at cudaGetLastError; cuBLAS is the host model of
// tests/emulated_cublas.h. A launch of more than 48 KiB of dynamic shared
// memory needs the kernel's cudaFuncSetAttribute opt-in first, as on the
// device. Not modelled: timing, and anything asynchronous.
#pragma once
#include "tests/emulator.h"

#include <algorithm>
#include <cerrno>
#include <cstddef>
#include <cstdio>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

#include <sys/mman.h>

// The CUDA build's objects (libprism.a) define the same launchers under the
// real names; the emulated ones get their own, in every translation unit that
// includes this file.
#define cuda_ops cuda_ops_emulated
#define cuda_detail cuda_detail_emulated

typedef struct CUstream_st* cudaStream_t;  // as kernels/cuda_ops.h declares it
typedef struct CUevent_st* cudaEvent_t;    // as kernels/cuda_util.h does

namespace prism {

using dim3 = emu::Dim;

enum cudaError_t {
    cudaSuccess = 0,
    cudaErrorInvalidValue = 1,
    cudaErrorMemoryAllocation = 2,
    cudaErrorNotReady = 600,
};
enum cudaMemcpyKind {
    cudaMemcpyHostToHost,
    cudaMemcpyHostToDevice,
    cudaMemcpyDeviceToHost,
    cudaMemcpyDeviceToDevice,
    cudaMemcpyDefault
};
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize };

inline const char* cudaGetErrorString(cudaError_t e) {
    return e == cudaSuccess                 ? "no error"
           : e == cudaErrorMemoryAllocation ? "out of memory"
           : e == cudaErrorNotReady         ? "device not ready"
                                            : "invalid argument";
}
// A launch the device would refuse has already thrown (emu::launch).
inline cudaError_t cudaGetLastError() { return cudaSuccess; }

// The live allocations (start → bytes), so that the cuBLAS and NCCL
// stand-ins can check that every operand they are handed lies inside one
// (emulated_in_allocation), as compute-sanitizer's memcheck would.
inline std::map<uintptr_t, size_t> emulated_allocations;
// The emulated device's memory: more than it is refused, as by a GPU that
// size (the arenas' out-of-memory message is tested against it). In the
// geometry-only mode (emulator.h) it is what an H100 80GB had free to a
// process (78.6 GiB, bench/results/2026-11-25-h100.md), so that a shape
// which runs there is one whose buffers fit the device.
inline size_t emulated_device_bytes() {
    return emu::geometry_only ? size_t(78.6 * double(size_t(1) << 30)) : size_t(4) << 30;
}
inline size_t emulated_allocated_bytes = 0;
// The geometry-only mode's allocations: address space only (mmap without a
// reservation, which Linux's default overcommit grants), never touched by a
// kernel, so tens of GiB cost no memory.
inline std::map<uintptr_t, size_t> emulated_mapped;

inline cudaError_t cudaMalloc(void** p, size_t bytes) {
    *p = nullptr;
    if (bytes == 0) return cudaSuccess;  // as cudaMalloc: a null pointer, no error
    if (bytes > emulated_device_bytes() - std::min(emulated_allocated_bytes, emulated_device_bytes()))
        return cudaErrorMemoryAllocation;
    constexpr size_t kAlign = 256;  // what cudaMalloc guarantees
    const size_t rounded = (bytes + kAlign - 1) / kAlign * kAlign;
    if (emu::geometry_only) {  // page-aligned, so 256-byte aligned
        void* m = mmap(nullptr, rounded, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (m == MAP_FAILED) {  // not the device's refusal: say so before the arena reports it as one
            std::fprintf(stderr, "emulator: mmap of %zu bytes of address space failed: %s\n", rounded,
                         std::strerror(errno));
            return cudaErrorMemoryAllocation;
        }
        *p = m;
        emulated_mapped[(uintptr_t)m] = rounded;
    } else {
        *p = std::aligned_alloc(kAlign, rounded);
        if (!*p) return cudaErrorMemoryAllocation;
        std::memset(*p, 0xFF, bytes);
    }
    emulated_allocations[(uintptr_t)*p] = bytes;
    emulated_allocated_bytes += bytes;
    return cudaSuccess;
}
// Does [p, p + bytes) lie inside one live allocation? (What would fault on a
// GPU: the cuBLAS and NCCL stand-ins check their operands with it.)
inline bool emulated_in_allocation(const void* p, size_t bytes) {
    const uintptr_t a = (uintptr_t)p;
    auto it = emulated_allocations.upper_bound(a);
    if (it == emulated_allocations.begin()) return false;
    --it;
    return a - it->first + bytes <= it->second;
}
inline cudaError_t cudaMemGetInfo(size_t* free_bytes, size_t* total_bytes) {
    *total_bytes = emulated_device_bytes();
    *free_bytes = *total_bytes - std::min(emulated_allocated_bytes, *total_bytes);
    return cudaSuccess;
}
template <class T>
cudaError_t cudaMalloc(T** p, size_t bytes) {
    return cudaMalloc(reinterpret_cast<void**>(p), bytes);
}
inline cudaError_t cudaFree(void* p) {
    if (!p) return cudaSuccess;
    const auto it = emulated_allocations.find((uintptr_t)p);
    if (it == emulated_allocations.end()) return cudaErrorInvalidValue;
    emulated_allocated_bytes -= it->second;
    emulated_allocations.erase(it);
    const auto mapped = emulated_mapped.find((uintptr_t)p);
    if (mapped == emulated_mapped.end()) {
        std::free(p);
    } else {
        munmap(p, mapped->second);
        emulated_mapped.erase(mapped);
    }
    return cudaSuccess;
}
inline cudaError_t cudaMallocAsync(void** p, size_t bytes, cudaStream_t) { return cudaMalloc(p, bytes); }
inline cudaError_t cudaFreeAsync(void* p, cudaStream_t) { return cudaFree(p); }
// A range that starts in a device allocation ends there too, as memcheck
// would require. (The op tests hand the launchers host buffers as device
// memory: those are not looked at.)
inline void require_inside_if_device(const void* p, size_t bytes, const char* what) {
    if (emulated_in_allocation(p, 1) && !emulated_in_allocation(p, bytes))
        emu::fail(std::string(what) + " of " + std::to_string(bytes) + " bytes runs past its device allocation");
}
// The geometry-only mode neither sets nor copies device memory (a kernel's
// work, and it would make the reserved pages real); copies to and from the
// host still happen.
inline cudaError_t cudaMemset(void* p, int value, size_t bytes) {
    if (!bytes) return cudaSuccess;
    require_inside_if_device(p, bytes, "cudaMemset");
    if (!emu::geometry_only) std::memset(p, value, bytes);
    return cudaSuccess;
}
inline cudaError_t cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t) {
    return cudaMemset(p, value, bytes);
}
inline cudaError_t cudaMemcpy(void* dst, const void* src, size_t bytes, cudaMemcpyKind) {
    if (!bytes) return cudaSuccess;
    require_inside_if_device(dst, bytes, "cudaMemcpy's destination");
    require_inside_if_device(src, bytes, "cudaMemcpy's source");
    if (emu::geometry_only && emulated_in_allocation(dst, bytes) && emulated_in_allocation(src, bytes))
        return cudaSuccess;
    std::memcpy(dst, src, bytes);
    return cudaSuccess;
}
inline cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind, cudaStream_t) {
    return cudaMemcpy(dst, src, bytes, kind);
}
inline cudaError_t cudaGetDevice(int* device) {
    *device = 0;
    return cudaSuccess;
}
inline cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }
inline cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
inline cudaError_t cudaStreamCreate(cudaStream_t* s) {
    *s = nullptr;
    return cudaSuccess;
}
inline cudaError_t cudaStreamDestroy(cudaStream_t) { return cudaSuccess; }
enum { cudaStreamNonBlocking = 1 };
inline cudaError_t cudaStreamCreateWithFlags(cudaStream_t* s, unsigned) { return cudaStreamCreate(s); }

// The devices kernels/cuda/device.cu, util.cu and engine/nccl.cpp ask about:
// a node of kEmulatedGpus, or those CUDA_VISIBLE_DEVICES lists (a
// comma-separated list of indices), each a distinct GPU (its UUID is its
// index), all sharing this process's memory.
constexpr int kEmulatedGpus = 2;
// The ids of the visible devices, in order; as CUDA does, the list ends at
// the first entry that names no device.
inline std::vector<int> emulated_visible_ids() {
    std::vector<int> ids;
    const char* v = std::getenv("CUDA_VISIBLE_DEVICES");
    if (!v) {
        for (int i = 0; i < kEmulatedGpus; i++) ids.push_back(i);
        return ids;
    }
    for (const char* p = v;;) {
        char* end = nullptr;
        const long id = std::strtol(p, &end, 10);
        if (end == p || id < 0 || id >= kEmulatedGpus) break;
        ids.push_back(int(id));
        if (*end != ',') break;
        p = end + 1;
    }
    return ids;
}
// The id of visible device `device`, or -1.
inline int emulated_device_id(int device) {
    const std::vector<int> ids = emulated_visible_ids();
    return device >= 0 && device < int(ids.size()) ? ids[device] : -1;
}
inline cudaError_t cudaGetDeviceCount(int* n) {
    *n = int(emulated_visible_ids().size());
    return cudaSuccess;
}
inline cudaError_t cudaSetDevice(int device) {
    return emulated_device_id(device) >= 0 ? cudaSuccess : cudaErrorInvalidValue;
}
struct cudaUUID_t {
    char bytes[16];
};
struct cudaDeviceProp {
    char name[256];
    cudaUUID_t uuid;
};
inline cudaError_t cudaGetDeviceProperties(cudaDeviceProp* prop, int device) {
    const int id = emulated_device_id(device);
    if (id < 0) return cudaErrorInvalidValue;
    std::snprintf(prop->name, sizeof prop->name, "CPU emulator GPU %d (tests/emulated_runtime.h%s)", id,
                  emu::geometry_only ? ", geometry only" : "");
    std::memset(prop->uuid.bytes, 0, sizeof prop->uuid.bytes);
    prop->uuid.bytes[0] = char(id + 1);
    return cudaSuccess;
}
inline cudaError_t cudaDeviceGetStreamPriorityRange(int* least, int* greatest) {
    *least = 0, *greatest = -5;
    return cudaSuccess;
}
inline cudaError_t cudaStreamCreateWithPriority(cudaStream_t* s, unsigned, int) { return cudaStreamCreate(s); }
// Everything queued has run: the one stream is synchronous.
inline cudaError_t cudaStreamQuery(cudaStream_t) { return cudaSuccess; }
inline cudaError_t cudaStreamWaitEvent(cudaStream_t, cudaEvent_t, unsigned) { return cudaSuccess; }

// Host memory: "pinned" is plain memory here.
enum { cudaHostAllocDefault = 0 };
inline cudaError_t cudaHostAlloc(void** p, size_t bytes, unsigned) {
    *p = std::malloc(bytes ? bytes : 1);
    return *p ? cudaSuccess : cudaErrorMemoryAllocation;
}
inline cudaError_t cudaFreeHost(void* p) {
    std::free(p);
    return cudaSuccess;
}

// The stream-ordered allocator's pool: nothing to keep here.
typedef struct EmulatedMemPool* cudaMemPool_t;
enum cudaMemPoolAttr { cudaMemPoolAttrReleaseThreshold };
inline cudaError_t cudaDeviceGetDefaultMemPool(cudaMemPool_t* pool, int) {
    *pool = nullptr;
    return cudaSuccess;
}
inline cudaError_t cudaMemPoolSetAttribute(cudaMemPool_t, cudaMemPoolAttr, void*) { return cudaSuccess; }
inline cudaError_t cudaMemPoolTrimTo(cudaMemPool_t, size_t) { return cudaSuccess; }

// Events: the one synchronous stream has always finished; no timing.
inline cudaError_t cudaEventCreate(cudaEvent_t* e) {
    *e = nullptr;
    return cudaSuccess;
}
inline cudaError_t cudaEventDestroy(cudaEvent_t) { return cudaSuccess; }
inline cudaError_t cudaEventRecord(cudaEvent_t, cudaStream_t) { return cudaSuccess; }
enum { cudaEventDisableTiming = 2 };
inline cudaError_t cudaEventCreateWithFlags(cudaEvent_t* e, unsigned) { return cudaEventCreate(e); }
inline cudaError_t cudaEventQuery(cudaEvent_t) { return cudaSuccess; }
inline cudaError_t cudaEventElapsedTime(float* ms, cudaEvent_t, cudaEvent_t) {
    *ms = 0.f;
    return cudaSuccess;
}

// The profiler bracket and NVTX ranges mark nothing here.
inline cudaError_t cudaProfilerStart() { return cudaSuccess; }
inline cudaError_t cudaProfilerStop() { return cudaSuccess; }
inline int nvtxRangePushA(const char*) { return 0; }
inline int nvtxRangePop() { return 0; }
// Records what a launch of the kernel may then ask for (emulator.h).
template <class F>
cudaError_t cudaFuncSetAttribute(F kernel, cudaFuncAttribute attr, int value) {
    if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaErrorInvalidValue;
    if (value < 0 || value > 227 * 1024) return cudaErrorInvalidValue;  // an H100's opt-in maximum
    std::lock_guard<std::mutex> lock(emu::smem_opt_in_mutex());
    emu::smem_opt_in()[emu::kernel_address(kernel)] = size_t(value);
    return cudaSuccess;
}

}  // namespace prism

// What the launchers call that kernels/cuda defines outside them.
namespace prism::cuda_detail {
[[noreturn]] inline void throw_error(const char* kind, const char* file, int line, const char* call,
                                     const std::string& what) {
    throw std::runtime_error(std::string(kind) + " error at " + file + ":" + std::to_string(line) + ": " + call +
                             ": " + what);
}
inline void check_or_abort(cudaError_t e, const char* file, int line, const char* call) {
    if (e != cudaSuccess) std::abort();
}
}  // namespace prism::cuda_detail
