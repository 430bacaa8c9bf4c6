// bf16 on the host for the GPU tests and the CPU emulation of the kernels:
// the engine's own conversions (kernels/bf16.h), under the tests' namespace.
#pragma once
#include "kernels/bf16.h"

#include <cstdint>
#include <vector>

namespace prism::testing {
using prism::bf16_bits;
using prism::bf16_value;

inline std::vector<uint16_t> to_bf16(const std::vector<float>& v) {
    std::vector<uint16_t> out(v.size());
    for (size_t i = 0; i < v.size(); i++) out[i] = bf16_bits(v[i]);
    return out;
}
inline std::vector<float> widen(const std::vector<uint16_t>& v) {
    std::vector<float> out(v.size());
    for (size_t i = 0; i < v.size(); i++) out[i] = bf16_value(v[i]);
    return out;
}
}  // namespace prism::testing
