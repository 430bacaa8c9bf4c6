// tests/test_cuda_ops.cpp for the emulator: every CUDA op, through its
// launcher (tests/emulated/*.cpp) down to its kernels, the cuBLAS ones on the
// host model of tests/emulated_cublas.h, against the CPU reference on a
// machine without a GPU, as EmulatedCudaOps.* (the tiny shape only).
#include "tests/emulated_runtime.h"

// The included test file keeps its fixture in an anonymous namespace, as it
// should as a file of its own; GCC warns about that only in an included file.
#pragma GCC diagnostic ignored "-Wsubobject-linkage"

#define CudaOps EmulatedCudaOps
#include "tests/test_cuda_ops.cpp"
