// Converters to shards: So2Sat LCZ42 (HDF5) and one-.npy-per-image lists
// (JUMP-CP cell crops). See data/convert.h.
//
// Both make two passes over their input. Pass 1 checks every value and
// accumulates per-channel statistics: per block (an HDF5 row block, an .npy
// file) a mean and a sum of squared deviations, merged in input order (Chan
// et al.), so the result is numerically sound and the same on every run.
// Pass 2 reads the input again and writes the shards through StagedShards.
#include "data/convert.h"

#include <algorithm>
#include <cerrno>
#include <cctype>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <memory>
#include <new>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#ifdef PRISM_HDF5
#include <hdf5.h>
#endif

#include "engine/common.h"

namespace prism {

std::vector<std::string> so2sat_channel_names() {
    std::vector<std::string> names;
    for (int c = 0; c < 8; c++) names.push_back("sen1_" + std::to_string(c));
    for (const char* b : {"B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B11", "B12"})
        names.push_back(std::string("sen2_") + b);
    return names;
}

// ---------------------------------------------------------------------------
// shared by both converters

[[noreturn]] static void fail(const std::string& path, const std::string& problem) {
    throw UserError(path + ": " + problem);
}

static std::string num(double v) {
    char buf[32];
    std::snprintf(buf, sizeof buf, "%.9g", v);
    return buf;
}

static void check_output_args(const std::string& out, const std::string& prefix, int64_t shard_size) {
    if (out.empty()) throw UserError("--out: empty directory name");
    if (prefix.empty() || prefix[0] == '.' ||
        !std::all_of(prefix.begin(), prefix.end(), [](char ch) {
            return std::isalnum((unsigned char)ch) || ch == '_' || ch == '-' || ch == '.';
        }))
        throw UserError("--prefix '" + printable(prefix) +
                        "': use letters, digits, '_', '-' and '.' (not first) only");
    if (shard_size < 0)
        throw UserError("--shard-size " + std::to_string(shard_size) + ": must be at least 1 (0: the default)");
}

// Pass 2 holds a whole shard in memory, so the default is bounded in bytes:
// 4096 images, fewer where that would pass 1 GiB (large hyperspectral images).
static int64_t images_per_shard(int64_t requested, size_t image_bytes) {
    if (requested > 0) return requested;
    return std::max<int64_t>(1, std::min<int64_t>(4096, int64_t((size_t(1) << 30) / image_bytes)));
}

static void hold_shard(std::vector<char>& images, size_t bytes, const std::string& out, const std::string& prefix,
                       int64_t k) {
    try {
        images.resize(bytes);
    } catch (const std::bad_alloc&) {
        char size[32];
        std::snprintf(size, sizeof size, "%.1f GiB", double(bytes) / double(1 << 30));
        fail(join_path(out, shard_file_name(prefix, k)),
             std::string("cannot hold the shard's ") + size + " in memory: lower --shard-size");
    }
}

// Whether `file` is a shard that a conversion to --out/--prefix replaces or
// removes as stale: DIR/PREFIX-<digits>.shard in the same directory.
static bool replaced_by_output(const std::string& file, const std::string& out, const std::string& prefix) {
    const size_t slash = file.rfind('/');
    const std::string base = slash == std::string::npos ? file : file.substr(slash + 1);
    return is_shard_name(base, prefix, ".shard") && same_file(dir_of(file), out);
}

// --stats-from: the normalization of another shard set (the training split's).
struct StatsSource {
    std::string first;    // the glob's first shard; empty: the conversion's own statistics
    ShardHeader header;   // of `first`
};

// --out is a directory, or its nearest existing ancestor is one that pass 2
// can create it in. Nothing is created before the input has passed.
static void check_output_dir(const std::string& out) {
    std::string p = out;
    for (;;) {
        // "file/" must be seen as "file": stat() would say ENOTDIR, which
        // means "go up" below.
        while (p.size() > 1 && p.back() == '/') p.pop_back();
        struct stat st;
        if (::stat(p.c_str(), &st) == 0) {
            if (!S_ISDIR(st.st_mode)) fail(p, "exists and is not a directory");
            if (::access(p.c_str(), W_OK | X_OK) != 0)
                fail(p, std::string("cannot create --out there: ") + std::strerror(errno));
            return;
        }
        if (errno != ENOENT && errno != ENOTDIR) fail(p, std::string("cannot stat: ") + std::strerror(errno));
        const size_t slash = p.rfind('/');
        if (slash == std::string::npos) return;  // relative: the working directory is the ancestor
        p = slash == 0 ? "/" : p.substr(0, slash);
    }
}

// Everything about the output that can be checked before the first pass
// reads the input (the So2Sat training file is 52 GB): the directory, and a
// --stats-from glob that exists and is not among the shards this conversion
// would replace: convert validation.h5 into the training shards' directory
// and prefix, and the statistics' source would be gone.
static StatsSource prepare_output(const std::string& out, const std::string& prefix, const std::string& stats_glob) {
    check_output_dir(out);
    StatsSource s;
    if (stats_glob.empty()) return s;
    const std::vector<std::string> files = expand_glob(stats_glob);
    for (const std::string& f : files)
        if (replaced_by_output(f, out, prefix))
            throw UserError("--stats-from '" + printable(stats_glob) + "': matches " + printable(f) +
                            ", which this conversion (--out " + printable(out) + " --prefix " + prefix +
                            ") would replace; give the new shards another --prefix");
    s.first = files.front();
    s.header = read_shard_header(s.first);
    return s;
}

// As soon as the converted data's channel count is known, before pass 1 reads on.
static void check_stats_channels(const StatsSource& s, int channels) {
    if (!s.first.empty() && s.header.channels != channels)
        fail(s.first, "--stats-from: has " + std::to_string(s.header.channels) +
                          " channels, the data being converted " + std::to_string(channels));
}

// The splits of one data set share a class count: training refuses ones that differ.
static void check_stats_classes(const StatsSource& s, int classes) {
    if (!s.first.empty() && s.header.num_classes != classes)
        fail(s.first, "--stats-from: has " + std::to_string(s.header.num_classes) + " classes, the data being converted " +
                          std::to_string(classes));
}

static void take_stats_from(ShardHeader& h, const StatsSource& s) {
    if (s.first.empty()) return;
    h.mean = s.header.mean;
    h.std = s.header.std;
}

// Per-channel mean and variance, merged block by block (Chan et al.).
struct ChannelStats {
    std::vector<double> n, mean, m2;
    explicit ChannelStats(int C) : n(size_t(C), 0), mean(size_t(C), 0), m2(size_t(C), 0) {}
    // A block of `count` values of channel c with mean `bm` and squared deviations `bm2`.
    void merge(int c, double count, double bm, double bm2) {
        size_t i = size_t(c);
        double na = n[i], nn = na + count;
        double delta = bm - mean[i];
        mean[i] += delta * count / nn;
        m2[i] += bm2 + delta * delta * na * count / nn;
        n[i] = nn;
    }
    // Merges `count` values, each value(j) for j in [0, count).
    template <class F>
    void merge_values(int c, size_t count, F value) {
        double s = 0;
        for (size_t j = 0; j < count; j++) s += value(j);
        double m = s / double(count), s2 = 0;
        for (size_t j = 0; j < count; j++) {
            double d = value(j) - m;
            s2 += d * d;
        }
        merge(c, double(count), m, s2);
    }
    std::vector<double> std_dev() const {
        std::vector<double> sd(n.size());
        for (size_t c = 0; c < n.size(); c++) {
            double v = std::sqrt(m2[c] / n[c]);
            sd[c] = (std::isfinite(v) && v > 0) ? v : 1.0;  // constant channel: leave it unscaled
        }
        return sd;
    }
};

// Pass-1 progress: a line every few seconds and one at the end, whatever
// the size of an image.
struct PassProgress {
    std::string tag;
    int64_t total;
    bool verbose;
    Every every{5};
    PassProgress(const std::string& t, int64_t total_, bool v) : tag(t), total(total_), verbose(v) {}
    void at(int64_t done) {
        if (verbose && (every.due() || done == total))
            progress(tag + ": checked " + std::to_string(done) + "/" + std::to_string(total) + " images");
    }
};

// ---------------------------------------------------------------------------
// So2Sat LCZ42

#ifdef PRISM_HDF5

namespace {

const int kSide = 32, kSen1 = 8, kSen2 = 10, kChannels = 18, kClasses = 17;
const int64_t kBlockRows = 512;  // rows per hyperslab read: about 75 MB of float64

// Closes an HDF5 handle on every path out.
struct H5Handle {
    hid_t id = -1;
    herr_t (*close)(hid_t) = nullptr;
    H5Handle(hid_t i, herr_t (*c)(hid_t)) : id(i), close(c) {}
    H5Handle(const H5Handle&) = delete;
    H5Handle& operator=(const H5Handle&) = delete;
    ~H5Handle() { if (id >= 0) close(id); }
};

struct H5Dataset {
    std::string name;
    std::unique_ptr<H5Handle> ds;
    std::vector<hsize_t> dims;
};

class So2SatFile {
public:
    So2SatFile(const std::string& path, DType dtype) : path_(path), dtype_(dtype) {
        H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);  // errors are reported here, in one line
        struct stat st;
        if (::stat(path.c_str(), &st) != 0) fail(path, std::string("cannot open: ") + std::strerror(errno));
        if (!S_ISREG(st.st_mode)) fail(path, "not a regular file");
        if (::access(path.c_str(), R_OK) != 0) fail(path, std::string("cannot open: ") + std::strerror(errno));
#if H5_VERSION_GE(1, 12, 0)
        htri_t is_hdf5 = H5Fis_accessible(path.c_str(), H5P_DEFAULT);
#else
        htri_t is_hdf5 = H5Fis_hdf5(path.c_str());
#endif
        if (is_hdf5 <= 0) fail(path, "not an HDF5 file");
        file_.reset(new H5Handle(H5Fopen(path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT), H5Fclose));
        if (file_->id < 0) fail(path, "cannot open as HDF5 (damaged or unsupported file)");
        open("sen1", {kSide, kSide, kSen1}, sen1_);
        open("sen2", {kSide, kSide, kSen2}, sen2_);
        open("label", {kClasses}, label_);
        n_ = int64_t(sen1_.dims[0]);
        if (sen2_.dims[0] != sen1_.dims[0] || label_.dims[0] != sen1_.dims[0])
            fail(path, "datasets disagree on the number of images: sen1 has " + std::to_string(sen1_.dims[0]) +
                           ", sen2 " + std::to_string(sen2_.dims[0]) + ", label " + std::to_string(label_.dims[0]));
        if (n_ == 0) fail(path, "datasets hold no images");
    }

