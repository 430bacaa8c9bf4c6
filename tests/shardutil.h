// Small shards for the tests that read them (test_shards, test_loader): a
// header, random pixels of every dtype, and in-place header edits.
#pragma once
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "data/shard.h"
#include "tests/testutil.h"

namespace prism::testing {

inline ShardHeader make_header(int64_t count, int C, int H, int W, DType d, int classes) {
    ShardHeader h;
    h.count = count;
    h.channels = C, h.height = H, h.width = W, h.dtype = d, h.num_classes = classes;
    for (int c = 0; c < C; c++) {
        h.channel_names.push_back("c" + std::to_string(c));
        h.mean.push_back(0.5 * c + 0.25);
        h.std.push_back(1.5 + c);
    }
    return h;
}

// Random pixels in the dtype, as bytes, and their float values.
struct Pixels {
    std::vector<char> bytes;
    std::vector<float> values;
};

inline Pixels random_pixels(const ShardHeader& h, uint32_t seed) {
    std::mt19937 rng(seed);
    size_t n = size_t(h.count) * h.channels * h.height * h.width;
    Pixels p;
    p.bytes.resize(n * dtype_size(h.dtype));
    p.values.resize(n);
    for (size_t i = 0; i < n; i++) {
        uint32_t r = rng();
        switch (h.dtype) {
            case DType::u8: p.bytes[i] = char(r & 0xff); p.values[i] = float(r & 0xff); break;
            case DType::u16: {
                uint16_t v = uint16_t(r);
                std::memcpy(&p.bytes[2 * i], &v, 2);
                p.values[i] = float(v);
                break;
            }
            case DType::f16: {
                uint16_t v = float_to_half(float(int(r % 20001) - 10000) / 100.f);
                std::memcpy(&p.bytes[2 * i], &v, 2);
                p.values[i] = half_to_float(v);
                break;
            }
            case DType::f32: {
                float v = float(int32_t(r)) * 1e-6f;
                std::memcpy(&p.bytes[4 * i], &v, 4);
                p.values[i] = v;
                break;
            }
        }
    }
    return p;
}

inline std::vector<int32_t> cycle_labels(int64_t n, int classes) {
    std::vector<int32_t> l((size_t)n);
    for (int64_t i = 0; i < n; i++) l[size_t(i)] = int32_t((i * 7 + 3) % classes);
    return l;
}

// A valid small shard at `path`; returns its header.
inline ShardHeader write_test_shard(const std::string& path, DType d = DType::f32, int64_t count = 5, int C = 3,
                             int classes = 17, uint32_t seed = 1) {
    ShardHeader h = make_header(count, C, 4, 6, d, classes);
    Pixels p = random_pixels(h, seed);
    write_shard(path, h, cycle_labels(count, classes), p.bytes.data());
    return read_shard_header(path);
}

// Four 2x3x3 samples (labels 0..3 of 5 classes), float32 or float16, every
// pixel `fill` but pixel `bad` (counted from the first image), which is
// `bad_value`. Pixel 2*18 + 9 + 4 is sample 2, channel 1, y 1, x 1.
inline ShardHeader write_planted_shard(const std::string& path, DType d, float fill, size_t bad, float bad_value,
                                       std::vector<double> std = {}) {
    ShardHeader h = make_header(4, 2, 3, 3, d, 5);
    if (!std.empty()) h.std = std;
    std::vector<float> px(4 * 18, fill);
    px[bad] = bad_value;
    std::vector<uint16_t> half;
    for (float v : px) half.push_back(float_to_half(v));
    write_shard(path, h, {0, 1, 2, 3}, d == DType::f16 ? (const void*)half.data() : (const void*)px.data());
    return h;
}

// Edits the JSON header in place; the payload stays where it is.
inline void edit_header(const std::string& path, const std::function<void(nlohmann::json&)>& edit) {
    std::string b = read_bytes(path);
    uint32_t len;
    std::memcpy(&len, &b[12], 4);
    nlohmann::json j = nlohmann::json::parse(b.substr(16, len));
    uint64_t labels_offset = j["labels_offset"].get<uint64_t>();
    edit(j);
    std::string text = j.dump();
    ASSERT_LE(16 + text.size(), labels_offset);
    uint32_t n = uint32_t(text.size());
    std::memcpy(&b[12], &n, 4);
    std::fill(b.begin() + 16, b.begin() + long(labels_offset), '\0');
    std::memcpy(&b[16], text.data(), text.size());
    write_bytes(path, b);
}

}  // namespace prism::testing
