// Converters (data/convert.h): So2Sat LCZ42 HDF5 and .npy lists, value by
// value against the inputs, every refusal, and what a failed or killed
// conversion leaves behind.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include <signal.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#ifdef PRISM_HDF5
#include <hdf5.h>
#endif

#include "data/convert.h"
#include "data/shard.h"
#include "engine/common.h"
#include "tests/shardutil.h"
#include "tests/testutil.h"

using namespace prism;
using namespace prism::testing;

namespace {

// Stored value i of a shard's images, as double.
double stored_value(const char* images, DType d, size_t i) {
    switch (d) {
        case DType::u8: return double(((const uint8_t*)images)[i]);
        case DType::u16: { uint16_t v; std::memcpy(&v, images + 2 * i, 2); return v; }
        case DType::f16: { uint16_t v; std::memcpy(&v, images + 2 * i, 2); return half_to_float(v); }
        case DType::f32: { float v; std::memcpy(&v, images + 4 * i, 4); return v; }
    }
    return 0;
}

struct ShardSet {
    ShardHeader first;           // header of shard 0
    std::vector<int64_t> counts;  // per shard
    std::vector<double> values;  // every stored value, in order
    std::vector<int32_t> labels;
};

// Reads every DIR/PREFIX-*.shard raw; checks that all headers agree.
ShardSet read_shards(const std::string& dir, const std::string& prefix = "train") {
    ShardSet s;
    for (const std::string& path : expand_glob(dir + "/" + prefix + "-*.shard")) {
        verify_shard(path);
        ShardHeader h = read_shard_header(path);
        if (s.counts.empty()) s.first = h;
        EXPECT_TRUE(h.same_shape(s.first)) << path;
        EXPECT_EQ(h.mean, s.first.mean) << path;
        EXPECT_EQ(h.std, s.first.std) << path;
        EXPECT_EQ(h.channel_names, s.first.channel_names) << path;
        s.counts.push_back(h.count);
        std::string b = read_bytes(path);
        size_t n = size_t(h.count) * h.channels * h.height * h.width;
        for (size_t i = 0; i < n; i++) s.values.push_back(stored_value(b.data() + h.images_offset, h.dtype, i));
        const int32_t* l = (const int32_t*)(b.data() + h.labels_offset);
        s.labels.insert(s.labels.end(), l, l + h.count);
    }
    return s;
}

// Per-channel mean and population std of values laid out [n][C][hw].
void direct_stats(const std::vector<double>& v, int C, size_t hw, std::vector<double>& mean, std::vector<double>& sd) {
    size_t n = v.size() / (C * hw);
    mean.assign(size_t(C), 0);
    sd.assign(size_t(C), 0);
    for (int c = 0; c < C; c++) {
        long double s = 0, s2 = 0;
        for (size_t i = 0; i < n; i++)
            for (size_t j = 0; j < hw; j++) s += v[(i * C + c) * hw + j];
        long double m = s / (n * hw);
        for (size_t i = 0; i < n; i++)
            for (size_t j = 0; j < hw; j++) s2 += (v[(i * C + c) * hw + j] - m) * (v[(i * C + c) * hw + j] - m);
        mean[size_t(c)] = double(m);
        double d = double(std::sqrt(s2 / (n * hw)));
        sd[size_t(c)] = d > 0 ? d : 1.0;
    }
}

void expect_stats(const ShardSet& s, const std::vector<double>& stored) {
    std::vector<double> mean, sd;
    direct_stats(stored, s.first.channels, size_t(s.first.height) * s.first.width, mean, sd);
    for (int c = 0; c < s.first.channels; c++) {
        EXPECT_NEAR(s.first.mean[size_t(c)], mean[size_t(c)], 1e-12 * (1 + std::fabs(mean[size_t(c)]))) << c;
        // Relative to the values' scale: a std far below the mean carries fewer exact digits.
        EXPECT_NEAR(s.first.std[size_t(c)], sd[size_t(c)], 1e-12 * (sd[size_t(c)] + std::fabs(mean[size_t(c)]))) << c;
    }
}

// Names of the *.shard* entries of a directory (shards and leftovers), sorted.
std::vector<std::string> shard_entries(const std::string& dir) {
    std::vector<std::string> out;
    for (const auto& e : std::filesystem::directory_iterator(dir)) {
        std::string name = e.path().filename().string();
        if (name.find(".shard") != std::string::npos) out.push_back(name);
    }
    std::sort(out.begin(), out.end());
    return out;
}

// ---------------------------------------------------------------------------
// .npy writing

std::string npy_bytes(const std::string& descr, const std::vector<int64_t>& shape, const std::string& data,
                      int major = 1, bool fortran = false) {
    std::string dict = "{'descr': '" + descr + "', 'fortran_order': " + (fortran ? "True" : "False") + ", 'shape': (";
    for (size_t i = 0; i < shape.size(); i++) dict += std::to_string(shape[i]) + (shape.size() == 1 || i + 1 < shape.size() ? ", " : "");
    dict += "), }";
    size_t prefix = major == 1 ? 10 : 12;
    while ((prefix + dict.size() + 1) % 64) dict += ' ';
    dict += '\n';
    std::string out = std::string("\x93NUMPY", 6) + char(major) + char(0);
    uint32_t len = uint32_t(dict.size());
    out.append((const char*)&len, major == 1 ? 2 : 4);
    return out + dict + data;
}

template <class T>
std::string raw(const std::vector<T>& v) {
    return std::string((const char*)v.data(), v.size() * sizeof(T));
}

// Writes n files of shape [C,H,W] from `value(i, j)` (image i, element j)
// as `descr` (<T> the element type) and list.csv with labels i % 5. Returns
// the values as double.
template <class T>
std::vector<double> write_npy_set(const TmpDir& dir, const std::string& descr, int n, int C, int H, int W,
                                  const std::function<double(int, size_t)>& value, int major = 1) {
    ::mkdir((dir / "img").c_str(), 0777);
    std::string csv = "path,label\r\n";  // CRLF, as Windows tools write it
    std::vector<double> all;
    size_t per = size_t(C) * H * W;
    for (int i = 0; i < n; i++) {
        std::vector<T> v(per);
        for (size_t j = 0; j < per; j++) {
            v[j] = T(value(i, j));
            all.push_back(double(v[j]));
        }
        std::string name = "img/" + std::to_string(i) + ".npy";
        write_bytes(dir / name, npy_bytes(descr, {C, H, W}, raw(v), i % 2 ? major : 1));
        csv += (i == 3 ? dir / name : name) + "," + std::to_string(i % 5) + "\r\n";  // one absolute path
    }
    write_bytes(dir / "list.csv", csv);
    return all;
}

NpyOptions npy_options(const TmpDir& dir, int64_t shard_size = 3) {
    NpyOptions o;
    o.list = dir / "list.csv";
    o.out = dir / "out";
    o.shard_size = shard_size;
    o.verbose = false;
    return o;
}

// Converts the set in `dir` and checks dtype, values, labels and statistics.
void expect_npy_round_trip(const TmpDir& dir, const std::vector<double>& values, DType want, int n, int C, int H,
                           int W) {
    convert_npy(npy_options(dir));
    ShardSet s = read_shards(dir / "out");
    EXPECT_EQ(s.first.dtype, want) << dtype_name(s.first.dtype);
    EXPECT_EQ(s.first.channels, C);
    EXPECT_EQ(s.first.height, H);
    EXPECT_EQ(s.first.width, W);
    EXPECT_EQ(s.first.num_classes, std::min(n, 5));
    EXPECT_EQ(s.first.channel_names[0], "ch0");
    EXPECT_EQ(s.first.channel_names[size_t(C - 1)], "ch" + std::to_string(C - 1));
    EXPECT_EQ(s.counts, (std::vector<int64_t>{3, 3, 1}));
    ASSERT_EQ(s.values.size(), values.size());
    std::vector<double> stored(values.size());
    for (size_t i = 0; i < values.size(); i++) stored[i] = double(float(values[i]));  // float64 lands as float32
    size_t diffs = 0;
    for (size_t i = 0; i < values.size(); i++) diffs += s.values[i] != stored[i];
    EXPECT_EQ(diffs, 0u);
    for (int i = 0; i < n; i++) EXPECT_EQ(s.labels[size_t(i)], i % 5);
    expect_stats(s, stored);
    Dataset ds = load_dataset(dir / "out/train-*.shard");
    EXPECT_EQ(ds.count(), n);
}

const int kN = 7, kC = 3, kH = 4, kW = 5;

}  // namespace

