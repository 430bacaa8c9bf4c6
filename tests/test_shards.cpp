// Shard format (DESIGN.md §3), its checks, and the synthetic data sets.
#include <gtest/gtest.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include <signal.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <nlohmann/json.hpp>

#include "data/shard.h"
#include "data/synth.h"
#include "engine/common.h"
#include "tests/shardutil.h"
#include "tests/testutil.h"

using namespace prism;
using namespace prism::testing;

namespace {

uint32_t crc32c_bitwise(const std::string& s) {
    uint32_t c = 0xffffffffu;
    for (unsigned char ch : s) {
        c ^= ch;
        for (int k = 0; k < 8; k++) c = (c >> 1) ^ (0x82F63B78u & (0u - (c & 1u)));
    }
    return ~c;
}

}  // namespace

// ---------------------------------------------------------------------------
// crc32c and half floats

TEST(Shards, Crc32cKnownVector) {
    EXPECT_EQ(crc32c_update(0, "123456789", 9), 0xE3069283u);
    EXPECT_EQ(crc32c_update(0, "", 0), 0u);
    // 32 zero bytes: RFC 3720 B.4 test vector.
    std::string zeros(32, '\0');
    EXPECT_EQ(crc32c_update(0, zeros.data(), 32), 0x8A9136AAu);
}

TEST(Shards, Crc32cIncrementalAndUnaligned) {
    std::mt19937 rng(5);
    std::string s(10000, '\0');
    for (char& c : s) c = char(rng());
    for (size_t start : {0, 1, 3, 7}) {
        for (size_t len : {0, 1, 7, 8, 9, 63, 64, 1000, 9000}) {
            std::string piece = s.substr(start, len);
            uint32_t whole = crc32c_update(0, s.data() + start, len);
            EXPECT_EQ(whole, crc32c_bitwise(piece)) << start << " " << len;
            size_t cut = len / 3;
            uint32_t inc = crc32c_update(crc32c_update(0, s.data() + start, cut), s.data() + start + cut, len - cut);
            EXPECT_EQ(inc, whole);
        }
    }
}

static uint16_t f16_bits(_Float16 h) {
    uint16_t u;
    std::memcpy(&u, &h, 2);
    return u;
}

TEST(Shards, HalfRoundTripsEveryHalf) {
    for (uint32_t u = 0; u < 65536; u++) {
        uint16_t h = uint16_t(u);
        float f = half_to_float(h);
        _Float16 ref;
        std::memcpy(&ref, &h, 2);
        if (std::isnan(f)) {
            EXPECT_TRUE(std::isnan(float(ref)));
            uint16_t back = float_to_half(f);
            EXPECT_EQ(back & 0x7c00, 0x7c00) << std::hex << u;
            EXPECT_NE(back & 0x3ff, 0) << std::hex << u;
            EXPECT_EQ(back & 0x8000, h & 0x8000);
            continue;
        }
        ASSERT_EQ(f, float(ref)) << std::hex << u;
        ASSERT_EQ(std::signbit(f), std::signbit(float(ref))) << std::hex << u;
        ASSERT_EQ(float_to_half(f), h) << std::hex << u;
    }
}

TEST(Shards, HalfRoundsToNearestEven) {
    EXPECT_EQ(float_to_half(1.0f), 0x3c00);
    EXPECT_EQ(float_to_half(-2.0f), 0xc000);
    EXPECT_EQ(float_to_half(65504.f), 0x7bff);
    EXPECT_EQ(float_to_half(65519.99f), 0x7bff);
    EXPECT_EQ(float_to_half(65520.f), 0x7c00);  // the tie goes to even: infinity
    EXPECT_EQ(float_to_half(1e10f), 0x7c00);
    EXPECT_EQ(float_to_half(-INFINITY), 0xfc00);
    EXPECT_EQ(float_to_half(std::ldexp(1.f, -24)), 0x0001);  // smallest subnormal
    EXPECT_EQ(float_to_half(std::ldexp(1.f, -25)), 0x0000);  // tie to even: zero
    EXPECT_EQ(float_to_half(std::nextafter(std::ldexp(1.f, -25), 1.f)), 0x0001);
    EXPECT_EQ(float_to_half(-0.f), 0x8000);
    EXPECT_EQ(float_to_half(std::ldexp(1.f, -14)), 0x0400);  // smallest normal
    EXPECT_TRUE(std::isnan(half_to_float(float_to_half(NAN))));
    // Midpoints between neighbours round to the even one, and a hair off
    // them to the nearer one.
    for (uint32_t h = 0; h < 0x7bff; h++) {
        float a = half_to_float(uint16_t(h)), b = half_to_float(uint16_t(h + 1));
        float mid = (a + b) / 2;  // exact: halves have 11 significant bits
        ASSERT_EQ(float_to_half(mid), (h & 1) ? h + 1 : h) << std::hex << h;
        ASSERT_EQ(float_to_half(std::nextafter(mid, 1e9f)), h + 1) << std::hex << h;
        ASSERT_EQ(float_to_half(std::nextafter(mid, -1e9f)), h) << std::hex << h;
        ASSERT_EQ(float_to_half(-mid), ((h & 1) ? h + 1 : h) | 0x8000) << std::hex << h;
    }
    // Against the compiler's own conversion on random floats of all magnitudes.
    std::mt19937 rng(9);
    for (int i = 0; i < 1000000; i++) {
        uint32_t u = rng();
        float f;
        std::memcpy(&f, &u, 4);
        if (std::isnan(f)) continue;
        ASSERT_EQ(float_to_half(f), f16_bits(_Float16(f))) << f;
    }
}

