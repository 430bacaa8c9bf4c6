// Shards, version 1 (DESIGN.md §3): writer, reader, checker and the
// synchronous whole-data-set loader.
//
// Every error about a file is a UserError "<path>: <problem>" on one line, so
// that `prism` can print it as is and exit 1.
#include "data/shard.h"

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <memory>
#include <new>

#include <dirent.h>
#include <fcntl.h>
#include <glob.h>
#include <sys/stat.h>
#include <unistd.h>

#include <nlohmann/json.hpp>

#include "engine/common.h"

// The format is little-endian and we move labels and pixels with plain memcpy.
static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "Prism shards assume a little-endian host");

namespace prism {

static const char kMagic[8] = {'P', 'R', 'I', 'S', 'M', 'S', 'H', 'D'};
static const uint32_t kVersion = 1;
static const uint64_t kAlign = 4096;
static const uint64_t kPrefix = 16;                  // magic + version + header_len
static const uint32_t kMaxHeaderLen = 16u << 20;     // a header is a few hundred bytes; this only catches garbage
static const size_t kIoChunk = size_t(32) << 20;     // bytes per read/crc step: few syscalls, bounded buffer

// ---------------------------------------------------------------------------
// small helpers

[[noreturn]] static void fail(const std::string& path, const std::string& problem) {
    throw UserError(path + ": " + problem);
}

static std::string errno_str() { return std::strerror(errno); }

static uint64_t round_up(uint64_t x, uint64_t a) { return (x + a - 1) / a * a; }

static std::string hex32(uint32_t v) {
    char buf[16];
    std::snprintf(buf, sizeof buf, "0x%08x", v);
    return buf;
}

// Closes on every path out, including exceptions.
struct Fd {
    int fd = -1;
    Fd() = default;
    Fd(const Fd&) = delete;
    Fd& operator=(const Fd&) = delete;
    ~Fd() { if (fd >= 0) ::close(fd); }
};

// pread until n bytes arrived. The caller has already checked the file size,
// so running short means the file changed under us.
static void pread_all(int fd, void* buf, size_t n, uint64_t off, const std::string& path) {
    char* p = (char*)buf;
    while (n > 0) {
        ssize_t r = ::pread(fd, p, n, (off_t)off);
        if (r < 0) {
            if (errno == EINTR) continue;
            fail(path, "read error at byte " + std::to_string(off) + ": " + errno_str());
        }
        if (r == 0) fail(path, "truncated: unexpected end of file at byte " + std::to_string(off) +
                                   " (did the file change while reading?)");
        p += r;
        n -= size_t(r);
        off += uint64_t(r);
    }
}

// ---------------------------------------------------------------------------
// dtypes

const char* dtype_name(DType d) {
    switch (d) {
        case DType::u8: return "uint8";
        case DType::u16: return "uint16";
        case DType::f16: return "float16";
        case DType::f32: return "float32";
    }
    PRISM_ASSERT(!"bad DType");
    return "";
}

size_t dtype_size(DType d) {
    switch (d) {
        case DType::u8: return 1;
        case DType::u16: return 2;
        case DType::f16: return 2;
        case DType::f32: return 4;
    }
    PRISM_ASSERT(!"bad DType");
    return 0;
}

DType dtype_from_name(const std::string& name, const std::string& origin) {
    if (name == "uint8") return DType::u8;
    if (name == "uint16") return DType::u16;
    if (name == "float16") return DType::f16;
    if (name == "float32") return DType::f32;
    fail(origin, "unknown dtype '" + printable(name) + "' (expected uint8, uint16, float16 or float32)");
}

// ---------------------------------------------------------------------------
// IEEE half <-> float, bit-exact, round to nearest even.

static uint32_t f32_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
static float bits_f32(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }

float half_to_float(uint16_t h) {
    uint32_t sign = uint32_t(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1f;
    uint32_t man = h & 0x3ff;
    if (exp == 0x1f) return bits_f32(sign | 0x7f800000 | (man << 13));  // inf, nan (payload kept)
    if (exp != 0) return bits_f32(sign | ((exp + 112) << 23) | (man << 13));
    // Zero or subnormal: man * 2^-24 is exact in float.
    float v = float(man) * 5.9604644775390625e-08f;
    return sign ? -v : v;
}

uint16_t float_to_half(float f) {
    uint32_t x = f32_bits(f);
    uint16_t sign = uint16_t((x >> 16) & 0x8000);
    uint32_t ax = x & 0x7fffffff;
    if (ax >= 0x7f800000) {
        if (ax == 0x7f800000) return sign | 0x7c00;
        // NaN: keep the top payload bits and force quiet, so it stays a NaN
        // even when those bits are all zero.
        return uint16_t(sign | 0x7e00 | ((ax >> 13) & 0x3ff));
    }
    // 65520 is halfway between 65504 (max half) and 2^16; ties go to even,
    // which is the overflow side.
    if (ax >= 0x477ff000) return sign | 0x7c00;
    if (ax >= 0x38800000) {  // normal half range, >= 2^-14
        uint32_t h = (ax >> 13) - (112u << 10);  // rebias exponent 127 -> 15
        uint32_t rest = ax & 0x1fff;
        // A carry out of the mantissa correctly bumps the exponent.
        if (rest > 0x1000 || (rest == 0x1000 && (h & 1))) h++;
        return uint16_t(sign | h);
    }
    if (ax <= 0x33000000) return sign;  // <= 2^-25: half of the smallest subnormal ties to 0
    // Subnormal half: value / 2^-24 rounded. value = m * 2^(e-150).
    uint32_t e = ax >> 23;
    uint32_t m = (ax & 0x7fffff) | 0x800000;
    uint32_t shift = 126 - e;  // 14..24
    uint32_t h = m >> shift;
    uint32_t rest = m & ((1u << shift) - 1);
    uint32_t halfway = 1u << (shift - 1);
    if (rest > halfway || (rest == halfway && (h & 1))) h++;
    return uint16_t(sign | h);
}

// ---------------------------------------------------------------------------
// crc32c (Castagnoli, reflected polynomial 0x82F63B78), slicing-by-8.
// Tables are built at compile time so there is no init race.

struct Crc32cTables {
    uint32_t t[8][256];
};

static constexpr Crc32cTables make_crc32c_tables() {
    Crc32cTables tab{};
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++) c = (c >> 1) ^ (0x82F63B78u & (0u - (c & 1u)));
        tab.t[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; i++)
        for (int s = 1; s < 8; s++) tab.t[s][i] = (tab.t[s - 1][i] >> 8) ^ tab.t[0][tab.t[s - 1][i] & 0xff];
    return tab;
}

static constexpr Crc32cTables kCrc = make_crc32c_tables();

uint32_t crc32c_update(uint32_t crc, const void* data, size_t n) {
    const unsigned char* p = (const unsigned char*)data;
    uint32_t c = ~crc;
    while (n > 0 && (uintptr_t(p) & 7)) {
        c = (c >> 8) ^ kCrc.t[0][(c ^ *p++) & 0xff];
        n--;
    }
    const auto& t = kCrc.t;
    while (n >= 8) {
        uint64_t w;
        std::memcpy(&w, p, 8);
        uint32_t lo = uint32_t(w) ^ c;
        uint32_t hi = uint32_t(w >> 32);
        c = t[7][lo & 0xff] ^ t[6][(lo >> 8) & 0xff] ^ t[5][(lo >> 16) & 0xff] ^ t[4][lo >> 24] ^
            t[3][hi & 0xff] ^ t[2][(hi >> 8) & 0xff] ^ t[1][(hi >> 16) & 0xff] ^ t[0][hi >> 24];
        p += 8;
        n -= 8;
    }
    while (n > 0) {
        c = (c >> 8) ^ kCrc.t[0][(c ^ *p++) & 0xff];
        n--;
    }
    return ~c;
}

static uint32_t crc32c_zeros(uint32_t crc, uint64_t n) {
    static const unsigned char zeros[4096] = {0};
    while (n > 0) {
        size_t k = size_t(std::min<uint64_t>(n, sizeof zeros));
        crc = crc32c_update(crc, zeros, k);
        n -= k;
    }
    return crc;
}

// ---------------------------------------------------------------------------
// header checks shared by the writer and the reader

static const int64_t kMaxCount = int64_t(1) << 40;
static const int64_t kMaxDim = 1 << 16;        // channels, height, width
static const int64_t kMaxClasses = 1 << 24;

// Bytes of labels + padding + images, i.e. images_offset - labels_offset plus
// the images; throws if the sizes do not fit in 64 bits.
static uint64_t checked_images_bytes(const ShardHeader& h, const std::string& path) {
    uint64_t per = 0, total = 0;
    if (__builtin_mul_overflow(uint64_t(h.channels) * uint64_t(h.height) * uint64_t(h.width),
                               uint64_t(dtype_size(h.dtype)), &per) ||
        __builtin_mul_overflow(per, uint64_t(h.count), &total) || total > (uint64_t(1) << 62))
        fail(path, "image data size overflows (count " + std::to_string(h.count) + " x " +
                       std::to_string(h.channels) + "x" + std::to_string(h.height) + "x" +
                       std::to_string(h.width) + ")");
    return total;
}

// The parts of a header that do not depend on the file: sizes, names,
// statistics. Used before writing and after parsing.
static void check_header_fields(const ShardHeader& h, const std::string& path) {
    if (h.count <= 0 || h.count > kMaxCount)
        fail(path, "count " + std::to_string(h.count) + " outside [1, 2^40]");
    if (h.channels <= 0 || h.channels > kMaxDim)
        fail(path, "channels " + std::to_string(h.channels) + " outside [1, 65536]");
    if (h.height <= 0 || h.height > kMaxDim)
        fail(path, "height " + std::to_string(h.height) + " outside [1, 65536]");
    if (h.width <= 0 || h.width > kMaxDim)
        fail(path, "width " + std::to_string(h.width) + " outside [1, 65536]");
    if (h.num_classes <= 0 || h.num_classes > kMaxClasses)
        fail(path, "num_classes " + std::to_string(h.num_classes) + " outside [1, 2^24]");
    size_t C = size_t(h.channels);
    if (h.channel_names.size() != C)
        fail(path, "channel_names has " + std::to_string(h.channel_names.size()) + " entries, channels is " +
                       std::to_string(C));
    if (h.mean.size() != C)
        fail(path, "mean has " + std::to_string(h.mean.size()) + " entries, channels is " + std::to_string(C));
    if (h.std.size() != C)
        fail(path, "std has " + std::to_string(h.std.size()) + " entries, channels is " + std::to_string(C));
    for (size_t c = 0; c < C; c++) {
        if (!std::isfinite(h.mean[c])) fail(path, "mean of channel " + std::to_string(c) + " is not finite");
        if (!std::isfinite(h.std[c]) || !(h.std[c] > 0))
            fail(path, "std of channel " + std::to_string(c) + " is " + std::to_string(h.std[c]) +
                           " (must be finite and > 0)");
    }
    checked_images_bytes(h, path);
}

static nlohmann::json header_json(const ShardHeader& h) {
    nlohmann::json j;
    j["count"] = h.count;
    j["channels"] = h.channels;
    j["height"] = h.height;
    j["width"] = h.width;
    j["dtype"] = dtype_name(h.dtype);
    j["num_classes"] = h.num_classes;
    j["channel_names"] = h.channel_names;
    j["mean"] = h.mean;
    j["std"] = h.std;
    j["labels_offset"] = h.labels_offset;
    j["images_offset"] = h.images_offset;
    j["crc32c"] = h.crc32c;
    return j;
}

// ---------------------------------------------------------------------------
// writer

// fwrite that reports which file and why.
static void write_all(FILE* f, const void* p, size_t n, const std::string& tmp) {
    if (n == 0) return;
    if (std::fwrite(p, 1, n, f) != n) fail(tmp, "write failed: " + errno_str());
}

static void write_zeros(FILE* f, uint64_t n, const std::string& tmp) {
    static const char zeros[4096] = {0};
    while (n > 0) {
        size_t k = size_t(std::min<uint64_t>(n, sizeof zeros));
        write_all(f, zeros, k, tmp);
        n -= k;
    }
}

void write_shard(const std::string& path, ShardHeader h, const std::vector<int32_t>& labels,
                 const void* images) {
    // Refuse to write what read_shard_header/verify_shard would refuse: a bad
    // shard should fail where it is made, not at training time.
    check_header_fields(h, path);
    if (int64_t(labels.size()) != h.count)
        fail(path, "cannot write: " + std::to_string(labels.size()) + " labels for count " + std::to_string(h.count));
    for (size_t i = 0; i < labels.size(); i++)
        if (labels[i] < 0 || labels[i] >= h.num_classes)
            fail(path, "cannot write: label " + std::to_string(labels[i]) + " of sample " + std::to_string(i) +
                           " outside [0, " + std::to_string(h.num_classes) + ")");
    PRISM_ASSERT(images != nullptr);

    uint64_t label_bytes = uint64_t(h.count) * 4;
    uint64_t label_region = round_up(label_bytes, kAlign);
    uint64_t image_bytes = checked_images_bytes(h, path);

    // The crc region (labels, padding, images) does not depend on where it
    // starts, so it is computed first and the header then sized around it.
    uint32_t crc = crc32c_update(0, labels.data(), label_bytes);
    crc = crc32c_zeros(crc, label_region - label_bytes);
    for (uint64_t off = 0; off < image_bytes; off += kIoChunk)
        crc = crc32c_update(crc, (const char*)images + off, size_t(std::min<uint64_t>(kIoChunk, image_bytes - off)));
    h.crc32c = crc;

    // The JSON holds the offsets, whose digits change its length: grow the
    // header area until the JSON fits in front of the labels.
    std::string text;
    h.labels_offset = kAlign;
    for (;;) {
        h.images_offset = h.labels_offset + label_region;
        try {
            text = header_json(h).dump();
        } catch (const nlohmann::json::exception& e) {  // e.g. a channel name that is not UTF-8
            fail(path, std::string("cannot encode header: ") + printable(e.what(), 200));
        }
        if (kPrefix + text.size() <= h.labels_offset) break;
        h.labels_offset = round_up(kPrefix + text.size(), kAlign);
    }
    if (text.size() > kMaxHeaderLen) fail(path, "cannot write: header of " + std::to_string(text.size()) + " bytes is too large");

    std::string tmp = path + ".tmp";
    FILE* f = std::fopen(tmp.c_str(), "wb");
    if (!f) fail(path, "cannot create " + tmp + ": " + errno_str());
    try {
        uint32_t version = kVersion, header_len = uint32_t(text.size());
        write_all(f, kMagic, 8, tmp);
        write_all(f, &version, 4, tmp);
        write_all(f, &header_len, 4, tmp);
        write_all(f, text.data(), text.size(), tmp);
        write_zeros(f, h.labels_offset - kPrefix - text.size(), tmp);
        write_all(f, labels.data(), label_bytes, tmp);
        write_zeros(f, label_region - label_bytes, tmp);
        for (uint64_t off = 0; off < image_bytes; off += kIoChunk)
            write_all(f, (const char*)images + off, size_t(std::min<uint64_t>(kIoChunk, image_bytes - off)), tmp);
        if (std::fflush(f) != 0) fail(tmp, "write failed: " + errno_str());
        // Data must be on disk before the rename makes the shard visible,
        // otherwise a crash could leave a complete-looking empty file.
        if (::fsync(fileno(f)) != 0) fail(tmp, "fsync failed: " + errno_str());
        FILE* g = f;
        f = nullptr;
        if (std::fclose(g) != 0) fail(tmp, "close failed: " + errno_str());
        if (std::rename(tmp.c_str(), path.c_str()) != 0) fail(path, "cannot rename " + tmp + " into place: " + errno_str());
    } catch (...) {
        if (f) std::fclose(f);  // already failing; its result adds nothing
        ::unlink(tmp.c_str());  // best effort: the error being reported is the useful one
        throw;
    }
    // Persist the rename itself. Some file systems cannot fsync a directory
    // (EINVAL); the shard is complete either way, so only real I/O errors count.
    std::string dir = dir_of(path);
    int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd < 0) fail(path, "written, but cannot open directory " + dir + " to sync it: " + errno_str());
    int rc = ::fsync(dfd);
    int err = errno;
    ::close(dfd);
    if (rc != 0 && err != EINVAL && err != EROFS)
        fail(path, "written, but syncing directory " + dir + " failed: " + std::strerror(err));
}

