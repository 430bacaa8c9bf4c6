// What a training run shows and records as it goes, on rank 0 only:
// - the progress: on a terminal one line per phase (train, eval) updated in
//   place; otherwise a plain line every train.log_every steps;
// - RUN/metrics.jsonl: one object per logged step ("type": "train") and per
//   evaluation ("type": "eval"), with moevit's routing diagnostics;
// - a router-collapse warning on stderr, at most once per logging window;
// - RUN/routing.json, the per-class routing histogram of each evaluation;
// - the cudaProfilerStart/Stop bracket of --profile-steps on CUDA.
// engine/train.cpp calls it at the points of its loop named below.
#pragma once
#include <chrono>
#include <fstream>
#include <memory>
#include <string>
#include <vector>
#include "engine/config.h"
#include "engine/metrics.h"
#include "engine/train.h"

namespace prism {

class TrainMonitor {
public:
    // channel_names: the data's, for routing.json (may be empty).
    TrainMonitor(const Config& cfg, Device device, const std::string& out_dir, bool verbose,
                 const TrainOptions& opts, int64_t total_steps, int64_t steps_per_epoch,
                 std::vector<std::string> channel_names);
    ~TrainMonitor();
    TrainMonitor(const TrainMonitor&) = delete;
    TrainMonitor& operator=(const TrainMonitor&) = delete;

    void step_begins(int64_t step);       // step counts from 0
    void data_waited(double seconds);     // time this step spent waiting for its batch
    // Where this step's time went: forward, backward, and the gradient
    // all-reduce (data parallel: on GPUs the part backward did not hide).
    void step_phases(double forward_s, double backward_s, double allreduce_s);
    // After the optimizer step; routing_counts = Model::routing_counts() (empty unless moevit).
    // `stops`: this invocation ends after the step (train.stop_after, a stop
    // signal), so its logging window is written even when short.
    void step_done(int64_t step, const Losses& l, int images, double lr, double grad_norm,
                   const std::vector<std::vector<int>>& routing_counts, bool stops = false);
    // An evaluation after `steps` steps over `images` images: the options to
    // give evaluate(), then its result.
    EvalOptions eval_begins(int64_t steps, int64_t images);
    void eval_done(int64_t steps, const EvalResult& r);
    void finish();                        // ends an open progress line

private:
    using Clock = std::chrono::steady_clock;
    void draw(const std::string& text);   // the terminal's updating line
    void print_line(const std::string& text);
    void warn(const std::string& text);
    std::string train_status(int64_t steps_done, double lr, double grad_norm) const;

    Config cfg_;
    Device device_;
    std::string out_dir_;
    bool console_, record_, tty_;
    int64_t total_, per_epoch_;
    int64_t profile_first_, profile_last_;
    double peak_flops_, train_flops_per_image_;
    std::ofstream metrics_;
    std::vector<std::string> channel_names_;
    std::unique_ptr<ClassRouting> class_routing_;

    Clock::time_point start_, window_start_, eval_start_, last_draw_;
    double eval_seconds_ = 0;
    bool line_open_ = false, profiling_ = false;
    // The logging window.
    double data_s_ = 0, loss_ = 0, aux_ = 0, z_ = 0;
    double forward_s_ = 0, backward_s_ = 0, allreduce_s_ = 0;
    int64_t images_ = 0, correct_ = 0, steps_ = 0;
    RoutingWindow routing_;
};

// "1h02m", "3m05s", "12s".
std::string format_duration(double seconds);

}  // namespace prism