    int64_t count() const { return n_; }

    // Reads rows [first, first + rows): stored pixel values (already rounded
    // to the output dtype, as float) into `chw` [rows][18][32][32], labels
    // into `labels`. Checks every value.
    void read(int64_t first, int64_t rows, std::vector<float>& chw, std::vector<int32_t>& labels) {
        const size_t hw = size_t(kSide) * kSide;
        chw.resize(size_t(rows) * kChannels * hw);
        labels.resize(size_t(rows));
        read_rows(sen1_, first, rows);
        to_chw(sen1_, kSen1, 0, first, rows, chw);
        read_rows(sen2_, first, rows);
        to_chw(sen2_, kSen2, kSen1, first, rows, chw);
        read_rows(label_, first, rows);
        for (int64_t r = 0; r < rows; r++) labels[size_t(r)] = one_hot(&buf_[size_t(r) * kClasses], first + r);
    }

private:
    void open(const char* name, std::vector<hsize_t> tail, H5Dataset& d) {
        d.name = name;
        htri_t has = H5Lexists(file_->id, name, H5P_DEFAULT);
        if (has <= 0)
            fail(path_, std::string("no dataset '") + name + "' (So2Sat LCZ42 files hold sen1, sen2 and label)");
        d.ds.reset(new H5Handle(H5Dopen2(file_->id, name, H5P_DEFAULT), H5Dclose));
        if (d.ds->id < 0) fail(path_, std::string("'") + name + "' is not a readable dataset");
        H5Handle type(H5Dget_type(d.ds->id), H5Tclose);
        H5T_class_t cls = type.id < 0 ? H5T_NO_CLASS : H5Tget_class(type.id);
        if (cls != H5T_FLOAT && cls != H5T_INTEGER)
            fail(path_, std::string("dataset '") + name + "' is not numeric (So2Sat LCZ42 stores float64)");
        H5Handle space(H5Dget_space(d.ds->id), H5Sclose);
        int rank = space.id < 0 ? -1 : H5Sget_simple_extent_ndims(space.id);
        std::string want = "(n";
        for (hsize_t t : tail) want += ", " + std::to_string(t);
        want += ")";
        if (rank != int(tail.size()) + 1)
            fail(path_, std::string("dataset '") + name + "' has rank " + std::to_string(rank) + ", expected shape " +
                            want);
        d.dims.resize(size_t(rank));
        H5Sget_simple_extent_dims(space.id, d.dims.data(), nullptr);
        if (!std::equal(tail.begin(), tail.end(), d.dims.begin() + 1)) {
            std::string got = "(";
            for (size_t i = 0; i < d.dims.size(); i++) got += (i ? ", " : "") + std::to_string(d.dims[i]);
            fail(path_, std::string("dataset '") + name + "' has shape " + got + "), expected " + want);
        }
    }

