// What the emulated-kernel tests (test_routing_emulated.cpp,
// test_reduce_emulated.cpp) share: random inputs and the comparison with the
// CPU reference, one printed line per comparison.
#pragma once
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "engine/rng.h"

namespace prism::testing {

inline std::vector<float> normal(size_t n, Rng& rng, double scale = 1.0, double shift = 0.0) {
    std::vector<float> v(n);
    for (auto& x : v) x = float(shift + scale * rng.normal());
    return v;
}

// after − before: what an op added to an array (the gradient or the step
// alone, which a relative error of the whole array would hide).
inline std::vector<float> change(const std::vector<float>& after, const std::vector<float>& before) {
    std::vector<float> d(after.size());
    for (size_t i = 0; i < d.size(); i++) d[i] = after[i] - before[i];
    return d;
}

// ‖got − ref‖ / ‖ref‖ within tol (NaN, an unwritten element, fails); the
// reference in float or in double.
template <class R>
void expect_close(const std::string& what, const std::vector<float>& got, const std::vector<R>& ref,
                  double tol = 1e-5) {
    ASSERT_EQ(got.size(), ref.size()) << what;
    double d2 = 0, r2 = 0;
    for (size_t i = 0; i < ref.size(); i++) {
        const double d = double(got[i]) - double(ref[i]);
        d2 += d * d;
        r2 += double(ref[i]) * double(ref[i]);
    }
    const double rel = std::sqrt(d2 / (r2 > 0 ? r2 : 1.0));
    std::printf("[ emulated   ] %-56s rel %.3g\n", what.c_str(), rel);
    EXPECT_LE(rel, tol) << what;
}

}  // namespace prism::testing
