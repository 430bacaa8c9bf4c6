// Helpers for the CUDA op tests: device arrays that copy to and from host
// vectors, poisoning (every byte 0xFF: a NaN for floats, -1 for ints), and the
// comparisons against the CPU reference. Built with the CUDA backend, and
// for the emulator (tests/emulated_runtime.h), where device memory is host memory.
#pragma once
#if defined(PRISM_CUDA) || defined(PRISM_EMULATION)
#ifndef PRISM_EMULATION
#include <cuda_runtime.h>
#endif

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include <gtest/gtest.h>

#include "engine/rng.h"
#include "tests/bf16_host.h"
#include "kernels/cuda_ops.h"

namespace prism::testing {
// The emulated build's helpers differ (other runtime calls): their own names.
#ifdef PRISM_EMULATION
inline namespace emulated {
#endif

inline void cuda_check(cudaError_t e, const char* what) {
    if (e != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(e));
}

// A device copy of a host vector. download() waits for the whole device, so
// the ops' streams need no separate synchronization in the tests.
template <class T>
class DeviceArray {
public:
    DeviceArray() = default;
    explicit DeviceArray(size_t n) : n_(n) {
        if (n) cuda_check(cudaMalloc(&p_, n * sizeof(T)), "cudaMalloc");
    }
    explicit DeviceArray(const std::vector<T>& host) : DeviceArray(host.size()) { upload(host); }
    DeviceArray(DeviceArray&& o) noexcept : p_(std::exchange(o.p_, nullptr)), n_(o.n_) {}
    DeviceArray& operator=(DeviceArray&& o) noexcept {
        std::swap(p_, o.p_);
        std::swap(n_, o.n_);
        return *this;
    }
    ~DeviceArray() {
        if (p_) cudaFree(p_);
    }
    T* get() const { return p_; }
    size_t size() const { return n_; }
    void upload(const std::vector<T>& host) {
        if (host.size() != n_) throw std::runtime_error("DeviceArray::upload: size mismatch");
        cuda_check(cudaDeviceSynchronize(), "before upload");
        if (n_) cuda_check(cudaMemcpy(p_, host.data(), n_ * sizeof(T), cudaMemcpyHostToDevice), "upload");
    }
    std::vector<T> download() const {
        std::vector<T> host(n_);
        cuda_check(cudaDeviceSynchronize(), "op (asynchronous error)");
        if (n_) cuda_check(cudaMemcpy(host.data(), p_, n_ * sizeof(T), cudaMemcpyDeviceToHost), "download");
        return host;
    }
    // Every byte 0xFF, so an element the op should write but does not stays NaN (or -1).
    void poison() {
        cuda_check(cudaDeviceSynchronize(), "before poison");
        if (n_) cuda_check(cudaMemset(p_, 0xFF, n_ * sizeof(T)), "poison");
    }

private:
    T* p_ = nullptr;
    size_t n_ = 0;
};

template <class T>
DeviceArray<T> to_device(const std::vector<T>& host) {
    return DeviceArray<T>(host);
}

// The host side of poisoning: the reference's outputs start as the same
// bytes, so the comparison knows which elements the reference left alone.
template <class T>
std::vector<T> poisoned(size_t n) {
    std::vector<T> v(n);
    if (n) std::memset(v.data(), 0xFF, n * sizeof(T));
    return v;
}
inline bool is_poison(float x) {
    uint32_t bits;
    std::memcpy(&bits, &x, 4);
    return bits == 0xFFFFFFFFu;
}

// widen, but a poisoned bf16 element (0xFFFF: never written) becomes the fp32
// poison, so that expect_close tells unwritten elements from written ones.
inline std::vector<float> widen_keeping_poison(const std::vector<uint16_t>& v) {
    std::vector<float> out = widen(v);
    for (size_t i = 0; i < v.size(); i++)
        if (v[i] == 0xFFFFu) std::memset(&out[i], 0xFF, sizeof(float));
    return out;
}

inline std::vector<float> randn_f(size_t n, Rng& rng, double scale = 1.0, double shift = 0.0) {
    std::vector<float> v(n);
    for (auto& x : v) x = float(rng.normal() * scale + shift);
    return v;
}

// ‖got − ref‖/‖ref‖ over the elements the reference wrote (NaN when the
// device left any of them unwritten or wrote a non-finite value); elements
// the reference left as poison must be poison on the device too. Prints one
// line per comparison, the per-op error table of a GPU run.
inline void expect_close(const std::string& what, const std::vector<float>& got,
                         const std::vector<float>& ref, double tol = 1e-5) {
    ASSERT_EQ(got.size(), ref.size()) << what;
    double diff2 = 0, ref2 = 0;
    size_t stray = 0, bad = 0;
    for (size_t i = 0; i < ref.size(); i++) {
        if (is_poison(ref[i])) {
            stray += !is_poison(got[i]);
            continue;
        }
        if (!std::isfinite(got[i])) bad++;
        const double d = double(got[i]) - double(ref[i]);
        diff2 += d * d;
        ref2 += double(ref[i]) * ref[i];
    }
    const double rel = bad ? NAN : std::sqrt(diff2) / (ref2 > 0 ? std::sqrt(ref2) : 1.0);
    std::printf("[ cuda-vs-cpu ] %-48s rel %.3g\n", what.c_str(), rel);
    EXPECT_LE(rel, tol) << what << ": relative error " << rel << " (" << bad
                        << " elements unwritten or not finite)";
    EXPECT_EQ(stray, 0u) << what << ": wrote " << stray << " elements the reference leaves alone";
}

inline void expect_close_scalar(const std::string& what, double got, double ref, double tol = 1e-5) {
    const double rel = std::fabs(got - ref) / (ref != 0 ? std::fabs(ref) : 1.0);
    std::printf("[ cuda-vs-cpu ] %-48s rel %.3g\n", what.c_str(), rel);
    EXPECT_LE(rel, tol) << what << ": device " << got << ", reference " << ref;
}

template <class T>
void expect_bit_identical(const std::string& what, const std::vector<T>& a, const std::vector<T>& b) {
    ASSERT_EQ(a.size(), b.size()) << what;
    EXPECT_TRUE(a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0)
        << what << ": two runs differ";
}

// A bf16 output that must be the rounding of an fp32 one, bit for bit (the
// bf16 mode's stored matrices: the op rounds the value it would store in
// fp32). A poisoned (unwritten) bf16 element, 0xFFFF, is no rounding of anything.
inline void expect_rounding_of(const std::string& what, const std::vector<uint16_t>& got,
                               const std::vector<float>& full) {
    ASSERT_EQ(got.size(), full.size()) << what;
    size_t wrong = 0, first = got.size();
    for (size_t i = 0; i < got.size(); i++)
        if (got[i] != bf16_bits(full[i])) {
            if (!wrong) first = i;
            wrong++;
        }
    std::printf("[ cuda-bf16   ] %-48s %zu of %zu not the rounding\n", what.c_str(), wrong, got.size());
    EXPECT_EQ(wrong, 0u) << what << ": first at " << first;
}

// An op run twice on the same inputs. Before each run every buffer it writes
// is reset: to its starting values (the gradients a backward adds into), or,
// where none are given, poisoned (outputs the op must write in full, so that
// an unwritten element fails the comparison with the reference). The second
// run must give the same bits; returns the first run's buffers.
using RunBuffers = std::vector<std::pair<DeviceArray<float>*, std::vector<float>>>;
inline std::vector<std::vector<float>> run_twice(const std::string& what, const RunBuffers& buffers,
                                                 const std::function<void()>& op) {
    std::vector<std::vector<float>> runs[2];
    for (int run = 0; run < 2; run++) {
        for (const auto& [dev, init] : buffers) {
            if (init.empty()) dev->poison();
            else dev->upload(init);
        }
        op();
        for (const auto& b : buffers) runs[run].push_back(b.first->download());
    }
    for (size_t i = 0; i < buffers.size(); i++)
        expect_bit_identical(what + ", buffer " + std::to_string(i), runs[0][i], runs[1][i]);
    return runs[0];
}

// A test with its own stream, skipped where no CUDA device is present (the
// emulator is always present).
class CudaStreamTest : public ::testing::Test {
protected:
    void SetUp() override {
#ifndef PRISM_EMULATION
        if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
#endif
        cuda_check(cudaStreamCreate(&stream), "cudaStreamCreate");
    }
    void TearDown() override {
        if (stream) cuda_check(cudaStreamDestroy(stream), "cudaStreamDestroy");
    }
    cudaStream_t stream = nullptr;
};

#ifdef PRISM_EMULATION
}  // inline namespace emulated
#endif
}  // namespace prism::testing
#endif  // PRISM_CUDA || PRISM_EMULATION
