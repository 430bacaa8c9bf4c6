// The streaming loader (data/loader.h).
//
// Batches are numbered by their step s (epoch * batches_per_epoch + index;
// for evaluation just the index). Reader threads claim steps in order, build
// each into slot s % depth of a ring, and mark it ready; next() hands the
// slots out in order. A reader may build step s once the consumer has let go
// of step s - depth, which bounds the queue. Since a batch's content depends
// only on its step, the thread that builds it and when do not matter.
#include "data/loader.h"

#include <algorithm>
#include <climits>
#include <cmath>
#include <condition_variable>
#include <cstring>
#include <mutex>
#include <numeric>
#include <thread>

#include <dirent.h>
#include <sys/resource.h>

#include "engine/common.h"
#include "engine/device.h"
#include "engine/rng.h"

namespace prism {

Augment augment_from_name(const std::string& name) {
    if (name == "none") return Augment::none;
    if (name == "so2sat") return Augment::so2sat;
    if (name == "jumpcp") return Augment::jumpcp;
    throw UserError("data.augment: expected none, so2sat or jumpcp, got \"" + printable(name) + "\"");
}

ops::InputAug draw_augmentation(Augment a, int H, int W, uint64_t seed, uint64_t index) {
    ops::InputAug g;
    if (a == Augment::none) return g;
    Rng rng(seed, kAugmentStream, index);
    if (a == Augment::jumpcp) {
        const int pad_y = H * 16 / 224, pad_x = W * 16 / 224;
        g.dy = int(rng.below(uint64_t(2 * pad_y + 1))) - pad_y;
        g.dx = int(rng.below(uint64_t(2 * pad_x + 1))) - pad_x;
    }
    g.dihedral = H == W ? int(rng.below(8)) : 2 * int(rng.below(4));
    if (a == Augment::jumpcp) {
        g.holes = ops::kMaxHoles;
        g.hole_h = std::min(10, H);
        g.hole_w = std::min(10, W);
        for (int i = 0; i < g.holes; i++) {
            g.hole_y[i] = int(rng.below(uint64_t(H - g.hole_h + 1)));
            g.hole_x[i] = int(rng.below(uint64_t(W - g.hole_w + 1)));
        }
    }
    return g;
}

nlohmann::json position_to_json(const LoaderPosition& p) { return {{"epoch", p.epoch}, {"batch", p.batch}}; }

LoaderPosition position_from_json(const nlohmann::json& j, const std::string& origin) {
    LoaderPosition p;
    for (const char* key : {"epoch", "batch"}) {
        if (!j.is_object() || !j.contains(key) || !j[key].is_number_integer() || j[key].get<int64_t>() < 0)
            throw UserError(origin + ": loader position needs a non-negative integer '" + key + "'");
    }
    p.epoch = j["epoch"].get<int64_t>();
    p.batch = j["batch"].get<int64_t>();
    return p;
}

int default_loader_threads() {
    const unsigned cores = std::thread::hardware_concurrency();
    return int(std::clamp(cores, 1u, 4u));
}

ops::Pixel pixel_of(DType d) {
    switch (d) {
        case DType::u8: return ops::Pixel::u8;
        case DType::u16: return ops::Pixel::u16;
        case DType::f16: return ops::Pixel::f16;
        case DType::f32: return ops::Pixel::f32;
    }
    PRISM_ASSERT(!"bad DType");
    return ops::Pixel::f32;
}

namespace {

struct Shard {
    ShardReader file;
    int64_t first = 0;  // its first sample's index in the set
    std::vector<float> mean, inv_std;
};

struct Slot {
    HostBuffer images, raw;
    std::vector<int32_t> labels;
    std::vector<int64_t> samples;
    std::vector<float> mean, inv_std;
    std::vector<ops::InputAug> aug;
    LoaderBatch batch;
    int64_t step = -1;
    bool ready = false;
    std::string error;
};

// Descriptors open in this process now (other loaders' shards among them),
// or 256 when /proc cannot say.
size_t open_files_now() {
    DIR* d = ::opendir("/proc/self/fd");
    if (!d) return 256;
    size_t n = 0;
    while (::readdir(d)) n++;
    ::closedir(d);
    return n;
}

// Shards may be many (thousands of JUMP-CP shards) and each stays open:
// raise the soft limit on open files as far as the hard limit allows.
void allow_open_files(size_t n) {
    struct rlimit r;
    if (::getrlimit(RLIMIT_NOFILE, &r) != 0) return;
    // In addition to what is open already: training's loader holds its
    // shards open when the validation loader opens its own.
    const rlim_t want = rlim_t(open_files_now() + n) + 64;
    if (r.rlim_cur != RLIM_INFINITY && r.rlim_cur < want) {
        r.rlim_cur = (r.rlim_max == RLIM_INFINITY || r.rlim_max > want) ? want : r.rlim_max;
        ::setrlimit(RLIMIT_NOFILE, &r);
    }
}

}  // namespace

struct Loader::Impl {
    LoaderOptions o;
    std::vector<Shard> shards;
    std::vector<int32_t> labels;  // every sample's, in shard order
    ShardHeader shape;
    int64_t n = 0;                // samples in the set
    int b = 0;                    // this rank's batch
    int64_t lo = 0, hi = 0;       // evaluation: this rank's samples
    int64_t per_epoch = 0;
    size_t image_bytes = 0, image_floats = 0;
    int threads = 1, depth = 2;

