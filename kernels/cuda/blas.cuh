// The cuBLAS handle behind the linear ops (kernels/cuda/context.cu), and the
// checked cuBLAS call. Only built when the Makefile found cuBLAS (PRISM_CUBLAS).
#pragma once
#ifdef PRISM_CUBLAS
#include <cublas_v2.h>

#include "kernels/cuda/common.cuh"

namespace prism::cuda_detail {

// The current device's handle, made on first use (atomics not allowed, default
// math: fp32 GEMMs stay fp32, no TF32), bound to `stream`. Not for concurrent
// use from several host threads.
cublasHandle_t blas_handle(cudaStream_t stream);

#define PRISM_CUBLAS_CHECK(call)                                                                \
    do {                                                                                        \
        const cublasStatus_t prism_s_ = (call);                                                 \
        if (prism_s_ != CUBLAS_STATUS_SUCCESS)                                                  \
            ::prism::cuda_detail::throw_error("cuBLAS", __FILE__, __LINE__, #call,              \
                                              cublasGetStatusString(prism_s_));                 \
    } while (0)

}  // namespace prism::cuda_detail
#endif