    // Rows [first, first + rows) of d as float64 into buf_.
    void read_rows(const H5Dataset& d, int64_t first, int64_t rows) {
        size_t per = 1;
        for (size_t i = 1; i < d.dims.size(); i++) per *= size_t(d.dims[i]);
        buf_.resize(size_t(rows) * per);
        std::vector<hsize_t> start(d.dims.size(), 0), count = d.dims;
        start[0] = hsize_t(first);
        count[0] = hsize_t(rows);
        H5Handle fspace(H5Dget_space(d.ds->id), H5Sclose);
        H5Handle mspace(H5Screate_simple(int(count.size()), count.data(), nullptr), H5Sclose);
        if (fspace.id < 0 || mspace.id < 0 ||
            H5Sselect_hyperslab(fspace.id, H5S_SELECT_SET, start.data(), nullptr, count.data(), nullptr) < 0 ||
            H5Dread(d.ds->id, H5T_NATIVE_DOUBLE, mspace.id, fspace.id, H5P_DEFAULT, buf_.data()) < 0)
            fail(path_, "dataset '" + d.name + "': read failed for images " + std::to_string(first) + " to " +
                            std::to_string(first + rows - 1));
    }

    // buf_ holds rows of d, HWC; writes channels [c0, c0 + C) of chw.
    void to_chw(const H5Dataset& d, int C, int c0, int64_t first, int64_t rows, std::vector<float>& chw) {
        const size_t hw = size_t(kSide) * kSide;
        const bool f16 = dtype_ == DType::f16;
        int64_t bad = INT64_MAX;  // first bad value, as an index into buf_
#pragma omp parallel for schedule(static) reduction(min : bad)
        for (int64_t r = 0; r < rows; r++) {
            const double* in = &buf_[size_t(r) * hw * C];
            float* out = &chw[(size_t(r) * kChannels + c0) * hw];
            for (size_t p = 0; p < hw; p++)
                for (int c = 0; c < C; c++) {
                    double v = in[p * C + c];
                    float s = float(v);
                    if (f16) s = half_to_float(float_to_half(s));
                    if (!std::isfinite(s)) bad = std::min(bad, int64_t(size_t(r) * hw * C + p * C + c));
                    out[size_t(c) * hw + p] = s;
                }
        }
        if (bad == INT64_MAX) return;
        double v = buf_[size_t(bad)];
        size_t per = hw * C, p = size_t(bad) % per / C;
        std::string where = "image " + std::to_string(first + bad / int64_t(per)) + " (y " + std::to_string(p / kSide) +
                            ", x " + std::to_string(p % kSide) + ", channel " + std::to_string(bad % C) + ")";
        if (!std::isfinite(v)) fail(path_, "dataset '" + d.name + "': " + (std::isnan(v) ? "NaN" : "Inf") + " in " + where);
        fail(path_, "dataset '" + d.name + "': value " + num(v) + " in " + where + " does not fit " +
                        dtype_name(dtype_) + (f16 ? " (use --dtype float32)" : ""));
    }

