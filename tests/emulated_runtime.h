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
// streams that run each launch, copy and product when it is queued, or, with
// PRISM_EMULATE_LATE_STREAMS, asynchronously and as late as their waits
// allow (see "streams" below); a bad launch throws from the emulator where
// the device would report it at cudaGetLastError; cuBLAS is the host model of
// tests/emulated_cublas.h. A launch of more than 48 KiB of dynamic shared
// memory needs the kernel's cudaFuncSetAttribute opt-in first, as on the
// device. Not modelled: timing (events measure 0 ms), streams running
// side by side (one runs at a time, in an order chosen to expose missing
// waits), stream priorities.
#pragma once
#include "tests/emulator.h"

#include <algorithm>
#include <cerrno>
#include <cstddef>
#include <cstdio>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <set>
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
    cudaErrorLaunchFailure = 719,
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
           : e == cudaErrorLaunchFailure    ? "unspecified launch failure"
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
// Allocations a cudaFreeAsync has queued for release: freeing one again is
// the program's error, as it would be on the device.
inline std::set<uintptr_t> emulated_freeing;
// Gives an allocation back (cudaFree once the queued work is done, or
// cudaFreeAsync when its stream gets there).
inline void emulated_release(void* p) {
    emulated_freeing.erase((uintptr_t)p);
    const auto it = emulated_allocations.find((uintptr_t)p);
    emulated_allocated_bytes -= it->second;
    emulated_allocations.erase(it);
    const auto mapped = emulated_mapped.find((uintptr_t)p);
    if (mapped == emulated_mapped.end()) {
        std::free(p);
    } else {
        munmap(p, mapped->second);
        emulated_mapped.erase(mapped);
    }
}
// ---- streams ---------------------------------------------------------------------------
// By default every stream runs its work when it is queued: a launch, copy or
// product is done when its call returns, and an event has always completed.
//
// PRISM_EMULATE_LATE_STREAMS (a comma-separated list of stream numbers, 1
// for the first stream the process creates, 2 for the second...; "all"; or
// "none")
// makes the streams asynchronous, to show that the code orders its streams
// itself: work is queued, and a stream runs it in order, a
// cudaStreamWaitEvent holding it until the event's stream has run what
// preceded the record. A listed stream runs late: only when something waits
// for it (a synchronization, a query, a wait of another stream that is made
// to run, a copy to pageable host memory). Every other stream runs as soon as
// what it waits for has run. So with the producer's stream late and the
// consumer's not, a missing wait lets the consumer read what was not yet
// written; with the consumer's late, a missing wait lets the producer run on
// past it. Host memory is treated as the device treats it: a copy from
// pageable memory takes its bytes at the call, one to pageable memory
// returns once it has landed, copies from and to pinned memory
// (cudaHostAlloc) move the bytes when the stream runs them. NCCL's
// collectives (tests/emulated_nccl.h) begin when their stream reaches them
// and complete when MPI says they have. A kernel's failure is thrown when
// its stream runs it, from the call that made it run.
}  // namespace prism

// The runtime's stream (cudaStream_t points to one) and event.
struct CUstream_st {
    // One queued operation: `step` does it, or the part of it that can be
    // done now (an MPI collective in flight), and says whether it is complete
    // (`forced`: something waits for its stream); or, with `after` set, a
    // wait until stream `after` has completed `after_at` operations.
    struct Work {
        std::function<bool(bool forced)> step;
        CUstream_st* after = nullptr;
        uint64_t after_at = 0;
    };
    int number = 0;          // in creation order, from 1; 0: the legacy default stream
    bool late = false;       // runs only when something waits for it
    bool blocking = false;   // created without cudaStreamNonBlocking: ordered with the legacy stream
    std::deque<Work> queue;  // not yet complete, oldest first
    uint64_t queued = 0, done = 0;  // operations ever queued, and completed
};
struct CUevent_st {
    CUstream_st* stream = nullptr;  // of the last record; null: never recorded
    uint64_t at = 0;                // complete once stream->done reaches it
    bool timing = true;
};

