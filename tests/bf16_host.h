// bf16 on the host for the GPU tests and the CPU emulation of the kernels:
// the engine's own conversions (kernels/bf16.h), under the tests' namespace.
#pragma once
#include "kernels/bf16.h"

namespace prism::testing {
using prism::bf16_bits;
using prism::bf16_value;
}  // namespace prism::testing
