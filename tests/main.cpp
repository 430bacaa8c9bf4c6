// Test entry point: GoogleTest, plus a closing line in the plain
// "N passed, N failed, N skipped" form that CI reads.
#include <cstdio>
#include <cstdlib>
#include <gtest/gtest.h>

int main(int argc, char** argv) {
    // Arenas start as NaN (engine/arena.h), here and in the prism processes
    // the tests start: an op that leaves an element unwritten fails a test
    // instead of passing on the zero a fresh arena would hold.
    // PRISM_POISON_ARENAS=0 turns it off, to tell a poison failure from another.
    setenv("PRISM_POISON_ARENAS", "1", 0);
    ::testing::InitGoogleTest(&argc, argv);
    const int rc = RUN_ALL_TESTS();
    if (::testing::GTEST_FLAG(list_tests)) return rc;  // nothing ran: no tally
    const auto* u = ::testing::UnitTest::GetInstance();
    // successful_test_count() already leaves skipped tests out.
    std::printf("tests: %d passed, %d failed, %d skipped\n", u->successful_test_count(),
                u->failed_test_count(), u->skipped_test_count());
    return rc;
}