// ---------------------------------------------------------------------------
// .npy round trips, one per source dtype and narrowing choice

TEST(ConvertNpy, Uint8StaysUint8) {
    TmpDir dir;
    auto v = write_npy_set<uint8_t>(dir, "|u1", kN, kC, kH, kW, [](int i, size_t j) { return double((i * 37 + j * 11) % 256); });
    expect_npy_round_trip(dir, v, DType::u8, kN, kC, kH, kW);
}

TEST(ConvertNpy, Uint16StaysUint16AndSmallUint16BecomesUint8) {
    {
        TmpDir dir;
        auto v = write_npy_set<uint16_t>(dir, "<u2", kN, kC, kH, kW, [](int i, size_t j) { return double((i * 7919 + j * 131) % 65536); }, 2);
        expect_npy_round_trip(dir, v, DType::u16, kN, kC, kH, kW);
    }
    {
        TmpDir dir;
        auto v = write_npy_set<uint16_t>(dir, "<u2", kN, kC, kH, kW, [](int i, size_t j) { return double((i + j) % 256); });
        expect_npy_round_trip(dir, v, DType::u8, kN, kC, kH, kW);
    }
}

TEST(ConvertNpy, Float32NarrowsToWhatHoldsItExactly) {
    {  // integers 0..255
        TmpDir dir;
        auto v = write_npy_set<float>(dir, "<f4", kN, kC, kH, kW, [](int i, size_t j) { return double((i * 5 + j) % 256); }, 2);
        expect_npy_round_trip(dir, v, DType::u8, kN, kC, kH, kW);
    }
    {  // integers up to 65535
        TmpDir dir;
        auto v = write_npy_set<float>(dir, "<f4", kN, kC, kH, kW, [](int i, size_t j) { return double(300 + i * 9000 + j); });
        expect_npy_round_trip(dir, v, DType::u16, kN, kC, kH, kW);
    }
    {  // 0.5 steps, some negative
        TmpDir dir;
        auto v = write_npy_set<float>(dir, "<f4", kN, kC, kH, kW, [](int i, size_t j) { return 0.5 * double(int(j) - 20 + i); });
        expect_npy_round_trip(dir, v, DType::f16, kN, kC, kH, kW);
    }
    {  // 1e-7 detail
        TmpDir dir;
        auto v = write_npy_set<float>(dir, "<f4", kN, kC, kH, kW, [](int i, size_t j) { return 1.0 + 1e-7 * double(j + 3 * i); });
        expect_npy_round_trip(dir, v, DType::f32, kN, kC, kH, kW);
    }
}

