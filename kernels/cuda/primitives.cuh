// The device primitives of the kernels written to run on the CPU as well:
// attention (flash_attention.cuh, the bf16 tensor-core ones, and
// attention.cuh, the fp32 ones), routing (routing.cuh), the deterministic
// reductions (reduce.cuh), LayerNorm (layernorm.cuh), the loss (loss.cuh),
// GELU and the residual add (activation.cuh), patch embedding (embed.cuh),
// the input step (input.cuh) and AdamW (adamw.cuh). Everything they
// do beyond plain arithmetic and global memory goes through these, so that
// tests can compile the kernels on the host with the primitives replaced
// (PRISM_EMULATION: a CPU model of warps, barriers, shared memory,
// ldmatrix, mma and cp.async; see tests/emulator.h).
#pragma once
#include <math.h>
#include <stdint.h>

#ifndef PRISM_EMULATION
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdio.h>
#define PRISM_DEVICE __device__ __forceinline__
#define PRISM_HOST_DEVICE __host__ __device__ __forceinline__
#define PRISM_KERNEL(threads) __global__ void __launch_bounds__(threads)
#define PRISM_SMEM(name) extern __shared__ __align__(128) unsigned char name[]
#define PRISM_UNROLL _Pragma("unroll")
// kernel<<<grid, threads, smem, stream>>>, written so that the emulator can
// run the launchers too (tests/emulator.h defines it as a call into the CPU
// model): PRISM_LAUNCH(grid, threads, smem, stream, kernel)(params). The
// kernel comes last, where its template arguments' commas do no harm.
#define PRISM_LAUNCH(grid, threads, smem, stream, ...) __VA_ARGS__<<<(grid), (threads), (smem), (stream)>>>
#endif

namespace prism::primitives {
// The emulated build gets its own names: the kernels' host stubs in the CUDA
// object and their emulated bodies must not meet in the linker.
#ifdef PRISM_EMULATION
inline namespace emulated {
#endif

#ifndef PRISM_EMULATION
// d += a·b, bf16 inputs, fp32 accumulators.
PRISM_DEVICE void mma_bf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
// Four 8×8 bf16 matrices; lanes 8j..8j+7 give the row addresses of matrix j.
PRISM_DEVICE void ldsm_x4(uint32_t (&r)[4], const uint16_t* row) {
    const uint32_t a = (uint32_t)__cvta_generic_to_shared(row);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
}
PRISM_DEVICE void ldsm_x4_trans(uint32_t (&r)[4], const uint16_t* row) {
    const uint32_t a = (uint32_t)__cvta_generic_to_shared(row);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
}
// 16 bytes global → shared, asynchronous; valid == false writes 16 zero bytes.
PRISM_DEVICE void cp_async_16(void* smem, const void* gmem, bool valid) {
    const uint32_t a = (uint32_t)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(a), "l"(gmem),
                 "r"(valid ? 16 : 0));
}
PRISM_DEVICE void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
PRISM_DEVICE void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::); }
PRISM_DEVICE void block_sync() { __syncthreads(); }
PRISM_DEVICE float shfl_xor(float v, int mask) { return __shfl_xor_sync(0xffffffffu, v, mask); }
PRISM_DEVICE int shfl_xor(int v, int mask) { return __shfl_xor_sync(0xffffffffu, v, mask); }
// The lanes of the warp whose v equals this lane's, as a bit mask.
PRISM_DEVICE unsigned match_any(int v) { return __match_any_sync(0xffffffffu, v); }
// The warp's lanes' global and shared memory writes, visible to all of them.
PRISM_DEVICE void warp_sync() { __syncwarp(); }
// Integer counts only: exact in any order, so still deterministic.
PRISM_DEVICE void atomic_add_shared(int* p, int v) { atomicAdd(p, v); }
// Global integer minimum (a flag several threads may set: exact in any order).
PRISM_DEVICE void atomic_min_global(int* p, int v) { atomicMin(p, v); }
// An IEEE half (its 16 bits) as float, exactly.
PRISM_DEVICE float half_to_float(uint16_t h) { return __half2float(__ushort_as_half(h)); }
// Two floats as bf16 (nearest even), lo in the low half: an mma operand register.
PRISM_DEVICE uint32_t pack_bf16(float lo, float hi) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
}
PRISM_DEVICE float ld_shared(const float* p) { return *p; }  // (the emulator checks these)
PRISM_DEVICE void st_shared(float* p, float v) { *p = v; }
PRISM_DEVICE int ld_shared(const int* p) { return *p; }
PRISM_DEVICE void st_shared(int* p, int v) { *p = v; }
PRISM_DEVICE double ld_shared(const double* p) { return *p; }
PRISM_DEVICE void st_shared(double* p, double v) { *p = v; }
// A broken promise of the caller's that the kernel can see but not report
// otherwise: the launch fails (the context with it) instead of dropping work.
PRISM_DEVICE void device_trap(const char* why) {
    printf("prism: %s\n", why);
    __trap();
}
PRISM_DEVICE void load_f8(float (&v)[8], const float* p) {  // 32 bytes, read-only path
    const float4 a = __ldg(reinterpret_cast<const float4*>(p));
    const float4 b = __ldg(reinterpret_cast<const float4*>(p + 4));
    v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
}
PRISM_DEVICE void store_shared_16(void* p, uint32_t a, uint32_t b, uint32_t c, uint32_t d) {
    *reinterpret_cast<uint4*>(p) = make_uint4(a, b, c, d);
}
PRISM_DEVICE void load_f2(float& x, float& y, const float* p) {
    const float2 v = *reinterpret_cast<const float2*>(p);
    x = v.x, y = v.y;
}
PRISM_DEVICE void store_f2(float* p, float x, float y) { *reinterpret_cast<float2*>(p) = make_float2(x, y); }
// Two bf16 in global memory (4 bytes, aligned): stored from / widened to floats.
PRISM_DEVICE void store_bf16x2(uint16_t* p, float x, float y) { *reinterpret_cast<uint32_t*>(p) = pack_bf16(x, y); }
PRISM_DEVICE void load_bf16x2(float& x, float& y, const uint16_t* p) {
    const uint32_t v = *reinterpret_cast<const uint32_t*>(p);
    x = __uint_as_float(v << 16), y = __uint_as_float(v & 0xffff0000u);
}
PRISM_DEVICE void add_f2(float* p, float x, float y) {
    float2 v = *reinterpret_cast<float2*>(p);
    v.x += x, v.y += y;
    *reinterpret_cast<float2*>(p) = v;
}
PRISM_DEVICE float load_elem(const uint16_t* p) { return __uint_as_float((uint32_t)*p << 16); }
PRISM_DEVICE void store_elem(uint16_t* p, float v) { *p = (uint16_t)(pack_bf16(v, 0.f) & 0xffffu); }
#endif

