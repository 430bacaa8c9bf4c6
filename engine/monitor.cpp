#include "engine/monitor.h"
#include <cstdio>
#include <sys/ioctl.h>
#include <unistd.h>
#include "engine/device.h"
#include "engine/flops.h"

namespace prism {

namespace {
double seconds_between(std::chrono::steady_clock::time_point a, std::chrono::steady_clock::time_point b) {
    return std::chrono::duration<double>(b - a).count();
}
// Terminal width, so that the updating line never wraps (a wrapped line
// cannot be rewritten with '\r').
size_t terminal_columns() {
    struct winsize ws {};
    if (ioctl(STDOUT_FILENO, TIOCGWINSZ, &ws) == 0 && ws.ws_col > 0) return ws.ws_col;
    return 120;
}
}  // namespace

std::string format_duration(double seconds) {
    const long s = long(seconds + 0.5);
    char buf[32];
    if (s >= 3600) std::snprintf(buf, sizeof buf, "%ldh%02ldm", s / 3600, (s / 60) % 60);
    else if (s >= 60) std::snprintf(buf, sizeof buf, "%ldm%02lds", s / 60, s % 60);
    else std::snprintf(buf, sizeof buf, "%lds", s);
    return buf;
}

// Whether progress may redraw one line in place. Open MPI's mpirun hands a
// rank's output on through a pseudo-terminal even when the job's output goes
// to a file, so under an MPI launcher the redraws would land in the log:
// plain lines there.
static bool may_redraw(const TrainOptions& opts) {
    const bool under_mpi = opts.comm && opts.comm->mpi;
    return !under_mpi && isatty(STDOUT_FILENO);
}

TrainMonitor::TrainMonitor(const Config& cfg, Device device, const std::string& out_dir, bool verbose,
                           const TrainOptions& opts, int64_t total_steps, int64_t steps_per_epoch,
                           std::vector<std::string> channel_names)
    : cfg_(cfg), device_(device), out_dir_(out_dir), console_(verbose && opts.rank == 0),
      record_(!out_dir.empty() && opts.rank == 0), tty_(console_ && may_redraw(opts)),
      total_(total_steps), per_epoch_(steps_per_epoch), profile_first_(opts.profile_first),
      profile_last_(opts.profile_last), peak_flops_(opts.peak_flops),
      train_flops_per_image_(count_flops(cfg.model).train_step_gflops_per_image * 1e9),
      channel_names_(std::move(channel_names)) {
    if (profile_first_ > 0 && (profile_first_ > profile_last_ || profile_last_ > total_))
        throw UserError("--profile-steps " + std::to_string(profile_first_) + ":" + std::to_string(profile_last_) +
                        ": expected A:B with 1 <= A <= B <= " + std::to_string(total_) + " (the run's steps)");
    if (record_) {
        make_dirs(out_dir_);
        write_file_atomic(join_path(out_dir_, "config.json"), config_to_json(cfg_).dump(2) + "\n");
        // A resumed run goes on with the lines of the run it continues.
        metrics_.open(join_path(out_dir_, "metrics.jsonl"), opts.resume_dir.empty() ? std::ios::trunc : std::ios::app);
        if (!metrics_) throw UserError(join_path(out_dir_, "metrics.jsonl") + ": cannot write");
    }
    start_ = window_start_ = last_draw_ = Clock::now();
}

TrainMonitor::~TrainMonitor() {
    if (profiling_) profiler_stop();  // the run ended (or failed) inside the range
}

void TrainMonitor::draw(const std::string& text) {
    const std::string shown = text.substr(0, terminal_columns() - 1);
    std::fprintf(stdout, "\r%s\033[K", shown.c_str());
    std::fflush(stdout);
    line_open_ = true;
    last_draw_ = Clock::now();
}

void TrainMonitor::print_line(const std::string& text) {
    if (tty_) {
        std::fprintf(stdout, "\r%s\033[K\n", text.c_str());
        std::fflush(stdout);
        line_open_ = false;
    } else {
        progress(text);
    }
}

void TrainMonitor::warn(const std::string& text) {
    finish();
    std::fprintf(stderr, "%s\n", text.c_str());
    std::fflush(stderr);
}

void TrainMonitor::finish() {
    if (line_open_) std::fputs("\n", stdout), std::fflush(stdout);
    line_open_ = false;
}

void TrainMonitor::step_begins(int64_t step) {
    if (device_ == Device::cuda && step + 1 == profile_first_) {
        profiler_start();
        profiling_ = true;
    }
}

void TrainMonitor::data_waited(double seconds) { data_s_ += seconds; }

void TrainMonitor::step_phases(double forward_s, double backward_s, double allreduce_s) {
    forward_s_ += forward_s;
    backward_s_ += backward_s;
    allreduce_s_ += allreduce_s;
}

std::string TrainMonitor::train_status(int64_t done, double lr, double grad_norm) const {
    const auto now = Clock::now();
    const double secs = seconds_between(window_start_, now);
    const double train_secs = seconds_between(start_, now) - eval_seconds_;
    const double eta = train_secs / double(done) * double(total_ - done);
    char buf[256];
    std::snprintf(buf, sizeof buf,
                  "step %6lld/%lld | epoch %.2f | loss %.4f | acc %.3f | lr %.2e | |g| %.3f | %.0f img/s | "
                  "data wait %.1f%% | ETA %s",
                  (long long)done, (long long)total_, double(done) / double(per_epoch_), loss_ / double(steps_),
                  double(correct_) / double(images_), lr, grad_norm, double(images_) / secs,
                  100.0 * data_s_ / secs, format_duration(eta).c_str());
    return buf;
}

void TrainMonitor::step_done(int64_t step, const Losses& l, int images, double lr, double grad_norm,
                             const std::vector<std::vector<int>>& routing_counts, bool stops) {
    if (profiling_ && step + 1 == profile_last_) {
        profiler_stop();
        profiling_ = false;
    }
    loss_ += l.total;
    aux_ += l.aux;
    z_ += l.z;
    correct_ += l.correct;
    images_ += images;
    steps_++;
    if (!routing_counts.empty()) routing_.add(routing_counts);
    const int64_t done = step + 1;
    const bool log = done % cfg_.train.log_every == 0 || done == total_ || stops;
    if (tty_ && (log || seconds_between(last_draw_, Clock::now()) >= 0.2)) draw(train_status(done, lr, grad_norm));
    if (!log) return;

    const double secs = seconds_between(window_start_, Clock::now());
    const double ips = double(images_) / secs;
    if (console_ && !tty_) print_line(train_status(done, lr, grad_norm));
    const RoutingSummary routing = summarize_routing(routing_);
    if (record_) {
        nlohmann::json j{{"type", "train"}, {"step", done}, {"epoch", double(done) / double(per_epoch_)},
                         {"loss", loss_ / double(steps_)}, {"accuracy", double(correct_) / double(images_)},
                         {"lr", lr}, {"grad_norm", grad_norm}, {"images_per_s", ips}, {"data_wait_s", data_s_},
                         {"aux_loss", aux_ / double(steps_)}, {"z_loss", z_ / double(steps_)},
                         {"forward_s", forward_s_ / double(steps_)}, {"backward_s", backward_s_ / double(steps_)},
                         {"allreduce_s", allreduce_s_ / double(steps_)},
                         {"time_s", seconds_between(start_, Clock::now())}};
        // MFU: model FLOPs (all channels, forward + backward) per second over the device's peak.
        if (device_ == Device::cuda && peak_flops_ > 0) j["mfu"] = ips * train_flops_per_image_ / peak_flops_;
        if (!routing.shares.empty()) {
            j["routing_shares"] = routing.shares;
            j["routing_entropy"] = routing.entropy;
        }
        metrics_ << j.dump() << "\n" << std::flush;
    }
    const std::string warning = collapse_warning(routing, done, cfg_.model.top_k);
    if (console_ && !warning.empty()) warn(warning);

    window_start_ = Clock::now();
    data_s_ = loss_ = aux_ = z_ = 0;
    forward_s_ = backward_s_ = allreduce_s_ = 0;
    images_ = correct_ = steps_ = 0;
    routing_.clear();
}

EvalOptions TrainMonitor::eval_begins(int64_t steps, int64_t images) {
    eval_start_ = Clock::now();
    EvalOptions o;
    if (cfg_.model.arch == "moevit") {
        class_routing_ = std::make_unique<ClassRouting>(cfg_.model.num_classes, cfg_.model.depth, cfg_.model.channels);
        o.routing = class_routing_.get();
    }
    if (tty_) {
        finish();
        o.on_batch = [this, steps, images](int64_t done) {
            if (done == images || seconds_between(last_draw_, Clock::now()) >= 0.2)
                draw("eval  step " + std::to_string(steps) + " | " + std::to_string(done) + "/" +
                     std::to_string(images) + " images");
        };
    }
    return o;
}

void TrainMonitor::eval_done(int64_t steps, const EvalResult& r) {
    eval_seconds_ += seconds_between(eval_start_, Clock::now());
    if (console_) {
        char buf[160];
        std::snprintf(buf, sizeof buf, "eval  step %lld | val loss %.4f | val acc %.4f (%lld images)",
                      (long long)steps, r.loss, r.accuracy, (long long)r.count);
        print_line(buf);
    }
    if (!record_) return;
    metrics_ << nlohmann::json{{"type", "eval"}, {"step", steps}, {"loss", r.loss}, {"accuracy", r.accuracy},
                               {"count", r.count}}.dump()
             << "\n" << std::flush;
    if (class_routing_) {
        write_file_atomic(join_path(out_dir_, "routing.json"),
                          routing_json(*class_routing_, steps, cfg_.model.top_k, cfg_.model.num_patches(),
                                       channel_names_).dump() + "\n");
    }
}

}  // namespace prism