// ---------------------------------------------------------------------------
// round trips

TEST(Shards, RoundTripEveryDtype) {
    TmpDir dir;
    for (DType d : {DType::u8, DType::u16, DType::f16, DType::f32}) {
        SCOPED_TRACE(dtype_name(d));
        EXPECT_EQ(dtype_from_name(dtype_name(d), "x"), d);
        // 1500 labels take 6000 bytes: labels and images are both padded.
        ShardHeader h = make_header(1500, 3, 5, 7, d, 11);
        Pixels p = random_pixels(h, 42 + uint32_t(d));
        std::vector<int32_t> labels = cycle_labels(h.count, h.num_classes);
        std::string path = dir / (std::string("rt-") + dtype_name(d) + ".shard");
        write_shard(path, h, labels, p.bytes.data());
        EXPECT_FALSE(exists(path + ".tmp"));

        ShardHeader r = read_shard_header(path);
        EXPECT_EQ(r.count, h.count);
        EXPECT_TRUE(r.same_shape(h));
        EXPECT_EQ(r.channel_names, h.channel_names);
        EXPECT_EQ(r.mean, h.mean);
        EXPECT_EQ(r.std, h.std);
        EXPECT_EQ(r.labels_offset % 4096, 0u);
        EXPECT_EQ(r.images_offset % 4096, 0u);
        EXPECT_GE(r.images_offset, r.labels_offset + 4 * 1500);
        EXPECT_NO_THROW(verify_shard(path));

        std::string b = read_bytes(path);
        ASSERT_EQ(b.size(), r.images_offset + r.count * r.image_bytes());
        EXPECT_EQ(b.substr(0, 8), "PRISMSHD");
        uint32_t version;
        std::memcpy(&version, &b[8], 4);
        EXPECT_EQ(version, 1u);
        EXPECT_EQ(crc32c_update(0, b.data() + r.labels_offset, b.size() - r.labels_offset), r.crc32c);
        EXPECT_EQ(std::memcmp(b.data() + r.labels_offset, labels.data(), labels.size() * 4), 0);
        EXPECT_EQ(std::memcmp(b.data() + r.images_offset, p.bytes.data(), p.bytes.size()), 0);
        for (size_t i = r.labels_offset + 4 * 1500; i < r.images_offset; i++) ASSERT_EQ(b[i], 0);

        Dataset ds = load_dataset(path);
        EXPECT_EQ(ds.count(), 1500);
        EXPECT_EQ(ds.labels, labels);
        ASSERT_EQ(ds.images.size(), p.values.size());
        size_t hw = 35;
        for (size_t i = 0; i < p.values.size(); i++) {
            size_t c = i / hw % 3;
            double want = (double(p.values[i]) - h.mean[c]) / h.std[c];
            ASSERT_NEAR(ds.images[i], want, 1e-6 * (1 + std::fabs(want))) << i;
        }
    }
}

TEST(Shards, LoadsManyShardsInOrderWithTheirOwnStatistics) {
    TmpDir dir;
    ShardHeader a = make_header(3, 2, 2, 2, DType::u8, 4), b = a;
    b.count = 2;
    b.mean = {10, 20};
    b.std = {2, 4};
    std::vector<char> pa(3 * 8, 1), pb(2 * 8, 30);
    write_shard(dir / "s-00001.shard", b, {3, 2}, pb.data());
    write_shard(dir / "s-00000.shard", a, {0, 1, 2}, pa.data());
    EXPECT_EQ(expand_glob(dir / "s-*.shard"),
              (std::vector<std::string>{dir / "s-00000.shard", dir / "s-00001.shard"}));
    Dataset ds = load_dataset(dir / "s-*.shard");
    EXPECT_EQ(ds.count(), 5);
    EXPECT_EQ(ds.shape.count, 5);
    EXPECT_EQ(ds.labels, (std::vector<int32_t>{0, 1, 2, 3, 2}));
    EXPECT_FLOAT_EQ(ds.images[0], (1 - 0.25) / 1.5);          // shard 0, channel 0
    EXPECT_FLOAT_EQ(ds.images[4], (1 - 0.75) / 2.5);          // shard 0, channel 1
    EXPECT_FLOAT_EQ(ds.images[3 * 8 + 0], (30 - 10) / 2.0);   // shard 1, channel 0
    EXPECT_FLOAT_EQ(ds.images[3 * 8 + 4], (30 - 20) / 4.0);   // shard 1, channel 1
}