// ---------------------------------------------------------------------------
// reader

namespace {

// Fetches a key of the header object with a type check and a clear message.
struct HeaderJson {
    const nlohmann::json& j;
    const std::string& path;

    const nlohmann::json& at(const char* key) const {
        auto it = j.find(key);
        if (it == j.end()) fail(path, std::string("header has no key '") + key + "'");
        return *it;
    }
    // A non-negative integer no larger than max.
    uint64_t uint(const char* key, uint64_t max) const {
        const nlohmann::json& v = at(key);
        if (!v.is_number_integer()) fail(path, std::string("header key '") + key + "' must be an integer");
        if (!v.is_number_unsigned()) fail(path, std::string("header key '") + key + "' is negative (" +
                                                     std::to_string(v.get<int64_t>()) + ")");
        uint64_t u = v.get<uint64_t>();
        if (u > max) fail(path, std::string("header key '") + key + "' = " + std::to_string(u) + " is too large");
        return u;
    }
    std::vector<double> numbers(const char* key) const {
        const nlohmann::json& v = at(key);
        if (!v.is_array()) fail(path, std::string("header key '") + key + "' must be an array of numbers");
        std::vector<double> out;
        for (const auto& x : v) {
            if (!x.is_number()) fail(path, std::string("header key '") + key + "' must be an array of numbers");
            out.push_back(x.get<double>());
        }
        return out;
    }
};

struct OpenShard {
    Fd fd;
    ShardHeader h;
    uint64_t file_size = 0;
};

}  // namespace

