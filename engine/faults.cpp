#include "engine/faults.h"
#include <cmath>
#include <csignal>
#include <cstdio>
#include <signal.h>
#include "engine/common.h"

namespace prism {

namespace {

volatile std::sig_atomic_t g_stop = 0;
const int kStopSignals[] = {SIGINT, SIGTERM};
struct sigaction g_previous[2];
bool g_installed = false;

extern "C" void on_stop_signal(int sig) {
    if (g_stop) {  // the second one: let it end the process
        struct sigaction dfl = {};
        dfl.sa_handler = SIG_DFL;
        sigaction(sig, &dfl, nullptr);
        raise(sig);
        return;
    }
    g_stop = sig;
}

std::string number(double x) {
    char buf[32];
    std::snprintf(buf, sizeof buf, "%g", x);
    return buf;
}

}  // namespace

void install_stop_signals() {
    if (g_installed) return;
    g_stop = 0;
    struct sigaction sa = {};
    sa.sa_handler = on_stop_signal;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = SA_RESTART;  // a read or write the signal interrupts goes on
    for (int i = 0; i < 2; i++) PRISM_ASSERT(sigaction(kStopSignals[i], &sa, &g_previous[i]) == 0);
    g_installed = true;
}

void remove_stop_signals() {
    if (!g_installed) return;
    for (int i = 0; i < 2; i++) PRISM_ASSERT(sigaction(kStopSignals[i], &g_previous[i], nullptr) == 0);
    g_installed = false;
    g_stop = 0;
}

int stop_signal() { return int(g_stop); }

bool guard_nonfinite(const TrainConfig& t, int64_t step, double loss, double grad_norm, NonfiniteSkips* skips,
                     const std::string& last_checkpoint, int64_t checkpoint_step) {
    if (std::isfinite(loss) && std::isfinite(grad_norm)) {
        skips->in_a_row = 0;
        return true;
    }
    // Not "good": a run that diverges slowly can write finite but useless
    // weights before the step that overflows. The step lets the user judge.
    const std::string checkpoint = last_checkpoint.empty()
                                       ? std::string("no checkpoint was written yet")
                                       : "the last checkpoint, " + last_checkpoint + ", holds the weights after step " +
                                             std::to_string(checkpoint_step) + ", untouched by this stop";
    const std::string found = "train: loss " + number(loss) + ", gradient norm " + number(grad_norm) + " at step " +
                              std::to_string(step);
    if (t.skip_nonfinite) {
        ++skips->total;
        if (++skips->in_a_row < kMaxSkipsInARow) return false;
        throw UserError(found + ", " + std::to_string(kMaxSkipsInARow) +
                        " non-finite steps in a row: train.skip_nonfinite skips bad batches, but the weights "
                        "themselves now give non-finite values; stopped (skipped steps leave the weights as they "
                        "are, so a checkpoint written since the last finite step holds these same weights: "
                        "restart from an earlier one, with a lower train.lr or train.grad_clip)");
    }
    throw UserError(found + "; stopped before updating the weights; " + checkpoint +
                    " (lower train.lr, set train.grad_clip, or set train.skip_nonfinite=true to skip such steps)");
}

}  // namespace prism
