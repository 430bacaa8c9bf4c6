// The input step on the CPU (kernels/ops.h): stored pixels to the model's
// normalized float input, with the crop, flips, quarter turns and dropout
// holes of the augmentation, in one pass over each image.
//
// Each output row reads its pixels along one straight line of the source
// image: a source row forwards or backwards, or, after an odd number of
// quarter turns, a source column, which is a row of the plane's transpose
// (made in register-sized blocks). The normalizing loop, which also reverses
// flipped rows, is the hot spot (JUMP-CP: 400k pixels per image); it is
// chosen once for the CPU: AVX2 + F16C where present, portable code else.
// Both give identical bits: every conversion is exact and the arithmetic is
// the same subtract then multiply.
#include "kernels/ops.h"

#include <algorithm>
#include <cstring>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "data/shard.h"  // half_to_float
#include "engine/common.h"

namespace prism::ops {

size_t pixel_size(Pixel p) {
    switch (p) {
        case Pixel::u8: return 1;
        case Pixel::u16: return 2;
        case Pixel::f16: return 2;
        case Pixel::f32: return 4;
    }
    PRISM_ASSERT(!"bad Pixel");
    return 0;
}

namespace {

// Normalizes n stored pixels into out and returns the largest magnitude bit
// pattern it wrote: 0x7f800000 or more means a non-finite value. Forwards
// it reads src[0], src[1], ...; reversed src[0], src[-1], ... (a flipped row).
using NormalizeFn = uint32_t (*)(float* out, const void* src, int n, float mean, float inv_std);

inline uint32_t magnitude_bits(float v) {
    uint32_t u;
    std::memcpy(&u, &v, 4);
    return u & 0x7fffffffu;
}

template <Pixel P>
inline float load(const void* src, ptrdiff_t i) {
    if constexpr (P == Pixel::u8) return float(((const uint8_t*)src)[i]);
    if constexpr (P == Pixel::u16) return float(((const uint16_t*)src)[i]);
    if constexpr (P == Pixel::f16) return half_to_float(((const uint16_t*)src)[i]);
    if constexpr (P == Pixel::f32) return ((const float*)src)[i];
}

template <Pixel P, bool Reversed>
uint32_t normalize_portable(float* out, const void* src, int n, float mean, float inv_std) {
    uint32_t worst = 0;
    for (int i = 0; i < n; i++) {
        const float v = (load<P>(src, Reversed ? -ptrdiff_t(i) : i) - mean) * inv_std;
        out[i] = v;
        worst = std::max(worst, magnitude_bits(v));
    }
    return worst;
}

#if defined(__x86_64__)
// Eight stored pixels starting at p, as floats.
template <Pixel P>
__attribute__((target("avx2,f16c"))) inline __m256 load8(const void* p) {
    if constexpr (P == Pixel::u8) return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)p)));
    if constexpr (P == Pixel::u16) return _mm256_cvtepi32_ps(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)));
    if constexpr (P == Pixel::f16) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p));
    if constexpr (P == Pixel::f32) return _mm256_loadu_ps((const float*)p);
}

template <Pixel P, bool Reversed>
__attribute__((target("avx2,f16c"))) uint32_t normalize_avx2(float* out, const void* src, int n, float mean,
                                                             float inv_std) {
    const size_t size = pixel_size(P);
    const __m256 m = _mm256_set1_ps(mean), k = _mm256_set1_ps(inv_std);
    const __m256i magnitude = _mm256_set1_epi32(0x7fffffff), backwards = _mm256_setr_epi32(7, 6, 5, 4, 3, 2, 1, 0);
    __m256i worst = _mm256_setzero_si256();
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        // Reversed, outputs i..i+7 are the stored pixels -i-7..-i, backwards.
        __m256 x = load8<P>((const char*)src + (Reversed ? -ptrdiff_t(i + 7) : ptrdiff_t(i)) * ptrdiff_t(size));
        if (Reversed) x = _mm256_permutevar8x32_ps(x, backwards);
        const __m256 v = _mm256_mul_ps(_mm256_sub_ps(x, m), k);
        _mm256_storeu_ps(out + i, v);
        worst = _mm256_max_epu32(worst, _mm256_and_si256(_mm256_castps_si256(v), magnitude));
    }
    alignas(32) uint32_t lanes[8];
    _mm256_store_si256((__m256i*)lanes, worst);
    uint32_t w = 0;
    for (uint32_t l : lanes) w = std::max(w, l);
    if (i < n)
        w = std::max(w, normalize_portable<P, Reversed>(
                            out + i, (const char*)src + (Reversed ? -ptrdiff_t(i) : ptrdiff_t(i)) * ptrdiff_t(size),
                            n - i, mean, inv_std));
    return w;
}

