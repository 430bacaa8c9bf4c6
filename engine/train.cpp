#include "engine/train.h"
#include <algorithm>
#include <csignal>
#include <chrono>
#include <cstring>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>
#include "data/loader.h"
#include "engine/checkpoint.h"
#include "engine/faults.h"
#include "engine/monitor.h"
#include "engine/nccl.h"
#include "engine/optimizer.h"
#include "engine/rng.h"
#include "engine/state.h"
#include "engine/device.h"
#include "kernels/ops.h"

namespace prism {

namespace {
using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point t) {
    return std::chrono::duration<double>(Clock::now() - t).count();
}
}  // namespace

std::vector<int> channels_for_step(const TrainConfig& t, int C, int64_t step) {
    std::vector<int> all(C);
    for (int c = 0; c < C; c++) all[c] = c;
    if (!t.hcs) return all;
    Rng rng(t.seed, kHcsStream, uint64_t(step));
    const int m = 1 + int(rng.below(uint64_t(C)));
    for (int i = 0; i < m; i++) std::swap(all[i], all[i + rng.below(uint64_t(C - i))]);
    all.resize(m);
    std::sort(all.begin(), all.end());
    return all;
}

void check_data_matches(const ShardHeader& h, const ModelConfig& m, const std::string& glob) {
    if (h.channels != m.channels)
        throw UserError(glob + ": shards have " + std::to_string(h.channels) +
                        " channels, model.channels is " + std::to_string(m.channels));
    if (h.height != m.image || h.width != m.image)
        throw UserError(glob + ": shards hold " + std::to_string(h.height) + "x" + std::to_string(h.width) +
                        " images, model.image is " + std::to_string(m.image));
    if (h.num_classes != m.num_classes)
        throw UserError(glob + ": shards have " + std::to_string(h.num_classes) +
                        " classes, model.num_classes is " + std::to_string(m.num_classes));
}

LoaderOptions eval_loader_options(const std::string& glob, int batch, int threads, bool device_input) {
    LoaderOptions o;
    o.pattern = glob;
    o.batch = batch;
    o.train = false;
    o.threads = threads;
    o.device_input = device_input;
    return o;
}

bool stored_input(const DataConfig& data, Device device) { return device == Device::cuda && data.device_input; }

namespace {
// The model's view of a loader batch: its normalized images or, in
// device_input mode, its stored pixels for the model's input step.
void point_at(Batch& b, const LoaderBatch& lb) {
    b.size = lb.size;
    b.labels = lb.labels;
    b.images = lb.images;
    b.stored = {};
    if (lb.raw) b.stored = {lb.raw, lb.pixel, lb.mean, lb.inv_std, lb.aug};
}
}  // namespace

template <class T>
EvalResult evaluate(Model<T>& model, Loader& loader, bool keep_logits, const EvalOptions& opts) {
    const int C = model.config().channels, K = model.config().num_classes;
    loader.seek({});
    Batch b;
    b.channels = opts.channels;
    if (b.channels.empty())
        for (int c = 0; c < C; c++) b.channels.push_back(c);
    EvalResult r;
    r.confusion.assign(size_t(K) * K, 0);
    double loss_sum = 0;
    int64_t correct = 0;
    for (;;) {
        const LoaderBatch& lb = loader.next();
        const int n = lb.size;
        if (n == 0) break;
        point_at(b, lb);
        const Losses l = model.forward(b, /*training=*/false);
        if (l.nonfinite_image >= 0) loader.refuse_nonfinite(lb, l.nonfinite_image);
        loss_sum += l.ce * n;
        correct += l.correct;
        r.count += n;
        if (keep_logits)
            for (int64_t i = 0; i < int64_t(n) * K; i++) r.logits.push_back(float(model.logits()[i]));
        tally_confusion(r.confusion, model.logits(), b.labels, n, K);
        if (opts.routing) {
            std::vector<std::vector<int>> per_block;
            for (int i = 0; i < model.config().depth; i++) per_block.push_back(model.routing_counts_per_image(i));
            opts.routing->add(per_block, b.labels, n);
        }
        if (opts.on_batch) opts.on_batch(r.count);
    }
    r.accuracy = r.count ? double(correct) / r.count : 0;
    r.loss = r.count ? loss_sum / r.count : 0;
    return r;
}
template EvalResult evaluate(Model<float>&, Loader&, bool, const EvalOptions&);
template EvalResult evaluate(Model<double>&, Loader&, bool, const EvalOptions&);