namespace prism {

namespace emulated_streams {

// The mode PRISM_EMULATE_LATE_STREAMS asks for (see above).
struct Mode {
    bool async = false;
    bool all_late = false;
    std::vector<int> late;  // stream numbers
};
inline Mode mode_from_environment() {
    Mode m;
    const char* v = std::getenv("PRISM_EMULATE_LATE_STREAMS");
    if (!v || !*v) return m;
    m.async = true;
    const std::string text = v;
    m.all_late = text == "all";
    if (text != "none" && text != "all") {
        for (const char* p = v;;) {
            char* end = nullptr;
            const long n = std::strtol(p, &end, 10);
            if (end == p || n < 1 || n > 1000 || (*end != ',' && *end != '\0')) {
                std::fprintf(stderr, "emulator: PRISM_EMULATE_LATE_STREAMS=%s: expected \"none\", \"all\" or stream "
                                     "numbers from 1, separated by commas\n", v);
                std::exit(1);
            }
            m.late.push_back(int(n));
            if (*end == '\0') break;
            p = end + 1;
        }
    }
    std::fprintf(stderr, "emulator: asynchronous streams (PRISM_EMULATE_LATE_STREAMS=%s)\n", v);
    return m;
}
inline Mode mode = mode_from_environment();

inline CUstream_st legacy;                       // the legacy default stream (cudaStream_t 0): never late
inline std::vector<CUstream_st*> all{&legacy};   // every stream ever created (kept: events may name them)

inline CUstream_st* of(cudaStream_t s) { return s ? s : &legacy; }

// Runs stream s in order until it has completed `until` operations.
// `forced`: something waits for s, so a wait of s on another stream makes
// that one run too, late or not (unforced, as the eager streams go on by
// themselves, s stops there). `may_block`: an operation that cannot complete
// yet (an MPI collective in flight) is waited for; otherwise (a query, the
// eager streams' progress) s stops there and this returns false.
inline bool advance(CUstream_st* s, uint64_t until, bool may_block, bool forced = true) {
    while (s->done < until) {
        CUstream_st::Work& w = s->queue.front();
        if (w.after) {
            if (w.after->done < w.after_at && (!forced || !advance(w.after, w.after_at, may_block))) return false;
        } else {
            bool complete = false;
            try {
                while (!(complete = w.step(forced)) && may_block) {
                }
            } catch (...) {  // the failed operation is gone, as on the device (whose context would be lost)
                s->queue.pop_front();
                s->done++;
                throw;
            }
            if (!complete) return false;
        }
        s->queue.pop_front();
        s->done++;
    }
    return true;
}

// The streams that run as soon as they can do so, until none can go further.
inline void run_eager_streams() {
    for (bool progress = true; progress;) {
        progress = false;
        for (CUstream_st* s : all) {
            if (s->late || s->done == s->queued) continue;
            const uint64_t before = s->done;
            advance(s, s->queued, false, false);
            progress |= s->done != before;
        }
    }
}

inline void push(CUstream_st* s, CUstream_st::Work w) {
    s->queue.push_back(std::move(w));
    s->queued++;
}

// The legacy default stream waits for the blocking streams' work before its
// own, and they for its work before theirs.
inline void order_with_legacy(CUstream_st* s) {
    if (s == &legacy) {
        for (CUstream_st* b : all)
            if (b->blocking && b->done < b->queued) push(&legacy, {nullptr, b, b->queued});
    } else if (s->blocking && legacy.done < legacy.queued) {
        push(s, {nullptr, &legacy, legacy.queued});
    }
}

// Queues an operation on stream s; returns its position (complete once
// s->done passes it). Synchronous mode: done before this returns.
inline uint64_t submit(cudaStream_t stream, std::function<bool(bool forced)> step) {
    CUstream_st* s = of(stream);
    if (!mode.async) {
        while (!step(true)) {
        }
        return s->queued;
    }
    order_with_legacy(s);
    push(s, {std::move(step)});
    const uint64_t at = s->queued;
    run_eager_streams();
    return at;
}
inline uint64_t submit_work(cudaStream_t stream, std::function<void()> work) {
    return submit(stream, [work = std::move(work)](bool) {
        work();
        return true;
    });
}

// Runs s through its first `until` operations, waiting for whatever that
// needs; then the eager streams go as far as they can.
inline void run_until(CUstream_st* s, uint64_t until) {
    advance(s, until, true);
    run_eager_streams();
}
inline void synchronize_all() {
    for (CUstream_st* s : all) advance(s, s->queued, true);
}
// Every stream runs what it can without blocking (NCCL's finalization
// polling its communicator's collectives).
inline void progress_all() {
    for (CUstream_st* s : all) advance(s, s->queued, false);
    run_eager_streams();
}
// Runs wait() for the calls that run in destructors (cudaFree, cudaFreeHost,
// cudaStreamDestroy): a queued kernel's failure is printed, and answered as
// the device answers every call after a fault, with an error code.
template <class Wait>
cudaError_t without_throwing(Wait wait) {
    try {
        wait();
        return cudaSuccess;
    } catch (const std::exception& e) {
        std::fprintf(stderr, "%s\n", e.what());
        return cudaErrorLaunchFailure;
    }
}
// cudaStreamQuery and cudaEventQuery: runs what can run without blocking,
// then says whether s has completed `until` operations.
inline cudaError_t query(CUstream_st* s, uint64_t until) {
    const bool done = advance(s, until, false);
    run_eager_streams();
    return done ? cudaSuccess : cudaErrorNotReady;
}

inline CUstream_st* create(bool blocking) {
    auto* s = new CUstream_st;
    s->number = int(all.size());  // all[0] is the legacy stream
    s->blocking = blocking;
    s->late = mode.all_late || std::find(mode.late.begin(), mode.late.end(), s->number) != mode.late.end();
    if (s->late) std::fprintf(stderr, "emulator: stream %d runs late (PRISM_EMULATE_LATE_STREAMS)\n", s->number);
    all.push_back(s);
    return s;
}

// Pinned host memory (cudaHostAlloc): start → bytes. Locked: a HostBuffer
// (engine/device.h) may be made on any thread.
inline std::map<uintptr_t, size_t> pinned;
inline std::mutex pinned_mutex;
inline bool is_pinned(const void* p) {
    std::lock_guard<std::mutex> lock(pinned_mutex);
    auto it = pinned.upper_bound((uintptr_t)p);
    if (it == pinned.begin()) return false;
    --it;
    return (uintptr_t)p - it->first < it->second;
}

}  // namespace emulated_streams

// A kernel's launch (emulator.h's PRISM_LAUNCH) goes to its stream's queue.
inline const bool emulated_launches_use_streams = [] {
    emu::submit_to_stream = [](const void* stream, std::function<void()> work) {
        emulated_streams::submit_work(static_cast<cudaStream_t>(const_cast<void*>(stream)), std::move(work));
    };
    return true;
}();

inline cudaError_t cudaDeviceSynchronize() {
    emulated_streams::synchronize_all();
    return cudaSuccess;
}
// As on the device, freeing device memory waits for all queued work first.
// Called from destructors: a queued kernel's failure is printed and
// answered as the device's sticky error, not thrown.
inline cudaError_t cudaFree(void* p) {
    if (!p) return cudaSuccess;
    if (!emulated_allocations.count((uintptr_t)p) || emulated_freeing.count((uintptr_t)p))
        return cudaErrorInvalidValue;
    const cudaError_t e = emulated_streams::without_throwing(emulated_streams::synchronize_all);
    emulated_release(p);
    return e;
}
inline cudaError_t cudaMallocAsync(void** p, size_t bytes, cudaStream_t) { return cudaMalloc(p, bytes); }
// Freed when the stream gets there, so that no other allocation takes the
// memory while the stream's work before it may still use it.
inline cudaError_t cudaFreeAsync(void* p, cudaStream_t stream) {
    if (!p) return cudaSuccess;
    if (!emulated_allocations.count((uintptr_t)p) || emulated_freeing.count((uintptr_t)p))
        return cudaErrorInvalidValue;
    emulated_freeing.insert((uintptr_t)p);
    emulated_streams::submit_work(stream, [p] { emulated_release(p); });
    return cudaSuccess;
}
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
inline cudaError_t cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t stream) {
    if (!bytes) return cudaSuccess;
    require_inside_if_device(p, bytes, "cudaMemset");
    if (!emu::geometry_only) emulated_streams::submit_work(stream, [=] { std::memset(p, value, bytes); });
    return cudaSuccess;
}
// The synchronous calls run on the legacy default stream and return once done.
inline cudaError_t cudaMemset(void* p, int value, size_t bytes) {
    const cudaError_t e = cudaMemsetAsync(p, value, bytes, nullptr);
    emulated_streams::run_until(&emulated_streams::legacy, emulated_streams::legacy.queued);
    return e;
}
inline cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind,
                                   cudaStream_t stream) {
    if (!bytes) return cudaSuccess;
    require_inside_if_device(dst, bytes, "cudaMemcpy's destination");
    require_inside_if_device(src, bytes, "cudaMemcpy's source");
    if (emu::geometry_only && emulated_in_allocation(dst, bytes) && emulated_in_allocation(src, bytes))
        return cudaSuccess;
    namespace es = emulated_streams;
    // Which end is host memory: the kind says, or (cudaMemcpyDefault) the allocations do.
    const bool src_host = kind == cudaMemcpyHostToDevice || kind == cudaMemcpyHostToHost ||
                          (kind == cudaMemcpyDefault && !emulated_in_allocation(src, 1));
    const bool dst_host = kind == cudaMemcpyDeviceToHost || kind == cudaMemcpyHostToHost ||
                          (kind == cudaMemcpyDefault && !emulated_in_allocation(dst, 1));
    uint64_t at = 0;
    if (src_host && es::mode.async && !es::is_pinned(src)) {  // pageable: its bytes are taken now
        auto bytes_now = std::make_shared<std::vector<char>>((const char*)src, (const char*)src + bytes);
        at = es::submit_work(stream, [dst, bytes_now] { std::memcpy(dst, bytes_now->data(), bytes_now->size()); });
    } else {
        at = es::submit_work(stream, [=] { std::memcpy(dst, src, bytes); });
    }
    if (dst_host && !es::is_pinned(dst)) es::run_until(es::of(stream), at);  // pageable: returns once landed
    return cudaSuccess;
}
inline cudaError_t cudaMemcpy(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind) {
    const cudaError_t e = cudaMemcpyAsync(dst, src, bytes, kind, nullptr);
    emulated_streams::run_until(&emulated_streams::legacy, emulated_streams::legacy.queued);
    return e;
}
inline cudaError_t cudaGetDevice(int* device) {
    *device = 0;
    return cudaSuccess;
}
inline cudaError_t cudaStreamSynchronize(cudaStream_t stream) {
    CUstream_st* s = emulated_streams::of(stream);
    emulated_streams::run_until(s, s->queued);
    return cudaSuccess;
}
enum { cudaStreamDefault = 0, cudaStreamNonBlocking = 1 };
inline cudaError_t cudaStreamCreateWithFlags(cudaStream_t* s, unsigned flags) {
    *s = emulated_streams::create(!(flags & cudaStreamNonBlocking));
    return cudaSuccess;
}
inline cudaError_t cudaStreamCreate(cudaStream_t* s) { return cudaStreamCreateWithFlags(s, cudaStreamDefault); }
// The device finishes a destroyed stream's work (here before this returns);
// its record stays for the events that name it.
inline cudaError_t cudaStreamDestroy(cudaStream_t s) {
    if (!s) return cudaSuccess;
    return emulated_streams::without_throwing([s] { emulated_streams::advance(s, s->queued, true); });
}

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
inline cudaError_t cudaStreamCreateWithPriority(cudaStream_t* s, unsigned flags, int) {
    return cudaStreamCreateWithFlags(s, flags);
}
// Runs what can run without blocking: done, or cudaErrorNotReady (an MPI
// collective in flight).
inline cudaError_t cudaStreamQuery(cudaStream_t stream) {
    CUstream_st* s = emulated_streams::of(stream);
    return emulated_streams::query(s, s->queued);
}