// Opens `path`, reads and checks its header; the fd stays open for the caller.
static void open_shard(const std::string& path, OpenShard& s) {
    uint64_t size = 0;
    s.fd.fd = open_regular_file(path, "", &size);
    s.file_size = size;
    if (size == 0) fail(path, "empty file (not a Prism shard)");

    unsigned char prefix[kPrefix] = {0};
    pread_all(s.fd.fd, prefix, size_t(std::min<uint64_t>(size, kPrefix)), 0, path);
    if (size < 8 || std::memcmp(prefix, kMagic, 8) != 0) fail(path, "bad magic (not a Prism shard)");
    if (size < kPrefix)
        fail(path, "truncated: file is " + std::to_string(size) + " bytes, a shard header needs at least 16");
    uint32_t version, header_len;
    std::memcpy(&version, prefix + 8, 4);
    std::memcpy(&header_len, prefix + 12, 4);
    if (version != kVersion)
        fail(path, "unsupported shard version " + std::to_string(version) + " (this build reads version 1)");
    if (header_len < 2 || header_len > kMaxHeaderLen)
        fail(path, "header_len " + std::to_string(header_len) + " is not sane (expected 2.." +
                       std::to_string(kMaxHeaderLen) + ")");
    if (kPrefix + header_len > size)
        fail(path, "truncated: file is " + std::to_string(size) + " bytes, header says " +
                       std::to_string(kPrefix + header_len) + " (header alone)");

    std::string text(header_len, '\0');
    pread_all(s.fd.fd, &text[0], header_len, kPrefix, path);
    nlohmann::json j;
    try {
        j = nlohmann::json::parse(text);
    } catch (const nlohmann::json::exception& e) {
        // Drop the "[json.exception.parse_error.101] " prefix: noise for a user.
        std::string msg = e.what();
        size_t close = msg.find("] ");
        if (msg.rfind("[json.exception", 0) == 0 && close != std::string::npos) msg = msg.substr(close + 2);
        fail(path, "header is not valid JSON: " + printable(msg, 200));
    }
    if (!j.is_object()) fail(path, "header is not a JSON object");

    HeaderJson hj{j, path};
    ShardHeader& h = s.h;
    // Only range checks that keep the casts below safe live here; the rest is
    // check_header_fields, shared with the writer.
    h.count = int64_t(hj.uint("count", uint64_t(kMaxCount)));
    h.channels = int(hj.uint("channels", uint64_t(kMaxDim)));
    h.height = int(hj.uint("height", uint64_t(kMaxDim)));
    h.width = int(hj.uint("width", uint64_t(kMaxDim)));
    const nlohmann::json& dt = hj.at("dtype");
    if (!dt.is_string()) fail(path, "header key 'dtype' must be a string");
    h.dtype = dtype_from_name(dt.get<std::string>(), path);
    h.num_classes = int(hj.uint("num_classes", uint64_t(kMaxClasses)));
    const nlohmann::json& names = hj.at("channel_names");
    if (!names.is_array()) fail(path, "header key 'channel_names' must be an array of strings");
    h.channel_names.clear();
    for (const auto& n : names) {
        if (!n.is_string()) fail(path, "header key 'channel_names' must be an array of strings");
        h.channel_names.push_back(n.get<std::string>());
    }
    h.mean = hj.numbers("mean");
    h.std = hj.numbers("std");
    h.labels_offset = hj.uint("labels_offset", uint64_t(1) << 62);
    h.images_offset = hj.uint("images_offset", uint64_t(1) << 62);
    h.crc32c = uint32_t(hj.uint("crc32c", 0xffffffffu));
    check_header_fields(h, path);

    if (h.labels_offset % kAlign != 0)
        fail(path, "labels_offset " + std::to_string(h.labels_offset) + " is not a multiple of 4096");
    if (h.images_offset % kAlign != 0)
        fail(path, "images_offset " + std::to_string(h.images_offset) + " is not a multiple of 4096");
    if (h.labels_offset < kPrefix + header_len)
        fail(path, "labels_offset " + std::to_string(h.labels_offset) + " overlaps the header (ends at " +
                       std::to_string(kPrefix + header_len) + ")");
    if (h.images_offset < h.labels_offset + uint64_t(h.count) * 4)
        fail(path, "images_offset " + std::to_string(h.images_offset) + " overlaps the labels (labels_offset " +
                       std::to_string(h.labels_offset) + ", count " + std::to_string(h.count) + ")");
    uint64_t expect = h.images_offset + checked_images_bytes(h, path);
    if (size < expect)
        fail(path, "truncated: file is " + std::to_string(size) + " bytes, header says " + std::to_string(expect));
    if (size > expect)
        fail(path, "file is " + std::to_string(size) + " bytes, header says " + std::to_string(expect) +
                       " (extra bytes at the end)");
}