    int32_t one_hot(const double* row, int64_t r) const {
        int hot = -1, ones = 0;
        for (int k = 0; k < kClasses; k++) {
            if (row[k] == 1.0) {
                ones++;
                hot = k;
            } else if (row[k] != 0.0) {
                fail(path_, "dataset 'label': row " + std::to_string(r) + " is not one-hot (entry " + std::to_string(k) +
                                " is " + num(row[k]) + ")");
            }
        }
        if (ones != 1)
            fail(path_, "dataset 'label': row " + std::to_string(r) + " is not one-hot (" + std::to_string(ones) +
                            " entries are 1)");
        return hot;
    }

    std::string path_;
    DType dtype_;
    std::unique_ptr<H5Handle> file_;
    H5Dataset sen1_, sen2_, label_;
    int64_t n_ = 0;
    std::vector<double> buf_;
};

}  // namespace

void convert_so2sat(const So2SatOptions& o) {
    check_output_args(o.out, o.prefix, o.shard_size);
    if (o.dtype != DType::f32 && o.dtype != DType::f16)
        throw UserError(std::string("--dtype ") + dtype_name(o.dtype) + ": expected float32 or float16");
    So2SatFile f(o.in, o.dtype);
    const StatsSource stats_from = prepare_output(o.out, o.prefix, o.stats_from);
    check_stats_channels(stats_from, kChannels);
    check_stats_classes(stats_from, kClasses);
    const int64_t n = f.count();
    const size_t hw = size_t(kSide) * kSide;
    const size_t per = size_t(kChannels) * hw;
    const int64_t shard_size = images_per_shard(o.shard_size, per * dtype_size(o.dtype));
    const int64_t block = std::min(kBlockRows, shard_size);
    const std::string tag = "convert so2sat " + o.in;
    std::vector<float> chw;
    std::vector<int32_t> labels;

    // Pass 1: check everything, per-channel statistics of the stored values.
    ChannelStats stats(kChannels);
    PassProgress prog(tag + " (pass 1/2)", n, o.verbose);
    for (int64_t first = 0; first < n; first += block) {
        int64_t rows = std::min(block, n - first);
        f.read(first, rows, chw, labels);
        std::vector<double> bm(kChannels), bm2(kChannels);
#pragma omp parallel for schedule(static)
        for (int c = 0; c < kChannels; c++) {
            ChannelStats one(1);
            one.merge_values(0, size_t(rows) * hw, [&](size_t j) {
                return double(chw[(j / hw * kChannels + size_t(c)) * hw + j % hw]);
            });
            bm[size_t(c)] = one.mean[0];
            bm2[size_t(c)] = one.m2[0];
        }
        for (int c = 0; c < kChannels; c++) stats.merge(c, double(rows) * double(hw), bm[size_t(c)], bm2[size_t(c)]);
        prog.at(first + rows);
    }

    ShardHeader h;
    h.channels = kChannels, h.height = kSide, h.width = kSide, h.dtype = o.dtype, h.num_classes = kClasses;
    h.channel_names = so2sat_channel_names();
    h.mean = stats.mean;
    h.std = stats.std_dev();
    take_stats_from(h, stats_from);

    // Pass 2: one shard in memory at a time.
    make_dirs(o.out);
    StagedShards out(o.out, o.prefix, tag, o.verbose);
    std::vector<char> images;
    std::vector<int32_t> shard_labels;
    for (int64_t s0 = 0; s0 < n; s0 += shard_size) {
        int64_t count = std::min(shard_size, n - s0);
        hold_shard(images, size_t(count) * per * dtype_size(o.dtype), o.out, o.prefix, s0 / shard_size);
        shard_labels.resize(size_t(count));
        for (int64_t first = s0; first < s0 + count; first += block) {
            int64_t rows = std::min(block, s0 + count - first);
            f.read(first, rows, chw, labels);
            std::copy(labels.begin(), labels.end(), shard_labels.begin() + (first - s0));
            size_t at = size_t(first - s0) * per;
            if (o.dtype == DType::f32) {
                std::memcpy(images.data() + at * 4, chw.data(), chw.size() * 4);
            } else {
                uint16_t* dst = (uint16_t*)images.data() + at;
                for (size_t j = 0; j < chw.size(); j++) dst[j] = float_to_half(chw[j]);  // exact: already rounded
            }
        }
        h.count = count;
        out.add(h, shard_labels, images.data(), s0 + count, n);
    }
    out.commit();
}