TEST(ConvertNpy, Float64) {
    {  // integers above 255
        TmpDir dir;
        auto v = write_npy_set<double>(dir, "<f8", kN, kC, kH, kW, [](int i, size_t j) { return double(1000 * i + j); });
        expect_npy_round_trip(dir, v, DType::u16, kN, kC, kH, kW);
    }
    {  // float32-exact values
        TmpDir dir;
        auto v = write_npy_set<double>(dir, "<f8", kN, kC, kH, kW, [](int i, size_t j) { return double(float(0.1 * (j + i))); });
        expect_npy_round_trip(dir, v, DType::f32, kN, kC, kH, kW);
    }
    {  // values float32 can only round: stored as float32 (compared as float(x))
        TmpDir dir;
        auto v = write_npy_set<double>(dir, "<f8", kN, kC, kH, kW, [](int i, size_t j) { return 0.1 * double(j + i) + 1e-12; }, 2);
        expect_npy_round_trip(dir, v, DType::f32, kN, kC, kH, kW);
    }
}

TEST(ConvertNpy, ListOptionsAndStaleShards) {
    TmpDir dir;
    write_npy_set<uint8_t>(dir, "|u1", kN, kC, kH, kW, [](int i, size_t j) { return double(i + j); });
    NpyOptions o = npy_options(dir, 2);  // 4 shards
    convert_npy(o);
    EXPECT_EQ(shard_entries(o.out).size(), 4u);
    o.shard_size = 3;  // 3 shards: the fourth must go
    o.num_classes = 9;
    convert_npy(o);
    EXPECT_EQ(shard_entries(o.out),
              (std::vector<std::string>{"train-00000.shard", "train-00001.shard", "train-00002.shard"}));
    EXPECT_EQ(read_shard_header(o.out + "/train-00000.shard").num_classes, 9);

    o.prefix = "val";  // another prefix leaves train alone
    o.shard_size = 100;
    convert_npy(o);
    EXPECT_EQ(shard_entries(o.out).size(), 4u);
    EXPECT_EQ(read_shard_header(o.out + "/val-00000.shard").count, kN);

    // A list with a trailing newline missing and blank lines is fine too.
    write_bytes(dir / "list.csv", "path,label\nimg/0.npy,1\n\nimg/1.npy,0");
    o.num_classes = 0;
    convert_npy(o);
    EXPECT_EQ(read_shard_header(o.out + "/val-00000.shard").count, 2);
    EXPECT_EQ(read_shard_header(o.out + "/val-00000.shard").num_classes, 2);

    o.prefix = "a/b";
    expect_error([&] { convert_npy(o); }, "--prefix 'a/b'", "letters");
    o.prefix = "train";
    o.shard_size = -1;  // 0 is the default: 4096 images, fewer where a shard would pass 1 GiB
    expect_error([&] { convert_npy(o); }, "--shard-size -1", "at least 1");
}

// A validation split converted with --stats-from carries the training
// split's normalization, not its own.
TEST(ConvertNpy, StatsFromAnotherShardSet) {
    TmpDir dir;
    write_npy_set<uint8_t>(dir, "|u1", kN, kC, kH, kW, [](int i, size_t j) { return double(i + j); });
    NpyOptions o = npy_options(dir, 100);
    convert_npy(o);
    const ShardHeader train = read_shard_header(o.out + "/train-00000.shard");
    write_npy_set<uint8_t>(dir, "|u1", kN, kC, kH, kW, [](int i, size_t j) { return double(3 * i + 2 * j); });
    o.prefix = "val";
    o.stats_from = o.out + "/train-*.shard";
    convert_npy(o);
    const ShardHeader val = read_shard_header(o.out + "/val-00000.shard");
    EXPECT_EQ(val.mean, train.mean);
    EXPECT_EQ(val.std, train.std);
    // The class count comes along: a split whose labels stop short of the
    // training split's largest still has its count (training refuses splits
    // that differ), and one that passes it, or a --num-classes that differs, is refused.
    ASSERT_EQ(train.num_classes, 5);
    write_bytes(dir / "list.csv", "path,label\nimg/0.npy,0\nimg/1.npy,2\n");
    convert_npy(o);
    EXPECT_EQ(read_shard_header(o.out + "/val-00000.shard").num_classes, 5);
    write_bytes(dir / "list.csv", "path,label\nimg/0.npy,0\nimg/1.npy,5\n");
    expect_error([&] { convert_npy(o); }, dir / "list.csv",
                 "line 3: label 5 is not below the 5 classes of --stats-from " + o.out + "/train-00000.shard");
    write_bytes(dir / "list.csv", "path,label\nimg/0.npy,0\n");
    o.num_classes = 7;
    expect_error([&] { convert_npy(o); }, o.out + "/train-00000.shard",
                 "--stats-from: has 5 classes, --num-classes says 7");
    o.num_classes = 5;
    convert_npy(o);
    EXPECT_EQ(read_shard_header(o.out + "/val-00000.shard").count, 1);
    o.num_classes = 0;
    write_npy_set<uint8_t>(dir, "|u1", kN, kC, kH, kW, [](int i, size_t j) { return double(3 * i + 2 * j); });
    o.stats_from = "";
    convert_npy(o);
    EXPECT_NE(read_shard_header(o.out + "/val-00000.shard").mean, train.mean);

    // Another channel count is refused, naming the shard.
    TmpDir other;
    write_npy_set<uint8_t>(other, "|u1", 2, kC + 1, kH, kW, [](int i, size_t j) { return double(i); });
    NpyOptions w = npy_options(other);
    w.stats_from = o.out + "/train-*.shard";
    expect_error([&] { convert_npy(w); }, o.out + "/train-00000.shard", "channels");
}

