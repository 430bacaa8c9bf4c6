// Finite-difference gradient checking in float64, shared by the op and model tests.
#pragma once
#include <cmath>
#include <functional>
#include <string>
#include <vector>
#include <gtest/gtest.h>
#include "engine/rng.h"

namespace prism::testing {

using Vec = std::vector<double>;

inline Vec randn(size_t n, Rng& rng, double scale = 1.0) {
    Vec v(n);
    for (auto& x : v) x = rng.normal() * scale;
    return v;
}

inline double dot(const Vec& a, const Vec& b) {
    double s = 0;
    for (size_t i = 0; i < a.size(); i++) s += a[i] * b[i];
    return s;
}

// Compares `analytic` with central differences of `loss` w.r.t. x at up to
// `samples` entries (all when x is small). Relative error over the sampled
// entries must be below tol.
inline void expect_gradient(const std::string& what, Vec& x, const Vec& analytic,
                            const std::function<double()>& loss, Rng& rng, int samples = 24,
                            double tol = 1e-6, double h = 1e-6) {
    ASSERT_EQ(x.size(), analytic.size()) << what;
    std::vector<size_t> idx;
    if (x.size() <= size_t(samples)) for (size_t i = 0; i < x.size(); i++) idx.push_back(i);
    else for (int i = 0; i < samples; i++) idx.push_back(rng.below(x.size()));
    double diff2 = 0, ref2 = 0;
    for (size_t i : idx) {
        const double keep = x[i];
        x[i] = keep + h; const double up = loss();
        x[i] = keep - h; const double down = loss();
        x[i] = keep;
        const double numeric = (up - down) / (2 * h);
        diff2 += (numeric - analytic[i]) * (numeric - analytic[i]);
        ref2 += numeric * numeric;
    }
    const double rel = std::sqrt(diff2) / std::max(std::sqrt(ref2), 1e-4);
    EXPECT_LT(rel, tol) << what << ": analytic vs numeric gradient, relative error " << rel;
    EXPECT_FALSE(std::isnan(rel)) << what;
}

}  // namespace prism::testing
