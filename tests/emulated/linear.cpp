// linear.cu's launchers, compiled for the emulator (tests/emulated_runtime.h)
// with the host model of its cuBLAS and cuBLASLt calls
// (tests/emulated_cublas.h). This file stands in for what
// kernels/cuda/context.cu gives linear.cu: the handles (the model keeps no
// state in them) and the cuBLASLt workspace, in emulated device memory, and
// for has_cublas and release_context.
#include "tests/emulated_runtime.h"
#include "tests/emulated_cublas.h"

#define PRISM_CUBLAS 1
#include "kernels/cuda/linear.cu"

namespace prism::cuda_detail {

// One handle, bound to the stream of the call, as context.cu's is.
cublasHandle_t blas_handle(cudaStream_t stream) {
    static EmulatedBlasHandle handle;
    handle.stream = stream;
    return &handle;
}

LtContext lt_context() {
    constexpr size_t kWorkspaceBytes = 1 << 20;
    static void* workspace = [] {
        void* p = nullptr;
        PRISM_CUDA_CHECK(cudaMalloc(&p, kWorkspaceBytes));
        return p;
    }();
    return {nullptr, workspace, kWorkspaceBytes};
}

void check_blas_or_abort(cublasStatus_t s, const char*, int, const char*) {
    if (s != CUBLAS_STATUS_SUCCESS) std::abort();
}

}  // namespace prism::cuda_detail

namespace prism::cuda_ops {
bool has_cublas() { return true; }  // tests/emulated_cublas.h
void release_context() {}           // the workspace lives for the process
}  // namespace prism::cuda_ops