// One element of an operand stored in fp32 or (the overloads above) in bf16,
// as a float; and stored back (bf16: nearest even).
PRISM_DEVICE float load_elem(const float* p) { return *p; }
PRISM_DEVICE void store_elem(float* p, float v) { *p = v; }

PRISM_DEVICE int imin(int a, int b) { return a < b ? a : b; }

// Butterflies: every lane ends with the same bits (each step adds a pair in
// both orders, and float addition is commutative).
PRISM_DEVICE float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += shfl_xor(v, o);
    return v;
}
PRISM_DEVICE float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, shfl_xor(v, o));
    return v;
}

// Grid-stride loops: for (i = grid_first(); i < n; i += grid_step()), over
// grid_stride_blocks(n, threads) blocks (at least 1, at most 65536; in the
// emulator at most 3, so that the loops make several passes at a test's
// sizes, as they do on the device past 65536 blocks' worth of items).
PRISM_DEVICE int64_t grid_first() { return (int64_t)blockIdx.x * blockDim.x + threadIdx.x; }
PRISM_DEVICE int64_t grid_step() { return (int64_t)gridDim.x * blockDim.x; }
PRISM_DEVICE int64_t global_warp() { return grid_first() / 32; }  // of a one-dimensional grid
#ifdef PRISM_EMULATION
constexpr int64_t kGridStrideMaxBlocks = 3;
#else
constexpr int64_t kGridStrideMaxBlocks = 65536;
#endif
PRISM_HOST_DEVICE unsigned grid_stride_blocks(int64_t n, int threads) {
    const int64_t b = (n + threads - 1) / threads;
    return (unsigned)(b < 1 ? 1 : (b > kGridStrideMaxBlocks ? kGridStrideMaxBlocks : b));
}
// The element-wise kernels' block, and their grid-stride grid for n items.
constexpr int kElementThreads = 256;
PRISM_HOST_DEVICE unsigned element_blocks(int64_t n) { return grid_stride_blocks(n, kElementThreads); }
#ifdef PRISM_EMULATION
inline int popc(unsigned v) { return __builtin_popcount(v); }
#else
PRISM_DEVICE int popc(unsigned v) { return __popc(v); }
#endif

#ifdef PRISM_EMULATION
}  // inline namespace emulated
#endif
}  // namespace prism::primitives