// ---------------------------------------------------------------------------
// bad input

TEST(Shards, RefusesTruncatedFiles) {
    TmpDir dir;
    std::string path = dir / "t.shard";
    ShardHeader h = write_test_shard(path);
    std::string b = read_bytes(path);
    write_bytes(path, b.substr(0, b.size() - 1));
    expect_error([&] { read_shard_header(path); }, path,
                 "truncated: file is " + std::to_string(b.size() - 1) + " bytes, header says " +
                     std::to_string(b.size()));
    expect_error([&] { load_dataset(path); }, path, "truncated");
    write_bytes(path, b.substr(0, 12));
    expect_error([&] { read_shard_header(path); }, path, "truncated");
    write_bytes(path, b.substr(0, 100));
    expect_error([&] { read_shard_header(path); }, path, "truncated");
    write_bytes(path, "");
    expect_error([&] { read_shard_header(path); }, path, "empty file");
    write_bytes(path, b + "x");
    expect_error([&] { read_shard_header(path); }, path, "extra bytes");
    expect_error([&] { read_shard_header(dir / "missing.shard"); }, dir / "missing.shard", "cannot open");
    expect_error([&] { read_shard_header(dir.path); }, dir.path, "not a regular file");
}

TEST(Shards, RefusesBadMagicAndVersion) {
    TmpDir dir;
    std::string path = dir / "m.shard";
    write_test_shard(path);
    std::string b = read_bytes(path);
    std::string bad = b;
    bad[0] = 'X';
    write_bytes(path, bad);
    expect_error([&] { read_shard_header(path); }, path, "bad magic (not a Prism shard)");
    write_bytes(path, "hello");
    expect_error([&] { read_shard_header(path); }, path, "bad magic");
    bad = b;
    bad[8] = 2;
    write_bytes(path, bad);
    expect_error([&] { read_shard_header(path); }, path, "unsupported shard version 2");
    bad = b;
    uint32_t huge = 0xfffffff0u;
    std::memcpy(&bad[12], &huge, 4);
    write_bytes(path, bad);
    expect_error([&] { read_shard_header(path); }, path, "header_len");
    bad = b;
    bad[16] = '#';
    write_bytes(path, bad);
    expect_error([&] { read_shard_header(path); }, path, "not valid JSON");
}

TEST(Shards, RefusesMissingOrMistypedKeys) {
    TmpDir dir;
    std::string path = dir / "k.shard";
    const char* keys[] = {"count", "channels", "height", "width", "dtype", "num_classes", "channel_names",
                          "mean", "std", "labels_offset", "images_offset", "crc32c"};
    for (const char* key : keys) {
        SCOPED_TRACE(key);
        write_test_shard(path);
        edit_header(path, [&](nlohmann::json& j) { j.erase(key); });
        expect_error([&] { read_shard_header(path); }, path, std::string("no key '") + key + "'");
        write_test_shard(path);
        // A value of the wrong type for every key.
        edit_header(path, [&](nlohmann::json& j) { j[key] = std::string(key) == "dtype" ? nlohmann::json(3) : nlohmann::json("x"); });
        expect_error([&] { read_shard_header(path); }, path, key);
    }
    struct Case {
        std::function<void(nlohmann::json&)> edit;
        const char* what;
    } cases[] = {
        {[](nlohmann::json& j) { j["count"] = 0; }, "count 0"},
        {[](nlohmann::json& j) { j["channels"] = -3; }, "'channels' is negative"},
        {[](nlohmann::json& j) { j["height"] = 2.5; }, "'height' must be an integer"},
        {[](nlohmann::json& j) { j["dtype"] = "int8"; }, "unknown dtype 'int8'"},
        {[](nlohmann::json& j) { j["channel_names"] = {"a", "b"}; }, "channel_names has 2 entries, channels is 3"},
        {[](nlohmann::json& j) { j["channel_names"] = {"a", 1, "c"}; }, "array of strings"},
        {[](nlohmann::json& j) { j["mean"] = {1, 2}; }, "mean has 2 entries"},
        {[](nlohmann::json& j) { j["std"] = {1, 0, 1}; }, "std of channel 1"},
        {[](nlohmann::json& j) { j["std"] = {1, -2, 1}; }, "std of channel 1"},
        {[](nlohmann::json& j) { j["labels_offset"] = 4000; }, "labels_offset 4000 is not a multiple of 4096"},
        {[](nlohmann::json& j) { j["images_offset"] = 4096; }, "overlaps the labels"},
        {[](nlohmann::json& j) { j["crc32c"] = 1ull << 33; }, "'crc32c'"},
        {[](nlohmann::json& j) { j["width"] = 7; }, "truncated"},
        {[](nlohmann::json& j) { j["count"] = 4; }, "extra bytes"},
    };
    for (const Case& c : cases) {
        SCOPED_TRACE(c.what);
        write_test_shard(path);
        edit_header(path, c.edit);
        expect_error([&] { read_shard_header(path); }, path, c.what);
    }
    // Unknown keys are allowed: a later writer may add some.
    write_test_shard(path);
    edit_header(path, [](nlohmann::json& j) { j["comment"] = "made by hand"; });
    EXPECT_NO_THROW(verify_shard(path));
}

