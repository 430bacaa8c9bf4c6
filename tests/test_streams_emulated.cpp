// The emulated runtime's asynchronous streams (tests/emulated_runtime.h,
// PRISM_EMULATE_LATE_STREAMS), which the emulated engine's runs use to show
// that the engine orders its streams itself (Nccl.LateStreams*): queued work
// runs only when the stream gets to it, a late stream only when something
// waits for it, a wait on an event holds a stream until the event's stream has
// run what preceded the record, copies treat pageable and pinned host memory
// as the device does, and a kernel's failure surfaces where its stream runs.
// Each test turns the mode on for itself and marks its own streams late (the
// variable numbers streams by creation, which a test process cannot know).
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <vector>

#include <gtest/gtest.h>

#include "tests/emulated_runtime.h"

using namespace prism;

namespace {

PRISM_KERNEL(32) add_one(float* p, int n) {
    const int i = int(threadIdx.x);
    if (i < n) p[i] += 1.f;
}

PRISM_KERNEL(32) trap(int) { primitives::device_trap("the test's failing kernel"); }

class EmulatedStreams : public ::testing::Test {
protected:
    void SetUp() override {
        saved_ = emulated_streams::mode;
        emulated_streams::mode.async = true;
    }
    void TearDown() override {
        cudaDeviceSynchronize();
        emulated_streams::mode = saved_;
    }
    static cudaStream_t stream(bool late) {
        cudaStream_t s = nullptr;
        EXPECT_EQ(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), cudaSuccess);
        s->late = late;
        return s;
    }
    static float* device_floats(int n) {
        float* p = nullptr;
        EXPECT_EQ(cudaMalloc(&p, sizeof(float) * n), cudaSuccess);
        return p;
    }
    // Zeroes p and adds one to each of its n elements, on s.
    static void write_ones(float* p, int n, cudaStream_t s) {
        ASSERT_EQ(cudaMemsetAsync(p, 0, sizeof(float) * n, s), cudaSuccess);
        PRISM_LAUNCH(dim3(1), 32, 0, s, add_one)(p, n);
    }
    emulated_streams::Mode saved_;
};

}  // namespace

// Device memory is host memory here, so a test can look at it without a
// copy, and see that nothing ran before the stream was waited for.
TEST_F(EmulatedStreams, ALateStreamRunsOnlyWhenSomethingWaitsForIt) {
    const int n = 8;
    float* x = device_floats(n);
    cudaStream_t s = stream(true);
    write_ones(x, n, s);
    EXPECT_TRUE(std::isnan(x[0])) << "a late stream ran before anything waited for it";
    cudaEvent_t e;
    ASSERT_EQ(cudaEventCreate(&e), cudaSuccess);
    ASSERT_EQ(cudaEventRecord(e, s), cudaSuccess);
    float ms = 0;
    EXPECT_EQ(cudaEventElapsedTime(&ms, e, e), cudaErrorNotReady) << "timing before the event completed";
    EXPECT_EQ(cudaEventQuery(e), cudaSuccess);  // runs the stream up to the record
    for (int i = 0; i < n; i++) EXPECT_EQ(x[i], 1.f);
    EXPECT_EQ(cudaEventElapsedTime(&ms, e, e), cudaSuccess);

    cudaStream_t eager = stream(false);
    write_ones(x, n, eager);
    EXPECT_EQ(x[0], 1.f) << "an eager stream runs its work when it is queued";
    cudaEventDestroy(e);
    cudaFree(x);
    cudaStreamDestroy(s);
    cudaStreamDestroy(eager);
}

// The consumer's copy waits for the producer's record; made to run, it makes
// the late producer run first. Without the wait it copies what was there.
TEST_F(EmulatedStreams, AWaitHoldsAStreamUntilTheEventsStreamHasRunToTheRecord) {
    const int n = 4;
    float *x = device_floats(n), *y = device_floats(n), *z = device_floats(n);
    cudaStream_t producer = stream(true), consumer = stream(false);
    cudaEvent_t ready;
    ASSERT_EQ(cudaEventCreateWithFlags(&ready, cudaEventDisableTiming), cudaSuccess);
    float ms = 0;
    EXPECT_EQ(cudaEventElapsedTime(&ms, ready, ready), cudaErrorInvalidValue) << "timing an untimed event";
    write_ones(x, n, producer);
    ASSERT_EQ(cudaEventRecord(ready, producer), cudaSuccess);
    PRISM_LAUNCH(dim3(1), 32, 0, producer, add_one)(x, n);  // after the record: not waited for

    ASSERT_EQ(cudaMemcpyAsync(z, x, sizeof(float) * n, cudaMemcpyDeviceToDevice, consumer), cudaSuccess);
    EXPECT_TRUE(std::isnan(z[0])) << "the unordered copy should have read x before the producer wrote it";

    ASSERT_EQ(cudaStreamWaitEvent(consumer, ready, 0), cudaSuccess);
    ASSERT_EQ(cudaMemcpyAsync(y, x, sizeof(float) * n, cudaMemcpyDeviceToDevice, consumer), cudaSuccess);
    EXPECT_TRUE(std::isnan(y[0])) << "the copy ran before the event it waits for";
    ASSERT_EQ(cudaStreamSynchronize(consumer), cudaSuccess);
    for (int i = 0; i < n; i++) EXPECT_EQ(y[i], 1.f) << "the copy sees the work before the record, not after";
    EXPECT_EQ(x[0], 1.f) << "the producer ran only as far as the record";
    ASSERT_EQ(cudaStreamSynchronize(producer), cudaSuccess);
    EXPECT_EQ(x[0], 2.f);
    cudaEventDestroy(ready);
    for (float* p : {x, y, z}) cudaFree(p);
    cudaStreamDestroy(producer);
    cudaStreamDestroy(consumer);
}