// Converting validation data into the training shards' directory without
// another --prefix would replace the shards its --stats-from reads: refused,
// with the training set intact.
TEST(ConvertNpy, StatsFromTheShardsItWouldReplaceIsRefused) {
    TmpDir dir;
    write_npy_set<uint8_t>(dir, "|u1", kN, kC, kH, kW, [](int i, size_t j) { return double(i + j); });
    NpyOptions o = npy_options(dir);
    convert_npy(o);
    const std::vector<std::string> before = shard_entries(o.out);
    const std::string first = read_bytes(o.out + "/train-00000.shard");
    o.stats_from = o.out + "/train-*.shard";
    expect_error([&] { convert_npy(o); }, "--stats-from '" + o.stats_from + "'",
                 "matches " + o.out + "/train-00000.shard, which this conversion (--out " + o.out +
                     " --prefix train) would replace");
    o.stats_from = dir / "out/../out/train-00002.shard";  // the same directory, named otherwise
    expect_error([&] { convert_npy(o); }, "--stats-from '" + o.stats_from + "'", "would replace");
    EXPECT_EQ(shard_entries(o.out), before);
    EXPECT_EQ(read_bytes(o.out + "/train-00000.shard"), first);
    o.prefix = "train2";  // "train-*" shards are no "train2-" shards
    o.stats_from = o.out + "/train-*.shard";
    convert_npy(o);
    EXPECT_EQ(read_shard_header(o.out + "/train2-00000.shard").mean, read_shard_header(o.out + "/train-00000.shard").mean);
}

// What can be checked without reading the images is checked before the first
// pass reads them (a 52 GB So2Sat file takes minutes), and a listed file is
// read whole only once its header says what it is.
TEST(ConvertNpy, ChecksOutputAndHeadersBeforeReadingImages) {
    TmpDir dir;
    write_npy_set<uint8_t>(dir, "|u1", kN, kC, kH, kW, [](int i, size_t j) { return double(i + j); });
    // Image 5 is no NPY file at all, but the bad --out and --stats-from come first.
    write_bytes(dir / "img/5.npy", "not an npy");
    write_bytes(dir / "file", "");
    NpyOptions o = npy_options(dir);
    o.out = dir / "file/out";
    expect_error([&] { convert_npy(o); }, dir / "file", "exists and is not a directory");
    o = npy_options(dir);
    o.stats_from = dir / "nothing-*.shard";
    expect_error([&] { convert_npy(o); }, o.stats_from, "no files match");
    // A huge file that is no NPY is refused from its first bytes: read whole,
    // it would need 64 GiB (the file is sparse and takes no disk). In a child
    // held to 2 GiB of address space, so that a reader that does read it
    // whole fails this test instead of the machine.
    const std::string big = dir / "img/6.npy";
    write_npy_set<uint8_t>(dir, "|u1", kN, kC, kH, kW, [](int i, size_t j) { return double(i + j); });
    auto refused_in_a_child = [&](const std::string& what) {
        const int status = in_child([&] {
            const rlimit limit = {rlim_t(2) << 30, rlim_t(2) << 30};
            ::setrlimit(RLIMIT_AS, &limit);
            try {
                convert_npy(npy_options(dir));
            } catch (const UserError& e) {
                _exit(std::string(e.what()).rfind(big + ": ", 0) == 0 &&
                              std::string(e.what()).find(what) != std::string::npos ? 0 : 2);
            } catch (...) {
                _exit(3);
            }
            _exit(4);
        });
        return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    };
    ASSERT_EQ(::truncate(big.c_str(), off_t(64) << 30), 0);  // 6.npy: a valid header, then 64 GiB
    EXPECT_EQ(refused_in_a_child("its header says"), 0);
    write_bytes(big, "not an npy either");
    ASSERT_EQ(::truncate(big.c_str(), off_t(64) << 30), 0);
    EXPECT_EQ(refused_in_a_child("not an NPY file (bad magic)"), 0);
}