ShardHeader read_shard_header(const std::string& path) {
    OpenShard s;
    open_shard(path, s);
    return s.h;
}

ShardReader::ShardReader(const std::string& path) : path_(path) {
    OpenShard s;
    open_shard(path, s);
    h_ = s.h;
    std::swap(fd_, s.fd.fd);
}

ShardReader::~ShardReader() {
    if (fd_ >= 0) ::close(fd_);
}

ShardReader::ShardReader(ShardReader&& o) noexcept : path_(std::move(o.path_)), h_(std::move(o.h_)) {
    std::swap(fd_, o.fd_);
}

void ShardReader::read(void* buf, size_t n, uint64_t offset) const { pread_all(fd_, buf, n, offset, path_); }

static void check_labels(const int32_t* labels, int64_t n, int64_t first, int num_classes, const std::string& path);

std::vector<int32_t> ShardReader::read_labels() const {
    std::vector<int32_t> labels(size_t(h_.count));
    read(labels.data(), labels.size() * 4, h_.labels_offset);
    check_labels(labels.data(), h_.count, 0, h_.num_classes, path_);
    return labels;
}

void ShardReader::read_images(void* buf, int64_t first, int64_t n) const {
    PRISM_ASSERT(first >= 0 && n >= 0 && first + n <= h_.count);
    const size_t per = h_.image_bytes();
    read(buf, size_t(n) * per, h_.images_offset + uint64_t(first) * per);
}