// Pageable memory: the bytes are taken at the call (to the device), or the
// call returns once they have landed (to the host). Pinned memory: the bytes
// move when the stream runs the copy, so the host must not touch it before.
TEST_F(EmulatedStreams, CopiesTreatPageableAndPinnedHostMemoryAsTheDeviceDoes) {
    const int n = 4;
    float *x = device_floats(n), *y = device_floats(n);
    cudaStream_t s = stream(true);
    std::vector<float> pageable(n, 3.f);
    ASSERT_EQ(cudaMemcpyAsync(x, pageable.data(), sizeof(float) * n, cudaMemcpyHostToDevice, s), cudaSuccess);
    pageable.assign(n, 4.f);
    float* pinned = nullptr;
    ASSERT_EQ(cudaHostAlloc((void**)&pinned, sizeof(float) * n, cudaHostAllocDefault), cudaSuccess);
    for (int i = 0; i < n; i++) pinned[i] = 5.f;
    ASSERT_EQ(cudaMemcpyAsync(y, pinned, sizeof(float) * n, cudaMemcpyHostToDevice, s), cudaSuccess);
    for (int i = 0; i < n; i++) pinned[i] = 6.f;  // the copy has not run: it will take these
    EXPECT_TRUE(std::isnan(x[0]) && std::isnan(y[0]));

    std::vector<float> back(n, 0.f);
    ASSERT_EQ(cudaMemcpyAsync(back.data(), x, sizeof(float) * n, cudaMemcpyDeviceToHost, s), cudaSuccess);
    EXPECT_EQ(back[0], 3.f) << "a copy to pageable memory returns once it has landed";
    EXPECT_EQ(y[0], 6.f) << "the pinned copy ran in stream order, with the bytes of that time";

    PRISM_LAUNCH(dim3(1), 32, 0, s, add_one)(y, n);
    ASSERT_EQ(cudaMemcpyAsync(pinned, y, sizeof(float) * n, cudaMemcpyDeviceToHost, s), cudaSuccess);
    EXPECT_EQ(pinned[0], 6.f) << "a copy to pinned memory is only queued";
    ASSERT_EQ(cudaStreamSynchronize(s), cudaSuccess);
    EXPECT_EQ(pinned[0], 7.f);
    cudaFreeHost(pinned);
    cudaFree(x);
    cudaFree(y);
    cudaStreamDestroy(s);
}

// A bad launch is refused at the launch; a kernel that fails does so when its
// stream runs it, and the call that made it run throws.
TEST_F(EmulatedStreams, AKernelFailsWhereItsStreamRunsIt) {
    cudaStream_t s = stream(true);
    EXPECT_THROW(PRISM_LAUNCH(dim3(0), 32, 0, s, trap)(0), std::runtime_error);
    PRISM_LAUNCH(dim3(1), 32, 0, s, trap)(0);
    try {
        cudaStreamSynchronize(s);
        ADD_FAILURE() << "the failing kernel never ran";
    } catch (const std::runtime_error& e) {
        EXPECT_NE(std::string(e.what()).find("the test's failing kernel"), std::string::npos) << e.what();
    }
    EXPECT_EQ(cudaStreamQuery(s), cudaSuccess) << "the failed kernel is no longer queued";
    // The calls destructors make answer a failure with the device's error
    // code (and print it), instead of throwing out of a destructor.
    PRISM_LAUNCH(dim3(1), 32, 0, s, trap)(0);
    EXPECT_EQ(cudaStreamDestroy(s), cudaErrorLaunchFailure);
}

// Freeing device memory waits for the queued work; a stream-ordered free
// gives the memory back only when its stream gets there.
TEST_F(EmulatedStreams, FreeingWaitsForTheWorkThatMayUseTheMemory) {
    const int n = 4;
    float *x = device_floats(n), *y = device_floats(n);
    cudaStream_t s = stream(true);
    write_ones(x, n, s);
    write_ones(y, n, s);
    ASSERT_EQ(cudaFreeAsync(x, s), cudaSuccess);
    EXPECT_TRUE(emulated_in_allocation(x, sizeof(float) * n)) << "freed before the stream got there";
    EXPECT_EQ(cudaFreeAsync(x, s), cudaErrorInvalidValue) << "a second free of the same memory";
    EXPECT_EQ(cudaFree(x), cudaErrorInvalidValue) << "a second free of the same memory";
    EXPECT_TRUE(std::isnan(y[0]));
    ASSERT_EQ(cudaFree(y), cudaSuccess);  // runs everything queued first, so x goes too
    EXPECT_FALSE(emulated_in_allocation(x, sizeof(float) * n));
    cudaStreamDestroy(s);
}

// The legacy default stream (0) and the blocking streams wait for each
// other's earlier work: a plain cudaMemcpy after a blocking stream's kernel
// sees its result, as the CUDA ops' tests rely on.
TEST_F(EmulatedStreams, TheLegacyStreamAndBlockingStreamsWaitForEachOther) {
    const int n = 4;
    float* x = device_floats(n);
    cudaStream_t blocking = nullptr;
    ASSERT_EQ(cudaStreamCreate(&blocking), cudaSuccess);
    blocking->late = true;
    write_ones(x, n, blocking);
    std::vector<float> back(n, 0.f);
    ASSERT_EQ(cudaMemcpy(back.data(), x, sizeof(float) * n, cudaMemcpyDeviceToHost), cudaSuccess);
    EXPECT_EQ(back[0], 1.f);
    cudaFree(x);
    cudaStreamDestroy(blocking);
}