// An evaluation of every rank's share, summed over ranks: every rank returns
// the whole set's loss, accuracy, count and confusion matrix.
static EvalResult reduce_eval(const Comm& comm, EvalResult r) {
    if (comm.size == 1) return r;
    std::vector<double> v = {double(r.count), r.loss * double(r.count), r.accuracy * double(r.count)};
    for (int64_t n : r.confusion) v.push_back(double(n));
    comm_allreduce_sum(comm, v.data(), int64_t(v.size()));
    r.count = int64_t(std::llround(v[0]));
    r.loss = r.count ? v[1] / v[0] : 0;
    r.accuracy = r.count ? double(std::llround(v[2])) / v[0] : 0;
    for (size_t i = 0; i < r.confusion.size(); i++) r.confusion[i] = int64_t(std::llround(v[3 + i]));
    return r;
}

// The per-class routing histograms of every rank's share, summed, so that
// routing.json describes the whole validation set.
static void reduce_class_routing(const Comm& comm, ClassRouting& routing) {
    if (comm.size == 1) return;
    std::vector<double> v(routing.images.begin(), routing.images.end());
    v.insert(v.end(), routing.slots.begin(), routing.slots.end());
    comm_allreduce_sum(comm, v.data(), int64_t(v.size()));  // counts far below 2^53: exact
    for (size_t i = 0; i < routing.images.size(); i++) routing.images[i] = int64_t(std::llround(v[i]));
    for (size_t i = 0; i < routing.slots.size(); i++)
        routing.slots[i] = int64_t(std::llround(v[routing.images.size() + i]));
}

// FNV-1a: cheap proof that every rank holds the same bytes.
static uint64_t fnv1a(const void* data, size_t bytes) {
    uint64_t h = 1469598103934665603ull;
    const auto* p = static_cast<const unsigned char*>(data);
    for (size_t i = 0; i < bytes; i++) h = (h ^ p[i]) * 1099511628211ull;
    return h;
}

static uint64_t weights_hash(Model<float>& model) {
    std::vector<float> params(model.param_elems());
    model.params_to_host(params.data());
    return fnv1a(params.data(), params.size() * sizeof(float));
}

// Every rank must train the same config: a stale file or a --set on one node
// would give the ranks collectives of different sizes, which MPI and NCCL
// do not survive gracefully. Checked before the first of them.
static void check_same_config(const Comm& comm, const Config& cfg) {
    const std::string text = config_to_json(cfg).dump();
    uint64_t mine = fnv1a(text.data(), text.size()), rank0 = mine;
    comm_broadcast(comm, &rank0, sizeof rank0);
    std::vector<double> differs(size_t(comm.size), 0.0);
    differs[size_t(comm.rank)] = mine != rank0 ? 1.0 : 0.0;
    comm_allreduce_sum(comm, differs.data(), int64_t(differs.size()));
    std::string ranks;
    for (int r = 0; r < comm.size; r++)
        if (differs[size_t(r)] > 0) ranks += (ranks.empty() ? "" : ", ") + std::to_string(r);
    if (!ranks.empty())
        throw UserError("train: the config of rank" + std::string(ranks.find(',') == std::string::npos ? " " : "s ") +
                        ranks + " differs from rank 0's (another file, or another --set): every rank must run "
                        "the same command");
}