TEST(Shards, CrcMismatchIsFoundByVerifyOnly) {
    TmpDir dir;
    std::string path = dir / "c.shard";
    ShardHeader h = write_test_shard(path);
    std::string b = read_bytes(path);
    b[h.images_offset + 17] ^= 0x10;
    write_bytes(path, b);
    EXPECT_NO_THROW(read_shard_header(path));
    expect_error([&] { verify_shard(path); }, path, "crc32c mismatch (stored 0x");
    // The padding between labels and images is covered too.
    b[h.images_offset + 17] ^= 0x10;
    b[h.labels_offset + 4 * h.count + 1] = 1;
    write_bytes(path, b);
    expect_error([&] { verify_shard(path); }, path, "crc32c mismatch");
}

TEST(Shards, RefusesLabelsOutOfRange) {
    TmpDir dir;
    std::string path = dir / "l.shard";
    ShardHeader h = write_test_shard(path);  // 5 samples, 17 classes
    // Patch sample 3's label and store a matching crc, so only the range check can object.
    std::string b = read_bytes(path);
    int32_t bad = 17;
    std::memcpy(&b[h.labels_offset + 12], &bad, 4);
    uint32_t crc = crc32c_update(0, b.data() + h.labels_offset, b.size() - h.labels_offset);
    write_bytes(path, b);
    edit_header(path, [&](nlohmann::json& j) { j["crc32c"] = crc; });
    EXPECT_NO_THROW(read_shard_header(path));
    expect_error([&] { verify_shard(path); }, path, "label 17 of sample 3 outside [0, 17)");
    expect_error([&] { load_dataset(path); }, path, "label 17 of sample 3 outside [0, 17)");

    ShardHeader w = make_header(2, 1, 1, 1, DType::u8, 3);
    std::vector<char> px(2, 0);
    expect_error([&] { write_shard(dir / "w.shard", w, {0, -1}, px.data()); }, dir / "w.shard",
                 "label -1 of sample 1 outside [0, 3)");
    expect_error([&] { write_shard(dir / "w.shard", w, {0}, px.data()); }, dir / "w.shard", "1 labels for count 2");
    EXPECT_FALSE(exists(dir / "w.shard"));
    EXPECT_FALSE(exists(dir / "w.shard.tmp"));
}

TEST(Shards, RefusesShardsOfDifferentShapes) {
    TmpDir dir;
    write_test_shard(dir / "a-00000.shard", DType::f32, 5, 3);
    write_test_shard(dir / "a-00001.shard", DType::f32, 5, 4);
    expect_error([&] { load_dataset(dir / "a-*.shard"); }, dir / "a-00001.shard",
                 "shape 4x4x6 float32, 17 classes differs from " + dir / "a-00000.shard");
    write_test_shard(dir / "b-00000.shard", DType::f32, 5, 3, 17);
    write_test_shard(dir / "b-00001.shard", DType::f32, 5, 3, 18);
    expect_error([&] { load_dataset(dir / "b-*.shard"); }, dir / "b-00001.shard", "differs");
    write_test_shard(dir / "c-00000.shard", DType::f32, 5, 3);
    write_test_shard(dir / "c-00001.shard", DType::f16, 5, 3);
    expect_error([&] { load_dataset(dir / "c-*.shard"); }, dir / "c-00001.shard", "differs");
}

TEST(Shards, RefusesNaNAndInfPixels) {
    TmpDir dir;
    std::string path = dir / "nan.shard";
    write_planted_shard(path, DType::f32, 0.5f, 2 * 18 + 9 + 4, NAN);  // sample 2, channel 1, y 1, x 1
    expect_error([&] { load_dataset(path); }, path, "NaN pixel in sample 2 (channel 1, y 1, x 1)");
    expect_error([&] { verify_shard(path); }, path, "NaN pixel in sample 2");

    path = dir / "inf.shard";
    write_planted_shard(path, DType::f16, 0.5f, 1 * 18 + 5, -INFINITY);  // sample 1, channel 0, y 1, x 2
    expect_error([&] { load_dataset(path); }, path, "Inf pixel in sample 1 (channel 0, y 1, x 2)");
    expect_error([&] { verify_shard(path); }, path, "Inf pixel in sample 1");
    // A finite f16 max with a tiny std overflows float after normalization.
    path = dir / "big.shard";
    write_planted_shard(path, DType::f16, 65504.f, 0, 65504.f, {1e-36, 1});
    expect_error([&] { load_dataset(path); }, path, "not finite after normalization");
}

