// The streaming loader (data/loader.h) and the input step (ops::input_forward).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <random>
#include <set>
#include <string>
#include <vector>
#include <sys/resource.h>

#include "data/loader.h"
#include "data/shard.h"
#include "engine/common.h"
#include "engine/rng.h"
#include "kernels/ops.h"
#include "tests/shardutil.h"
#include "tests/testutil.h"

using namespace prism;
using namespace prism::testing;
using ops::InputAug;
using ops::Pixel;

namespace {

// ---------------------------------------------------------------------------
// the input step

// The definition in kernels/ops.h, pixel by pixel.
float reference_pixel(const std::vector<float>& stored, int C, int H, int W, int b, int c, int y, int x, float mean,
                      float inv_std, const InputAug* a) {
    int sy = y, sx = x;
    if (a) {
        for (int i = 0; i < a->holes; i++)
            if (y >= a->hole_y[i] && y < a->hole_y[i] + a->hole_h && x >= a->hole_x[i] && x < a->hole_x[i] + a->hole_w)
                return 0.f;
        const int xf = (a->dihedral & 4) ? W - 1 - x : x;
        switch (a->dihedral & 3) {
            case 0: sy = y, sx = xf; break;
            case 1: sy = xf, sx = W - 1 - y; break;
            case 2: sy = H - 1 - y, sx = W - 1 - xf; break;
            default: sy = H - 1 - xf, sx = y; break;
        }
        sy += a->dy;
        sx += a->dx;
    }
    if (sy < 0 || sy >= H || sx < 0 || sx >= W) return 0.f;
    return (stored[((size_t(b) * C + c) * H + sy) * W + sx] - mean) * inv_std;
}

struct Images {
    ShardHeader h;  // count = B
    Pixels px;
    std::vector<float> mean, inv_std;  // [B, C]
};

Images random_images(int B, int C, int H, int W, DType d, uint32_t seed) {
    Images im;
    im.h = make_header(B, C, H, W, d, 3);
    im.px = random_pixels(im.h, seed);
    for (int b = 0; b < B; b++)
        for (int c = 0; c < C; c++) {
            im.mean.push_back(float(0.5 * c + b));
            im.inv_std.push_back(float(1.0 / (1.5 + c)));
        }
    return im;
}

std::vector<float> run_input(const Images& im, const InputAug* aug) {
    const ShardHeader& h = im.h;
    std::vector<float> out(size_t(h.count) * h.channels * h.height * h.width, -7.f);
    EXPECT_EQ(ops::input_forward(out.data(), im.px.bytes.data(), pixel_of(h.dtype), int(h.count), h.channels,
                                 h.height, h.width, im.mean.data(), im.inv_std.data(), aug),
              -1);
    return out;
}

TEST(InputOp, NoneIsPureNormalization) {
    for (DType d : {DType::u8, DType::u16, DType::f16, DType::f32}) {
        SCOPED_TRACE(dtype_name(d));
        const Images im = random_images(3, 2, 5, 13, d, 4);  // 13: a tail after the 8-wide loop
        std::vector<InputAug> identity(3);
        const std::vector<float> none = run_input(im, nullptr), same = run_input(im, identity.data());
        EXPECT_EQ(none, same);
        const size_t hw = 5 * 13;
        for (size_t i = 0; i < none.size(); i++) {
            const size_t q = i / hw;  // b * C + c
            ASSERT_EQ(none[i], (im.px.values[i] - im.mean[q]) * im.inv_std[q]) << i;
        }
    }
}

TEST(InputOp, QuarterTurnsAndFlipsFollowNumpy) {
    Images im = random_images(1, 1, 2, 2, DType::f32, 1);
    const float v[4] = {1, 2, 3, 4};  // [[1, 2], [3, 4]]
    std::memcpy(im.px.bytes.data(), v, sizeof v);
    im.mean = {0};
    im.inv_std = {1};
    InputAug a;
    a.dihedral = 1;  // numpy.rot90: [[2, 4], [1, 3]]
    EXPECT_EQ(run_input(im, &a), (std::vector<float>{2, 4, 1, 3}));
    a.dihedral = 4;  // numpy.fliplr: [[2, 1], [4, 3]]
    EXPECT_EQ(run_input(im, &a), (std::vector<float>{2, 1, 4, 3}));
    a.dihedral = 5;  // fliplr(rot90): [[4, 2], [3, 1]]
    EXPECT_EQ(run_input(im, &a), (std::vector<float>{4, 2, 3, 1}));
}

TEST(InputOp, MatchesTheDefinitionForEveryTransformCropAndHole) {
    std::mt19937 rng(3);
    for (DType d : {DType::u8, DType::u16, DType::f16, DType::f32})
        for (int side : {9, 16, 21}) {
            const int B = 8, C = 2, H = side, W = side;
            const Images im = random_images(B, C, H, W, d, uint32_t(side));
            std::vector<InputAug> aug(B);
            for (int b = 0; b < B; b++) {
                InputAug& a = aug[size_t(b)];
                a.dihedral = b;  // all eight
                a.dy = int(rng() % 9) - 4;
                a.dx = int(rng() % 9) - 4;
                a.holes = int(rng() % (ops::kMaxHoles + 1));
                a.hole_h = 1 + int(rng() % 4);
                a.hole_w = 1 + int(rng() % 4);
                for (int i = 0; i < a.holes; i++) a.hole_y[i] = int(rng() % H), a.hole_x[i] = int(rng() % W);
            }
            const std::vector<float> out = run_input(im, aug.data());
            for (int b = 0; b < B; b++)
                for (int c = 0; c < C; c++)
                    for (int y = 0; y < H; y++)
                        for (int x = 0; x < W; x++) {
                            const size_t q = size_t(b) * C + c;
                            const float want = reference_pixel(im.px.values, C, H, W, b, c, y, x, im.mean[q],
                                                               im.inv_std[q], &aug[size_t(b)]);
                            ASSERT_EQ(out[(q * H + y) * W + x], want)
                                << dtype_name(d) << " side " << side << " image " << b << " y " << y << " x " << x;
                        }
        }
    // Non-square images: the four shape-keeping transforms.
    const Images im = random_images(4, 1, 6, 11, DType::u8, 9);
    std::vector<InputAug> aug(4);
    for (int b = 0; b < 4; b++) aug[size_t(b)].dihedral = 2 * b, aug[size_t(b)].dy = b - 2, aug[size_t(b)].dx = 1 - b;
    const std::vector<float> out = run_input(im, aug.data());
    for (int b = 0; b < 4; b++)
        for (int y = 0; y < 6; y++)
            for (int x = 0; x < 11; x++)
                ASSERT_EQ(out[(size_t(b) * 6 + y) * 11 + x],
                          reference_pixel(im.px.values, 1, 6, 11, b, 0, y, x, im.mean[size_t(b)],
                                          im.inv_std[size_t(b)], &aug[size_t(b)]));
}

TEST(InputOp, FlipsAndQuarterTurnsArePermutationsUndoneByTheirInverse) {
    const int H = 12, W = 12, C = 3;
    Images im = random_images(1, C, H, W, DType::f32, 5);
    im.mean.assign(size_t(C), 0.f);
    im.inv_std.assign(size_t(C), 1.f);
    for (int d = 0; d < 8; d++) {
        InputAug a, inverse;
        a.dihedral = d;
        // fliplr∘rot90^t is a reflection, its own inverse; rot90^t is undone by rot90^(4-t).
        inverse.dihedral = (d & 4) ? d : (4 - d) % 4;
        const std::vector<float> once = run_input(im, &a);
        std::vector<float> a_sorted = once, v_sorted = im.px.values;
        std::sort(a_sorted.begin(), a_sorted.end());
        std::sort(v_sorted.begin(), v_sorted.end());
        EXPECT_EQ(a_sorted, v_sorted) << "dihedral " << d << " is not a permutation";
        Images again = im;
        std::memcpy(again.px.bytes.data(), once.data(), once.size() * 4);
        EXPECT_EQ(run_input(again, &inverse), im.px.values) << "dihedral " << d;
    }
}

TEST(InputOp, DropoutHolesAreTenByTenInsideTheImage) {
    const int H = 224, W = 224;
    std::set<int> seen_dihedral, seen_dy;
    for (uint64_t index = 0; index < 64; index++) {
        const InputAug a = draw_augmentation(Augment::jumpcp, H, W, 11, index);
        ASSERT_EQ(a.holes, 10);
        ASSERT_EQ(a.hole_h, 10);
        ASSERT_EQ(a.hole_w, 10);
        ASSERT_GE(a.dy, -16);
        ASSERT_LE(a.dy, 16);
        ASSERT_GE(a.dx, -16);
        ASSERT_LE(a.dx, 16);
        seen_dihedral.insert(a.dihedral);
        seen_dy.insert(a.dy);
        for (int i = 0; i < 10; i++) {
            ASSERT_GE(a.hole_y[i], 0);
            ASSERT_LE(a.hole_y[i] + 10, H);
            ASSERT_GE(a.hole_x[i], 0);
            ASSERT_LE(a.hole_x[i] + 10, W);
        }
        if (index >= 4) continue;
        // Only the holes, no crop or turn: exactly the union of the ten squares is 0.
        InputAug holes_only = a;
        holes_only.dihedral = holes_only.dy = holes_only.dx = 0;
        Images im = random_images(1, 2, H, W, DType::u8, uint32_t(index));
        for (size_t i = 0; i < im.px.bytes.size(); i++) im.px.bytes[i] = char(1 + i % 200);  // never the mean
        im.mean = {0, 0};
        im.inv_std = {1, 1};
        const std::vector<float> out = run_input(im, &holes_only);
        std::vector<char> in_hole(size_t(H) * W, 0);
        for (int i = 0; i < 10; i++)
            for (int y = a.hole_y[i]; y < a.hole_y[i] + 10; y++)
                for (int x = a.hole_x[i]; x < a.hole_x[i] + 10; x++) in_hole[size_t(y) * W + x] = 1;
        const size_t covered = size_t(std::count(in_hole.begin(), in_hole.end(), 1));
        EXPECT_GE(covered, 100u);
        EXPECT_LE(covered, 1000u);
        for (int c = 0; c < 2; c++)
            for (size_t p = 0; p < size_t(H) * W; p++)
                ASSERT_EQ(out[size_t(c) * H * W + p] == 0.f, in_hole[p] == 1) << "channel " << c << " pixel " << p;
    }
    EXPECT_EQ(seen_dihedral.size(), 8u);
    EXPECT_GT(seen_dy.size(), 10u);
    // Small images: holes clipped to the image, padding scaled with the side.
    const InputAug small = draw_augmentation(Augment::jumpcp, 8, 32, 1, 0);
    EXPECT_EQ(small.hole_h, 8);
    EXPECT_EQ(small.hole_w, 10);
    EXPECT_EQ(small.dy, 0);  // 8 * 16 / 224 = 0
    EXPECT_LE(std::abs(small.dx), 2);
    EXPECT_EQ(small.dihedral % 2, 0);  // not square
}

TEST(InputOp, So2SatAugmentationKeepsEveryPixelValue) {
    Images im = random_images(6, 18, 32, 32, DType::f16, 8);
    std::vector<InputAug> aug;
    for (uint64_t i = 0; i < 6; i++) {
        aug.push_back(draw_augmentation(Augment::so2sat, 32, 32, 5, i));
        EXPECT_EQ(aug.back().holes, 0);
        EXPECT_EQ(aug.back().dy, 0);
        EXPECT_EQ(aug.back().dx, 0);
    }
    const std::vector<float> plain = run_input(im, nullptr), augmented = run_input(im, aug.data());
    const size_t plane = 32 * 32;
    for (size_t q = 0; q < 6 * 18; q++) {
        std::vector<float> a(plain.begin() + long(q * plane), plain.begin() + long((q + 1) * plane));
        std::vector<float> b(augmented.begin() + long(q * plane), augmented.begin() + long((q + 1) * plane));
        std::sort(a.begin(), a.end());
        std::sort(b.begin(), b.end());
        ASSERT_EQ(a, b) << "plane " << q;
    }
}

TEST(InputOp, DeterministicDrawsAndOutput) {
    for (Augment k : {Augment::so2sat, Augment::jumpcp}) {
        int differ = 0;
        for (uint64_t i = 0; i < 20; i++) {
            const InputAug a = draw_augmentation(k, 224, 224, 3, i), b = draw_augmentation(k, 224, 224, 3, i);
            EXPECT_EQ(std::memcmp(&a, &b, sizeof a), 0);
            const InputAug other = draw_augmentation(k, 224, 224, 4, i);
            differ += std::memcmp(&a, &other, sizeof a) != 0;
        }
        EXPECT_GE(differ, 15);  // another seed draws otherwise (so2sat: 1 in 8 agree by chance)
    }
    const InputAug none = draw_augmentation(Augment::none, 224, 224, 3, 1);
    EXPECT_EQ(none.dihedral + none.dy + none.dx + none.holes, 0);
    const Images im = random_images(4, 8, 224, 224, DType::u8, 2);
    std::vector<InputAug> aug;
    for (uint64_t i = 0; i < 4; i++) aug.push_back(draw_augmentation(Augment::jumpcp, 224, 224, 9, i));
    EXPECT_EQ(run_input(im, aug.data()), run_input(im, aug.data()));
}

TEST(InputOp, ReportsTheFirstNonFiniteImage) {
    Images im = random_images(3, 2, 4, 9, DType::f32, 1);
    float nan = NAN, inf = INFINITY;
    std::memcpy(&im.px.bytes[(1 * 72 + 40) * 4], &nan, 4);
    std::memcpy(&im.px.bytes[(2 * 72 + 3) * 4], &inf, 4);
    std::vector<float> out(3 * 72);
    EXPECT_EQ(ops::input_forward(out.data(), im.px.bytes.data(), Pixel::f32, 3, 2, 4, 9, im.mean.data(),
                                 im.inv_std.data(), nullptr),
              1);
    // Finite pixels that the statistics blow up count too.
    im = random_images(1, 1, 4, 9, DType::f16, 2);
    im.inv_std = {1e38f};
    EXPECT_EQ(ops::input_forward(out.data(), im.px.bytes.data(), Pixel::f16, 1, 1, 4, 9, im.mean.data(),
                                 im.inv_std.data(), nullptr),
              0);
}

// ---------------------------------------------------------------------------
// the loader

// Three shards of 7, 5 and 11 images (23 in all), 2x6x6 uint16, with mean 0
// and std 1, so the normalized pixels are the stored ones: pixel 0 of sample
// g is 100*g, which tells the sample. Label g % 5.
constexpr int kN = 23, kC = 2, kSide = 6;
constexpr size_t kPer = size_t(kC) * kSide * kSide;

std::string numbered_set(const TmpDir& dir) {
    int64_t g = 0;
    const int64_t sizes[3] = {7, 5, 11};
    for (int s = 0; s < 3; s++) {
        ShardHeader h = make_header(sizes[s], kC, kSide, kSide, DType::u16, 5);
        h.mean = {0, 0};
        h.std = {1, 1};
        std::vector<uint16_t> px(size_t(sizes[s]) * kPer);
        std::vector<int32_t> labels;
        for (int64_t i = 0; i < sizes[s]; i++, g++) {
            for (size_t p = 0; p < kPer; p++) px[size_t(i) * kPer + p] = uint16_t(100 * g + p);
            labels.push_back(int32_t(g % 5));
        }
        write_shard(dir / shard_file_name("n", s), h, labels, px.data());
    }
    return dir / "n-*.shard";
}

LoaderOptions options(const std::string& glob, int batch, bool train, int threads = 2) {
    LoaderOptions o;
    o.pattern = glob;
    o.batch = batch;
    o.train = train;
    o.seed = 7;
    o.threads = threads;
    return o;
}

struct Seen {
    int size = 0;
    LoaderPosition position;
    std::vector<int32_t> labels;
    std::vector<float> images;
    bool operator==(const Seen& o) const {
        return size == o.size && position == o.position && labels == o.labels && images == o.images;
    }
};

Seen take_one(Loader& l, size_t per = kPer) {
    const LoaderBatch& b = l.next();
    Seen s;
    s.size = b.size;
    s.position = b.position;
    s.labels.assign(b.labels, b.labels + b.size);
    if (b.images) s.images.assign(b.images, b.images + size_t(b.size) * per);
    return s;
}

std::vector<Seen> take(Loader& l, int n, size_t per = kPer) {
    std::vector<Seen> out;
    for (int i = 0; i < n; i++) out.push_back(take_one(l, per));
    return out;
}

// Sample numbers of an unaugmented batch of the numbered set.
std::vector<int> ids(const Seen& s) {
    std::vector<int> out;
    for (int i = 0; i < s.size; i++) {
        const int g = int(s.images[size_t(i) * kPer]) / 100;
        EXPECT_EQ(s.labels[size_t(i)], g % 5);
        EXPECT_EQ(s.images[size_t(i) * kPer + kPer - 1], float(100 * g + kPer - 1));
        out.push_back(g);
    }
    return out;
}

TEST(Loader, SameSeedSameBatchesWhateverTheThreads) {
    TmpDir dir;
    const std::string glob = numbered_set(dir);
    LoaderOptions o = options(glob, 4, true, 1);
    o.augment = Augment::so2sat;
    o.prefetch = 2;
    Loader one(o);
    o.threads = 3;
    o.prefetch = 5;
    Loader three(o);
    const std::vector<Seen> a = take(one, 17), b = take(three, 17);  // more than 3 epochs of 5 batches
    for (size_t i = 0; i < a.size(); i++) ASSERT_TRUE(a[i] == b[i]) << "batch " << i;
    EXPECT_EQ(a[16].position, (LoaderPosition{3, 1}));
    o.seed = 8;
    Loader other(o);
    EXPECT_FALSE(take_one(other) == a[0]);
}

TEST(Loader, EveryEpochIsANewPermutationAndDropsTheTail) {
    TmpDir dir;
    Loader l(options(numbered_set(dir), 4, true));
    EXPECT_EQ(l.count(), kN);
    EXPECT_EQ(l.batches_per_epoch(), 5);  // 23 / 4, the last 3 dropped
    std::vector<std::vector<int>> orders;
    for (int e = 0; e < 3; e++) {
        std::vector<int> order;
        for (int k = 0; k < 5; k++) {
            const Seen s = take_one(l);
            ASSERT_EQ(s.size, 4);  // full batches only
            EXPECT_EQ(s.position, (LoaderPosition{e, k}));
            for (int g : ids(s)) order.push_back(g);
        }
        EXPECT_EQ(std::set<int>(order.begin(), order.end()).size(), 20u) << "epoch " << e << " repeats a sample";
        orders.push_back(order);
    }
    EXPECT_NE(orders[0], orders[1]);
    EXPECT_NE(orders[1], orders[2]);
    std::set<int> dropped0, dropped1;
    for (int g = 0; g < kN; g++) {
        if (std::find(orders[0].begin(), orders[0].end(), g) == orders[0].end()) dropped0.insert(g);
        if (std::find(orders[1].begin(), orders[1].end(), g) == orders[1].end()) dropped1.insert(g);
    }
    EXPECT_EQ(dropped0.size(), 3u);
    EXPECT_NE(dropped0, dropped1);  // a different tail each epoch
}

TEST(Loader, RankSlicesAreDisjointAndMakeUpTheGlobalBatch) {
    TmpDir dir;
    const std::string glob = numbered_set(dir);
    LoaderOptions o = options(glob, 6, true);
    o.augment = Augment::so2sat;  // keyed by the place in the global batch, so ranks agree too
    Loader whole(o);
    const std::vector<Seen> global = take(whole, 8);  // 3 batches per epoch: crosses two epoch ends
    LoaderOptions plain = options(glob, 6, true);
    Loader whole_plain(plain);
    const std::vector<Seen> global_plain = take(whole_plain, 8);
    for (int R : {2, 3}) {
        std::vector<std::unique_ptr<Loader>> ranks, ranks_plain;
        for (int r = 0; r < R; r++) {
            o.rank = plain.rank = r;
            o.world = plain.world = R;
            ranks.push_back(std::make_unique<Loader>(o));
            ranks_plain.push_back(std::make_unique<Loader>(plain));
            EXPECT_EQ(ranks.back()->local_batch(), 6 / R);
            EXPECT_EQ(ranks.back()->batches_per_epoch(), 3);
        }
        for (size_t k = 0; k < global.size(); k++) {
            Seen joined, joined_plain;
            std::set<int> seen;
            for (int r = 0; r < R; r++) {
                const Seen s = take_one(*ranks[size_t(r)]), sp = take_one(*ranks_plain[size_t(r)]);
                ASSERT_EQ(s.size, 6 / R);
                EXPECT_EQ(s.position, global[k].position);
                joined.size += s.size;
                joined.position = s.position;
                joined.labels.insert(joined.labels.end(), s.labels.begin(), s.labels.end());
                joined.images.insert(joined.images.end(), s.images.begin(), s.images.end());
                for (int g : ids(sp)) EXPECT_TRUE(seen.insert(g).second) << "sample " << g << " on two ranks";
                joined_plain.size += sp.size;
                joined_plain.position = sp.position;
                joined_plain.labels.insert(joined_plain.labels.end(), sp.labels.begin(), sp.labels.end());
                joined_plain.images.insert(joined_plain.images.end(), sp.images.begin(), sp.images.end());
            }
            EXPECT_TRUE(joined == global[k]) << R << " ranks, batch " << k;
            EXPECT_TRUE(joined_plain == global_plain[k]) << R << " ranks, batch " << k;
        }
    }
}

TEST(Loader, RefusesABatchTheRanksCannotShareEvenly) {
    TmpDir dir;
    LoaderOptions o = options(numbered_set(dir), 5, true);
    o.world = 3;
    o.rank = 1;
    try {
        Loader l(o);
        ADD_FAILURE() << "no error";
    } catch (const UserError& e) {
        EXPECT_EQ(std::string(e.what()), "batch 5 is not divisible by the 3 ranks: each rank takes an equal share of the global batch");
    }
    o.world = 1, o.rank = 0, o.batch = 24;
    expect_error([&] { Loader l(o); }, o.pattern, "23 images, fewer than one batch of 24");
}

TEST(Loader, EvaluationCoversEverySampleOnceInOrder) {
    TmpDir dir;
    const std::string glob = numbered_set(dir);
    for (int R : {1, 2, 3}) {
        std::vector<int> all;
        for (int r = 0; r < R; r++) {
            LoaderOptions o = options(glob, 6, false, 3);
            o.rank = r;
            o.world = R;
            o.augment = Augment::jumpcp;  // ignored: evaluation never augments
            Loader l(o);
            std::vector<int> mine;
            for (int pass = 0; pass < 2; pass++) {
                l.seek({});
                std::vector<int> got;
                int64_t k = 0;
                for (;; k++) {
                    const Seen s = take_one(l);
                    if (s.size == 0) {
                        EXPECT_EQ(s.position, (LoaderPosition{0, l.batches_per_epoch()}));
                        break;
                    }
                    EXPECT_EQ(s.position, (LoaderPosition{0, k}));
                    EXPECT_LE(s.size, 6 / R);
                    if (s.size < 6 / R) {
                        EXPECT_EQ(k + 1, l.batches_per_epoch()) << "only the last batch is short";
                    }
                    for (int g : ids(s)) got.push_back(g);
                }
                EXPECT_EQ(k, l.batches_per_epoch());
                EXPECT_EQ(take_one(l).size, 0);  // and it stays over
                if (pass == 0) mine = got;
                EXPECT_EQ(got, mine) << "the second pass differs";
            }
            all.insert(all.end(), mine.begin(), mine.end());
        }
        std::vector<int> want(kN);
        std::iota(want.begin(), want.end(), 0);
        EXPECT_EQ(all, want) << R << " ranks";
    }
}

TEST(Loader, RestoredPositionGivesExactlyTheBatchesThatFollow) {
    TmpDir dir;
    LoaderOptions o = options(numbered_set(dir), 4, true);
    o.augment = Augment::so2sat;
    Loader a(o);
    take(a, 7);
    const LoaderPosition saved = a.position();
    EXPECT_EQ(saved, (LoaderPosition{1, 2}));
    const nlohmann::json state = nlohmann::json::parse(position_to_json(saved).dump());
    const std::vector<Seen> rest = take(a, 9);

    LoaderOptions resumed = o;
    resumed.start = position_from_json(state, "state.json");
    resumed.threads = 3;
    Loader b(resumed);
    EXPECT_EQ(b.position(), saved);
    const std::vector<Seen> got = take(b, 9);
    for (size_t i = 0; i < rest.size(); i++) EXPECT_TRUE(got[i] == rest[i]) << "batch " << i;

    Loader c(o);  // seek on a loader that has already read ahead
    take(c, 2);
    c.seek(saved);
    for (size_t i = 0; i < rest.size(); i++) EXPECT_TRUE(take_one(c) == rest[i]) << "batch " << i;

    // The end of an epoch and the start of the next are the same place.
    resumed.start = {0, 5};
    Loader d(resumed);
    EXPECT_EQ(d.position(), (LoaderPosition{1, 0}));
    resumed.start = {0, 6};
    expect_error([&] { Loader e(resumed); }, resumed.pattern, "loader position (epoch 0, batch 6) is outside this data set (5 batches per epoch)");
    expect_error([&] { position_from_json({{"epoch", 1}}, "state.json"); }, "state.json", "'batch'");
}

TEST(Loader, NormalizesEachShardWithItsOwnStatisticsLikeLoadDataset) {
    TmpDir dir;
    for (DType d : {DType::u8, DType::u16, DType::f16, DType::f32}) {
        SCOPED_TRACE(dtype_name(d));
        const std::string prefix = std::string("s") + dtype_name(d);
        for (int s = 0; s < 3; s++) {
            ShardHeader h = make_header(3 + 2 * s, 3, 5, 7, d, 4);
            for (int c = 0; c < 3; c++) h.mean[size_t(c)] += 3 * s, h.std[size_t(c)] *= 1 + s;
            const Pixels p = random_pixels(h, uint32_t(10 * s + int(d)));
            write_shard(dir / shard_file_name(prefix, s), h, cycle_labels(h.count, 4), p.bytes.data());
        }
        const std::string glob = dir / (prefix + "-*.shard");
        const Dataset ds = load_dataset(glob);
        Loader l(options(glob, 4, false));
        std::vector<float> images;
        std::vector<int32_t> labels;
        for (;;) {
            const Seen s = take_one(l, 3 * 5 * 7);
            if (s.size == 0) break;
            images.insert(images.end(), s.images.begin(), s.images.end());
            labels.insert(labels.end(), s.labels.begin(), s.labels.end());
        }
        EXPECT_EQ(labels, ds.labels);
        EXPECT_EQ(images, ds.images);  // bit for bit
        // Training batches without augmentation are the same images, shuffled.
        Loader t(options(glob, 3, true));
        const Seen s = take_one(t, 3 * 5 * 7);
        for (int i = 0; i < s.size; i++) {
            const size_t per = 3 * 5 * 7;
            bool found = false;
            for (int64_t j = 0; j < ds.count() && !found; j++)
                found = std::equal(s.images.begin() + long(i * per), s.images.begin() + long((i + 1) * per),
                                   ds.images.begin() + long(size_t(j) * per));
            EXPECT_TRUE(found) << "training image " << i << " is not a normalized image of the set";
        }
    }
}

TEST(Loader, DeviceInputBatchesGiveTheSameImagesThroughTheInputStep) {
    TmpDir dir;
    for (int s = 0; s < 2; s++) {
        ShardHeader h = make_header(9, 2, 8, 8, DType::f16, 4);
        h.mean = {1.0 + s, -2.0};
        const Pixels p = random_pixels(h, uint32_t(s));
        write_shard(dir / shard_file_name("d", s), h, cycle_labels(9, 4), p.bytes.data());
    }
    for (Augment aug : {Augment::none, Augment::so2sat, Augment::jumpcp}) {
        LoaderOptions o = options(dir / "d-*.shard", 4, true);
        o.augment = aug;
        Loader host(o);
        o.device_input = true;
        Loader device(o);
        for (int k = 0; k < 6; k++) {
            const Seen want = take_one(host, 128);
            const LoaderBatch& b = device.next();
            ASSERT_EQ(b.size, want.size);
            ASSERT_EQ(b.images, nullptr);
            EXPECT_EQ(b.aug == nullptr, aug == Augment::none);
            std::vector<float> out(size_t(b.size) * 128);
            EXPECT_EQ(ops::input_forward(out.data(), b.raw, Pixel::f16, b.size, 2, 8, 8, b.mean, b.inv_std, b.aug), -1);
            EXPECT_EQ(out, want.images) << "batch " << k;
            EXPECT_EQ(std::vector<int32_t>(b.labels, b.labels + b.size), want.labels);
        }
    }
}

TEST(Loader, RefusesBadShardsNamingTheFile) {
    TmpDir dir;
    auto open = [](const std::string& glob) { Loader l(options(glob, 2, true)); };
    const std::string empty = dir / "none-*.shard";
    expect_error([&] { open(empty); }, empty, "no files match");

    write_test_shard(dir / "a-00000.shard", DType::f32, 5, 3);
    write_test_shard(dir / "a-00001.shard", DType::f32, 5, 4);
    expect_error([&] { open(dir / "a-*.shard"); }, dir / "a-00001.shard",
                 "shape 4x4x6 float32, 17 classes differs from " + dir / "a-00000.shard");
    write_test_shard(dir / "b-00000.shard", DType::f32, 5, 3);
    write_test_shard(dir / "b-00001.shard", DType::f16, 5, 3);
    expect_error([&] { open(dir / "b-*.shard"); }, dir / "b-00001.shard", "differs");

    const std::string label = dir / "l.shard";
    const ShardHeader h = write_test_shard(label);
    std::string bytes = read_bytes(label);
    const int32_t bad = 17;
    std::memcpy(&bytes[h.labels_offset + 12], &bad, 4);
    write_bytes(label, bytes);
    expect_error([&] { open(label); }, label, "label 17 of sample 3 outside [0, 17)");

    const std::string cut = dir / "t.shard";
    write_test_shard(cut);
    bytes = read_bytes(cut);
    write_bytes(cut, bytes.substr(0, bytes.size() - 1));
    expect_error([&] { open(cut); }, cut, "truncated");

    const std::string magic = dir / "m.shard";
    write_bytes(magic, "X" + bytes.substr(1));
    expect_error([&] { open(magic); }, magic, "bad magic");
    std::string v2 = bytes;
    v2[8] = 2;
    write_bytes(magic, v2);
    expect_error([&] { open(magic); }, magic, "unsupported shard version 2");

    const std::string header = dir / "k.shard";
    write_test_shard(header);
    edit_header(header, [](nlohmann::json& j) { j.erase("std"); });
    expect_error([&] { open(header); }, header, "no key 'std'");

    // Statistics that overflow integer or half pixels: refused at open.
    write_planted_shard(dir / "big.shard", DType::f16, 1.f, 0, 1.f, {1e-36, 1});
    expect_error([&] { open(dir / "big.shard"); }, dir / "big.shard", "channel 0 is not finite after normalization");
}

// NaN and Inf are found when the batch that holds them is read, in the
// order of the batches, on whichever reader thread.
TEST(Loader, RefusesNonFinitePixelsWhenTheirBatchIsRead) {
    TmpDir dir;
    write_planted_shard(dir / "nan.shard", DType::f32, 0.5f, 2 * 18 + 9 + 4, NAN);  // sample 2, channel 1, y 1, x 1
    for (bool device : {false, true}) {
        LoaderOptions o = options(dir / "nan.shard", 1, false, 3);
        o.device_input = device;
        Loader l(o);
        EXPECT_EQ(take_one(l, 18).size, 1);
        EXPECT_EQ(take_one(l, 18).size, 1);
        expect_error([&] { l.next(); }, dir / "nan.shard", "NaN pixel in sample 2 (channel 1, y 1, x 1)");
        expect_error([&] { l.next(); }, dir / "nan.shard", "NaN pixel in sample 2");  // and stays refused
    }
    write_planted_shard(dir / "inf.shard", DType::f16, 0.5f, 1 * 18 + 5, -INFINITY);  // sample 1, channel 0, y 1, x 2
    Loader inf(options(dir / "inf.shard", 4, true));
    expect_error([&] { inf.next(); }, dir / "inf.shard", "Inf pixel in sample 1 (channel 0, y 1, x 2)");
    // float32 can overflow only once normalized: found at its batch too.
    write_planted_shard(dir / "over.shard", DType::f32, 3e38f, 0, 3e38f, {1, 1e-3});
    Loader over(options(dir / "over.shard", 4, false));
    expect_error([&] { over.next(); }, dir / "over.shard", "sample 0 channel 1 is not finite after normalization");
}

// In device_input mode the batch carries the stored pixels and each image's
// sample; the device's input step finds the overflow, and the loader names it
// in the host path's words.
TEST(Loader, NamesTheImageTheDevicesInputStepFoundNonFinite) {
    TmpDir dir;
    const std::string path = dir / "over.shard";
    write_planted_shard(path, DType::f32, 1.f, 2 * 18 + 9 + 4, 3e38f, {1, 1e-3});  // sample 2, channel 1
    const std::string line = "sample 2 channel 1 is not finite after normalization";
    LoaderOptions o = options(path, 4, true);
    o.device_input = true;
    Loader l(o);
    const LoaderBatch& b = l.next();
    ASSERT_EQ(b.size, 4);
    ASSERT_EQ(b.pixel, Pixel::f32);
    std::vector<int64_t> samples(b.samples, b.samples + 4);
    std::vector<float> out(4 * 18);
    const int bad = ops::input_forward(out.data(), b.raw, b.pixel, 4, 2, 3, 3, b.mean, b.inv_std, b.aug);
    ASSERT_GE(bad, 0);
    EXPECT_EQ(samples[size_t(bad)], 2);
    std::sort(samples.begin(), samples.end());
    EXPECT_EQ(samples, (std::vector<int64_t>{0, 1, 2, 3}));
    expect_error([&] { l.refuse_nonfinite(b, bad); }, path, line);
    Loader host(options(path, 4, true));
    expect_error([&] { host.next(); }, path, line);
}

}  // namespace

