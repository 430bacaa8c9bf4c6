// Inputs of the routing tests (test_cuda_ops.cpp on the GPU,
// test_routing_emulated.cpp on the CPU): router logits with exact ties and
// top-k picks with empty groups.
#pragma once
#include <cmath>
#include <numeric>
#include <utility>
#include <vector>

#include "engine/rng.h"

namespace prism::testing {

// Logits on a grid of 1/8: equal values tie exactly on both sides (testing
// ties → lower channel), unequal ones differ far beyond rounding.
inline std::vector<float> grid_logits(size_t n, Rng& rng) {
    std::vector<float> v(n);
    for (auto& x : v) x = float(std::round(rng.normal() * 4.0) / 8.0);
    return v;
}

// Experts [T, k] of distinct positions: drawn from the first `allowed`
// positions only (the other groups stay empty), or from all of them.
inline std::vector<int> random_experts(int64_t T, int k, int allowed, Rng& rng) {
    std::vector<int> e(T * k), pool(allowed);
    for (int64_t t = 0; t < T; t++) {
        std::iota(pool.begin(), pool.end(), 0);
        for (int j = 0; j < k; j++) {
            std::swap(pool[j], pool[j + rng.below(allowed - j)]);
            e[t * k + j] = pool[j];
        }
    }
    return e;
}

}  // namespace prism::testing