// check_finite scans bits a block at a time: the first NaN or Inf wherever it
// falls (block edges included, another one in a later block), and no false alarm
// from the largest finite values, subnormals or negative zero.
TEST(Shards, CheckFiniteNamesTheFirstBadPixelAnywhere) {
    for (DType d : {DType::f16, DType::f32}) {
        SCOPED_TRACE(dtype_name(d));
        const ShardHeader h = make_header(1, 3, 32, 32, d, 2);  // 3072 pixels, blocks of 1024
        const float largest = d == DType::f16 ? 65504.f : FLT_MAX, tiny = d == DType::f16 ? 6e-8f : 1e-45f;
        std::vector<float> px(3072);
        const float finite[4] = {largest, -largest, tiny, -0.f};
        for (size_t i = 0; i < px.size(); i++) px[i] = finite[i % 4];
        auto stored = [&](const std::vector<float>& v) {
            std::vector<char> b(v.size() * dtype_size(d));
            for (size_t i = 0; i < v.size(); i++) {
                if (d == DType::f16) {
                    const uint16_t x = float_to_half(v[i]);
                    std::memcpy(&b[2 * i], &x, 2);
                } else {
                    std::memcpy(&b[4 * i], &v[i], 4);
                }
            }
            return b;
        };
        EXPECT_NO_THROW(check_finite(stored(px).data(), px.size(), h, 0, "x.shard"));
        for (size_t at : {size_t(0), size_t(1023), size_t(1024), size_t(2047), size_t(3071)})
            for (float bad : {NAN, INFINITY, -INFINITY}) {
                std::vector<float> v = px;
                v[at] = bad;
                if (at + 1100 < v.size()) v[at + 1100] = NAN;  // in a later block
                const std::string where = std::string(std::isnan(bad) ? "NaN" : "Inf") +
                                          " pixel in sample 0 (channel " + std::to_string(at / 1024) + ", y " +
                                          std::to_string(at % 1024 / 32) + ", x " + std::to_string(at % 32) + ")";
                expect_error([&] { check_finite(stored(v).data(), v.size(), h, 0, "x.shard"); }, "x.shard", where);
            }
    }
}

TEST(Shards, RefusesEmptyGlob) {
    TmpDir dir;
    std::string pattern = dir / "nothing-*.shard";
    expect_error([&] { expand_glob(pattern); }, pattern, "no files match");
    expect_error([&] { load_dataset(pattern); }, pattern, "no files match");
}

TEST(Shards, WriterRefusesBadHeaders) {
    TmpDir dir;
    std::string path = dir / "h.shard";
    std::vector<char> px(64, 0);
    ShardHeader h = make_header(1, 2, 2, 2, DType::u8, 2);
    h.std[1] = 0;
    expect_error([&] { write_shard(path, h, {0}, px.data()); }, path, "std of channel 1");
    h = make_header(1, 2, 2, 2, DType::u8, 2);
    h.channel_names.pop_back();
    expect_error([&] { write_shard(path, h, {0}, px.data()); }, path, "channel_names has 1 entries");
    h = make_header(0, 2, 2, 2, DType::u8, 2);
    expect_error([&] { write_shard(path, h, {}, px.data()); }, path, "count 0");
    expect_error([&] { dtype_from_name("bfloat16", "cfg.json"); }, "cfg.json", "unknown dtype 'bfloat16'");
    EXPECT_FALSE(exists(path));
}

// ---------------------------------------------------------------------------
// atomic writes

TEST(Shards, FailedWriteLeavesNothing) {
    TmpDir dir;
    std::string path = dir / "no-such-dir/x.shard";
    ShardHeader h = make_header(2, 1, 2, 2, DType::f32, 2);
    std::vector<float> px(8, 1.f);
    expect_error([&] { write_shard(path, h, {0, 1}, px.data()); }, path, "cannot create");
    EXPECT_FALSE(exists(path));
    EXPECT_FALSE(exists(path + ".tmp"));

    if (geteuid() != 0) {  // root writes anywhere
        std::string ro = dir / "ro";
        ASSERT_EQ(::mkdir(ro.c_str(), 0555), 0);
        std::string p2 = ro + "/x.shard";
        expect_error([&] { write_shard(p2, h, {0, 1}, px.data()); }, p2, "cannot create");
        EXPECT_FALSE(exists(p2));
        EXPECT_FALSE(exists(p2 + ".tmp"));
    }
}