bool has_avx2() {
    static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
    return yes;
}
#endif

template <Pixel P>
NormalizeFn pick(bool reversed) {
#if defined(__x86_64__)
    if (has_avx2()) return reversed ? normalize_avx2<P, true> : normalize_avx2<P, false>;
#endif
    return reversed ? normalize_portable<P, true> : normalize_portable<P, false>;
}

NormalizeFn normalize_fn(Pixel p, bool reversed) {
    switch (p) {
        case Pixel::u8: return pick<Pixel::u8>(reversed);
        case Pixel::u16: return pick<Pixel::u16>(reversed);
        case Pixel::f16: return pick<Pixel::f16>(reversed);
        case Pixel::f32: return pick<Pixel::f32>(reversed);
    }
    PRISM_ASSERT(!"bad Pixel");
    return nullptr;
}

inline void swap_halves(uint64_t& a, uint64_t& b, int shift, uint64_t mask) {
    const uint64_t t = ((a >> shift) ^ b) & mask;
    b ^= t;
    a ^= t << shift;
}

// An N x N block of pixels held in N 64-bit words, one row each (pixel i of
// a word in its i-th lowest part: little-endian). Round D swaps the
// Shift-bit halves between words i and i + D: after log2(N) rounds word j
// holds column j.
template <int N, int D = 1, int Shift = 64 / N>
inline void transpose_block(uint64_t* r) {
    if constexpr (D < N) {
        constexpr uint64_t mask = Shift == 8 ? 0x00FF00FF00FF00FFull : Shift == 16 ? 0x0000FFFF0000FFFFull
                                                                                    : 0x00000000FFFFFFFFull;
        for (int i = 0; i < N; i++)
            if ((i & D) == 0) swap_halves(r[i], r[i + D], Shift, mask);
        transpose_block<N, 2 * D, 2 * Shift>(r);
    }
}

// dst [W, H] = the transpose of src [H, W], a block of 8 bytes by 8 rows
// (4 by 4 for 16-bit pixels, 2 by 2 for 32-bit) at a time.
template <class T>
void transpose_as(void* dst, const void* src, int H, int W) {
    static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "transpose_block assumes a little-endian host");
    constexpr int N = 8 / sizeof(T);
    T* d = (T*)dst;
    const T* s = (const T*)src;
    const int HN = H / N * N, WN = W / N * N;
    for (int y0 = 0; y0 < HN; y0 += N)
        for (int x0 = 0; x0 < WN; x0 += N) {
            uint64_t r[N];
            for (int i = 0; i < N; i++) std::memcpy(&r[i], s + size_t(y0 + i) * W + x0, 8);
            transpose_block<N>(r);
            for (int j = 0; j < N; j++) std::memcpy(d + size_t(x0 + j) * H + y0, &r[j], 8);
        }
    // The edges: columns from WN on in every row, and rows from HN on.
    for (int y = 0; y < H; y++)
        for (int x = y < HN ? WN : 0; x < W; x++) d[size_t(x) * H + y] = s[size_t(y) * W + x];
}

void transpose(void* dst, const void* src, int H, int W, size_t size) {
    switch (size) {
        case 1: transpose_as<uint8_t>(dst, src, H, W); break;
        case 2: transpose_as<uint16_t>(dst, src, H, W); break;
        default: transpose_as<uint32_t>(dst, src, H, W); break;
    }
}

// Coordinate c0 + x*dc must lie in [0, len): narrows [lo, hi) to the x that keep it there.
void clip(int c0, int dc, int len, int& lo, int& hi) {
    if (dc == 0) {
        if (c0 < 0 || c0 >= len) hi = lo;
    } else if (dc > 0) {
        lo = std::max(lo, -c0);
        hi = std::min(hi, len - c0);
    } else {
        lo = std::max(lo, c0 - len + 1);
        hi = std::min(hi, c0 + 1);
    }
}

