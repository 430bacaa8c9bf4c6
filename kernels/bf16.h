// bf16 on the host, as the device rounds it (nearest even, NaN stays NaN) and
// widens it (exactly). bf16 values are stored as their uint16_t bits.
#pragma once
#include <cstdint>
#include <cstring>

namespace prism {

inline uint16_t bf16_bits(float x) {
    uint32_t u;
    std::memcpy(&u, &x, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
    u += 0x7fffu + ((u >> 16) & 1u);
    return uint16_t(u >> 16);
}

inline float bf16_value(uint16_t b) {
    const uint32_t u = uint32_t(b) << 16;
    float x;
    std::memcpy(&x, &u, 4);
    return x;
}

}  // namespace prism
