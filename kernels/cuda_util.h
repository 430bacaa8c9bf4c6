// The few CUDA runtime calls a host tool needs beside the ops of
// kernels/cuda_ops.h (`prism bench attention`: device buffers, a stream,
// random fills, events), each checked: an error throws std::runtime_error
// naming the call, like the ops do. Implemented in kernels/cuda/util.cu.
//
// A plain header: usable from .cpp files without the CUDA headers. Only
// built with the CUDA backend (PRISM_CUDA).
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>

typedef struct CUstream_st* cudaStream_t;  // as <driver_types.h> declares them
typedef struct CUevent_st* cudaEvent_t;

namespace prism::cuda {

// Device memory, freed when the owner goes (errors at free are printed, not
// thrown: a destructor may run while an exception unwinds). Move-only.
class DeviceMemory {
public:
    DeviceMemory() = default;
    explicit DeviceMemory(size_t bytes);
    ~DeviceMemory();
    DeviceMemory(DeviceMemory&& o) noexcept;
    DeviceMemory& operator=(DeviceMemory&& o) noexcept;
    DeviceMemory(const DeviceMemory&) = delete;
    DeviceMemory& operator=(const DeviceMemory&) = delete;

    template <class T> T* as() const { return static_cast<T*>(p_); }
    size_t bytes() const { return bytes_; }

private:
    void* p_ = nullptr;
    size_t bytes_ = 0;
};

// A non-blocking stream of the current device, destroyed with its owner.
class Stream {
public:
    Stream();
    ~Stream();
    Stream(const Stream&) = delete;
    Stream& operator=(const Stream&) = delete;
    cudaStream_t get() const { return s_; }
    void synchronize() const;  // also reports errors of kernels queued before

private:
    cudaStream_t s_ = nullptr;
};

// A timing event.
class Event {
public:
    Event();
    ~Event();
    Event(const Event&) = delete;
    Event& operator=(const Event&) = delete;
    void record(cudaStream_t stream);
    // Milliseconds from `start` to this event; both must have completed
    // (synchronize the stream first).
    float ms_since(const Event& start) const;

private:
    cudaEvent_t e_ = nullptr;
};

void set_device(int index);
size_t device_total_memory();  // bytes of the current device
// Queued on `stream`.
void memset_async(void* p, int value, size_t bytes, cudaStream_t stream);
// Copies queued on `stream` after the work already there, and waited for:
// the host buffer may go as soon as they return. (A plain cudaMemcpy would
// order them on the legacy default stream, which a non-blocking Stream does
// not wait for.)
void copy_to_device(void* dst, const void* src, size_t bytes, cudaStream_t stream);
void copy_to_host(void* dst, const void* src, size_t bytes, cudaStream_t stream);
// n values uniform in [lo, hi), a pure function of (seed, index): the same
// bits on every device and in every run.
void fill_uniform(float* p, int64_t n, float lo, float hi, uint64_t seed, cudaStream_t stream);
// Lets the stream-ordered allocator keep freed memory instead of returning it
// to the driver at every synchronization, as a training loop's steady state
// would (the ops take their scratch from it).
void keep_pool_memory();
// Returns what the pool holds unused to the driver: at a model's end, and
// before a large allocation outside the pool. Never throws.
void release_pool_memory() noexcept;

}  // namespace prism::cuda