#else  // no HDF5

void convert_so2sat(const So2SatOptions& o) {
    throw UserError(o.in + ": cannot read HDF5: this build of prism has no HDF5 support "
                           "(install libhdf5-dev and rebuild)");
}

#endif

// ---------------------------------------------------------------------------
// .npy lists

namespace {

enum class NpyType { u8, u16, f32, f64 };

struct NpyArray {
    NpyType type = NpyType::u8;
    int64_t shape[3] = {0, 0, 0};
    size_t data_offset = 0;
    size_t count() const { return size_t(shape[0]) * size_t(shape[1]) * size_t(shape[2]); }
    size_t item() const {
        switch (type) {
            case NpyType::u8: return 1;
            case NpyType::u16: return 2;
            case NpyType::f32: return 4;
            case NpyType::f64: return 8;
        }
        return 0;
    }
    bool is_float() const { return type == NpyType::f32 || type == NpyType::f64; }
};

// An input file opened for reading, refused unless it is a regular file.
class InputFile {
public:
    InputFile(const std::string& path, const std::string& context)
        : path_(path), fd_(open_regular_file(path, context, &size_)) {}
    ~InputFile() { ::close(fd_); }
    InputFile(const InputFile&) = delete;
    InputFile& operator=(const InputFile&) = delete;

    uint64_t size() const { return size_; }
    // Bytes [offset, offset + n) of the file into dst.
    void read(char* dst, size_t n, uint64_t offset) const {
        size_t got = 0;
        while (got < n) {
            ssize_t r = ::pread(fd_, dst + got, n - got, off_t(offset + got));
            if (r < 0 && errno == EINTR) continue;
            if (r <= 0)
                fail(path_, r == 0 ? "file shrank while reading" : std::string("read error: ") + std::strerror(errno));
            got += size_t(r);
        }
    }

private:
    std::string path_;
    uint64_t size_ = 0;
    int fd_ = -1;
};

std::string read_whole_file(const std::string& path, const std::string& context) {
    InputFile f(path, context);
    std::string bytes(size_t(f.size()), '\0');
    f.read(&bytes[0], bytes.size(), 0);
    return bytes;
}

// The NPY header is a Python dict literal, e.g.
// {'descr': '<f4', 'fortran_order': False, 'shape': (8, 64, 64), }
class NpyHeaderParser {
public:
    NpyHeaderParser(const std::string& text, const std::string& path) : s_(text), path_(path) {}

    void parse(std::string& descr, bool& fortran, std::vector<int64_t>& shape) {
        bool has_descr = false, has_fortran = false, has_shape = false;
        expect('{');
        while (true) {
            ws();
            if (peek() == '}') break;
            std::string key = str();
            expect(':');
            ws();
            if (key == "descr") {
                descr = str();
                has_descr = true;
            } else if (key == "fortran_order") {
                if (word("True")) fortran = true;
                else if (word("False")) fortran = false;
                else bad("'fortran_order' is neither True nor False");
                has_fortran = true;
            } else if (key == "shape") {
                shape = tuple();
                has_shape = true;
            } else {
                bad("unexpected key '" + printable(key) + "'");
            }
            ws();
            if (peek() != ',') break;
            pos_++;
        }
        expect('}');
        if (!has_descr || !has_fortran || !has_shape)
            bad(std::string("no '") + (!has_descr ? "descr" : !has_fortran ? "fortran_order" : "shape") + "' key");
    }

private:
    [[noreturn]] void bad(const std::string& what) const { fail(path_, "bad NPY header: " + what); }
    char peek() const { return pos_ < s_.size() ? s_[pos_] : '\0'; }
    void ws() { while (pos_ < s_.size() && std::isspace((unsigned char)s_[pos_])) pos_++; }
    void expect(char ch) {
        ws();
        if (peek() != ch) bad(std::string("expected '") + ch + "' at byte " + std::to_string(pos_));
        pos_++;
    }
    bool word(const char* w) {
        size_t n = std::strlen(w);
        if (s_.compare(pos_, n, w) != 0) return false;
        pos_ += n;
        return true;
    }
    std::string str() {
        ws();
        char q = peek();
        if (q != '\'' && q != '"') bad("expected a quoted string at byte " + std::to_string(pos_));
        size_t end = s_.find(q, pos_ + 1);
        if (end == std::string::npos) bad("unterminated string");
        std::string out = s_.substr(pos_ + 1, end - pos_ - 1);
        pos_ = end + 1;
        return out;
    }
    std::vector<int64_t> tuple() {
        expect('(');
        std::vector<int64_t> out;
        while (true) {
            ws();
            if (peek() == ')') break;
            if (!std::isdigit((unsigned char)peek())) bad("'shape' is not a tuple of integers");
            int64_t v = 0;
            while (std::isdigit((unsigned char)peek())) {
                if (v > (int64_t(1) << 40)) bad("'shape' entry too large");
                v = v * 10 + (s_[pos_++] - '0');
            }
            if (peek() == 'L') pos_++;  // Python 2 long
            out.push_back(v);
            ws();
            if (peek() == ',') { pos_++; continue; }
            if (peek() != ')') bad("'shape' is not a tuple of integers");
        }
        pos_++;
        return out;
    }