static void check_labels(const int32_t* labels, int64_t n, int64_t first, int num_classes, const std::string& path) {
    for (int64_t i = 0; i < n; i++)
        if (labels[i] < 0 || labels[i] >= num_classes)
            fail(path, "label " + std::to_string(labels[i]) + " of sample " + std::to_string(first + i) +
                           " outside [0, " + std::to_string(num_classes) + ")");
}

// Pixel as float; the one place that knows the stored encodings.
static inline float load_pixel(const void* base, size_t i, DType d) {
    switch (d) {
        case DType::u8: return float(((const uint8_t*)base)[i]);
        case DType::u16: return float(((const uint16_t*)base)[i]);
        case DType::f16: return half_to_float(((const uint16_t*)base)[i]);
        case DType::f32: return ((const float*)base)[i];
    }
    return 0.f;
}

// The first of n IEEE values (float16 or float32 bits) whose exponent bits
// are all ones, i.e. NaN or Inf, or n. The loader runs it on every float
// image it hands on unnormalized (device_input), on its reader threads, so it
// tests bits, not widened floats, and a block at a time with a min-reduction
// the compiler vectorizes (a block holds one when its least ~v & exponent is 0).
template <class Bits>
static size_t first_all_ones_exponent(const void* block, size_t n, Bits exponent) {
    constexpr size_t kBlock = 1024;
    const char* bytes = static_cast<const char*>(block);
    auto clear_exponent_bits = [&](size_t i) {
        Bits v;
        std::memcpy(&v, bytes + i * sizeof(Bits), sizeof(Bits));
        return Bits(~v & exponent);
    };
    for (size_t start = 0; start < n; start += kBlock) {
        const size_t end = std::min(n, start + kBlock);
        Bits least = exponent;
        for (size_t i = start; i < end; i++) least = std::min(least, clear_exponent_bits(i));
        if (least != 0) continue;
        for (size_t i = start; i < end; i++)
            if (clear_exponent_bits(i) == 0) return i;
    }
    return n;
}

