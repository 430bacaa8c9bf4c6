// tests/test_cuda_ops.cpp for the emulator: every CUDA op but the cuBLAS
// ones, through its launcher (tests/emulated/*.cpp) down to its kernels,
// against the CPU reference on a machine without a GPU, as EmulatedCudaOps.*.
#include "tests/emulated_runtime.h"

// The included test file keeps its fixture in an anonymous namespace, as it
// should as a file of its own; GCC warns about that only in an included file.
#pragma GCC diagnostic ignored "-Wsubobject-linkage"

#define CudaOps EmulatedCudaOps
#include "tests/test_cuda_ops.cpp"
