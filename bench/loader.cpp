// `prism bench loader`: throughput of the streaming loader.
#include <chrono>
#include <cstdio>
#include <ctime>

#include "bench/bench.h"
#include "engine/common.h"

namespace prism {

namespace {
using Clock = std::chrono::steady_clock;
double since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

double cpu_seconds() {
    timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return double(ts.tv_sec) + 1e-9 * double(ts.tv_nsec);
}

std::string fmt(const char* f, double a, double b, double c, double d) {
    char buf[256];
    std::snprintf(buf, sizeof buf, f, a, b, c, d);
    return buf;
}
}  // namespace

LoaderBenchResult bench_loader(const LoaderBenchOptions& o, bool verbose) {
    if (!(o.seconds > 0)) throw UserError("--seconds must be > 0");
    // The bound of data.threads, which this stands for.
    if (o.threads < 0 || o.threads > 256)
        throw UserError("--threads " + std::to_string(o.threads) + ": must be in [0, 256] (0 = default)");
    LoaderOptions lo;
    lo.pattern = o.data;
    lo.batch = o.batch;
    lo.threads = o.threads;
    lo.augment = o.augment;
    lo.device_input = o.device_input;
    LoaderBenchResult r;
    r.threads = o.threads > 0 ? o.threads : default_loader_threads();
    const auto open_start = Clock::now();
    Loader loader(lo);
    r.shape = loader.shape();
    const ShardHeader& h = r.shape;
    const double image_mb = double(h.image_bytes()) / 1e6;
    const double out_mb = o.device_input ? image_mb : double(h.channels) * h.height * h.width * 4 / 1e6;
    if (verbose)
        progress("bench loader: " + std::to_string(h.count) + " images " + std::to_string(h.channels) + "x" +
                 std::to_string(h.height) + "x" + std::to_string(h.width) + " " + dtype_name(h.dtype) + ", batch " +
                 std::to_string(o.batch) + ", " + std::to_string(r.threads) + " reader threads, augment " +
                 (o.augment == Augment::none ? "none" : o.augment == Augment::so2sat ? "so2sat" : "jumpcp") +
                 (o.device_input ? ", stored pixels for the device's input step" : ", normalized on the host"));
    loader.next();  // opening and the first batch are start-up, not throughput
    r.first_batch_s = since(open_start);

    const auto start = Clock::now();
    const double cpu_start = cpu_seconds();
    auto shown = start;
    int64_t shown_images = 0;
    while (since(start) < o.seconds) {
        r.images += loader.next().size;
        const double window = std::chrono::duration<double>(Clock::now() - shown).count();
        if (verbose && window >= 1.0) {
            const double ips = double(r.images - shown_images) / window;
            progress(fmt("bench loader: %5.1f s, %.0f images, %.0f images/s, %.0f MB/s", since(start),
                         double(r.images), ips, ips * image_mb));
            shown = Clock::now();
            shown_images = r.images;
        }
    }
    r.seconds = since(start);
    r.cpu_s = cpu_seconds() - cpu_start;
    r.images_per_cpu_s = r.cpu_s > 0 ? double(r.images) / r.cpu_s : 0;
    r.images_per_s = double(r.images) / r.seconds;
    r.mb_per_s = r.images_per_s * image_mb;
    r.out_mb_per_s = r.images_per_s * out_mb;
    return r;
}

nlohmann::json loader_bench_json(const LoaderBenchOptions& o, const LoaderBenchResult& r) {
    const ShardHeader& h = r.shape;
    return {{"bench", "loader"},
            {"images_per_s", r.images_per_s},
            {"mb_per_s", r.mb_per_s},
            {"out_mb_per_s", r.out_mb_per_s},
            {"images", r.images},
            {"seconds", r.seconds},
            {"first_batch_s", r.first_batch_s},
            {"cpu_s", r.cpu_s},
            {"images_per_cpu_s", r.images_per_cpu_s},
            {"shape", {h.channels, h.height, h.width}},
            {"dtype", dtype_name(h.dtype)},
            {"set_images", h.count},
            {"batch", o.batch},
            {"threads", r.threads},
            {"device_input", o.device_input}};
}

}  // namespace prism