TrainResult train(const Config& cfg, Device device, const std::string& out_dir, bool verbose,
                  const TrainOptions& opts) {
    const ModelConfig& m = cfg.model;
    const TrainConfig& t = cfg.train;
    const Comm world_of_one;
    const Comm& comm = opts.comm ? *opts.comm : world_of_one;
    const bool lead = comm.rank == 0;  // logs, evaluates the reduced result, writes checkpoints
    verbose = verbose && lead;
    // GPU ranks sum device memory through NCCL (engine/nccl.h): the caller
    // made the communicator (prism train does, with comm_init_nccl).
    if (device == Device::cuda && comm.size > 1 && !comm.nccl)
        throw UserError("--device cuda with " + std::to_string(comm.size) +
                        " ranks needs NCCL, and there is no NCCL communicator (a build without NCCL, or "
                        "comm_init_nccl was not called); --device cpu trains data parallel over MPI");
    const bool nccl = device == Device::cuda && comm.nccl;
    if (comm.size > 1) check_same_config(comm, cfg);
    if (cfg.data.train.empty())
        throw UserError(opts.config_origin + ": data.train is empty (a glob of training shards)");
    if (t.steps == 0 && t.epochs == 0) throw UserError(opts.config_origin + ": set train.steps or train.epochs");

    LoaderOptions lo;
    lo.pattern = cfg.data.train;
    lo.batch = t.batch;
    lo.seed = t.seed;
    lo.augment = augment_from_name(cfg.data.augment);
    lo.threads = cfg.data.threads;
    lo.device_input = stored_input(cfg.data, device);
    lo.rank = comm.rank;
    lo.world = comm.size;
    Loader loader(lo);
    check_data_matches(loader.shape(), m, cfg.data.train);
    std::unique_ptr<Loader> val_data;
    if (!cfg.data.val.empty()) {
        LoaderOptions vo = eval_loader_options(cfg.data.val, t.batch, cfg.data.threads, lo.device_input);
        vo.rank = comm.rank;
        vo.world = comm.size;
        val_data = std::make_unique<Loader>(vo);
        check_data_matches(val_data->shape(), m, cfg.data.val);
    }
    const int64_t per_epoch = loader.batches_per_epoch();
    const int64_t total = t.steps > 0 ? t.steps : int64_t(std::ceil(t.epochs * per_epoch));
    const int64_t warmup = t.warmup_steps > 0 ? t.warmup_steps : int64_t(std::llround(t.warmup_epochs * per_epoch));
    if (verbose)
        std::printf("train: %s, %lld images (%lld steps/epoch), %lld steps, batch %d (%d rank%s of %d), device %s\n",
                    m.arch.c_str(), (long long)loader.count(), (long long)per_epoch, (long long)total, t.batch,
                    comm.size, comm.size == 1 ? "" : "s", loader.local_batch(), device_description(device).c_str());

    Model<float> model(m, loader.local_batch(), verbose, device, bf16_mode(t.precision, device));
    if (verbose && model.bf16_matmul())
        std::printf("precision: bf16 inputs to the matrix products (fp32 accumulation), LayerNorm, fc1, GELU "
                    "and (head dim 64) attention inputs and outputs stored in bf16, everything else fp32%s\n",
                    t.precision == "auto" ? " (train.precision auto on CUDA; fp32 to turn it off)" : "");
    if (verbose && lo.device_input)
        std::printf("input: %s pixels go up as stored and are normalized%s on the GPU (data.device_input)\n",
                    dtype_name(loader.shape().dtype), lo.augment != Augment::none ? " and augmented" : "");
    if (verbose && device == Device::cpu && t.precision == "bf16")
        std::printf("precision: train.precision bf16 applies on CUDA only; the CPU computes in fp32\n");
    model.init_weights(t.seed);
    // Data parallel. The CPU sums host memory over MPI after backward. GPU
    // ranks (also a world of one under mpirun, so that the path can be
    // checked on one GPU) sum device memory with NCCL: the gradients on a
    // stream of their own, each range as soon as backward has written it
    // (train.overlap_comm), and the load-balance statistics on the model's stream.
    // ZeRO-1 (train.zero): each rank keeps the moments of its shard, gets the
    // summed gradients of that shard alone, and all-gathers the parameters
    // after its update (engine/optimizer.h).
    AdamW<float> opt(t, model.param_elems(), verbose, device, t.zero ? &comm : nullptr);
    if (verbose && t.zero && comm.size == 1) std::printf("train.zero=1 with one rank: nothing to shard\n");
    std::unique_ptr<GradAllReduce> grad_reduce;
    if (nccl) {
        grad_reduce = std::make_unique<GradAllReduce>(comm, model.grads(), model.param_elems(), model.exec().stream,
                                                      t.overlap_comm, opt.sharded());
        if (t.overlap_comm)
            model.set_on_grads_ready(
                [&grad_reduce](int64_t offset, int64_t count) { grad_reduce->ready(offset, count); });
        model.set_reduce_over_ranks(
            [&comm, &model](double* x, int64_t n) { nccl_allreduce_sum(comm, x, n, model.exec().stream); });
        if (verbose)
            std::printf("comm: %s; gradients %s %s\n", nccl_description(comm).c_str(),
                        opt.sharded() ? "reduced to the ranks that own them (ZeRO-1)" : "all-reduced",
                        t.overlap_comm ? "block by block, overlapped with backward (train.overlap_comm)"
                                       : "at once after backward (train.overlap_comm=false)");
    } else if (comm.size > 1) {
        model.set_reduce_over_ranks([&comm](double* x, int64_t n) { comm_allreduce_sum(comm, x, n); });
    }

    // Resume: weights, moments and counters from the state file; the loader
    // continues at the batch the interrupted run would have drawn next.
    ResumePoint at;
    std::string last_state;  // the newest complete state file, named when a run stops
    int64_t last_state_step = 0;
    if (!opts.resume_dir.empty()) {
        last_state = join_path(opts.resume_dir, kTrainStateFile);
        at = load_train_state(last_state, cfg, model, opt);
        last_state_step = at.step;
        loader.seek({at.epoch, at.batch_index});
        if (at.step > total)
            throw UserError("resume: " + last_state + " is at step " + std::to_string(at.step) + ", past this run's " +
                            std::to_string(total) + " steps (raise train.steps, or train.epochs)");
        const char* left = at.step < total ? ""
                           : val_data      ? "; the run has all its steps, only the final evaluation is left"
                                           : "; the run has all its steps and no data.val: nothing is left to do";
        if (verbose)
            std::printf("resume: %s at step %lld (epoch %lld, batch %lld)%s\n", last_state.c_str(),
                        (long long)at.step, (long long)at.epoch, (long long)at.batch_index, left);
    }
    const int64_t stop_at = t.stop_after > 0 ? std::min(total, at.step + t.stop_after) : total;

    TrainOptions monitor_opts = opts;
    monitor_opts.rank = comm.rank;
    // Progress, metrics.jsonl, config.json, routing diagnostics, profiler bracket.
    TrainMonitor monitor(cfg, device, lead ? out_dir : "", verbose, monitor_opts, total, per_epoch,
                         loader.shape().channel_names);
    auto run_eval = [&](int64_t step) {
        const EvalOptions eo = monitor.eval_begins(step, val_data->count());
        EvalResult r = reduce_eval(comm, evaluate(model, *val_data, false, eo));
        if (eo.routing) reduce_class_routing(comm, *eo.routing);
        monitor.eval_done(step, r);
        return r;
    };
    NonfiniteSkips skips;
    skips.total = at.skipped_steps;
    auto checkpoint = [&](int64_t steps_done) {
        if (out_dir.empty()) return;
        const LoaderPosition pos = loader.position();
        // A sharded optimizer's moments are gathered from every rank: all take part.
        if (lead || opt.sharded())
            save_training_checkpoint(out_dir, model, opt, cfg, {steps_done, skips.total, pos.epoch, pos.batch}, lead);
        comm_barrier(comm);  // no rank runs ahead of a checkpoint it may need
        last_state = join_path(out_dir, kTrainStateFile);
        last_state_step = steps_done;
    };

    TrainResult result;
    // Step phases for the final summary (metrics.jsonl has them per window);
    // the first step of this invocation warms up and is left out.
    double phase_sum[3] = {0, 0, 0};
    int64_t phase_steps = 0;
    const auto start = Clock::now();
    install_stop_signals();
    int64_t step = at.step;
    for (; step < stop_at; step++) {
        monitor.step_begins(step);
        const auto data_start = Clock::now();
        const LoaderBatch& lb = loader.next();
        Batch b;
        point_at(b, lb);
        b.channels = channels_for_step(t, m.channels, step);
        b.first_image = int64_t(comm.rank) * loader.local_batch();
        monitor.data_waited(seconds_since(data_start));

        // forward() reads the losses back: its time is the device's too.
        const auto forward_start = Clock::now();
        const Losses l = model.forward(b, /*training=*/true, Rng(t.seed, kDropPathStream, step).next());
        if (l.nonfinite_image >= 0) loader.refuse_nonfinite(lb, l.nonfinite_image);
        const double forward_s = seconds_since(forward_start);
        double backward_s = 0, allreduce_s = 0;
        const auto backward_start = Clock::now();
        if (grad_reduce) grad_reduce->begin();
        model.backward();
        // Data parallel: every rank's loss is the mean over its equal share,
        // so the global gradient is the mean of the ranks' gradients.
        // The loss and any rank's stop signal share one small reduction.
        double loss = l.total, stop = double(stop_signal());
        if (grad_reduce) {
            // Queued behind the all-reduces; the host goes on to the loss's
            // reduction meanwhile and waits below.
            grad_reduce->end();
            op::scale_inplace(model.exec(), model.grads(), model.param_elems(), 1.0f / float(comm.size));
        } else if (comm.size > 1) {
            backward_s = seconds_since(backward_start);
            const auto allreduce_start = Clock::now();
            const Shard mine = opt.shard();  // all of them without ZeRO-1
            if (opt.sharded())
                comm_reduce_scatter_sum(comm, model.grads(), model.param_elems());
            else
                comm_allreduce_sum(comm, model.grads(), model.param_elems());
            ops::scale_inplace(model.grads() + mine.begin, mine.size(), 1.0f / float(comm.size));
            allreduce_s = seconds_since(allreduce_start);
        } else {
            op::sync(model.exec());  // CUDA: backward was only queued (grad_norm waits for it anyway)
            backward_s = seconds_since(backward_start);
        }
        if (comm.size > 1) {
            double both[2] = {loss, stop};
            comm_allreduce_sum(comm, both, 2);
            loss = both[0] / comm.size;
            stop = both[1];
        }
        if (grad_reduce) {
            // Measured on the GPU: backward, then how long the model's stream
            // still waited for the all-reduces (what overlap did not hide).
            const GradReduceTimes gt = grad_reduce->wait();
            backward_s = gt.backward_s;
            allreduce_s = gt.exposed_s;
        }
        monitor.step_phases(forward_s, backward_s, allreduce_s);
        if (step > at.step || stop_at - at.step == 1) {
            phase_sum[0] += forward_s, phase_sum[1] += backward_s, phase_sum[2] += allreduce_s;
            phase_steps++;
        }
        const double lr = learning_rate(t, step, total, warmup);
        const double grad_norm = opt.grad_norm(model);
        if (guard_nonfinite(t, step, loss, grad_norm, &skips, last_state, last_state_step))
            opt.apply(model, lr, grad_norm);

        monitor.step_done(step, l, b.size, lr, grad_norm, model.routing_counts(), step + 1 == stop_at || stop > 0);
        const bool last = step + 1 == total;
        if (val_data && t.eval_every > 0 && (step + 1) % t.eval_every == 0 && !last) run_eval(step + 1);
        if (t.checkpoint_every > 0 && (step + 1) % t.checkpoint_every == 0 && step + 1 < stop_at) checkpoint(step + 1);
        if (stop > 0) {
            const int sig = stop_signal() ? stop_signal() : SIGTERM;  // another rank's signal: stop alike
            step++;
            checkpoint(step);
            result.stop_signal = sig;
            break;
        }
    }
    monitor.finish();
    if (verbose && phase_steps > 0) {
        const double n = double(phase_steps);
        std::string allreduce;
        char buf[200];
        if (nccl) {
            std::snprintf(buf, sizeof buf, ", then %.2f ms waiting for the gradient all-reduce (%lld per step, %s)",
                          1e3 * phase_sum[2] / n, (long long)grad_reduce->calls_per_step(),
                          t.overlap_comm ? "overlapped with backward" : "after backward: train.overlap_comm=false");
            allreduce = buf;
        } else if (comm.size > 1) {
            std::snprintf(buf, sizeof buf, ", gradient %s %.2f ms", opt.sharded() ? "reduce-scatter" : "all-reduce",
                          1e3 * phase_sum[2] / n);
            allreduce = buf;
        }
        std::printf("train: step phases, mean of %lld step%s%s: forward %.2f ms, backward %.2f ms%s\n",
                    (long long)phase_steps, phase_steps == 1 ? "" : "s",
                    phase_steps < step - at.step ? " (the first left out)" : "", 1e3 * phase_sum[0] / n,
                    1e3 * phase_sum[1] / n, allreduce.c_str());
    }

    // Every rank applied the same reduced gradients: the weights must agree bit for bit.
    if (comm.size > 1) {
        uint64_t mine = weights_hash(model), rank0 = mine;
        comm_broadcast(comm, &rank0, sizeof rank0);
        if (comm_max(comm, mine != rank0 ? 1.0 : 0.0) > 0)
            throw UserError("train: the ranks' weights differ after step " + std::to_string(step) +
                            " (a non-deterministic reduction?)");
        if (verbose) std::printf("train: weights identical on all %d ranks\n", comm.size);
    }
    result.steps = step;
    result.seconds = seconds_since(start);
    result.position = loader.position();
    result.skipped_steps = skips.total;
    const std::string resume_hint =
        out_dir.empty() ? "; nothing was saved (no --out)" : "; resume with --resume " + out_dir;
    if (result.stop_signal) {
        remove_stop_signals();
        if (verbose)
            std::printf("train: stopped by signal %d after step %lld%s\n", result.stop_signal, (long long)step,
                        resume_hint.c_str());
        return result;
    }
    // The checkpoint comes before the final evaluation, and the stop signals
    // go back to their defaults once it is written: Ctrl-C during the
    // evaluation then ends the process at once and loses no training
    // (--resume runs the evaluation alone). A resumed run with no step left
    // has nothing new to write.
    const bool write = step > at.step || opts.resume_dir.empty();
    if (write) checkpoint(step);
    // A stop asked for since the loop last looked (during that checkpoint,
    // say) skips the evaluation; the ranks agree on it, as in the loop.
    const int late_signal = int(comm.size > 1 ? comm_max(comm, double(stop_signal())) : stop_signal());
    remove_stop_signals();
    if (verbose && write && !out_dir.empty())
        std::printf("wrote %s/model.safetensors and %s\n", out_dir.c_str(), kTrainStateFile);
    if (late_signal) {
        result.stop_signal = late_signal;
        if (verbose)
            std::printf("train: stopped by signal %d before the final evaluation%s\n", late_signal,
                        resume_hint.c_str());
        return result;
    }
    if (val_data) result.val = run_eval(step);
    if (verbose && step < total)
        std::printf("train: stopped after step %lld of %lld (train.stop_after)%s\n", (long long)step,
                    (long long)total, resume_hint.c_str());
    if (verbose) std::printf("train: %lld steps in %.1f s%s\n", (long long)(step - at.step), result.seconds,
                             skips.total ? (", " + std::to_string(skips.total) + " skipped (non-finite)").c_str() : "");
    return result;
}

}  // namespace prism