// Runs write_shard of a 1 MiB shard to `path` in a child process whose
// file-size limit makes it die part way through the images; returns the
// child's exit code (0: it failed with a write error, as it should).
static int write_with_size_limit(const std::string& path) {
    pid_t pid = fork();
    if (pid < 0) return -1;
    if (pid == 0) {
        signal(SIGXFSZ, SIG_IGN);  // let write() fail with EFBIG instead of killing us
        struct rlimit lim = {256 << 10, 256 << 10};
        if (setrlimit(RLIMIT_FSIZE, &lim) != 0) _exit(3);
        ShardHeader h = make_header(64, 4, 32, 32, DType::f32, 2);
        std::vector<float> px(size_t(64) * 4 * 32 * 32, 0.25f);
        try {
            write_shard(path, h, std::vector<int32_t>(64, 1), px.data());
        } catch (const UserError& e) {
            _exit(std::string(e.what()).find("write failed") != std::string::npos ? 0 : 4);
        }
        _exit(5);
    }
    int status = 0;
    if (waitpid(pid, &status, 0) != pid || !WIFEXITED(status)) return -2;
    return WEXITSTATUS(status);
}

// A write that dies part way leaves nothing at a new path, and the previous
// shard untouched at an existing one; no temporary stays behind.
TEST(Shards, InterruptedWriteLeavesNoShard) {
    TmpDir dir;
    std::string fresh = dir / "new.shard";
    EXPECT_EQ(write_with_size_limit(fresh), 0);
    EXPECT_FALSE(exists(fresh));
    EXPECT_FALSE(exists(fresh + ".tmp"));

    std::string path = dir / "old.shard";
    ShardHeader old = write_test_shard(path);
    std::string before = read_bytes(path);
    EXPECT_EQ(write_with_size_limit(path), 0);
    EXPECT_EQ(read_bytes(path), before);
    EXPECT_NO_THROW(verify_shard(path));
    EXPECT_FALSE(exists(path + ".tmp"));
    EXPECT_EQ(read_shard_header(path).crc32c, old.crc32c);
}

// ---------------------------------------------------------------------------
// synthetic data sets

TEST(Synth, TinyIsDeterministic) {
    TmpDir dir;
    synthesize("tiny", dir / "a", 300, 7, false);
    synthesize("tiny", dir / "b", 300, 7, false);
    synthesize("tiny", dir / "c", 300, 8, false);
    for (const char* f : {"train-00000.shard", "val-00000.shard"}) {
        std::string a = read_bytes(dir / "a" + "/" + f);
        EXPECT_EQ(a, read_bytes(dir / "b" + "/" + f)) << f;
        EXPECT_NE(a, read_bytes(dir / "c" + "/" + f)) << f;
    }
}

TEST(Synth, TinyLayoutAndStatistics) {
    TmpDir dir;
    std::string out = dir / "deep/er/data";  // mkdir -p
    synthesize("tiny", out, 5000, 1, false);
    std::vector<std::string> train = expand_glob(out + "/train-*.shard");
    ASSERT_EQ(train.size(), 2u);
    ShardHeader t0 = read_shard_header(train[0]), t1 = read_shard_header(train[1]);
    ShardHeader v0 = read_shard_header(out + "/val-00000.shard");
    EXPECT_EQ(expand_glob(out + "/val-*.shard").size(), 1u);
    EXPECT_EQ(t0.count, 4096);
    EXPECT_EQ(t1.count, 904);
    EXPECT_EQ(v0.count, 1250);
    EXPECT_EQ(t0.channels, 4);
    EXPECT_EQ(t0.height, 32);
    EXPECT_EQ(t0.width, 32);
    EXPECT_EQ(t0.dtype, DType::f32);
    EXPECT_EQ(t0.num_classes, 4);
    EXPECT_EQ(t0.channel_names, (std::vector<std::string>{"ch0", "ch1", "ch2", "ch3"}));
    EXPECT_EQ(t0.mean, t1.mean);
    EXPECT_EQ(t0.mean, v0.mean);
    EXPECT_EQ(t0.std, v0.std);
    for (const auto& f : train) EXPECT_NO_THROW(verify_shard(f));
    EXPECT_NO_THROW(verify_shard(out + "/val-00000.shard"));

    // The header statistics are those of the training pixels, and so the
    // normalized training set has mean 0, std 1 per channel.
    Dataset ds = load_dataset(out + "/train-*.shard");
    size_t hw = 32 * 32;
    for (int c = 0; c < 4; c++) {
        double s = 0, s2 = 0;
        for (int64_t i = 0; i < ds.count(); i++)
            for (size_t j = 0; j < hw; j++) {
                double v = ds.images[(size_t(i) * 4 + c) * hw + j];
                s += v, s2 += v * v;
            }
        double n = double(ds.count()) * hw, m = s / n;
        EXPECT_NEAR(m, 0, 1e-4) << c;
        EXPECT_NEAR(std::sqrt(s2 / n - m * m), 1, 1e-4) << c;
    }
    std::vector<int> per_class(4, 0);
    for (int32_t l : ds.labels) per_class[size_t(l)]++;
    EXPECT_EQ(per_class, (std::vector<int>{1250, 1250, 1250, 1250}));

    // A smaller run into the same directory removes the now stale second
    // shard, and what a killed run staged beyond its own last shard; a file
    // that only looks alike stays.
    write_bytes(out + "/train-00007.shard.part", "killed");
    write_bytes(out + "/train-00008.shard.part.tmp", "killed while writing");
    write_bytes(out + "/train-notes.shard.part", "mine");
    ASSERT_EQ(::mkdir((out + "/train-00009.shard.part").c_str(), 0755), 0);
    synthesize("tiny", out, 100, 1, false);
    EXPECT_EQ(expand_glob(out + "/train-*.shard"), std::vector<std::string>{out + "/train-00000.shard"});
    EXPECT_FALSE(exists(out + "/train-00007.shard.part"));
    EXPECT_FALSE(exists(out + "/train-00008.shard.part.tmp"));
    EXPECT_TRUE(exists(out + "/train-notes.shard.part"));
    EXPECT_TRUE(exists(out + "/train-00009.shard.part"));  // a directory: not a conversion's
    EXPECT_EQ(read_shard_header(out + "/val-00000.shard").count, 25);
}

