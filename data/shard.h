// Shards, version 1 (DESIGN.md §3): one file holds `count` labelled images of
// one shape. Little-endian; the layout is a contract shared with users' tools.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace prism {

enum class DType { u8, u16, f16, f32 };
const char* dtype_name(DType d);          // "uint8", "uint16", "float16", "float32"
size_t dtype_size(DType d);
DType dtype_from_name(const std::string& name, const std::string& origin);  // throws UserError

struct ShardHeader {
    int64_t count = 0;
    int channels = 0, height = 0, width = 0;
    DType dtype = DType::f32;
    int num_classes = 0;
    std::vector<std::string> channel_names;  // one per channel
    std::vector<double> mean, std;           // per channel, in stored units
    uint64_t labels_offset = 0, images_offset = 0;
    uint32_t crc32c = 0;

    size_t image_bytes() const { return size_t(channels) * height * width * dtype_size(dtype); }
    bool same_shape(const ShardHeader& o) const {
        return channels == o.channels && height == o.height && width == o.width &&
               dtype == o.dtype && num_classes == o.num_classes;
    }
};

// Castagnoli CRC (crc32c), incremental: crc = crc32c_update(crc, data, n),
// starting from 0.
uint32_t crc32c_update(uint32_t crc, const void* data, size_t n);

// Writes a complete shard to `path` atomically: it writes `path.tmp`, fsyncs
// and renames, so an interrupted write never leaves a shard that looks
// complete. `images` holds count*image_bytes() bytes in the header's dtype.
// Offsets and crc32c in `h` are computed here.
void write_shard(const std::string& path, ShardHeader h, const std::vector<int32_t>& labels,
                 const void* images);

// Reads and checks the header (magic, version, every key, file size).
// Throws UserError("<path>: <problem>").
ShardHeader read_shard_header(const std::string& path);

// A shard opened for reading: the header is checked as read_shard_header
// does, and the file stays open, so every later read sees that same file.
// Reads may run concurrently (pread). Errors are UserError naming the file.
class ShardReader {
public:
    explicit ShardReader(const std::string& path);
    ~ShardReader();
    ShardReader(ShardReader&& o) noexcept;
    ShardReader(const ShardReader&) = delete;
    ShardReader& operator=(const ShardReader&) = delete;
    ShardReader& operator=(ShardReader&&) = delete;

    const std::string& path() const { return path_; }
    const ShardHeader& header() const { return h_; }
    // Exactly n bytes at `offset`; a short read means the file changed.
    void read(void* buf, size_t n, uint64_t offset) const;
    // All labels, checked to lie in [0, num_classes).
    std::vector<int32_t> read_labels() const;
    // The stored bytes of images [first, first + n).
    void read_images(void* buf, int64_t first, int64_t n) const;

private:
    std::string path_;
    ShardHeader h_;
    int fd_ = -1;
};

// The checks load_dataset and the streaming loader share; each throws
// UserError("<path>: ...").
// `h` (of `path`) must have the shape of the set's first shard `first`.
void check_same_shape(const ShardHeader& h, const std::string& path, const ShardHeader& first,
                      const std::string& first_path);
// The first NaN or Inf among `pixels` stored pixels that start at image
// `first_image` of the shard: "NaN pixel in sample 3 (channel 1, y 4, x 5)".
void check_finite(const void* block, size_t pixels, const ShardHeader& h, int64_t first_image,
                  const std::string& path);

// Everything read_shard_header checks, plus labels in range and the crc32c.
void verify_shard(const std::string& path);

// "PREFIX-NNNNN.shard", the name of shard k of a set (5 digits, more if needed).
std::string shard_file_name(const std::string& prefix, int64_t k);

// Whether `name` (no directory) is PREFIX-<digits>TAIL: ".shard" for a
// shard of the set, ".shard.part" for one staged.
bool is_shard_name(const std::string& name, const std::string& prefix, const std::string& tail);

// Removes DIR/PREFIX-NNNNN.shard for k = first, first+1, ... up to the first
// that does not exist: shards left by an earlier, larger run that would
// otherwise join a `PREFIX-*.shard` glob. Removes every regular file
// DIR/PREFIX-NNNNN.shard.part(.tmp) too: what a killed run staged. Returns
// the removed paths; throws UserError naming a file it cannot remove.
std::vector<std::string> remove_stale_shards(const std::string& dir, const std::string& prefix, int64_t first);

// Writes a set of shards so that a run that fails or is killed part way
// changes no PREFIX-NNNNN.shard: each shard is staged as
// PREFIX-NNNNN.shard.part (atomically, by write_shard), and commit() renames
// them all into place, then removes stale shards beyond the last. Staged
// files of a run that throws are removed; those of one that is killed stay
// as *.part, which no `*.shard` glob matches, and the next run's commit
// removes them. Only a failure inside commit's rename loop itself (a handful of
// renames in one directory) can leave old and new shards mixed.
class StagedShards {
public:
    // `tag` starts the progress lines printed when `verbose`.
    StagedShards(const std::string& dir, const std::string& prefix, const std::string& tag, bool verbose);
    ~StagedShards();
    StagedShards(const StagedShards&) = delete;
    StagedShards& operator=(const StagedShards&) = delete;

    // Stages the next shard; `done` of `total` images are then staged.
    void add(const ShardHeader& h, const std::vector<int32_t>& labels, const void* images, int64_t done,
             int64_t total);
    // rename_into_place, then remove_stale. Sets staged together (synth's
    // two splits) rename all of theirs before any removal can fail.
    void commit();
    void rename_into_place();
    void remove_stale();

private:
    std::string dir_, prefix_, tag_;
    bool verbose_;
    std::vector<std::string> staged_;
    bool committed_ = false;
};

// Sorted list of files matching a glob; throws UserError if none match.
std::vector<std::string> expand_glob(const std::string& pattern);

// A whole data set in memory, normalized to float: image i, channel c is
// (stored - mean[c]) / std[c]. For tests and tools that want all of it at
// once; training and evaluation stream through data/loader.h instead.
struct Dataset {
    ShardHeader shape;                // header of the first shard (count = total)
    std::vector<int32_t> labels;      // [count]
    std::vector<float> images;        // [count][channels][height][width]
    int64_t count() const { return int64_t(labels.size()); }
};

// Loads every shard matching `pattern`. Refuses (UserError naming the file):
// an empty glob, shards of different shapes, labels out of range, NaN or Inf
// pixels, and anything read_shard_header refuses.
Dataset load_dataset(const std::string& pattern);

// fp16 <-> fp32 (IEEE half), for float16 shards.
float half_to_float(uint16_t h);
uint16_t float_to_half(float f);

}  // namespace prism
