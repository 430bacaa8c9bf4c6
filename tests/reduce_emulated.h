// common.cuh's launchers of the deterministic reductions (column_sum_as and
// device_sum), for the emulated kernels: the same geometry and scratch
// layout, run through tests/emulator.h. Include after the emulator.
#pragma once
#include <cmath>
#include <vector>

#include "kernels/cuda/reduce.cuh"

namespace prism::testing {

template <class Acc, class Term, class Out>
void column_sum(int batches, int64_t rows, int cols, Term term, Out out) {
    const int chunks = rows > 0 ? reduce::column_chunks(rows) : 0;
    std::vector<Acc> partial((size_t)batches * (chunks > 0 ? chunks : 1) * cols, Acc(NAN));
    if (chunks > 0)
        emu::launch({reduce::column_tiles(cols), (unsigned)chunks, (unsigned)batches}, reduce::kColThreads,
                    reduce::column_partials_smem<Acc>(), reduce::column_partials_kernel<Acc, Term>,
                    reduce::ColumnPartialsParams<Acc, Term>{partial.data(), rows,
                                                            reduce::column_chunk_rows(rows), cols, term});
    emu::launch({reduce::finish_blocks((int64_t)batches * cols)}, reduce::kFinishThreads, 0,
                reduce::column_finish_kernel<Acc, Out>,
                reduce::ColumnFinishParams<Acc, Out>{partial.data(), chunks, cols, batches, out});
}
template <class Term, class Out>
void device_sum(int64_t n, Term term, Out out) {
    const int64_t parts = reduce::sum_parts(n);
    std::vector<double> partial(parts > 0 ? parts : 1, NAN);
    if (parts > 0)
        emu::launch({(unsigned)parts}, reduce::kSumThreads, reduce::sum_smem(), reduce::sum_partials_kernel<Term>,
                    reduce::SumPartialsParams<Term>{partial.data(), n, term});
    emu::launch({1}, reduce::kSumThreads, reduce::sum_smem(), reduce::sum_finish_kernel<Out>,
                reduce::SumFinishParams<Out>{partial.data(), parts, out});
}

}  // namespace prism::testing
