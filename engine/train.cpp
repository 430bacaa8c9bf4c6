#include "engine/train.h"
#include <algorithm>
#include <chrono>
#include <cstring>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>
#include "data/loader.h"
#include "engine/checkpoint.h"
#include "engine/monitor.h"
#include "engine/optimizer.h"
#include "engine/rng.h"

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

LoaderOptions eval_loader_options(const std::string& glob, int batch, int threads) {
    LoaderOptions o;
    o.pattern = glob;
    o.batch = batch;
    o.train = false;
    o.threads = threads;
    return o;
}

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
        b.images = lb.images;
        b.labels = lb.labels;
        b.size = n;
        const Losses l = model.forward(b, /*training=*/false);
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

TrainResult train(const Config& cfg, Device device, const std::string& out_dir, bool verbose,
                  const TrainOptions& opts) {
    const ModelConfig& m = cfg.model;
    const TrainConfig& t = cfg.train;
    if (device != Device::cpu)
        throw UserError("--device cuda: the CUDA backend's kernels are not implemented yet; use --device cpu");
    if (cfg.data.train.empty()) throw UserError("config: data.train is empty (a glob of training shards)");
    if (t.steps == 0 && t.epochs == 0) throw UserError("config: set train.steps or train.epochs");

    LoaderOptions lo;
    lo.pattern = cfg.data.train;
    lo.batch = t.batch;
    lo.seed = t.seed;
    lo.augment = augment_from_name(cfg.data.augment);
    lo.threads = cfg.data.threads;
    Loader loader(lo);
    check_data_matches(loader.shape(), m, cfg.data.train);
    std::unique_ptr<Loader> val_data;
    if (!cfg.data.val.empty()) {
        val_data = std::make_unique<Loader>(eval_loader_options(cfg.data.val, t.batch, cfg.data.threads));
        check_data_matches(val_data->shape(), m, cfg.data.val);
    }
    const int64_t per_epoch = loader.batches_per_epoch();
    const int64_t total = t.steps > 0 ? t.steps : int64_t(std::ceil(t.epochs * per_epoch));
    const int64_t warmup = t.warmup_steps > 0 ? t.warmup_steps : int64_t(std::llround(t.warmup_epochs * per_epoch));
    if (verbose)
        std::printf("train: %s, %lld images (%lld steps/epoch), %lld steps, batch %d, device cpu\n",
                    m.arch.c_str(), (long long)loader.count(), (long long)per_epoch,
                    (long long)total, t.batch);

    Model<float> model(m, t.batch, verbose);
    model.init_weights(t.seed);
    AdamW<float> opt(t, model.num_params(), verbose);

    // Progress, metrics.jsonl, config.json, routing diagnostics, profiler bracket.
    TrainMonitor monitor(cfg, device, out_dir, verbose, opts, total, per_epoch, loader.shape().channel_names);
    auto run_eval = [&](int64_t step) {
        EvalResult r = evaluate(model, *val_data, false, monitor.eval_begins(step, val_data->count()));
        monitor.eval_done(step, r);
        return r;
    };

    TrainResult result;
    const auto start = Clock::now();
    for (int64_t step = 0; step < total; step++) {
        monitor.step_begins(step);
        const auto data_start = Clock::now();
        const LoaderBatch& lb = loader.next();
        Batch b;
        b.size = lb.size;
        b.images = lb.images;
        b.labels = lb.labels;
        b.channels = channels_for_step(t, m.channels, step);
        monitor.data_waited(seconds_since(data_start));

        const Losses l = model.forward(b, /*training=*/true, Rng(t.seed, kDropPathStream, step).next());
        if (!std::isfinite(l.total))
            throw UserError("train: loss is " + std::to_string(l.total) + " at step " + std::to_string(step) +
                            " (lower train.lr or set train.grad_clip)");
        model.backward();
        const double lr = learning_rate(t, step, total, warmup);
        const double grad_norm = opt.step(model, lr);

        monitor.step_done(step, l, b.size, lr, grad_norm, model.routing_counts());
        const bool last = step + 1 == total;
        if (val_data && t.eval_every > 0 && (step + 1) % t.eval_every == 0 && !last) run_eval(step + 1);
        if (!out_dir.empty() && t.checkpoint_every > 0 && (step + 1) % t.checkpoint_every == 0 && !last)
            save_checkpoint(out_dir + "/model.safetensors", model, cfg);
    }
    monitor.finish();
    result.steps = total;
    result.seconds = seconds_since(start);
    result.position = loader.position();
    if (val_data) result.val = run_eval(total);
    if (!out_dir.empty()) {
        save_checkpoint(out_dir + "/model.safetensors", model, cfg);
        if (verbose) std::printf("wrote %s/model.safetensors\n", out_dir.c_str());
    }
    if (verbose) std::printf("train: %lld steps in %.1f s\n", (long long)total, result.seconds);
    return result;
}

}  // namespace prism