// Host memory: "pinned" is plain memory, recorded (emulated_streams::pinned)
// so that copies treat it as the device treats page-locked memory.
enum { cudaHostAllocDefault = 0 };
inline cudaError_t cudaHostAlloc(void** p, size_t bytes, unsigned) {
    *p = std::malloc(bytes ? bytes : 1);
    if (!*p) return cudaErrorMemoryAllocation;
    std::lock_guard<std::mutex> lock(emulated_streams::pinned_mutex);
    emulated_streams::pinned[(uintptr_t)*p] = bytes ? bytes : 1;
    return cudaSuccess;
}
// Waits for the queued work first (copies may still read or write it).
inline cudaError_t cudaFreeHost(void* p) {
    const cudaError_t e = emulated_streams::without_throwing(emulated_streams::synchronize_all);
    {
        std::lock_guard<std::mutex> lock(emulated_streams::pinned_mutex);
        emulated_streams::pinned.erase((uintptr_t)p);
    }
    std::free(p);
    return e;
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

// Events mark a position in a stream's queue; no timing (0 ms between any
// two), but asking for it before both have completed is refused, as the
// device refuses it.
enum { cudaEventDefault = 0, cudaEventDisableTiming = 2 };
inline cudaError_t cudaEventCreateWithFlags(cudaEvent_t* e, unsigned flags) {
    *e = new CUevent_st;
    (*e)->timing = !(flags & cudaEventDisableTiming);
    return cudaSuccess;
}
inline cudaError_t cudaEventCreate(cudaEvent_t* e) { return cudaEventCreateWithFlags(e, cudaEventDefault); }
inline cudaError_t cudaEventDestroy(cudaEvent_t e) {
    delete e;
    return cudaSuccess;
}
inline cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t stream) {
    e->stream = emulated_streams::of(stream);
    emulated_streams::order_with_legacy(e->stream);
    e->at = e->stream->queued;
    return cudaSuccess;
}
inline cudaError_t cudaEventQuery(cudaEvent_t e) {
    if (!e->stream) return cudaSuccess;  // never recorded: as the device answers
    return emulated_streams::query(e->stream, e->at);
}
inline cudaError_t cudaEventSynchronize(cudaEvent_t e) {
    if (e->stream) emulated_streams::run_until(e->stream, e->at);
    return cudaSuccess;
}
inline cudaError_t cudaEventElapsedTime(float* ms, cudaEvent_t start, cudaEvent_t end) {
    if (!start->timing || !end->timing || !start->stream || !end->stream) return cudaErrorInvalidValue;
    for (cudaEvent_t e : {start, end})
        if (e->stream->done < e->at) return cudaErrorNotReady;
    *ms = 0.f;
    return cudaSuccess;
}
// Stream s goes on only once the event's stream has run what preceded the record.
inline cudaError_t cudaStreamWaitEvent(cudaStream_t stream, cudaEvent_t e, unsigned) {
    CUstream_st* s = emulated_streams::of(stream);
    if (!e->stream || e->stream->done >= e->at) return cudaSuccess;
    emulated_streams::order_with_legacy(s);
    emulated_streams::push(s, {nullptr, e->stream, e->at});
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