// The label lives only in which channel pair shows the same texture: an
// oracle that matches each channel against the four textures and compares
// channels gets it right, while each channel's texture alone is uniform
// whatever the label.
TEST(Synth, TinyLabelIsWhichChannelsShareATexture) {
    TmpDir dir;
    synthesize("tiny", dir.path, 2000, 3, false);
    Dataset ds = load_dataset(dir / "train-*.shard");
    ASSERT_EQ(ds.count(), 2000);
    const int pairs[4][2] = {{0, 1}, {2, 3}, {0, 3}, {1, 2}};
    // The 8x8 tiles of the generator, tiled over 32x32.
    auto texture = [](int k, int y, int x) {
        y %= 8, x %= 8;
        const bool v[4] = {y < 4, x < 4, (y < 4) == (x < 4), (x + y) % 8 < 4};
        return v[k] ? 1.0 : -1.0;
    };
    int correct = 0;
    std::vector<std::vector<int>> seen(4, std::vector<int>(16, 0));  // [class][channel*4 + texture]
    for (int64_t i = 0; i < ds.count(); i++) {
        int tex[4];
        for (int c = 0; c < 4; c++) {
            const float* img = ds.images.data() + (size_t(i) * 4 + c) * 1024;
            double best = -1e30;
            for (int k = 0; k < 4; k++) {  // matched filter
                double s = 0;
                for (int p = 0; p < 1024; p++) s += img[p] * texture(k, p / 32, p % 32);
                if (s > best) best = s, tex[c] = k;
            }
        }
        int guess = -1;
        for (int k = 0; k < 4; k++)
            if (tex[pairs[k][0]] == tex[pairs[k][1]]) guess = k;
        const int label = ds.labels[size_t(i)];
        correct += guess == label;
        for (int c = 0; c < 4; c++) seen[size_t(label)][size_t(c * 4 + tex[c])]++;
    }
    EXPECT_GE(correct, 0.99 * ds.count());

    // Per channel and class, each texture turns up about a quarter of the
    // time (500 images per class: 125 expected, binomial sd 9.7).
    for (int l = 0; l < 4; l++)
        for (int q = 0; q < 16; q++)
            EXPECT_NEAR(seen[size_t(l)][size_t(q)], 125, 45) << "class " << l << " channel " << q / 4 << " texture " << q % 4;
}

// Mean of each (channel, quadrant) of every image: the features the
// so2sat/jumpcp generators hide the class in.
static std::vector<double> quadrant_means(const Dataset& ds) {
    int C = ds.shape.channels, H = ds.shape.height, W = ds.shape.width;
    std::vector<double> f(size_t(ds.count()) * C * 4, 0);
    for (int64_t i = 0; i < ds.count(); i++)
        for (int c = 0; c < C; c++)
            for (int y = 0; y < H; y++)
                for (int x = 0; x < W; x++) {
                    int q = (y >= H / 2) * 2 + (x >= W / 2);
                    f[(size_t(i) * C + c) * 4 + q] += ds.images[((size_t(i) * C + c) * H + y) * W + x] / (H * W / 4.0);
                }
    return f;
}