// Index of the first non-finite stored pixel of a block, or `pixels` if none;
// integer dtypes cannot hold one.
static size_t first_nonfinite(const void* block, size_t pixels, DType d) {
    if (d == DType::f16) return first_all_ones_exponent<uint16_t>(block, pixels, 0x7c00);
    if (d == DType::f32) return first_all_ones_exponent<uint32_t>(block, pixels, 0x7f800000);
    return pixels;
}

// "NaN pixel in sample 3 (channel 1, y 4, x 5)", pixel index counted from
// the first image of the shard.
[[noreturn]] static void fail_nonfinite(float v, uint64_t pixel, const ShardHeader& h, const std::string& path) {
    uint64_t hw = uint64_t(h.height) * h.width, chw = hw * h.channels;
    fail(path, std::string(std::isnan(v) ? "NaN" : "Inf") + " pixel in sample " + std::to_string(pixel / chw) +
                   " (channel " + std::to_string(pixel % chw / hw) + ", y " + std::to_string(pixel % hw / h.width) +
                   ", x " + std::to_string(pixel % h.width) + ")");
}

void check_finite(const void* block, size_t pixels, const ShardHeader& h, int64_t first,
                  const std::string& path) {
    size_t bad = first_nonfinite(block, pixels, h.dtype);
    if (bad == pixels) return;
    uint64_t chw = uint64_t(h.channels) * h.height * h.width;
    fail_nonfinite(load_pixel(block, bad, h.dtype), uint64_t(first) * chw + bad, h, path);
}

void verify_shard(const std::string& path) {
    OpenShard s;
    open_shard(path, s);
    const ShardHeader& h = s.h;
    // Labels and the padding after them are the start of the crc region.
    uint64_t label_bytes = uint64_t(h.count) * 4;
    std::vector<char> head(size_t(h.images_offset - h.labels_offset));
    pread_all(s.fd.fd, head.data(), head.size(), h.labels_offset, path);
    uint32_t crc = crc32c_update(0, head.data(), head.size());
    std::vector<int32_t> labels(size_t(h.count));
    std::memcpy(labels.data(), head.data(), label_bytes);

    // One pass over the images in whole-image blocks: crc, and the first
    // non-finite pixel, reported only once the crc says the bytes are intact.
    size_t per = h.image_bytes(), px_per = per / dtype_size(h.dtype);
    int64_t per_chunk = std::max<int64_t>(1, int64_t(kIoChunk / per));
    std::unique_ptr<char[]> buf(new char[size_t(per_chunk) * per]);
    uint64_t bad = UINT64_MAX;
    float bad_value = 0;
    for (int64_t i = 0; i < h.count; i += per_chunk) {
        int64_t n = std::min<int64_t>(per_chunk, h.count - i);
        pread_all(s.fd.fd, buf.get(), size_t(n) * per, h.images_offset + uint64_t(i) * per, path);
        crc = crc32c_update(crc, buf.get(), size_t(n) * per);
        if (bad == UINT64_MAX) {
            size_t b = first_nonfinite(buf.get(), size_t(n) * px_per, h.dtype);
            if (b != size_t(n) * px_per) {
                bad = uint64_t(i) * px_per + b;
                bad_value = load_pixel(buf.get(), b, h.dtype);
            }
        }
    }
    if (crc != h.crc32c) fail(path, "crc32c mismatch (stored " + hex32(h.crc32c) + ", computed " + hex32(crc) + ")");
    check_labels(labels.data(), h.count, 0, h.num_classes, path);
    if (bad != UINT64_MAX) fail_nonfinite(bad_value, bad, h, path);
}