// One augmented (image, channel) plane; returns the largest magnitude bits.
uint32_t augment_plane(float* dst, const char* src, Pixel pixel, int H, int W, float m, float k,
                       const InputAug& a) {
    const size_t psize = pixel_size(pixel);
    // Output (y, x): undo the flip, x' = xf0 + x*xs; the quarter turns give
    // crop pixel (u, v) = (u0 + x*du, v0 + x*dv); the crop reads source pixel
    // (u + dy, v + dx). With an odd number of quarter turns a row of the
    // output is a column of the source: read rows of its transpose instead.
    const int t = a.dihedral & 3, xs = (a.dihedral & 4) ? -1 : 1, xf0 = xs < 0 ? W - 1 : 0;
    const bool across = t % 2 == 1;
    const char* plane = src;
    int cols = W;
    if (across) {
        thread_local std::vector<char> transposed;
        transposed.resize(size_t(H) * W * psize);
        transpose(transposed.data(), src, H, W, psize);
        plane = transposed.data();
        cols = H;
    }
    uint32_t worst = 0;
    for (int y = 0; y < H; y++) {
        int u0, du, v0, dv;
        switch (t) {
            case 0: u0 = y, du = 0, v0 = xf0, dv = xs; break;
            case 1: u0 = xf0, du = xs, v0 = W - 1 - y, dv = 0; break;
            case 2: u0 = H - 1 - y, du = 0, v0 = W - 1 - xf0, dv = -xs; break;
            default: u0 = H - 1 - xf0, du = -xs, v0 = y, dv = 0; break;
        }
        u0 += a.dy;
        v0 += a.dx;
        int x0 = 0, x1 = W;
        clip(u0, du, H, x0, x1);
        clip(v0, dv, W, x0, x1);
        float* row = dst + size_t(y) * W;
        if (x1 <= x0) {
            std::fill(row, row + W, 0.f);
            continue;
        }
        std::fill(row, row + x0, 0.f);
        std::fill(row + x1, row + W, 0.f);
        // The row of `plane` and the direction this output row reads.
        const int r = across ? v0 : u0, c0 = across ? u0 : v0, dc = across ? du : dv;
        const char* first = plane + (ptrdiff_t(r) * cols + c0 + ptrdiff_t(x0) * dc) * ptrdiff_t(psize);
        worst = std::max(worst, normalize_fn(pixel, dc < 0)(row + x0, first, x1 - x0, m, k));
    }
    for (int i = 0; i < a.holes; i++) {
        const int y0 = std::max(a.hole_y[i], 0), y1 = std::min(a.hole_y[i] + a.hole_h, H);
        const int x0 = std::max(a.hole_x[i], 0), x1 = std::min(a.hole_x[i] + a.hole_w, W);
        for (int y = y0; y < y1 && x0 < x1; y++) std::fill(dst + size_t(y) * W + x0, dst + size_t(y) * W + x1, 0.f);
    }
    return worst;
}

}  // namespace

int input_forward(float* out, const void* raw, Pixel pixel, int B, int C, int H, int W, const float* mean,
                  const float* inv_std, const InputAug* aug) {
    const NormalizeFn normalize = normalize_fn(pixel, false);
    const size_t hw = size_t(H) * W, plane_bytes = hw * pixel_size(pixel);
    int first_bad = -1;
    for (int b = 0; b < B; b++) {
        const InputAug* a = aug ? aug + b : nullptr;
        if (a) {
            PRISM_ASSERT(a->dihedral >= 0 && a->dihedral < 8 && a->holes >= 0 && a->holes <= kMaxHoles);
            PRISM_ASSERT(H == W || a->dihedral % 2 == 0);
        }
        const bool plain = !a || (a->dihedral == 0 && a->dy == 0 && a->dx == 0 && a->holes == 0);
        uint32_t worst = 0;
        for (int c = 0; c < C; c++) {
            const size_t q = size_t(b) * C + c;
            const char* src = (const char*)raw + q * plane_bytes;
            worst = std::max(worst, plain ? normalize(out + q * hw, src, int(hw), mean[q], inv_std[q])
                                          : augment_plane(out + q * hw, src, pixel, H, W, mean[q], inv_std[q], *a));
        }
        if (worst >= 0x7f800000u && first_bad < 0) first_bad = b;
    }
    return first_bad;
}

}  // namespace prism::ops