// A FIFO where a file should be is refused at once instead of blocking the
// open until a writer comes (the test would hang).
TEST(ConvertNpy, FifosAreRefusedNotWaitedOn) {
    TmpDir dir;
    write_npy_set<uint8_t>(dir, "|u1", kN, kC, kH, kW, [](int i, size_t j) { return double(i + j); });
    ::unlink((dir / "img/2.npy").c_str());
    ASSERT_EQ(::mkfifo((dir / "img/2.npy").c_str(), 0600), 0);
    expect_error([&] { convert_npy(npy_options(dir)); }, dir / "img/2.npy", "not a regular file (listed on line 4");
    ::mkdir((dir / "shards").c_str(), 0777);
    ASSERT_EQ(::mkfifo((dir / "shards/train-00000.shard").c_str(), 0600), 0);
    expect_error([&] { read_shard_header(dir / "shards/train-00000.shard"); }, dir / "shards/train-00000.shard",
                 "not a regular file");
}

// Pass 2 holds a shard in memory: without --shard-size, a shard of large
// images is bounded at 1 GiB instead of 4096 images.
TEST(ConvertNpy, DefaultShardSizeIsBoundedInBytes) {
    TmpDir dir;
    const int C = 16, H = 1024, W = 1024;  // 16 MiB per uint8 image: 64 of them make 1 GiB
    write_npy_set<uint8_t>(dir, "|u1", 2, C, H, W, [](int i, size_t j) { return double((i + j) & 255); });
    NpyOptions o = npy_options(dir, 0);
    o.verbose = true;
    ::testing::internal::CaptureStdout();
    convert_npy(o);
    const std::string out = ::testing::internal::GetCapturedStdout();
    EXPECT_NE(out.find("stored as uint8, 2 classes, 64 images per shard"), std::string::npos) << out;
    o = npy_options(dir, 0);
    write_npy_set<uint8_t>(dir, "|u1", kN, kC, kH, kW, [](int i, size_t j) { return double(i + j); });
    o.verbose = true;
    ::testing::internal::CaptureStdout();
    convert_npy(o);
    const std::string small = ::testing::internal::GetCapturedStdout();
    EXPECT_NE(small.find("4096 images per shard"), std::string::npos) << small;
}

// ---------------------------------------------------------------------------
// .npy refusals: each names the file

TEST(ConvertNpy, RefusesBadFiles) {
    TmpDir dir;
    std::vector<float> px(size_t(kC) * kH * kW, 1.5f);
    std::string good = npy_bytes("<f4", {kC, kH, kW}, raw(px));
    struct Case {
        const char* what;
        std::string second;  // bytes of the second listed file
    } cases[] = {
        {"fortran_order is True", npy_bytes("<f4", {kC, kH, kW}, raw(px), 1, true)},
        {"differs from the first listed file's (3, 4, 5)", npy_bytes("<f4", {kC, kH, kW + 1}, raw(px) + std::string(12 * 4, '\0'))},
        {"big-endian dtype '>f4'", npy_bytes(">f4", {kC, kH, kW}, raw(px))},
        {"truncated", good.substr(0, good.size() - 3)},
        {"truncated", good.substr(0, 40)},
        {"extra bytes", good + "x"},
        {"unsupported dtype '<i4'", npy_bytes("<i4", {kC, kH, kW}, raw(px))},
        {"unsupported dtype '<f2'", npy_bytes("<f2", {kC, kH, kW}, raw(px).substr(0, px.size() * 2))},
        {"rank 2", npy_bytes("<f4", {kC, kH * kW}, raw(px))},
        {"not an NPY file", "hello, world: not numpy at all"},
        {"unsupported NPY version 3.0", npy_bytes("<f4", {kC, kH, kW}, raw(px), 3)},
        {"bad NPY header", std::string("\x93NUMPY\x01\x00\x08\x00{'descr'", 18) + raw(px)},
        {"NaN at channel 1, y 2, x 3", [&] {
             std::vector<float> q = px;
             q[size_t(1 * kH * kW + 2 * kW + 3)] = std::numeric_limits<float>::quiet_NaN();
             return npy_bytes("<f4", {kC, kH, kW}, raw(q));
         }()},
        {"Inf at", [&] {
             std::vector<double> q(px.size(), 2.0);
             q[5] = -std::numeric_limits<double>::infinity();
             return npy_bytes("<f8", {kC, kH, kW}, raw(q));
         }()},
        {"does not fit float32", [&] {
             std::vector<double> q(px.size(), 2.0);
             q[5] = 1e300;
             return npy_bytes("<f8", {kC, kH, kW}, raw(q));
         }()},
    };
    write_bytes(dir / "a.npy", good);
    write_bytes(dir / "list.csv", "path,label\na.npy,0\nb.npy,1\n");
    NpyOptions o = npy_options(dir);
    for (const Case& c : cases) {
        SCOPED_TRACE(c.what);
        write_bytes(dir / "b.npy", c.second);
        expect_error([&] { convert_npy(o); }, dir / "b.npy", c.what);
        EXPECT_FALSE(exists(o.out)) << "nothing is written before every file is checked";
    }
}