std::string shard_file_name(const std::string& prefix, int64_t k) {
    char buf[32];
    std::snprintf(buf, sizeof buf, "-%05lld.shard", (long long)k);
    return prefix + buf;
}

bool is_shard_name(const std::string& name, const std::string& prefix, const std::string& tail) {
    const std::string head = prefix + "-";
    if (name.size() <= head.size() + tail.size() || name.compare(0, head.size(), head) != 0 ||
        name.compare(name.size() - tail.size(), tail.size(), tail) != 0)
        return false;
    return std::all_of(name.begin() + long(head.size()), name.end() - long(tail.size()),
                       [](char ch) { return ch >= '0' && ch <= '9'; });
}

std::vector<std::string> remove_stale_shards(const std::string& dir, const std::string& prefix, int64_t first) {
    std::vector<std::string> removed;
    for (int64_t k = first;; k++) {
        std::string path = join_path(dir, shard_file_name(prefix, k));
        struct stat st;
        if (::stat(path.c_str(), &st) != 0) break;
        if (::unlink(path.c_str()) != 0) fail(path, "stale shard from an earlier run, cannot remove: " + errno_str());
        removed.push_back(path);
    }
    // What a killed run staged at indices this run did not reach, and so did
    // not overwrite: PREFIX-NNNNN.shard.part, or the .part.tmp of the shard
    // it was writing. A run's own are renamed by now. Only regular files: a
    // directory of that name is someone's, not a conversion's.
    std::vector<std::string> parts;
    if (DIR* d = ::opendir(dir.c_str())) {
        while (const dirent* e = ::readdir(d)) {
            const std::string name = e->d_name;
            if (!is_shard_name(name, prefix, ".shard.part") && !is_shard_name(name, prefix, ".shard.part.tmp"))
                continue;
            const std::string path = join_path(dir, name);
            struct stat st;
            if (::lstat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode)) parts.push_back(path);
        }
        ::closedir(d);
    }
    std::sort(parts.begin(), parts.end());
    for (const std::string& path : parts) {
        if (::unlink(path.c_str()) == 0) removed.push_back(path);
        else if (errno != ENOENT) fail(path, "staged shard of an earlier, killed run, cannot remove: " + errno_str());
    }
    return removed;
}

StagedShards::StagedShards(const std::string& dir, const std::string& prefix, const std::string& tag, bool verbose)
    : dir_(dir), prefix_(prefix), tag_(tag), verbose_(verbose) {}

StagedShards::~StagedShards() {
    if (committed_) return;
    for (const std::string& p : staged_) ::unlink((p + ".part").c_str());  // best effort
}

void StagedShards::add(const ShardHeader& h, const std::vector<int32_t>& labels, const void* images, int64_t done,
                       int64_t total) {
    std::string path = join_path(dir_, shard_file_name(prefix_, int64_t(staged_.size())));
    staged_.push_back(path);
    write_shard(path + ".part", h, labels, images);
    if (verbose_)
        progress(tag_ + ": " + std::to_string(done) + "/" + std::to_string(total) + " images (" +
                 shard_file_name(prefix_, int64_t(staged_.size()) - 1) + ")");
}

void StagedShards::commit() {
    rename_into_place();
    remove_stale();
}

void StagedShards::rename_into_place() {
    for (const std::string& p : staged_)
        if (std::rename((p + ".part").c_str(), p.c_str()) != 0)
            fail(p, "cannot rename " + p + ".part into place: " + errno_str());
    committed_ = true;
}

void StagedShards::remove_stale() {
    for (const std::string& p : remove_stale_shards(dir_, prefix_, int64_t(staged_.size())))
        if (verbose_) progress(tag_ + ": removed stale " + p);
    if (verbose_)
        progress(tag_ + ": wrote " + std::to_string(staged_.size()) + " shard(s) " +
                 join_path(dir_, prefix_ + "-*.shard"));
}

