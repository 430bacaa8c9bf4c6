// Error reporting for every CUDA file, and the cuBLAS and cuBLASLt handles,
// made once per device on first use.
#include <cstdio>
#include <cstdlib>
#include <map>
#include <mutex>
#include <stdexcept>

#include "kernels/cuda/blas.cuh"
#include "kernels/cuda/common.cuh"

namespace prism::cuda_detail {

void throw_error(const char* kind, const char* file, int line, const char* call,
                 const std::string& what) {
    throw std::runtime_error(std::string(kind) + " error at " + file + ":" + std::to_string(line) +
                             ": " + call + ": " + what);
}

void check_or_abort(cudaError_t e, const char* file, int line, const char* call) {
    if (e == cudaSuccess) return;
    std::fprintf(stderr, "prism: CUDA error at %s:%d: %s: %s\n", file, line, call,
                 cudaGetErrorString(e));
    std::fflush(stderr);
    std::abort();
}

#ifdef PRISM_CUBLAS
namespace {
std::mutex g_mutex;
std::map<int, cublasHandle_t> g_handles;  // device → handle
std::map<int, LtContext> g_lt;            // device → cuBLASLt handle and workspace
constexpr size_t kLtWorkspaceBytes = 32u << 20;
}  // namespace

void check_blas_or_abort(cublasStatus_t s, const char* file, int line, const char* call) {
    if (s == CUBLAS_STATUS_SUCCESS) return;
    std::fprintf(stderr, "prism: cuBLAS error at %s:%d: %s: %s\n", file, line, call,
                 cublasGetStatusString(s));
    std::fflush(stderr);
    std::abort();
}

LtContext lt_context() {
    int device = 0;
    PRISM_CUDA_CHECK(cudaGetDevice(&device));
    std::lock_guard<std::mutex> lock(g_mutex);
    LtContext& c = g_lt[device];
    if (!c.handle) {
        PRISM_CUBLAS_CHECK(cublasLtCreate(&c.handle));
        PRISM_CUDA_CHECK(cudaMalloc(&c.workspace, kLtWorkspaceBytes));
        c.workspace_bytes = kLtWorkspaceBytes;
    }
    return c;
}

cublasHandle_t blas_handle(cudaStream_t stream) {
    int device = 0;
    PRISM_CUDA_CHECK(cudaGetDevice(&device));
    std::lock_guard<std::mutex> lock(g_mutex);
    cublasHandle_t& h = g_handles[device];
    if (!h) {
        PRISM_CUBLAS_CHECK(cublasCreate(&h));
        // Deterministic results: no atomics; CUBLAS_DEFAULT_MATH never lowers
        // fp32 inputs to TF32.
        PRISM_CUBLAS_CHECK(cublasSetAtomicsMode(h, CUBLAS_ATOMICS_NOT_ALLOWED));
        PRISM_CUBLAS_CHECK(cublasSetMathMode(h, CUBLAS_DEFAULT_MATH));
        PRISM_CUBLAS_CHECK(cublasSetPointerMode(h, CUBLAS_POINTER_MODE_HOST));
    }
    PRISM_CUBLAS_CHECK(cublasSetStream(h, stream));
    return h;
}
#endif

}  // namespace prism::cuda_detail

namespace prism::cuda_ops {

#ifdef PRISM_CUBLAS
bool has_cublas() { return true; }
void release_context() {
    std::lock_guard<std::mutex> lock(cuda_detail::g_mutex);
    for (auto& [device, h] : cuda_detail::g_handles)
        if (h) PRISM_CUBLAS_CHECK(cublasDestroy(h));
    cuda_detail::g_handles.clear();
    for (auto& [device, c] : cuda_detail::g_lt) {
        if (c.handle) PRISM_CUBLAS_CHECK(cublasLtDestroy(c.handle));
        if (c.workspace) PRISM_CUDA_CHECK(cudaFree(c.workspace));
    }
    cuda_detail::g_lt.clear();
}
#else
bool has_cublas() { return false; }
void release_context() {}
#endif

}  // namespace prism::cuda_ops