    const std::string& s_;
    const std::string& path_;
    size_t pos_ = 0;
};

// The most of a file's start that parse_npy reads: every NPY 1.0 header
// fits, and NumPy writes 2.0 headers only when 1.0's 64 KiB do not suffice.
const size_t kNpyHead = size_t(1) << 17;

// Parses and checks an NPY file from its first min(file_size, kNpyHead)
// bytes, so that a file that is not what the header says (or no NPY at all)
// is refused before it is read whole.
NpyArray parse_npy(const std::string& head, uint64_t file_size, const std::string& path) {
    if (head.size() < 10 || std::memcmp(head.data(), "\x93NUMPY", 6) != 0) {
        if (head.size() < 10 && std::memcmp(head.data(), "\x93NUMPY", std::min<size_t>(6, head.size())) == 0)
            fail(path, "truncated: " + std::to_string(head.size()) + " bytes, too short for an NPY header");
        fail(path, "not an NPY file (bad magic)");
    }
    unsigned major = (unsigned char)head[6], minor = (unsigned char)head[7];
    size_t header_len = 0, start = 0;
    if (major == 1) {
        header_len = size_t((unsigned char)head[8]) | size_t((unsigned char)head[9]) << 8;
        start = 10;
    } else if (major == 2) {
        if (head.size() < 12) fail(path, "truncated: too short for an NPY 2.0 header");
        for (int i = 3; i >= 0; i--) header_len = header_len << 8 | (unsigned char)head[size_t(8 + i)];
        start = 12;
    } else {
        fail(path, "unsupported NPY version " + std::to_string(major) + "." + std::to_string(minor) +
                       " (expected 1.0 or 2.0)");
    }
    if (header_len > file_size - start)
        fail(path, "truncated: NPY header says " + std::to_string(header_len) + " bytes, file has " +
                       std::to_string(file_size - start) + " after the prefix");
    if (header_len > head.size() - start)
        fail(path, "NPY header of " + std::to_string(header_len) + " bytes is too long (at most " +
                       std::to_string(kNpyHead - start) + " are read)");
    std::string descr;
    bool fortran = false;
    std::vector<int64_t> shape;
    NpyHeaderParser(head.substr(start, header_len), path).parse(descr, fortran, shape);

    NpyArray a;
    if (descr == "<u1" || descr == "|u1") a.type = NpyType::u8;
    else if (descr == "<u2") a.type = NpyType::u16;
    else if (descr == "<f4") a.type = NpyType::f32;
    else if (descr == "<f8") a.type = NpyType::f64;
    else if (!descr.empty() && descr[0] == '>')
        fail(path, "big-endian dtype '" + printable(descr) + "' (save it little-endian: a.astype(a.dtype.newbyteorder('<')))");
    else
        fail(path, "unsupported dtype '" + printable(descr) + "' (expected uint8, uint16, float32 or float64)");
    if (fortran) fail(path, "fortran_order is True (save a C-ordered array: np.ascontiguousarray)");
    if (shape.size() != 3)
        fail(path, "array has rank " + std::to_string(shape.size()) + ", expected 3 ([C, H, W])");
    for (int i = 0; i < 3; i++) {
        if (shape[size_t(i)] < 1 || shape[size_t(i)] > 65536)
            fail(path, "shape entry " + std::to_string(shape[size_t(i)]) + " outside [1, 65536]");
        a.shape[i] = shape[size_t(i)];
    }
    a.data_offset = start + header_len;
    uint64_t want = a.data_offset + a.count() * a.item();
    if (file_size < want)
        fail(path, "truncated: file is " + std::to_string(file_size) + " bytes, its header says " +
                       std::to_string(want));
    if (file_size > want)
        fail(path, "file is " + std::to_string(file_size) + " bytes, its header says " + std::to_string(want) +
                       " (extra bytes at the end)");
    return a;
}

std::string shape_str(const NpyArray& a) {
    return "(" + std::to_string(a.shape[0]) + ", " + std::to_string(a.shape[1]) + ", " + std::to_string(a.shape[2]) +
           ")";
}

// Element i as double.
inline double npy_value(const char* data, NpyType t, size_t i) {
    switch (t) {
        case NpyType::u8: return double(((const uint8_t*)data)[i]);
        case NpyType::u16: { uint16_t v; std::memcpy(&v, data + 2 * i, 2); return double(v); }
        case NpyType::f32: { float v; std::memcpy(&v, data + 4 * i, 4); return double(v); }
        case NpyType::f64: { double v; std::memcpy(&v, data + 8 * i, 8); return v; }
    }
    return 0;
}

struct ListEntry {
    std::string path;
    int32_t label;
    int line;
};

std::vector<ListEntry> read_list(const std::string& list, int& max_label) {
    std::string text = read_whole_file(list, "");
    if (text.compare(0, 3, "\xEF\xBB\xBF") == 0) text.erase(0, 3);  // UTF-8 BOM, as Excel writes
    size_t slash = list.rfind('/');
    std::string dir = slash == std::string::npos ? "" : slash == 0 ? "/" : list.substr(0, slash);
    std::vector<ListEntry> out;
    max_label = -1;
    int line_no = 0;
    size_t pos = 0;
    while (pos < text.size()) {
        size_t end = text.find('\n', pos);
        if (end == std::string::npos) end = text.size();
        std::string line = text.substr(pos, end - pos);
        pos = end + 1;
        line_no++;
        if (!line.empty() && line.back() == '\r') line.pop_back();
        std::string where = "line " + std::to_string(line_no) + ": ";
        if (line_no == 1) {
            if (line != "path,label")
                fail(list, where + "expected the header 'path,label', found '" + printable(line) + "'");
            continue;
        }
        if (line.empty()) continue;
        size_t comma = line.rfind(',');
        if (comma == std::string::npos) fail(list, where + "expected 'path,label', found '" + printable(line) + "'");
        std::string path = line.substr(0, comma), label = line.substr(comma + 1);
        if (path.size() >= 2 && path.front() == '"' && path.back() == '"') {  // CSV quoting
            std::string unq;
            for (size_t i = 1; i + 1 < path.size(); i++) {
                unq += path[i];
                if (path[i] == '"' && path[i + 1] == '"') i++;
            }
            path = unq;
        }
        if (path.empty()) fail(list, where + "empty path");
        if (path.find('\0') != std::string::npos)  // open() would stop at it and read another file
            fail(list, where + "the path holds a NUL byte");
        int64_t v = 0;
        bool ok = !label.empty() && label.size() <= 9 &&
                  std::all_of(label.begin(), label.end(), [](char ch) { return ch >= '0' && ch <= '9'; });
        if (ok) v = std::stoll(label);
        if (!ok || v >= (int64_t(1) << 24))
            fail(list, where + "label '" + printable(label) + "' is not an integer in [0, 2^24)");
        out.push_back({path[0] == '/' || dir.empty() ? path : join_path(dir, path), int32_t(v), line_no});
        max_label = std::max(max_label, int(v));
    }
    if (line_no == 0) fail(list, "empty file (expected the header 'path,label')");
    if (out.empty()) fail(list, "lists no images");
    return out;
}

// Reads and checks one listed file; its shape must match `first` once set.
// Header first: the whole file is read only once it is known to be the
// array its header describes, of the first file's shape.
NpyArray load_npy(const ListEntry& e, const std::string& list, NpyArray* first, std::string& bytes) {
    InputFile f(e.path, " (listed on line " + std::to_string(e.line) + " of " + list + ")");
    bytes.resize(size_t(std::min<uint64_t>(f.size(), kNpyHead)));
    f.read(&bytes[0], bytes.size(), 0);
    NpyArray a = parse_npy(bytes, f.size(), e.path);
    if (first && (a.shape[0] != first->shape[0] || a.shape[1] != first->shape[1] || a.shape[2] != first->shape[2]))
        fail(e.path, "shape " + shape_str(a) + " differs from the first listed file's " + shape_str(*first));
    const size_t head = bytes.size();
    bytes.resize(size_t(f.size()));
    f.read(&bytes[head], bytes.size() - head, head);
    return a;
}

}  // namespace

