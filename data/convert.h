// Converters from public data-set layouts to shards (DESIGN.md §3, §4):
// `prism convert so2sat` and `prism convert npy`.
//
// Both read their input twice: a first pass checks every value and computes
// the per-channel mean and std that every shard header carries, a second
// writes DIR/PREFIX-00000.shard, ... A conversion that fails leaves the
// directory's shards as they were: new shards are staged as
// PREFIX-NNNNN.shard.part and renamed into place only once all are written;
// then shards of the same prefix beyond the last one written are removed.
// Validation and test sets should be normalized like the training set:
// `stats_from` (--stats-from GLOB) copies the training shards' mean and std
// into their headers instead of their own; a glob that matches shards the
// conversion would replace is refused. The output directory and --stats-from
// are checked before the first pass reads any input.
// Every problem is a UserError "<path>: <problem>" on one line.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "data/shard.h"

namespace prism {

// So2Sat LCZ42 channel names: sen1_0..sen1_7, then sen2_B2 ... sen2_B12.
std::vector<std::string> so2sat_channel_names();

struct So2SatOptions {
    std::string in;                 // training.h5, validation.h5 or testing.h5
    std::string out;                // output directory (created)
    std::string prefix = "train";   // shard names PREFIX-NNNNN.shard
    DType dtype = DType::f32;       // f32 or f16
    int64_t shard_size = 0;         // images per shard (the last may hold fewer); 0: 4096, fewer
                                    // where a shard would pass 1 GiB (pass 2 holds one in memory)
    bool verbose = true;            // progress lines on stdout
    std::string stats_from;         // a shard glob: use its mean/std instead of this file's
};

// Reads the So2Sat LCZ42 HDF5 layout: `sen1` (n,32,32,8), `sen2`
// (n,32,32,10) and `label` (n,17) one-hot, streamed in row blocks. Shards
// hold 18 channels (sen1's 8, then sen2's 10) in CHW order, the label as the
// index of the one-hot entry, 17 classes. Throws UserError when this build
// has no HDF5 support.
void convert_so2sat(const So2SatOptions& o);

struct NpyOptions {
    std::string list;               // CSV "path,label", paths relative to its directory
    std::string out;
    std::string prefix = "train";
    int64_t shard_size = 0;         // as So2SatOptions::shard_size
    int num_classes = 0;            // 0: stats_from's, else max label + 1
    bool verbose = true;
    std::string stats_from;         // a shard glob: use its mean/std instead of this list's
};

// One .npy file per image, each a [C,H,W] array of uint8, uint16, float32 or
// float64 (little-endian, C order), all of one shape. The shards use the
// narrowest dtype that holds every value exactly: uint8, uint16, float16,
// else float32 (float64 that float32 cannot hold exactly is rounded, with a
// note). Channel names ch0 .. chC-1.
void convert_npy(const NpyOptions& o);

}  // namespace prism