std::vector<std::string> expand_glob(const std::string& pattern) {
    glob_t g;
    std::memset(&g, 0, sizeof g);
    int rc = ::glob(pattern.c_str(), 0, nullptr, &g);
    if (rc == GLOB_NOMATCH) {
        globfree(&g);
        fail(pattern, "no files match");
    }
    if (rc != 0) {
        globfree(&g);
        fail(pattern, rc == GLOB_NOSPACE ? "glob ran out of memory" : "glob failed: cannot read a directory");
    }
    std::vector<std::string> out(g.gl_pathv, g.gl_pathv + g.gl_pathc);
    globfree(&g);
    // Byte order, not the locale's collation, so shard order is the same
    // on every machine.
    std::sort(out.begin(), out.end());
    return out;
}

static std::string shape_str(const ShardHeader& h) {
    return std::to_string(h.channels) + "x" + std::to_string(h.height) + "x" + std::to_string(h.width) + " " +
           dtype_name(h.dtype) + ", " + std::to_string(h.num_classes) + " classes";
}

void check_same_shape(const ShardHeader& h, const std::string& path, const ShardHeader& first,
                      const std::string& first_path) {
    if (!h.same_shape(first))
        fail(path, "shape " + shape_str(h) + " differs from " + first_path + ": " + shape_str(first));
}

Dataset load_dataset(const std::string& pattern) {
    std::vector<std::string> files = expand_glob(pattern);
    // Check every header before allocating, so a bad last shard fails fast.
    std::vector<ShardHeader> heads;
    int64_t total = 0;
    for (const std::string& f : files) {
        heads.push_back(read_shard_header(f));
        check_same_shape(heads.back(), f, heads[0], files[0]);
        total += heads.back().count;
    }
    Dataset ds;
    ds.shape = heads[0];
    ds.shape.count = total;
    const ShardHeader& shape = ds.shape;
    size_t per_px = size_t(shape.channels) * shape.height * shape.width;
    size_t floats = 0;
    if (__builtin_mul_overflow(size_t(total), per_px, &floats) || floats > (size_t(1) << 60))
        fail(pattern, "data set of " + std::to_string(total) + " images is too large to load");
    try {
        ds.labels.resize(size_t(total));
        ds.images.resize(floats);
    } catch (const std::bad_alloc&) {
        fail(pattern, "not enough memory to load " + std::to_string(total) + " images (" +
                          std::to_string(double(total) * per_px * 4 / (1 << 30)) + " GiB as float32)");
    }

    std::unique_ptr<char[]> buf;
    size_t per_bytes = shape.image_bytes();
    int64_t per_chunk = std::max<int64_t>(1, int64_t(kIoChunk / per_bytes));
    if (shape.dtype != DType::f32) buf.reset(new char[size_t(per_chunk) * per_bytes]);
    int64_t at = 0;  // first sample of the current shard in the data set
    for (size_t s = 0; s < files.size(); s++) {
        const std::string& path = files[s];
        const ShardReader sh(path);  // again: the file may have changed since the scan
        const ShardHeader& h = sh.header();
        if (!h.same_shape(shape) || h.count != heads[s].count) fail(path, "changed while loading");
        const std::vector<int32_t> labels = sh.read_labels();
        std::copy(labels.begin(), labels.end(), ds.labels.begin() + at);

        // Each shard is normalized with its own statistics: shards converted
        // separately may carry different ones.
        std::vector<float> mean(size_t(h.channels)), inv(size_t(h.channels));
        for (int c = 0; c < h.channels; c++) {
            mean[size_t(c)] = float(h.mean[size_t(c)]);
            inv[size_t(c)] = float(1.0 / h.std[size_t(c)]);
        }
        size_t hw = size_t(h.height) * h.width;
        for (int64_t i = 0; i < h.count; i += per_chunk) {
            int64_t n = std::min<int64_t>(per_chunk, h.count - i);
            float* dst = ds.images.data() + size_t(at + i) * per_px;
            // float32 lands straight in its final place and is normalized in place.
            const void* src = shape.dtype == DType::f32 ? (const void*)dst : (const void*)buf.get();
            sh.read_images((void*)src, i, n);
            check_finite(src, size_t(n) * per_px, h, i, path);
            // One (image, channel) plane per iteration keeps the channel
            // lookup out of the pixel loop.
            int64_t planes = n * h.channels;
            int64_t bad = planes;
#pragma omp parallel for reduction(min : bad) schedule(static)
            for (int64_t q = 0; q < planes; q++) {
                size_t c = size_t(q % h.channels);
                float m = mean[c], k = inv[c];
                float* d = dst + size_t(q) * hw;
                bool ok = true;
                for (size_t j = 0; j < hw; j++) {
                    float v = (load_pixel(src, size_t(q) * hw + j, h.dtype) - m) * k;
                    d[j] = v;
                    ok &= std::isfinite(v);
                }
                if (!ok) bad = std::min(bad, q);
            }
            if (bad != planes)  // finite stored values, but a tiny std blows them up
                fail(path, "sample " + std::to_string(i + bad / h.channels) + " channel " +
                               std::to_string(bad % h.channels) +
                               " is not finite after normalization (check the header's mean/std)");
        }
        at += h.count;
    }
    return ds;
}

}  // namespace prism