TEST(ConvertNpy, RefusesBadLists) {
    TmpDir dir;
    std::vector<uint8_t> px(size_t(kC) * kH * kW, 7);
    write_bytes(dir / "a.npy", npy_bytes("|u1", {kC, kH, kW}, raw(px)));
    NpyOptions o = npy_options(dir);
    struct Case {
        const char* csv;
        const char* what;
    } cases[] = {
        {"path,label\na.npy,-1\n", "line 2: label '-1' is not an integer"},
        {"path,label\na.npy,x\n", "line 2: label 'x'"},
        {"path,label\na.npy,1.5\n", "label '1.5'"},
        {"path,label\na.npy,\n", "label ''"},
        {"path,label\na.npy\n", "line 2: expected 'path,label'"},
        {"file,class\na.npy,1\n", "line 1: expected the header 'path,label'"},
        {"path,label\n", "lists no images"},
        {"", "empty file"},
        {"path,label\n,3\n", "empty path"},
    };
    for (const Case& c : cases) {
        SCOPED_TRACE(c.what);
        write_bytes(o.list, c.csv);
        expect_error([&] { convert_npy(o); }, o.list, c.what);
    }
    const char nul[] = "path,label\na.npy\0junk,1\n";  // open() would read a.npy
    write_bytes(o.list, std::string(nul, sizeof nul - 1));
    expect_error([&] { convert_npy(o); }, o.list, "line 2: the path holds a NUL byte");
    write_bytes(o.list, "path,label\na.npy,1\na.npy,4\n");
    o.num_classes = 3;
    expect_error([&] { convert_npy(o); }, o.list, "line 3: label 4 is not below --num-classes 3");
    o.num_classes = 0;

    write_bytes(o.list, "path,label\na.npy,1\nmissing.npy,0\n");
    expect_error([&] { convert_npy(o); }, dir / "missing.npy", "cannot open: No such file or directory (listed on line 3 of");
    o.list = dir / "nolist.csv";
    expect_error([&] { convert_npy(o); }, o.list, "cannot open");
    EXPECT_FALSE(exists(o.out));
}

// ---------------------------------------------------------------------------
// failed and killed conversions

// A conversion that fails, in either pass, or is killed part way leaves the
// shards of an earlier run as they were and no new file named *.shard.
TEST(ConvertNpy, FailedOrKilledConversionLeavesOldShards) {
    TmpDir dir;
    write_npy_set<uint8_t>(dir, "|u1", kN, kC, kH, kW, [](int i, size_t j) { return double(i * j % 200); });
    NpyOptions o = npy_options(dir);
    convert_npy(o);
    const std::vector<std::string> names = shard_entries(o.out);
    ASSERT_EQ(names.size(), 3u);
    std::vector<std::string> before;
    for (const auto& n : names) before.push_back(read_bytes(o.out + "/" + n));
    auto unchanged = [&] {
        EXPECT_EQ(shard_entries(o.out), names);
        for (size_t i = 0; i < names.size(); i++) EXPECT_EQ(read_bytes(o.out + "/" + names[i]), before[i]) << names[i];
    };

    // New data, 7 shards of 1.
    write_npy_set<uint8_t>(dir, "|u1", kN, kC, kH, kW, [](int i, size_t j) { return double((i + 1) * j % 250); });
    o.shard_size = 1;

    // Pass 1 fails on the sixth file.
    std::string sixth = read_bytes(dir / "img/5.npy");
    write_bytes(dir / "img/5.npy", sixth.substr(0, sixth.size() - 1));
    expect_error([&] { convert_npy(o); }, dir / "img/5.npy", "truncated");
    unchanged();
    write_bytes(dir / "img/5.npy", sixth);

    // Pass 2 fails on the third shard, after two were staged.
    std::string blocker = o.out + "/train-00002.shard.part";
    ASSERT_EQ(::mkdir(blocker.c_str(), 0777), 0);
    expect_error([&] { convert_npy(o); }, blocker, "cannot rename");
    ASSERT_EQ(::rmdir(blocker.c_str()), 0);
    unchanged();

    // Killed while writing the first shard (the file-size limit's signal).
    pid_t pid = fork();
    ASSERT_GE(pid, 0);
    if (pid == 0) {
        struct rlimit lim = {5000, 5000}, none = {0, 0};  // below the 8 KiB header and label pages
        if (setrlimit(RLIMIT_FSIZE, &lim) != 0 || setrlimit(RLIMIT_CORE, &none) != 0) _exit(3);
        signal(SIGXFSZ, SIG_DFL);
        try {
            convert_npy(o);
        } catch (...) {
            _exit(4);
        }
        _exit(5);
    }
    int status = 0;
    ASSERT_EQ(waitpid(pid, &status, 0), pid);
    ASSERT_TRUE(WIFSIGNALED(status)) << "exit code " << WEXITSTATUS(status);
    EXPECT_EQ(WTERMSIG(status), SIGXFSZ);
    std::vector<std::string> left = shard_entries(o.out);
    left.erase(std::remove_if(left.begin(), left.end(),
                              [](const std::string& n) { return n.rfind(".shard") != n.size() - 6; }),
               left.end());  // keep the names a *.shard glob would match
    EXPECT_EQ(left, names);
    for (size_t i = 0; i < names.size(); i++) EXPECT_EQ(read_bytes(o.out + "/" + names[i]), before[i]) << names[i];

    // The next run, undisturbed, replaces them all.
    convert_npy(o);
    EXPECT_EQ(read_shards(o.out).counts, std::vector<int64_t>(kN, 1));
}

