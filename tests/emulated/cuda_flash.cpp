// tests/test_cuda_flash.cpp for the emulator: the flash attention ops at the
// small shapes, through flash_attention.cu's launchers (the routed work lists
// made on the "device" from the offsets included), against the CPU reference
// on a machine without a GPU, as EmulatedCudaFlash.*.
#include "tests/emulated_runtime.h"

// The included test file keeps its fixture in an anonymous namespace, as it
// should as a file of its own; GCC warns about that only in an included file.
#pragma GCC diagnostic ignored "-Wsubobject-linkage"

#define CudaFlash EmulatedCudaFlash
#include "tests/test_cuda_flash.cpp"