// Nearest class centroid, fitted on train, scored on val.
static double centroid_accuracy(const Dataset& train, const Dataset& val) {
    int K = train.shape.num_classes;
    size_t F = size_t(train.shape.channels) * 4;
    std::vector<double> ft = quadrant_means(train), fv = quadrant_means(val);
    std::vector<double> cen(size_t(K) * F, 0);
    std::vector<int> n(size_t(K), 0);
    for (int64_t i = 0; i < train.count(); i++) {
        int l = train.labels[size_t(i)];
        n[size_t(l)]++;
        for (size_t j = 0; j < F; j++) cen[size_t(l) * F + j] += ft[size_t(i) * F + j];
    }
    for (int k = 0; k < K; k++)
        for (size_t j = 0; j < F; j++) cen[size_t(k) * F + j] /= std::max(1, n[size_t(k)]);
    int correct = 0;
    for (int64_t i = 0; i < val.count(); i++) {
        double best = 1e300;
        int guess = -1;
        for (int k = 0; k < K; k++) {
            double d = 0;
            for (size_t j = 0; j < F; j++) {
                double e = fv[size_t(i) * F + j] - cen[size_t(k) * F + j];
                d += e * e;
            }
            if (d < best) best = d, guess = k;
        }
        correct += guess == val.labels[size_t(i)];
    }
    return double(correct) / double(val.count());
}

TEST(Synth, So2SatIsLearnableButNotTrivial) {
    TmpDir dir;
    synthesize("so2sat", dir.path, 1700, 5, false);  // 100 per class
    ShardHeader h = read_shard_header(dir / "train-00000.shard");
    EXPECT_EQ(h.channels, 18);
    EXPECT_EQ(h.height, 32);
    EXPECT_EQ(h.dtype, DType::f16);
    EXPECT_EQ(h.num_classes, 17);
    EXPECT_EQ(h.channel_names.size(), 18u);
    EXPECT_NO_THROW(verify_shard(dir / "train-00000.shard"));
    Dataset train = load_dataset(dir / "train-*.shard"), val = load_dataset(dir / "val-*.shard");
    EXPECT_EQ(val.count(), 425);
    // A nearest-centroid rule gets about 0.7 (0.73 at 200 per class).
    double acc = centroid_accuracy(train, val);
    EXPECT_GT(acc, 0.4);   // chance is 1/17
    EXPECT_LT(acc, 0.95);  // but the per-image nuisance keeps it from being trivial
}

// Learnability is the same construction as so2sat's; at 8 images per class
// a nearest-centroid rule scores about 0.68 on val (chance 1/161), too slow
// to generate here (400k pixels per image), so this checks the format only.
TEST(Synth, JumpcpShape) {
    TmpDir dir;
    synthesize("jumpcp", dir.path, 16, 2, false);
    ShardHeader h = read_shard_header(dir / "train-00000.shard");
    EXPECT_EQ(h.count, 16);
    EXPECT_EQ(h.channels, 8);
    EXPECT_EQ(h.height, 224);
    EXPECT_EQ(h.width, 224);
    EXPECT_EQ(h.dtype, DType::u8);
    EXPECT_EQ(h.num_classes, 161);
    EXPECT_EQ(h.channel_names.size(), 8u);
    for (int c = 0; c < 8; c++) {
        EXPECT_GT(h.mean[size_t(c)], 20);
        EXPECT_LT(h.mean[size_t(c)], 120);
        EXPECT_GT(h.std[size_t(c)], 5);
    }
    EXPECT_NO_THROW(verify_shard(dir / "train-00000.shard"));
    EXPECT_NO_THROW(verify_shard(dir / "val-00000.shard"));
    EXPECT_EQ(read_shard_header(dir / "val-00000.shard").count, 4);
    EXPECT_EQ(read_shard_header(dir / "val-00000.shard").mean, h.mean);
}

TEST(Synth, RefusesBadArguments) {
    TmpDir dir;
    expect_error([&] { synthesize("imagenet", dir.path, 10, 1, false); }, "--preset imagenet", "unknown preset");
    expect_error([&] { synthesize("tiny", dir.path, 0, 1, false); }, "--count 0", "at least 1");
    std::string file = dir / "f";
    write_bytes(file, "x");
    expect_error([&] { synthesize("tiny", file + "/sub", 10, 1, false); }, file, "not a directory");
}

// synth stages both splits and commits them together: a run that fails part
// way (here the validation shard cannot be written) leaves the earlier set
// whole, not new training shards beside old validation ones.
TEST(Synth, AFailedRunLeavesTheEarlierSetWhole) {
    TmpDir dir;
    synthesize("tiny", dir.path, 64, 1, false);
    const std::string train = read_bytes(dir / "train-00000.shard"), val = read_bytes(dir / "val-00000.shard");
    ASSERT_EQ(::mkdir((dir / "val-00000.shard.part.tmp").c_str(), 0777), 0);  // where write_shard writes
    expect_error([&] { synthesize("tiny", dir.path, 64, 2, false); }, dir / "val-00000.shard.part", "cannot create");
    EXPECT_EQ(read_bytes(dir / "train-00000.shard"), train);
    EXPECT_EQ(read_bytes(dir / "val-00000.shard"), val);
    EXPECT_FALSE(exists(dir / "train-00000.shard.part"));
    ASSERT_EQ(::rmdir((dir / "val-00000.shard.part.tmp").c_str()), 0);
    synthesize("tiny", dir.path, 64, 2, false);
    EXPECT_NE(read_bytes(dir / "train-00000.shard"), train);
}
