// The cuBLAS handle behind the linear ops (kernels/cuda/context.cu), and the
// checked cuBLAS call. Only built when the Makefile found cuBLAS (PRISM_CUBLAS).
#pragma once
#ifdef PRISM_CUBLAS
#ifndef PRISM_EMULATION  // tests/emulated_cublas.h stands in for them
#include <cublasLt.h>
#include <cublas_v2.h>
#endif

#include "kernels/cuda/common.cuh"

namespace prism::cuda_detail {

// The current device's handle, made on first use (atomics not allowed, default
// math: fp32 GEMMs stay fp32, no TF32), bound to `stream`. Not for concurrent
// use from several host threads.
cublasHandle_t blas_handle(cudaStream_t stream);

// The current device's cuBLASLt handle and its GEMM workspace, made on first
// use; the same one-stream-at-a-time rule.
struct LtContext {
    cublasLtHandle_t handle;
    void* workspace;
    size_t workspace_bytes;
};
LtContext lt_context();

#define PRISM_CUBLAS_CHECK(call)                                                                \
    do {                                                                                        \
        const cublasStatus_t prism_s_ = (call);                                                 \
        if (prism_s_ != CUBLAS_STATUS_SUCCESS)                                                  \
            ::prism::cuda_detail::throw_error("cuBLAS", __FILE__, __LINE__, #call,              \
                                              cublasGetStatusString(prism_s_));                 \
    } while (0)

// For destructors: prints the failed call and aborts.
void check_blas_or_abort(cublasStatus_t s, const char* file, int line, const char* call);

}  // namespace prism::cuda_detail
#endif