void convert_npy(const NpyOptions& o) {
    check_output_args(o.out, o.prefix, o.shard_size);
    if (o.num_classes < 0 || o.num_classes > (1 << 24))
        throw UserError("--num-classes " + std::to_string(o.num_classes) + ": outside [1, 2^24]");
    int max_label = -1;
    const std::vector<ListEntry> list = read_list(o.list, max_label);
    const StatsSource stats_from = prepare_output(o.out, o.prefix, o.stats_from);
    // A validation split takes the training split's class count from
    // --stats-from: its own largest label may be lower, and training refuses
    // splits whose counts differ.
    int num_classes = o.num_classes;
    std::string classes_from = "--num-classes " + std::to_string(num_classes);
    if (!stats_from.first.empty()) {
        const int trained = stats_from.header.num_classes;
        if (num_classes > 0 && num_classes != trained)
            fail(stats_from.first, "--stats-from: has " + std::to_string(trained) + " classes, --num-classes says " +
                                       std::to_string(num_classes) + "; the splits of one data set share a class count");
        num_classes = trained;
        classes_from = "the " + std::to_string(trained) + " classes of --stats-from " + stats_from.first;
    }
    for (const ListEntry& e : list)
        if (num_classes > 0 && e.label >= num_classes)
            fail(o.list, "line " + std::to_string(e.line) + ": label " + std::to_string(e.label) + " is not below " +
                             classes_from);
    const int64_t n = int64_t(list.size());
    const std::string tag = "convert npy " + o.list;

    // Pass 1: shapes, finite values, the narrowest dtype, statistics. The
    // stored value of x is float(x): exact except for float64 that float32
    // cannot hold, which is then what the shards store.
    std::string bytes;
    NpyArray first;
    bool fits_u8 = true, fits_u16 = true, fits_f16 = true;
    std::string rounded_f64;  // the first file whose float64 values float32 rounds
    std::unique_ptr<ChannelStats> stats;
    std::vector<float> vals;
    PassProgress prog(tag + " (pass 1/2)", n, o.verbose);
    for (int64_t i = 0; i < n; i++) {
        const ListEntry& e = list[size_t(i)];
        NpyArray a = load_npy(e, o.list, i ? &first : nullptr, bytes);
        if (i == 0) {
            first = a;
            check_stats_channels(stats_from, int(a.shape[0]));
            stats.reset(new ChannelStats(int(a.shape[0])));
        }
        const char* data = bytes.data() + a.data_offset;
        const size_t count = a.count(), hw = size_t(a.shape[1]) * size_t(a.shape[2]);
        vals.resize(count);
        bool u8 = fits_u8, u16 = fits_u16, f16 = fits_f16;  // only what can still hold matters
        for (size_t j = 0; j < count; j++) {
            double x = npy_value(data, a.type, j);
            float s = float(x);
            if (a.is_float() && !std::isfinite(s)) {
                size_t c = j / hw, p = j % hw;
                std::string where = " at channel " + std::to_string(c) + ", y " + std::to_string(p / size_t(a.shape[2])) +
                                    ", x " + std::to_string(p % size_t(a.shape[2]));
                if (std::isfinite(x)) fail(e.path, "value " + num(x) + where + " does not fit float32");
                fail(e.path, std::string(std::isnan(x) ? "NaN" : "Inf") + where);
            }
            if (a.type == NpyType::f64 && double(s) != x && rounded_f64.empty()) rounded_f64 = e.path;
            vals[j] = s;
            if (u16) {
                bool integral = s == std::nearbyint(s) && s >= 0;
                u8 = u8 && integral && s <= 255;
                u16 = integral && s <= 65535;
            }
            if (f16 && !u8) f16 = half_to_float(float_to_half(s)) == s;
        }
        fits_u8 = fits_u8 && u8;
        fits_u16 = fits_u16 && u16;
        fits_f16 = fits_f16 && f16;
        for (int c = 0; c < int(a.shape[0]); c++)
            stats->merge_values(c, hw, [&](size_t j) { return double(vals[size_t(c) * hw + j]); });
        prog.at(i + 1);
    }
    const DType dtype = fits_u8 ? DType::u8 : fits_u16 ? DType::u16 : fits_f16 ? DType::f16 : DType::f32;
    if (!rounded_f64.empty() && o.verbose)
        progress(tag + ": note: float64 values that float32 cannot hold exactly (first in " + rounded_f64 +
                 ") are stored rounded to float32");

    ShardHeader h;
    h.channels = int(first.shape[0]), h.height = int(first.shape[1]), h.width = int(first.shape[2]);
    h.dtype = dtype;
    h.num_classes = num_classes > 0 ? num_classes : max_label + 1;
    for (int c = 0; c < h.channels; c++) h.channel_names.push_back("ch" + std::to_string(c));
    h.mean = stats->mean;
    h.std = stats->std_dev();
    take_stats_from(h, stats_from);
    const size_t per = first.count(), esize = dtype_size(dtype);
    const int64_t shard_size = images_per_shard(o.shard_size, per * esize);
    if (o.verbose)
        progress(tag + ": " + std::to_string(n) + " images " + shape_str(first) + ", stored as " + dtype_name(dtype) +
                 ", " + std::to_string(h.num_classes) + " classes, " + std::to_string(shard_size) +
                 " images per shard");

    // Pass 2.
    make_dirs(o.out);
    StagedShards out(o.out, o.prefix, tag, o.verbose);
    std::vector<char> images;
    std::vector<int32_t> labels;
    for (int64_t s0 = 0; s0 < n; s0 += shard_size) {
        int64_t count = std::min(shard_size, n - s0);
        hold_shard(images, size_t(count) * per * esize, o.out, o.prefix, s0 / shard_size);
        labels.resize(size_t(count));
        for (int64_t i = s0; i < s0 + count; i++) {
            const ListEntry& e = list[size_t(i)];
            NpyArray a = load_npy(e, o.list, &first, bytes);
            const char* data = bytes.data() + a.data_offset;
            char* dst = images.data() + size_t(i - s0) * per * esize;
            labels[size_t(i - s0)] = e.label;
            bool same = true;  // the value pass 1 saw still fits
            for (size_t j = 0; j < per; j++) {
                float s = float(npy_value(data, a.type, j));
                switch (dtype) {
                    case DType::u8:
                        same = same && s >= 0 && s <= 255 && s == std::nearbyint(s);
                        dst[j] = char(same ? uint8_t(s) : 0);  // no out-of-range conversion
                        break;
                    case DType::u16: {
                        same = same && s >= 0 && s <= 65535 && s == std::nearbyint(s);
                        uint16_t v = same ? uint16_t(s) : 0;
                        std::memcpy(dst + 2 * j, &v, 2);
                        break;
                    }
                    case DType::f16: {
                        uint16_t v = float_to_half(s);
                        same &= half_to_float(v) == s;
                        std::memcpy(dst + 2 * j, &v, 2);
                        break;
                    }
                    case DType::f32: same &= std::isfinite(s); std::memcpy(dst + 4 * j, &s, 4); break;
                }
            }
            if (!same) fail(e.path, "changed since the first pass: its values no longer fit " + std::string(dtype_name(dtype)));
        }
        h.count = count;
        out.add(h, labels, images.data(), s0 + count, n);
    }
    out.commit();
}

}  // namespace prism
