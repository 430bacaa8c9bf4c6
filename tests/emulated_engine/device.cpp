// device.cu compiled for the emulator (tests/emulated_runtime.h): only in the
// emulated engine (build/prism_emulated_tests), where it stands in for the
// real one.
#include "tests/emulated_runtime.h"

#include "kernels/cuda/device.cu"
