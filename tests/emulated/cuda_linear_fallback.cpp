// linear.cu's cublasGemmEx fallback, taken where cuBLASLt's heuristic has no
// algorithm for a bf16 product's shapes or alignments: the emulated linear
// tests (EmulatedCudaOps.*Linear*) run again in a child process with
// PRISM_EMULATED_LT_HEURISTIC=none, under which the emulated heuristic finds
// nothing (tests/emulated_cublas.h). A child, because linear.cu keeps each
// shape's plan for the life of the process.
#include "tests/emulated_runtime.h"
#include "tests/emulated_cublas.h"

#include <gtest/gtest.h>

#include <cstdio>
#include <string>

#include "tests/shellutil.h"

namespace {

using prism::emulated_blas::heuristic_finds_none;

// The child says, at exit, which entry points its products went through.
struct ReportAtExit {
    ~ReportAtExit() {
        if (heuristic_finds_none())
            std::printf("emulated cuBLAS: %lld cublasLtMatmul, %lld cublasGemmEx\n",
                        (long long)prism::emulated_blas::lt_matmul_calls,
                        (long long)prism::emulated_blas::gemm_ex_calls);
    }
} report_at_exit;

}  // namespace

TEST(EmulatedCublas, LinearTestsPassOnTheGemmExFallback) {
    using namespace prism::testing;
    if (heuristic_finds_none()) GTEST_SKIP() << "this is the child run";
    const ShellRun r = run_shell("PRISM_EMULATED_LT_HEURISTIC=none " + build_dir() +
                                 "prism_tests --gtest_filter='EmulatedCudaOps.*Linear*'");
    ASSERT_TRUE(exited_ok(r)) << r.output;
    int passed = -1, failed = -1, skipped = -1;
    long long lt = -1, gemm_ex = -1;
    const size_t tally = r.output.rfind("tests: "), report = r.output.rfind("emulated cuBLAS: ");
    ASSERT_NE(tally, std::string::npos) << r.output;
    ASSERT_NE(report, std::string::npos) << r.output;
    ASSERT_EQ(std::sscanf(r.output.c_str() + tally, "tests: %d passed, %d failed, %d skipped", &passed, &failed,
                          &skipped),
              3);
    ASSERT_EQ(std::sscanf(r.output.c_str() + report, "emulated cuBLAS: %lld cublasLtMatmul, %lld cublasGemmEx", &lt,
                          &gemm_ex),
              2);
    std::printf("[ fallback ] %d linear tests passed with no cuBLASLt algorithm: %lld cublasGemmEx products\n",
                passed, gemm_ex);
    EXPECT_GE(passed, 4) << r.output;  // Linear, LinearBf16, LinearMixed, ExpertLinear
    EXPECT_EQ(failed, 0);
    EXPECT_EQ(skipped, 0);
    EXPECT_EQ(lt, 0) << "a product went through cuBLASLt although its heuristic found nothing";
    EXPECT_GT(gemm_ex, 0);
}