// Every loader holds its shards open: the training loader's are still open
// when the validation loader opens its own, so each raises the soft limit
// on open files by what it adds (it used to ask for its own count + 256
// alone, and 2 x 300 shards under a soft limit of 64 failed). In a child,
// whose limits the test may change.
TEST(Loader, TwoLoadersOfManyShardsFitTheRaisedLimit) {
    TmpDir dir;
    for (int i = 0; i < 300; i++) write_test_shard(dir / shard_file_name("train", i), DType::u8, 2);
    struct rlimit hard;
    ASSERT_EQ(::getrlimit(RLIMIT_NOFILE, &hard), 0);
    if (hard.rlim_max != RLIM_INFINITY && hard.rlim_max < 1024) GTEST_SKIP() << "hard limit on open files below 1024";
    const int status = in_child([&] {
        struct rlimit low = hard;
        low.rlim_cur = 64;
        if (::setrlimit(RLIMIT_NOFILE, &low) != 0) _exit(5);
        try {
            LoaderOptions a;
            a.pattern = dir / "train-*.shard";
            a.batch = 4;
            Loader train(a);
            LoaderOptions v = a;
            v.train = false;
            Loader val(v);
            _exit(train.count() == 600 && val.count() == 600 ? 0 : 3);
        } catch (const UserError& e) {
            std::fprintf(stderr, "%s\n", e.what());
            _exit(2);
        }
    });
    EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << status;
}
