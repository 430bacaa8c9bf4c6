// attention.cu's launchers, compiled for the emulator (tests/emulated_runtime.h).
#include "tests/emulated_runtime.h"

#include "kernels/cuda/attention.cu"