    std::mutex perm_mu;  // epoch permutations, computed once, shared by the readers
    std::vector<std::pair<int64_t, std::shared_ptr<const std::vector<int64_t>>>> perms;

    std::mutex mu;  // everything below
    std::condition_variable work_cv, ready_cv;
    std::vector<Slot> slots;
    std::vector<std::thread> readers;
    bool stop = false;
    int64_t next_claim = 0;  // the step a reader builds next
    int64_t free_below = 0;  // the consumer is done with every step before this
    int64_t next_out = 0;    // the step next() returns next
    int64_t end = INT64_MAX; // evaluation: steps in the pass
    LoaderBatch over;        // returned at the end of an evaluation pass

    explicit Impl(const LoaderOptions& opt);
    void open();
    int64_t step_of(LoaderPosition p) const;
    LoaderPosition position_of(int64_t step) const;
    std::shared_ptr<const std::vector<int64_t>> permutation(int64_t epoch);
    const Shard& shard_of(int64_t sample) const;
    void start();  // under mu
    void halt();   // not under mu
    void reader();
    void build(Slot& s, int64_t step, std::vector<char>& stored);
    [[noreturn]] void refuse_nonfinite(const Shard& sh, int64_t sample, const void* stored) const;
};

Loader::Impl::Impl(const LoaderOptions& opt) : o(opt) {
    if (o.world < 1 || o.rank < 0 || o.rank >= o.world)
        throw UserError("loader: rank " + std::to_string(o.rank) + " outside a world of " + std::to_string(o.world));
    if (o.batch < 1) throw UserError("loader: batch must be at least 1, got " + std::to_string(o.batch));
    if (o.batch % o.world != 0)
        throw UserError("batch " + std::to_string(o.batch) + " is not divisible by the " + std::to_string(o.world) +
                        " ranks: each rank takes an equal share of the global batch");
    if (o.threads < 0 || o.prefetch < 0) throw UserError("loader: threads and prefetch must be >= 0");
    b = o.batch / o.world;
    threads = o.threads > 0 ? o.threads : default_loader_threads();
    depth = std::max(2, o.prefetch > 0 ? o.prefetch : threads + 2);
    open();
    if (o.train) {
        per_epoch = n / o.batch;
        if (per_epoch == 0)
            throw UserError(o.pattern + ": " + std::to_string(n) + " images, fewer than one batch of " +
                            std::to_string(o.batch));
    } else {
        lo = n * o.rank / o.world;
        hi = n * (o.rank + 1) / o.world;
        per_epoch = (hi - lo + b - 1) / b;
        end = per_epoch;
    }
    next_out = step_of(o.start);
}

void Loader::Impl::open() {
    const std::vector<std::string> files = expand_glob(o.pattern);
    allow_open_files(files.size());
    for (const std::string& f : files) {
        Shard s{ShardReader(f), n, {}, {}};
        const ShardHeader& h = s.file.header();
        if (!shards.empty()) check_same_shape(h, f, shards[0].file.header(), shards[0].file.path());
        const std::vector<int32_t> l = s.file.read_labels();
        labels.insert(labels.end(), l.begin(), l.end());
        // Each shard is normalized with its own statistics, as load_dataset does.
        for (int c = 0; c < h.channels; c++) {
            s.mean.push_back(float(h.mean[size_t(c)]));
            s.inv_std.push_back(float(1.0 / h.std[size_t(c)]));
        }
        // Integer and half pixels are bounded: refuse statistics that would
        // overflow them now rather than at some batch. float32 is checked per batch.
        if (h.dtype != DType::f32) {
            const float top = h.dtype == DType::u8 ? 255.f : h.dtype == DType::u16 ? 65535.f : 65504.f;
            const float bottom = h.dtype == DType::f16 ? -top : 0.f;
            for (int c = 0; c < h.channels; c++) {
                const float m = s.mean[size_t(c)], k = s.inv_std[size_t(c)];
                if (!std::isfinite((top - m) * k) || !std::isfinite((bottom - m) * k))
                    throw UserError(f + ": channel " + std::to_string(c) +
                                    " is not finite after normalization for stored values in [" +
                                    std::to_string(int(bottom)) + ", " + std::to_string(int(top)) +
                                    "] (check the header's mean/std)");
            }
        }
        n += h.count;
        shards.push_back(std::move(s));
    }
    shape = shards[0].file.header();
    shape.count = n;
    image_bytes = shape.image_bytes();
    image_floats = size_t(shape.channels) * shape.height * shape.width;
}

int64_t Loader::Impl::step_of(LoaderPosition p) const {
    const int64_t max_epoch = o.train ? INT64_MAX / std::max<int64_t>(per_epoch, 1) - 1 : 0;
    if (p.epoch < 0 || p.epoch > max_epoch || p.batch < 0 || p.batch > per_epoch)
        throw UserError(o.pattern + ": loader position (epoch " + std::to_string(p.epoch) + ", batch " +
                        std::to_string(p.batch) + ") is outside this data set (" + std::to_string(per_epoch) +
                        " batches per epoch): did the data or the batch size change?");
    return p.epoch * per_epoch + p.batch;
}

LoaderPosition Loader::Impl::position_of(int64_t step) const {
    if (!o.train) return {0, step};
    return {step / per_epoch, step % per_epoch};
}

std::shared_ptr<const std::vector<int64_t>> Loader::Impl::permutation(int64_t epoch) {
    std::lock_guard<std::mutex> lk(perm_mu);
    for (const auto& e : perms)
        if (e.first == epoch) return e.second;
    auto order = std::make_shared<std::vector<int64_t>>(size_t(n));
    std::iota(order->begin(), order->end(), int64_t(0));
    Rng rng(o.seed, kShuffleStream, uint64_t(epoch));  // Fisher-Yates from a stream keyed by the epoch
    for (int64_t i = n - 1; i > 0; i--) std::swap((*order)[size_t(i)], (*order)[size_t(rng.below(uint64_t(i + 1)))]);
    // Readers work on at most two epochs at once (the end of one, the start
    // of the next); keep the three latest.
    perms.emplace_back(epoch, order);
    if (perms.size() > 3)
        perms.erase(std::min_element(perms.begin(), perms.end(),
                                     [](const auto& a, const auto& c) { return a.first < c.first; }));
    return order;
}

const Shard& Loader::Impl::shard_of(int64_t sample) const {
    auto it = std::upper_bound(shards.begin(), shards.end(), sample,
                               [](int64_t v, const Shard& s) { return v < s.first; });
    return *(it - 1);
}

void Loader::Impl::start() {
    if (slots.empty()) {
        const size_t C = size_t(shape.channels);
        slots.resize(size_t(depth));
        for (Slot& s : slots) {
            s.labels.resize(size_t(b));
            s.batch.labels = s.labels.data();
            s.samples.resize(size_t(b));
            s.batch.samples = s.samples.data();
            if (o.device_input) {
                s.raw = HostBuffer(size_t(b) * image_bytes, /*pinned=*/true);
                s.mean.resize(size_t(b) * C);
                s.inv_std.resize(size_t(b) * C);
                s.batch.pixel = pixel_of(shape.dtype);
                s.batch.raw = s.raw.data();
                s.batch.mean = s.mean.data();
                s.batch.inv_std = s.inv_std.data();
                if (o.train && o.augment != Augment::none) {
                    s.aug.resize(size_t(b));
                    s.batch.aug = s.aug.data();
                }
            } else {
                s.images = HostBuffer(size_t(b) * image_floats * sizeof(float), /*pinned=*/false);
                s.batch.images = (const float*)s.images.data();
            }
        }
    }
    for (Slot& s : slots) s.ready = false, s.step = -1;
    next_claim = free_below = next_out;
    for (int t = 0; t < threads; t++) readers.emplace_back([this] { reader(); });
}

void Loader::Impl::halt() {
    {
        std::lock_guard<std::mutex> lk(mu);
        stop = true;
    }
    work_cv.notify_all();
    for (std::thread& t : readers) t.join();
    readers.clear();
    stop = false;
}

void Loader::Impl::reader() {
    std::vector<char> stored(image_bytes);  // one image as the shard holds it
    std::unique_lock<std::mutex> lk(mu);
    for (;;) {
        work_cv.wait(lk, [&] { return stop || next_claim >= end || next_claim < free_below + depth; });
        if (stop || next_claim >= end) return;
        const int64_t step = next_claim++;
        Slot& s = slots[size_t(step % depth)];
        s.ready = false;
        s.step = step;
        lk.unlock();
        std::string error;
        try {
            build(s, step, stored);
        } catch (const std::bad_alloc&) {
            error = "out of host memory while reading a batch";
        } catch (const std::exception& e) {
            error = e.what();
        }
        lk.lock();
        s.error = std::move(error);
        s.ready = true;
        ready_cv.notify_all();
    }
}

void Loader::Impl::build(Slot& s, int64_t step, std::vector<char>& stored) {
    const int C = shape.channels, H = shape.height, W = shape.width;
    std::shared_ptr<const std::vector<int64_t>> order;
    int64_t first;  // training: position in the epoch's order; evaluation: sample
    int size;
    if (o.train) {
        order = permutation(step / per_epoch);
        first = (step % per_epoch) * o.batch + int64_t(o.rank) * b;
        size = b;
    } else {
        first = lo + step * b;
        size = int(std::min<int64_t>(b, hi - first));
    }
    const bool augment = o.train && o.augment != Augment::none;
    for (int i = 0; i < size; i++) {
        const int64_t sample = o.train ? (*order)[size_t(first + i)] : first + i;
        const Shard& sh = shard_of(sample);
        const int64_t j = sample - sh.first;
        s.labels[size_t(i)] = labels[size_t(sample)];
        s.samples[size_t(i)] = sample;
        ops::InputAug aug;
        // Keyed by the image's place in the global batch: the same on every rank.
        if (augment)
            aug = draw_augmentation(o.augment, H, W, o.seed, uint64_t(step) * uint64_t(o.batch) + uint64_t(o.rank) * b + i);
        if (o.device_input) {
            char* dst = (char*)s.raw.data() + size_t(i) * image_bytes;
            sh.file.read_images(dst, j, 1);
            if (shape.dtype == DType::f16 || shape.dtype == DType::f32)
                check_finite(dst, image_floats, sh.file.header(), j, sh.file.path());
            std::copy(sh.mean.begin(), sh.mean.end(), s.mean.begin() + size_t(i) * C);
            std::copy(sh.inv_std.begin(), sh.inv_std.end(), s.inv_std.begin() + size_t(i) * C);
            if (augment) s.aug[size_t(i)] = aug;
        } else {
            sh.file.read_images(stored.data(), j, 1);
            float* out = (float*)s.images.data() + size_t(i) * image_floats;
            if (ops::input_forward(out, stored.data(), pixel_of(shape.dtype), 1, C, H, W, sh.mean.data(),
                                   sh.inv_std.data(), augment ? &aug : nullptr) >= 0)
                refuse_nonfinite(sh, j, stored.data());
        }
    }
    s.batch.size = size;
    s.batch.step = step;
    s.batch.position = position_of(step);
}

void Loader::Impl::refuse_nonfinite(const Shard& sh, int64_t sample, const void* stored) const {
    const ShardHeader& h = sh.file.header();
    check_finite(stored, image_floats, h, sample, sh.file.path());  // a NaN or Inf stored pixel
    // Finite pixels, but the statistics blow one up: find its channel.
    const size_t hw = size_t(h.height) * h.width;
    std::vector<float> plane(hw);
    int c = 0;
    while (c + 1 < h.channels &&
           ops::input_forward(plane.data(), (const char*)stored + size_t(c) * hw * dtype_size(h.dtype),
                              pixel_of(h.dtype), 1, 1, h.height, h.width, &sh.mean[size_t(c)],
                              &sh.inv_std[size_t(c)], nullptr) < 0)
        c++;
    throw UserError(sh.file.path() + ": sample " + std::to_string(sample) + " channel " + std::to_string(c) +
                    " is not finite after normalization (check the header's mean/std)");
}

// ---------------------------------------------------------------------------

Loader::Loader(const LoaderOptions& options) : impl_(new Impl(options)) {}

Loader::~Loader() { impl_->halt(); }

const ShardHeader& Loader::shape() const { return impl_->shape; }
int64_t Loader::count() const { return impl_->n; }
int Loader::local_batch() const { return impl_->b; }
int64_t Loader::batches_per_epoch() const { return impl_->per_epoch; }
const LoaderOptions& Loader::options() const { return impl_->o; }

const LoaderBatch& Loader::next() {
    Impl& m = *impl_;
    std::unique_lock<std::mutex> lk(m.mu);
    if (m.next_out >= m.end) {
        // The evaluation pass is over: give the batch memory back until a seek.
        lk.unlock();
        m.halt();
        lk.lock();
        m.slots.clear();
        m.over = LoaderBatch{};
        m.over.position = m.position_of(m.next_out);
        m.over.step = m.next_out;
        return m.over;
    }
    if (m.readers.empty()) m.start();
    m.free_below = m.next_out;  // the previous batch is released
    m.work_cv.notify_all();
    Slot& s = m.slots[size_t(m.next_out % m.depth)];
    m.ready_cv.wait(lk, [&] { return s.ready && s.step == m.next_out; });
    if (!s.error.empty()) throw UserError(s.error);
    m.next_out++;
    return s.batch;
}

LoaderPosition Loader::position() const {
    std::lock_guard<std::mutex> lk(impl_->mu);
    return impl_->position_of(impl_->next_out);
}

void Loader::seek(LoaderPosition p) {
    Impl& m = *impl_;
    const int64_t step = m.step_of(p);
    m.halt();
    std::lock_guard<std::mutex> lk(m.mu);
    m.next_out = step;
}

void Loader::refuse_nonfinite(const LoaderBatch& batch, int image) const {
    const Impl& m = *impl_;
    PRISM_ASSERT(batch.samples && image >= 0 && image < batch.size);
    const int64_t sample = batch.samples[image];
    const Shard& sh = m.shard_of(sample);
    std::vector<char> stored(m.image_bytes);
    sh.file.read_images(stored.data(), sample - sh.first, 1);
    m.refuse_nonfinite(sh, sample - sh.first, stored.data());
}

}  // namespace prism
