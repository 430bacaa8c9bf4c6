// linear.cu built as without cuBLAS, for the emulator (tests/emulated_runtime.h):
// its ops throw saying so. The tests that call them skip first ("cuBLAS is
// not emulated"); test_linear_emulated.cpp checks the kernels around the
// products instead.
#include "tests/emulated_runtime.h"

#undef PRISM_CUBLAS
#include "kernels/cuda/linear.cu"
