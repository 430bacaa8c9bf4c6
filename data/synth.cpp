// Synthetic data sets (`prism synth`), written as shards.
//
// Every image is drawn from its own RNG stream keyed by (seed, split, index),
// so the bytes do not depend on shard size or thread count, and the training
// split can be generated twice: once for its statistics (which every header
// carries) and once to write it, without holding it in memory.
#include "data/synth.h"

#include <algorithm>
#include <cmath>
#include <memory>
#include <vector>

#include "data/convert.h"
#include "data/shard.h"
#include "engine/common.h"

namespace prism {

// ---------------------------------------------------------------------------
// RNG: splitmix64 to seed, xoshiro256** to draw. Self-contained so that the
// same seed gives the same bytes with any standard library.

static uint64_t splitmix64(uint64_t& s) {
    uint64_t z = (s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

// Independent stream key for (seed, a, b).
static uint64_t stream_key(uint64_t seed, uint64_t a, uint64_t b) {
    uint64_t s = seed;
    s = splitmix64(s) ^ a;
    s = splitmix64(s) ^ b;
    return splitmix64(s);
}

namespace {

struct Rng {
    uint64_t s[4];
    bool has_spare = false;
    float spare = 0;

    explicit Rng(uint64_t seed) {
        for (auto& w : s) w = splitmix64(seed);
    }
    static uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }
    uint64_t next() {
        uint64_t r = rotl(s[1] * 5, 7) * 9, t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = rotl(s[3], 45);
        return r;
    }
    double uniform() { return double(next() >> 11) * 0x1.0p-53; }  // [0, 1)
    // Uniform in [0, n) without modulo bias.
    uint64_t below(uint64_t n) {
        uint64_t limit = UINT64_MAX - UINT64_MAX % n;
        for (;;) {
            uint64_t r = next();
            if (r < limit) return r % n;
        }
    }
    // Box-Muller in float: one 64-bit draw gives both uniforms, and the float
    // libm calls are several times cheaper than double ones, which matters at
    // 400k noise values per jumpcp image. u1 in (0, 1] keeps the log finite;
    // 24-bit uniforms cap |z| at 5.8, irrelevant for pixel noise.
    float normal() {
        if (has_spare) {
            has_spare = false;
            return spare;
        }
        uint64_t r = next();
        float u1 = float((r >> 40) + 1) * 0x1.0p-24f;
        float u2 = float((r >> 16) & 0xffffff) * 0x1.0p-24f;
        float rad = std::sqrt(-2.0f * std::log(u1)), a = 6.2831853f * u2;
        spare = rad * std::sin(a);
        has_spare = true;
        return rad * std::cos(a);
    }
};

enum Split : uint64_t { kTrain = 1, kVal = 2 };
enum Stream : uint64_t { kTaskStream = 11, kLabelStream = 12, kImageStream = 13 };

struct Preset {
    std::string name;
    int channels, height, width, num_classes;
    DType dtype;
    int64_t shard_max;  // images per shard
    std::vector<std::string> channel_names;
};

// What is shared by all images of one seed: for so2sat/jumpcp the class
// patterns, for tiny the textures.
struct Task {
    Preset p;
    uint64_t seed = 0;
    // so2sat / jumpcp: pixel = base[c] + scale[c] * (class_amp * mu[k][c][q] +
    // nuisance_amp * g[c][q] + pixel_amp * noise), q the image quadrant.
    std::vector<double> base, scale, mu;  // mu: [classes][channels][4]
    double class_amp = 0, nuisance_amp = 0, pixel_amp = 0;
    double lo = 0, hi = 0;  // clamp range in stored units (uint8 only)
    float texture[4][8][8] = {};  // tiny
};

}  // namespace

static Preset find_preset(const std::string& name) {
    Preset p;
    p.name = name;
    if (name == "tiny") {
        p.channels = 4, p.height = 32, p.width = 32, p.num_classes = 4, p.dtype = DType::f32, p.shard_max = 4096;
        for (int c = 0; c < 4; c++) p.channel_names.push_back("ch" + std::to_string(c));
    } else if (name == "so2sat") {
        p.channels = 18, p.height = 32, p.width = 32, p.num_classes = 17, p.dtype = DType::f16, p.shard_max = 4096;
        p.channel_names = so2sat_channel_names();  // the real files' channels, as `convert so2sat` writes them
    } else if (name == "jumpcp") {
        p.channels = 8, p.height = 224, p.width = 224, p.num_classes = 161, p.dtype = DType::u8, p.shard_max = 512;
        // Five fluorescence stains, three brightfield planes.
        p.channel_names = {"DNA", "ER", "RNA", "AGP", "Mito", "BF_low", "BF_mid", "BF_high"};
    } else {
        throw UserError("--preset " + name + ": unknown preset (expected tiny, so2sat or jumpcp)");
    }
    return p;
}

static Task make_task(const std::string& preset, uint64_t seed) {
    Task t;
    t.p = find_preset(preset);
    t.seed = seed;
    const Preset& p = t.p;
    if (p.name == "tiny") {
        // Four textures with an 8-pixel period, aligned with the patch grid
        // and zero-mean: horizontal bars, vertical bars, a checkerboard of 4x4
        // squares, diagonal bars. They are fixed, not drawn from the seed, so
        // a reader can recognise them in any image.
        for (int y = 0; y < 8; y++)
            for (int x = 0; x < 8; x++) {
                t.texture[0][y][x] = y < 4 ? 1.f : -1.f;
                t.texture[1][y][x] = x < 4 ? 1.f : -1.f;
                t.texture[2][y][x] = (y < 4) == (x < 4) ? 1.f : -1.f;
                t.texture[3][y][x] = (x + y) % 8 < 4 ? 1.f : -1.f;
            }
        return t;
    }
    Rng r(stream_key(seed, kTaskStream, 0));
    int C = p.channels;
    t.base.resize(size_t(C));
    t.scale.resize(size_t(C));
    for (int c = 0; c < C; c++) {
        if (p.name == "so2sat") {  // reflectance-like floats
            t.base[size_t(c)] = 0.05 + 0.25 * r.uniform();
            t.scale[size_t(c)] = 0.02 + 0.08 * r.uniform();
        } else {  // 8-bit microscopy intensities
            t.base[size_t(c)] = 40 + 60 * r.uniform();
            t.scale[size_t(c)] = 12 + 13 * r.uniform();
        }
    }
    t.mu.resize(size_t(p.num_classes) * C * 4);
    for (double& m : t.mu) m = r.normal();
    // The per-image nuisance per (channel, quadrant) is what keeps it from
    // being trivial: the class is a direction in 4C dimensions, seen through
    // noise of comparable size (Bayes accuracy well below 100%).
    t.class_amp = p.name == "so2sat" ? 0.15 : 0.35;
    t.nuisance_amp = 0.5;
    t.pixel_amp = 0.3;
    t.lo = 0, t.hi = 255;
    return t;
}

// The channel pair that shares a texture, for each tiny class.
static const int kTinyPairs[4][2] = {{0, 1}, {2, 3}, {0, 3}, {1, 2}};

// Writes one image, in the preset's stored dtype, to `out`.
static void gen_image(const Task& t, uint64_t split, int64_t index, int label, void* out) {
    const Preset& p = t.p;
    Rng r(stream_key(t.seed, kImageStream + (split << 8), uint64_t(index)));
    int H = p.height, W = p.width;
    size_t hw = size_t(H) * W;
    if (p.name == "tiny") {
        // The pair of the label shows one texture; the two other channels
        // show the two others, all three distinct and uniformly drawn. Every
        // channel on its own is a uniformly random texture whatever the
        // label, so only comparing channels tells the class.
        int textures[3];  // the pair's, then one for each other channel
        for (int k = 0; k < 3; k++) {
            bool dup;
            do {
                textures[k] = int(r.below(4));
                dup = false;
                for (int m = 0; m < k; m++) dup |= textures[m] == textures[k];
            } while (dup);
        }
        int a = kTinyPairs[label][0], b = kTinyPairs[label][1];
        float* img = (float*)out;
        for (int c = 0, other = 1; c < 4; c++) {
            const int tex = (c == a || c == b) ? textures[0] : textures[other++];
            const float amp = float(0.5 + 0.5 * r.uniform());
            float* plane = img + size_t(c) * hw;
            for (int y = 0; y < H; y++)
                for (int x = 0; x < W; x++)
                    plane[size_t(y) * W + x] = amp * t.texture[tex][y % 8][x % 8] + float(0.5 * r.normal());
        }
        return;
    }
    int C = p.channels;
    for (int c = 0; c < C; c++) {
        double off[4];
        for (int q = 0; q < 4; q++)
            off[q] = t.class_amp * t.mu[(size_t(label) * C + c) * 4 + q] + t.nuisance_amp * r.normal();
        for (int y = 0; y < H; y++) {
            for (int x = 0; x < W; x++) {
                int q = (y >= H / 2) * 2 + (x >= W / 2);
                double v = t.base[size_t(c)] + t.scale[size_t(c)] * (off[q] + t.pixel_amp * r.normal());
                size_t i = size_t(c) * hw + size_t(y) * W + x;
                if (p.dtype == DType::f16) {
                    ((uint16_t*)out)[i] = float_to_half(float(v));
                } else {
                    double u = std::min(t.hi, std::max(t.lo, std::nearbyint(v)));
                    ((uint8_t*)out)[i] = uint8_t(u);
                }
            }
        }
    }
}

// Labels of a split: every class equally often (up to count % classes), in
// an order shuffled from the seed.
static std::vector<int32_t> make_labels(const Task& t, uint64_t split, int64_t count) {
    std::vector<int32_t> labels((size_t)count);
    for (int64_t i = 0; i < count; i++) labels[size_t(i)] = int32_t(i % t.p.num_classes);
    Rng r(stream_key(t.seed, kLabelStream, split));
    for (int64_t i = count - 1; i > 0; i--) {
        uint64_t j = r.below(uint64_t(i + 1));
        std::swap(labels[size_t(i)], labels[size_t(j)]);
    }
    return labels;
}

static float stored_pixel(const void* img, size_t i, DType d) {
    switch (d) {
        case DType::u8: return float(((const uint8_t*)img)[i]);
        case DType::u16: return float(((const uint16_t*)img)[i]);
        case DType::f16: return half_to_float(((const uint16_t*)img)[i]);
        case DType::f32: return ((const float*)img)[i];
    }
    return 0.f;
}

// Generates images [first, first + n) of a split into buf.
static void gen_block(const Task& t, uint64_t split, const std::vector<int32_t>& labels, int64_t first, int64_t n,
                      std::vector<char>& buf) {
    size_t per = size_t(t.p.channels) * t.p.height * t.p.width * dtype_size(t.p.dtype);
    buf.resize(size_t(n) * per);
#pragma omp parallel for schedule(dynamic, 4)
    for (int64_t i = 0; i < n; i++) gen_image(t, split, first + i, labels[size_t(first + i)], buf.data() + size_t(i) * per);
}

void synthesize(const std::string& preset, const std::string& dir, int64_t count, uint64_t seed, bool verbose) {
    Task t = make_task(preset, seed);
    const Preset& p = t.p;
    if (count < 1) throw UserError("--count " + std::to_string(count) + ": must be at least 1");
    if (dir.empty()) throw UserError("--out: empty directory name");
    make_dirs(dir);

    int C = p.channels;
    size_t hw = size_t(p.height) * p.width;
    int64_t val_count = std::max<int64_t>(1, count / 4);
    std::vector<int32_t> train_labels = make_labels(t, kTrain, count);
    std::vector<int32_t> val_labels = make_labels(t, kVal, val_count);
    std::vector<char> buf;

    // Pass 1: training statistics in stored units. Per (image, channel) mean
    // and sum of squared deviations, merged in image order (Chan et al.), so
    // the result is exact-ish and independent of the thread count.
    std::vector<double> n_acc(size_t(C), 0), mean_acc(size_t(C), 0), m2_acc(size_t(C), 0);
    for (int64_t first = 0; first < count; first += p.shard_max) {
        int64_t n = std::min(p.shard_max, count - first);
        gen_block(t, kTrain, train_labels, first, n, buf);
        size_t per = size_t(C) * hw * dtype_size(p.dtype);
        std::vector<double> pm(size_t(n) * C), pm2(size_t(n) * C);
#pragma omp parallel for schedule(static)
        for (int64_t q = 0; q < n * C; q++) {
            const char* img = buf.data() + size_t(q / C) * per;
            size_t off = size_t(q % C) * hw;
            double s = 0;
            for (size_t j = 0; j < hw; j++) s += stored_pixel(img, off + j, p.dtype);
            double m = s / double(hw), s2 = 0;
            for (size_t j = 0; j < hw; j++) {
                double d = stored_pixel(img, off + j, p.dtype) - m;
                s2 += d * d;
            }
            pm[size_t(q)] = m;
            pm2[size_t(q)] = s2;
        }
        for (int64_t i = 0; i < n; i++)
            for (int c = 0; c < C; c++) {
                size_t q = size_t(i) * C + c;
                double na = n_acc[size_t(c)], nb = double(hw), nn = na + nb;
                double delta = pm[q] - mean_acc[size_t(c)];
                mean_acc[size_t(c)] += delta * nb / nn;
                m2_acc[size_t(c)] += pm2[q] + delta * delta * na * nb / nn;
                n_acc[size_t(c)] = nn;
            }
    }

    ShardHeader h;
    h.channels = C, h.height = p.height, h.width = p.width, h.dtype = p.dtype, h.num_classes = p.num_classes;
    h.channel_names = p.channel_names;
    h.mean = mean_acc;
    h.std.resize(size_t(C));
    for (int c = 0; c < C; c++) {
        double sd = std::sqrt(m2_acc[size_t(c)] / n_acc[size_t(c)]);
        h.std[size_t(c)] = (std::isfinite(sd) && sd > 0) ? sd : 1.0;  // constant channel: leave it unscaled
    }

    // Pass 2: both splits, one shard in memory at a time, staged and
    // committed together, so that a run that fails part way leaves the old
    // set whole rather than new training shards next to old validation ones.
    struct { const char* name; uint64_t split; int64_t count; const std::vector<int32_t>* labels; } splits[2] = {
        {"train", kTrain, count, &train_labels}, {"val", kVal, val_count, &val_labels}};
    std::unique_ptr<StagedShards> staged[2];
    for (int i = 0; i < 2; i++) {
        const auto& sp = splits[i];
        staged[i] = std::make_unique<StagedShards>(dir, sp.name, "synth " + p.name + " " + sp.name, verbose);
        for (int64_t first = 0; first < sp.count; first += p.shard_max) {
            int64_t n = std::min(p.shard_max, sp.count - first);
            gen_block(t, sp.split, *sp.labels, first, n, buf);
            h.count = n;
            std::vector<int32_t> labels(sp.labels->begin() + first, sp.labels->begin() + first + n);
            staged[i]->add(h, labels, buf.data(), first + n, sp.count);
        }
    }
    for (auto& s : staged) s->rename_into_place();
    for (auto& s : staged) s->remove_stale();  // shards past the last, from a larger run
}

}  // namespace prism
