// kernels/cuda's launchers (the .cu files without cuBLAS) compiled on the
// host for the emulator, so that the CUDA ops themselves, from their entry
// points in kernels/cuda_ops.h down to every kernel they launch, run on a
// machine without a GPU: the launch geometry, the parameters each launcher
// fills in, the order of its launches and its scratch memory are the ones the
// device gets. A translation unit includes this first, then one .cu file
// (tests/emulated/*.cpp) or a test of the CUDA ops.
//
// What stands in for the CUDA runtime: device memory is host memory (aligned
// as cudaMalloc aligns it, starting as 0xFF bytes, so that reading what was
// never written gives NaN or -1); streams are one synchronous queue (a launch
// runs when it is made); a bad launch throws from the emulator where the
// device would report it at cudaGetLastError; cuBLAS is the host model of
// tests/emulated_cublas.h. Not modelled: the dynamic shared memory opt-in
// above 48 KiB, and anything asynchronous.
#pragma once
#include "tests/emulator.h"

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <map>
#include <stdexcept>
#include <string>

// The CUDA build's objects (libprism.a) define the same launchers under the
// real names; the emulated ones get their own, in every translation unit that
// includes this file.
#define cuda_ops cuda_ops_emulated
#define cuda_detail cuda_detail_emulated

typedef struct CUstream_st* cudaStream_t;  // as kernels/cuda_ops.h declares it

namespace prism {

using dim3 = emu::Dim;

enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorMemoryAllocation = 2 };
enum cudaMemcpyKind {
    cudaMemcpyHostToHost,
    cudaMemcpyHostToDevice,
    cudaMemcpyDeviceToHost,
    cudaMemcpyDeviceToDevice,
    cudaMemcpyDefault
};
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize };

inline const char* cudaGetErrorString(cudaError_t e) {
    return e == cudaSuccess ? "no error" : e == cudaErrorMemoryAllocation ? "out of memory" : "invalid argument";
}
// A launch the device would refuse has already thrown (emu::launch).
inline cudaError_t cudaGetLastError() { return cudaSuccess; }

// The live allocations (start → bytes), so that the cuBLAS stand-in
// (tests/emulated_cublas.h) can check that every matrix it is handed lies
// inside one, as compute-sanitizer's memcheck would on the device.
inline std::map<uintptr_t, size_t> emulated_allocations;

inline cudaError_t cudaMalloc(void** p, size_t bytes) {
    constexpr size_t kAlign = 256;  // what cudaMalloc guarantees
    *p = std::aligned_alloc(kAlign, (bytes + kAlign - 1) / kAlign * kAlign);
    if (!*p) return cudaErrorMemoryAllocation;
    std::memset(*p, 0xFF, bytes);
    emulated_allocations[(uintptr_t)*p] = bytes;
    return cudaSuccess;
}
template <class T>
cudaError_t cudaMalloc(T** p, size_t bytes) {
    return cudaMalloc(reinterpret_cast<void**>(p), bytes);
}
inline cudaError_t cudaFree(void* p) {
    if (p && !emulated_allocations.erase((uintptr_t)p)) return cudaErrorInvalidValue;
    std::free(p);
    return cudaSuccess;
}
inline cudaError_t cudaMallocAsync(void** p, size_t bytes, cudaStream_t) { return cudaMalloc(p, bytes); }
inline cudaError_t cudaFreeAsync(void* p, cudaStream_t) { return cudaFree(p); }
inline cudaError_t cudaMemset(void* p, int value, size_t bytes) {
    if (bytes) std::memset(p, value, bytes);
    return cudaSuccess;
}
inline cudaError_t cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t) {
    return cudaMemset(p, value, bytes);
}
inline cudaError_t cudaMemcpy(void* dst, const void* src, size_t bytes, cudaMemcpyKind) {
    if (bytes) std::memcpy(dst, src, bytes);
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
template <class F>
cudaError_t cudaFuncSetAttribute(F, cudaFuncAttribute, int) {
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

namespace prism::cuda_ops {
inline bool has_cublas() { return true; }  // tests/emulated_cublas.h
}  // namespace prism::cuda_ops
