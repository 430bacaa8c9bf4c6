// Deterministic random numbers, identical on every platform: xoshiro256** seeded
// through splitmix64, and our own Box-Muller (std::normal_distribution is
// implementation-defined, so it would break "same seed, same weights").
#pragma once
#include <cmath>
#include <cstdint>

namespace prism {

inline uint64_t splitmix64(uint64_t& x) {
    uint64_t z = (x += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

struct Rng {
    uint64_t s[4];
    // Streams are keyed by (seed, purpose, index) so that, e.g., step 7's
    // channel subset does not depend on how many numbers step 6 drew.
    explicit Rng(uint64_t seed, uint64_t stream = 0, uint64_t index = 0) {
        uint64_t x = seed ^ (stream * 0xD1B54A32D192ED03ull) ^ (index * 0x8CB92BA72F3D8DD7ull);
        for (auto& v : s) v = splitmix64(x);
    }
    static uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }
    uint64_t next() {
        const uint64_t r = rotl(s[1] * 5, 7) * 9, t = s[1] << 17;
        s[2] ^= s[0]; s[3] ^= s[1]; s[1] ^= s[2]; s[0] ^= s[3]; s[2] ^= t; s[3] = rotl(s[3], 45);
        return r;
    }
    double uniform() { return (next() >> 11) * 0x1.0p-53; }             // [0, 1)
    uint64_t below(uint64_t n) { return uint64_t(uniform() * double(n)); }  // [0, n)
    double normal() {
        const double u1 = 1.0 - uniform(), u2 = uniform();
        return std::sqrt(-2.0 * std::log(u1)) * std::cos(2.0 * M_PI * u2);
    }
    // Normal truncated to [-2σ, 2σ] by resampling (timm's trunc_normal_).
    double trunc_normal(double std) {
        for (;;) { const double z = normal(); if (z >= -2.0 && z <= 2.0) return z * std; }
    }
};

// Stream ids: one per use of randomness in a run.
enum RngStream : uint64_t { kInitStream = 1, kShuffleStream, kHcsStream, kDropPathStream, kAugmentStream,
                            kEvalSubsetStream };

}  // namespace prism
