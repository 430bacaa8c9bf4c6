// What the training loop does when something goes wrong mid-run: a stop
// signal (SIGINT, SIGTERM) asks for a checkpoint and a clean exit; a NaN or
// Inf in the loss or the gradient norm stops the run before the weights are
// touched, or skips the step (train.skip_nonfinite).
#pragma once
#include <cstdint>
#include <string>
#include "engine/config.h"

namespace prism {

// Installs SIGINT and SIGTERM handlers that only record the signal (async-
// signal-safe); the loop polls stop_signal() once a step. A second signal
// while the first is pending gets the default action (the process ends), so
// a stuck run still dies on a second Ctrl-C. Under MPI the ranks must agree on
// when to stop: poll comm_max(comm, stop_signal()) > 0.
void install_stop_signals();
// Puts back the handlers install_stop_signals replaced, and clears the flag.
void remove_stop_signals();
// 0, or the number of the first stop signal received.
int stop_signal();

// Steps skipped for a non-finite loss or gradient norm: in all, and since
// the last finite one.
struct NonfiniteSkips {
    int64_t total = 0;
    int64_t in_a_row = 0;
};
// train.skip_nonfinite rides out a few bad batches; this many in a row means
// the weights themselves give non-finite values, and skipping would go on
// forever without changing them.
constexpr int64_t kMaxSkipsInARow = 20;

// Call once a step, after the gradient is all-reduced and before the
// optimizer update, with values every rank agrees on: the loss summed over
// ranks and the norm of the reduced gradient. Returns true when both are
// finite (apply the step). Otherwise, with t.skip_nonfinite, counts the skip
// and returns false: the caller leaves weights and moments alone and goes on
// with the next batch. Without it, or at the kMaxSkipsInARow-th skip in a
// row, throws UserError with one line naming the step and last_checkpoint
// (the last state file written, "" if none, at checkpoint_step), which the
// stop leaves as it was.
bool guard_nonfinite(const TrainConfig& t, int64_t step, double loss, double grad_norm, NonfiniteSkips* skips,
                     const std::string& last_checkpoint, int64_t checkpoint_step);

}  // namespace prism