// ---------------------------------------------------------------------------
// So2Sat LCZ42

#ifdef PRISM_HDF5
namespace {

struct H5Set {
    std::string name;
    std::vector<hsize_t> dims;
    std::vector<double> data;
};

void write_h5(const std::string& path, const std::vector<H5Set>& sets) {
    hid_t f = H5Fcreate(path.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
    ASSERT_GE(f, 0) << path;
    for (const H5Set& s : sets) {
        hid_t sp = H5Screate_simple(int(s.dims.size()), s.dims.data(), nullptr);
        hid_t ds = H5Dcreate2(f, s.name.c_str(), H5T_IEEE_F64LE, sp, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
        ASSERT_GE(ds, 0) << s.name;
        ASSERT_GE(H5Dwrite(ds, H5T_NATIVE_DOUBLE, H5S_ALL, H5S_ALL, H5P_DEFAULT, s.data.data()), 0) << s.name;
        H5Dclose(ds);
        H5Sclose(sp);
    }
    H5Fclose(f);
}

// A So2Sat-layout file of n images: sen1, sen2 (HWC), label one-hot.
struct So2SatData {
    H5Set sen1, sen2, label;
    std::vector<int32_t> classes;
    explicit So2SatData(hsize_t n, uint32_t seed = 1) {
        std::mt19937 r(seed);
        std::normal_distribution<double> normal(0.0, 0.3);
        std::uniform_real_distribution<double> uni(0.0, 0.6);
        sen1 = {"sen1", {n, 32, 32, 8}, {}};
        sen2 = {"sen2", {n, 32, 32, 10}, {}};
        label = {"label", {n, 17}, std::vector<double>(size_t(n) * 17, 0.0)};
        for (size_t i = 0; i < n * 32 * 32 * 8; i++) sen1.data.push_back(normal(r) + 0.01 * double(i % 8));
        for (size_t i = 0; i < n * 32 * 32 * 10; i++) sen2.data.push_back(uni(r) * (1 + double(i % 10)));
        for (hsize_t i = 0; i < n; i++) {
            classes.push_back(int32_t(r() % 17));
            label.data[size_t(i) * 17 + size_t(classes.back())] = 1.0;
        }
    }
    void write(const std::string& path) const { write_h5(path, {sen1, sen2, label}); }
    // Image i channel c pixel (y, x) in the file's HWC layout.
    double pixel(size_t i, int c, int y, int x) const {
        size_t p = size_t(y) * 32 + size_t(x);
        return c < 8 ? sen1.data[(i * 1024 + p) * 8 + size_t(c)] : sen2.data[(i * 1024 + p) * 10 + size_t(c - 8)];
    }
};

So2SatOptions so2sat_options(const std::string& in, const std::string& out, int64_t shard_size = 16) {
    So2SatOptions o;
    o.in = in;
    o.out = out;
    o.shard_size = shard_size;
    o.verbose = false;
    return o;
}

// Checks a converted set against the file, pixel by pixel in CHW order.
void expect_so2sat(const So2SatData& d, const std::string& out, DType dtype) {
    ShardSet s = read_shards(out);
    size_t n = d.classes.size();
    EXPECT_EQ(s.first.dtype, dtype);
    EXPECT_EQ(s.first.channels, 18);
    EXPECT_EQ(s.first.height, 32);
    EXPECT_EQ(s.first.width, 32);
    EXPECT_EQ(s.first.num_classes, 17);
    EXPECT_EQ(s.first.channel_names, so2sat_channel_names());
    EXPECT_EQ(s.first.channel_names.front(), "sen1_0");
    EXPECT_EQ(s.first.channel_names[8], "sen2_B2");
    EXPECT_EQ(s.first.channel_names.back(), "sen2_B12");
    EXPECT_EQ(s.labels, d.classes);
    ASSERT_EQ(s.values.size(), n * 18 * 1024);
    std::vector<double> stored(s.values.size());
    for (size_t i = 0; i < n; i++)
        for (int c = 0; c < 18; c++)
            for (int y = 0; y < 32; y++)
                for (int x = 0; x < 32; x++) {
                    float v = float(d.pixel(i, c, y, x));
                    if (dtype == DType::f16) v = half_to_float(float_to_half(v));
                    stored[((i * 18 + size_t(c)) * 32 + size_t(y)) * 32 + size_t(x)] = v;
                }
    size_t diffs = 0;
    for (size_t i = 0; i < stored.size(); i++) diffs += s.values[i] != stored[i];
    EXPECT_EQ(diffs, 0u);
    expect_stats(s, stored);
    Dataset ds = load_dataset(out + "/train-*.shard");
    EXPECT_EQ(ds.labels, d.classes);
}

}  // namespace
#endif

TEST(ConvertSo2Sat, RoundTrip) {
#ifndef PRISM_HDF5
    GTEST_SKIP() << "built without HDF5";
#else
    TmpDir dir;
    So2SatData d(37);
    d.write(dir / "training.h5");
    So2SatOptions o = so2sat_options(dir / "training.h5", dir / "out", 8);
    convert_so2sat(o);  // 5 shards first, so that the next run has stale ones to remove
    EXPECT_EQ(shard_entries(o.out).size(), 5u);
    o.shard_size = 16;
    convert_so2sat(o);
    EXPECT_EQ(shard_entries(o.out),
              (std::vector<std::string>{"train-00000.shard", "train-00001.shard", "train-00002.shard"}));
    EXPECT_EQ(read_shards(o.out).counts, (std::vector<int64_t>{16, 16, 5}));
    expect_so2sat(d, o.out, DType::f32);

    o.out = dir / "out16";
    o.dtype = DType::f16;
    convert_so2sat(o);
    expect_so2sat(d, o.out, DType::f16);

    // --stats-from shards of another class count are refused before any work.
    write_test_shard(dir / "five-00000.shard", DType::f32, 5, 18, 5);
    o.out = dir / "out_val";
    o.stats_from = dir / "five-*.shard";
    expect_error([&] { convert_so2sat(o); }, dir / "five-00000.shard",
                 "--stats-from: has 5 classes, the data being converted 17");
    EXPECT_FALSE(exists(o.out + "/train-00000.shard"));
#endif
}

TEST(ConvertSo2Sat, RefusesBadFiles) {
#ifndef PRISM_HDF5
    GTEST_SKIP() << "built without HDF5";
#else
    TmpDir dir;
    const hsize_t n = 6;
    const std::string path = dir / "bad.h5";
    So2SatOptions o = so2sat_options(path, dir / "out");
    auto refused = [&](const std::vector<H5Set>& sets, const std::string& what, DType dtype = DType::f32) {
        SCOPED_TRACE(what);
        write_h5(path, sets);
        o.dtype = dtype;
        expect_error([&] { convert_so2sat(o); }, path, what);
        EXPECT_FALSE(exists(o.out));
    };
    So2SatData d(n);
    refused({d.sen1, d.label}, "no dataset 'sen2'");
    H5Set sen1 = d.sen1;
    sen1.dims = {n, 32, 32, 7};
    sen1.data.resize(n * 32 * 32 * 7);
    refused({sen1, d.sen2, d.label}, "dataset 'sen1' has shape (6, 32, 32, 7), expected (n, 32, 32, 8)");
    H5Set flat = d.label;
    flat.dims = {n * 17};
    refused({d.sen1, d.sen2, flat}, "dataset 'label' has rank 1, expected shape (n, 17)");
    H5Set short_label = d.label;
    short_label.dims = {n - 1, 17};
    short_label.data.resize((n - 1) * 17);
    refused({d.sen1, d.sen2, short_label}, "disagree on the number of images: sen1 has 6, sen2 6, label 5");
    H5Set two = d.label;
    two.data[4 * 17 + size_t(d.classes[4] + 1) % 17] = 1.0;
    refused({d.sen1, d.sen2, two}, "dataset 'label': row 4 is not one-hot (2 entries are 1)");
    H5Set half = d.label;
    half.data[3 * 17 + size_t(d.classes[3])] = 0.5;
    refused({d.sen1, d.sen2, half}, "dataset 'label': row 3 is not one-hot (entry " + std::to_string(d.classes[3]) + " is 0.5)");
    H5Set zero = d.label;
    zero.data[2 * 17 + size_t(d.classes[2])] = 0.0;
    refused({d.sen1, d.sen2, zero}, "row 2 is not one-hot (0 entries are 1)");
    H5Set nan = d.sen2;
    nan.data[((5 * 32 + 3) * 32 + 4) * 10 + 2] = std::numeric_limits<double>::quiet_NaN();
    refused({d.sen1, nan, d.label}, "dataset 'sen2': NaN in image 5 (y 3, x 4, channel 2)");
    H5Set inf = d.sen1;
    inf.data[7] = std::numeric_limits<double>::infinity();
    refused({inf, d.sen2, d.label}, "dataset 'sen1': Inf in image 0 (y 0, x 0, channel 7)");
    H5Set big = d.sen1;
    big.data[(1 * 32 + 0) * 8 + 1] = 1e6;
    refused({big, d.sen2, d.label}, "dataset 'sen1': value 1000000 in image 0 (y 1, x 0, channel 1) does not fit float16",
            DType::f16);
    o.dtype = DType::u8;  // only float32 and float16 hold So2Sat's reflectances
    expect_error([&] { convert_so2sat(o); }, "--dtype uint8", "expected float32 or float16");
    o.dtype = DType::f32;

    write_bytes(path, "sen1,sen2,label\n1,2,3\n");
    expect_error([&] { convert_so2sat(o); }, path, "not an HDF5 file");
    o.in = dir / "missing.h5";
    expect_error([&] { convert_so2sat(o); }, o.in, "cannot open: No such file or directory");
    EXPECT_FALSE(exists(o.out));
#endif
}

TEST(ConvertSo2Sat, NeedsHdf5Support) {
    TmpDir dir;
    So2SatOptions o;
    o.in = dir / "training.h5";
    o.out = dir / "out";
    o.verbose = false;
#ifdef PRISM_HDF5
    expect_error([&] { convert_so2sat(o); }, o.in, "cannot open");
#else
    expect_error([&] { convert_so2sat(o); }, o.in, "this build of prism has no HDF5 support");
#endif
}
