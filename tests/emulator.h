// A CPU model of the few CUDA features the hand-written kernels use (the
// primitives of kernels/cuda/primitives.cuh), so that the kernels of
// flash_attention.cuh (bf16 tensor cores), attention.cuh (fp32) and
// routing.cuh (MoE-ViT's router, dispatch, gather and combine), reduce.cuh
// (the deterministic sums), layernorm.cuh, loss.cuh, activation.cuh,
// embed.cuh, input.cuh, adamw.cuh and linear.cuh run
// (slowly) on a machine without a GPU and can be checked against the CPU
// reference ops. Include this header first, then the .cuh.
//
// Every CUDA thread of a block is a fiber (its own stack) on the calling thread,
// run until it blocks. What is modelled, from the PTX ISA:
// - warp collectives (mma.sync m16n8k16 bf16 → fp32, ldmatrix .x4 and
//   .x4.trans, shfl.xor of floats and ints, match.any, __syncwarp): all 32
//   lanes must arrive at the same one (else: "warp divergence"); the last to
//   arrive computes every lane's result from the documented fragment layouts;
// - __syncthreads over the block's live threads; a thread that exits while
//   others wait at a barrier, or a block where no thread can move, fails;
// - cp.async as late as the ISA allows: a copy lands in shared memory only at
//   the issuing thread's cp.async.wait_group, so reading a tile before waiting
//   (and, often, before the barrier that publishes it) reads stale data;
// - shared memory starts as 0xFF bytes (NaN as bf16 or fp32): reading what
//   was never written shows up as NaN; ldmatrix, cp.async and 16-byte shared
//   stores check their bounds and alignment;
// - a racecheck of shared memory: every access through the primitives is
//   recorded per 4-byte word with its thread and barrier interval (a cp.async
//   write may land anywhere from its issue to its wait); two threads touching
//   a word in the same interval, one of them writing, fail; shared integer
//   atomics of several threads in one interval are no race, an atomic and
//   another thread's plain access are.
// Not modelled: timing, bank conflicts, memory ordering beyond the above,
// the hardware's accumulation order inside an mma (here: double, then fp32).
#pragma once
#define PRISM_EMULATION 1

#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <mutex>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "tests/bf16_host.h"

namespace prism::emu {

struct Dim {
    Dim(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
    unsigned x, y, z;
};
inline Dim thread_idx, block_idx, grid_dim, block_dim;

[[noreturn]] inline void fail(const std::string& what) {
    throw std::runtime_error("emulator: " + what);
}

struct Copy {
    void* dst;
    const void* src;
    bool valid;
    uint64_t issued;  // barrier interval of the issue
};

// Per 4-byte word of shared memory: the last writer (and the barrier
// intervals its write may fall in) and the last reader(s) of the latest interval.
struct Shadow {
    int writer = -1;
    uint64_t w_lo = 0, w_hi = 0;
    int reader = -1;  // -2: several threads
    uint64_t r_at = 0;
    int atomic_by = -1;  // the last atomic's thread (-2: several) in interval atomic_at
    uint64_t atomic_at = 0;
};

// Fiber switches. swapcontext saves and restores the signal mask with a
// system call each way, which made the kernel's time half of the emulated
// tests' time; on x86-64 a switch is the callee-saved registers, MXCSR and the
// x87 control word pushed on the fiber's own stack, and its stack pointer.
#if defined(__x86_64__) && defined(__linux__)
extern "C" void prism_emu_switch(void** save_sp, void* resume_sp);
// Weak: every test that includes this header defines it, the linker keeps one.
asm(R"(
    .pushsection .text
    .weak prism_emu_switch
    .type prism_emu_switch, @function
prism_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size prism_emu_switch, .-prism_emu_switch
    .popsection
)");

struct Context {
    void* sp = nullptr;
};
inline void switch_context(Context& from, const Context& to) { prism_emu_switch(&from.sp, to.sp); }
// A context that enters `entry` (which must never return) on `stack`: the
// frame prism_emu_switch pops, returning into entry as if called.
inline void make_context(Context& c, std::vector<char>& stack, void (*entry)()) {
    uintptr_t top = (uintptr_t)(stack.data() + stack.size()) & ~uintptr_t(15);
    auto* sp = (uint64_t*)(top - 72);  // at entry rsp = top - 8, as after a call
    uint32_t mxcsr;
    uint16_t fpu_cw;
    asm volatile("stmxcsr %0" : "=m"(mxcsr));
    asm volatile("fnstcw %0" : "=m"(fpu_cw));
    sp[0] = uint64_t(mxcsr) | uint64_t(fpu_cw) << 32;
    for (int i = 1; i <= 6; i++) sp[i] = 0;  // r15 r14 r13 r12 rbx rbp
    sp[7] = (uint64_t)entry;
    sp[8] = 0;  // entry's return address: none (ends a backtrace)
    c.sp = sp;
}
#else
struct Context {
    ucontext_t uc;
};
inline void switch_context(Context& from, const Context& to) { swapcontext(&from.uc, &to.uc); }
inline void make_context(Context& c, std::vector<char>& stack, void (*entry)()) {
    getcontext(&c.uc);
    c.uc.uc_stack.ss_sp = stack.data();
    c.uc.uc_stack.ss_size = stack.size();
    c.uc.uc_link = nullptr;
    makecontext(&c.uc, entry, 0);
}
#endif

struct Fiber {
    Context ctx;
    std::vector<char> stack;
    Dim tid;
    bool done = false;
    const uint64_t* wait_gen = nullptr;  // blocked while *wait_gen == wait_value
    uint64_t wait_value = 0;
    std::vector<Copy> pending;                // issued since the last commit
    std::vector<std::vector<Copy>> groups;    // committed, not yet waited for
};

// One warp's rendezvous: each lane leaves pointers to its operands.
struct Rendezvous {
    int arrived = 0;
    uint32_t mask = 0;
    uint64_t gen = 0;
    const char* kind = nullptr;
    const void* in[32];
    void* out[32];
};

struct Block {
    std::vector<Fiber> fibers;
    Context scheduler;
    int current = -1;
    int live = 0;
    std::vector<unsigned char> smem;
    std::vector<Rendezvous> warps;
    int bar_arrived = 0;
    uint64_t bar_gen = 0;  // the barrier interval: +1 at every completed __syncthreads
    std::vector<Shadow> shadow;
    std::function<void()> body;
    std::string error;  // the first failure inside a fiber
};
inline Block block;

inline Fiber& self() { return block.fibers[block.current]; }

inline void block_until(const uint64_t* gen, uint64_t value) {
    Fiber& f = self();
    f.wait_gen = gen;
    f.wait_value = value;
    switch_context(f.ctx, block.scheduler);
    f.wait_gen = nullptr;
}

inline void check_shared(const void* p, size_t bytes, size_t align, const char* what) {
    const auto* c = static_cast<const unsigned char*>(p);
    if (c < block.smem.data() || c + bytes > block.smem.data() + block.smem.size())
        fail(std::string(what) + ": address outside the block's shared memory");
    if ((uintptr_t)p % align) fail(std::string(what) + ": misaligned shared address");
}

inline void race(const char* kind, const void* p, int a, int b) {
    const size_t off = static_cast<const unsigned char*>(p) - block.smem.data();
    fail(std::string("shared-memory race (") + kind + ") at byte " + std::to_string(off) + ": threads " +
         std::to_string(a) + " and " + (b == -2 ? std::string("several others") : std::to_string(b)) +
         " in one barrier interval");
}
inline void shared_write(const void* p, size_t bytes, uint64_t lo, uint64_t hi) {
    const int me = block.current;
    const size_t w0 = (static_cast<const unsigned char*>(p) - block.smem.data()) / 4;
    for (size_t w = w0; w < w0 + bytes / 4; w++) {
        Shadow& s = block.shadow[w];
        if (s.writer >= 0 && s.writer != me && s.w_lo <= hi && lo <= s.w_hi) race("write-write", p, me, s.writer);
        if (s.reader != -1 && s.reader != me && lo <= s.r_at && s.r_at <= hi) race("read-write", p, me, s.reader);
        if (s.atomic_by != -1 && s.atomic_by != me && lo <= s.atomic_at && s.atomic_at <= hi)
            race("atomic-write", p, me, s.atomic_by);
        s.writer = me, s.w_lo = lo, s.w_hi = hi;
    }
}
inline void shared_read(const void* p, size_t bytes) {
    const int me = block.current;
    const uint64_t now = block.bar_gen;
    const size_t w0 = (static_cast<const unsigned char*>(p) - block.smem.data()) / 4;
    for (size_t w = w0; w < w0 + bytes / 4; w++) {
        Shadow& s = block.shadow[w];
        if (s.writer >= 0 && s.writer != me && s.w_lo <= now && now <= s.w_hi) race("write-read", p, me, s.writer);
        if (s.atomic_by != -1 && s.atomic_by != me && s.atomic_at == now) race("atomic-read", p, me, s.atomic_by);
        if (s.r_at != now || s.reader == -1) s.reader = me, s.r_at = now;
        else if (s.reader != me) s.reader = -2;
    }
}
// An atomic read-modify-write: atomics of several threads in one interval are
// no race, an atomic and a plain access of another thread are.
inline void shared_atomic(const void* p) {
    const int me = block.current;
    const uint64_t now = block.bar_gen;
    Shadow& s = block.shadow[(static_cast<const unsigned char*>(p) - block.smem.data()) / 4];
    if (s.writer >= 0 && s.writer != me && s.w_lo <= now && now <= s.w_hi) race("write-atomic", p, me, s.writer);
    if (s.reader != -1 && s.reader != me && s.r_at == now) race("read-atomic", p, me, s.reader);
    if (s.atomic_at != now || s.atomic_by == -1) s.atomic_by = me, s.atomic_at = now;
    else if (s.atomic_by != me) s.atomic_by = -2;
}

// The last lane to arrive runs op(in, out) for all 32.
template <class Op>
void warp_collective(const char* kind, const void* in, void* out, Op&& op) {
    const int lane = thread_idx.x & 31, w = thread_idx.x >> 5;
    Rendezvous& r = block.warps[w];
    if (r.arrived == 0) r.kind = kind;
    else if (std::strcmp(r.kind, kind) != 0)
        fail(std::string("warp divergence: ") + kind + " while other lanes are in " + r.kind);
    if (r.mask >> lane & 1) fail(std::string("lane arrives twice at ") + kind);
    r.mask |= 1u << lane;
    r.in[lane] = in;
    r.out[lane] = out;
    const uint64_t gen = r.gen;
    if (++r.arrived == 32) {
        op(r.in, r.out);
        r.arrived = 0;
        r.mask = 0;
        r.gen++;
        return;
    }
    block_until(&r.gen, gen);
}

using testing::bf16_bits;
inline float bf16_float(uint16_t b) { return testing::bf16_value(b); }
inline float lo(uint32_t r) { return bf16_float(uint16_t(r & 0xffff)); }
inline float hi(uint32_t r) { return bf16_float(uint16_t(r >> 16)); }

inline void fiber_entry() {
    try {
        block.body();
        Fiber& f = self();
        if (!f.pending.empty() || !f.groups.empty()) fail("a thread exits with cp.async copies in flight");
        if (block.bar_arrived > 0) fail("a thread exits while others wait at __syncthreads");
    } catch (const std::exception& e) {
        if (block.error.empty()) block.error = e.what();
    }
    self().done = true;
    block.live--;
    switch_context(self().ctx, block.scheduler);
}

// The dynamic shared memory each kernel has been allowed (the emulated
// runtime's cudaFuncSetAttribute with cudaFuncAttributeMaxDynamicSharedMemorySize
// records it). The device refuses a launch of more than 48 KiB beyond that.
inline std::map<const void*, size_t>& smem_opt_in() {
    static std::map<const void*, size_t> allowed;
    return allowed;
}
inline std::mutex& smem_opt_in_mutex() {
    static std::mutex m;
    return m;
}
template <class F>
const void* kernel_address(F* kernel) {
    return reinterpret_cast<const void*>(kernel);
}
inline void check_smem_opt_in(const void* kernel, size_t smem_bytes) {
    if (smem_bytes <= 48 * 1024) return;
    std::lock_guard<std::mutex> lock(smem_opt_in_mutex());
    const auto it = smem_opt_in().find(kernel);
    if (it == smem_opt_in().end() || it->second < smem_bytes)
        fail(std::to_string(smem_bytes) + " bytes of dynamic shared memory, above 48 KiB, and the kernel was allowed " +
             std::to_string(it == smem_opt_in().end() ? 48 * 1024 : it->second) +
             " (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes) before the "
             "launch; the device refuses it otherwise)");
}

// Kernel launches and cuBLAS calls (each call once, however many products it
// batches) this process made: the same launchers make the same ones on a
// device, less what cuBLAS launches inside. The geometry-only mode prints
// them at exit, so that two runs' difference gives the launches of a step.
inline int64_t launches = 0, blas_calls = 0;

// Geometry only (PRISM_EMULATE_GEOMETRY_ONLY=1 in the environment): every
// launch is checked as the device checks it, and then no block runs; the
// CUDA runtime and cuBLAS models do the same (emulated_runtime.h,
// emulated_cublas.h). So a whole training step at a production batch costs
// milliseconds, and shows that every launch, product and allocation of that
// shape is one the device accepts; it computes nothing, so no result of it
// means anything, and index arithmetic inside the kernels is not exercised.
inline bool geometry_only = [] {
    const char* v = std::getenv("PRISM_EMULATE_GEOMETRY_ONLY");
    const bool on = v && *v && std::strcmp(v, "0") != 0;
    if (on) {
        std::fprintf(stderr, "emulator: geometry only (PRISM_EMULATE_GEOMETRY_ONLY): launches, products and "
                             "allocations are checked, nothing is computed, no result means anything\n");
        std::atexit([] {
            std::fprintf(stderr, "emulator: %lld kernel launches and %lld cuBLAS calls in this process\n",
                         (long long)launches, (long long)blas_calls);
        });
    }
    return on;
}();

// What the device refuses at the launch itself (cudaGetLastError reports it
// there, before any block runs); counts the launch.
inline void check_launch(Dim grid, int threads, size_t smem_bytes) {
    if (threads <= 0 || threads % 32 || threads > 1024) fail("block size must be a multiple of 32, at most 1024");
    if (smem_bytes > 227 * 1024) fail("dynamic shared memory above the 227 KiB of an H100 block");
    // What the device refuses as an invalid configuration.
    if (grid.x == 0 || grid.y == 0 || grid.z == 0) fail("a grid with no blocks (the device refuses it)");
    if (grid.x > 0x7fffffffu || grid.y > 65535 || grid.z > 65535) fail("a grid dimension above the device's limit");
    launches++;
}

// Runs the body over the grid, block after block.
inline void run_blocks(Dim grid, int threads, size_t smem_bytes, const std::function<void()>& body) {
    grid_dim = grid;
    block_dim = Dim{(unsigned)threads, 1, 1};
    block.fibers.resize(threads);
    block.warps.assign(threads / 32, Rendezvous{});
    block.body = body;
    for (unsigned z = 0; z < grid.z; z++)
        for (unsigned y = 0; y < grid.y; y++)
            for (unsigned x = 0; x < grid.x; x++) {
                block_idx = Dim{x, y, z};
                block.smem.assign(smem_bytes, 0xFF);
                block.shadow.assign((smem_bytes + 3) / 4, Shadow{});
                block.bar_gen = 0;
                block.live = threads;
                block.bar_arrived = 0;
                block.error.clear();
                for (int t = 0; t < threads; t++) {
                    Fiber& f = block.fibers[t];
                    f.stack.resize(64 * 1024);
                    f.tid = Dim{(unsigned)t, 0, 0};
                    f.done = false;
                    f.wait_gen = nullptr;
                    f.pending.clear();
                    f.groups.clear();
                    make_context(f.ctx, f.stack, fiber_entry);
                }
                while (block.live > 0) {
                    bool ran = false;
                    for (int t = 0; t < threads; t++) {
                        Fiber& f = block.fibers[t];
                        if (f.done || (f.wait_gen && *f.wait_gen == f.wait_value)) continue;
                        block.current = t;
                        thread_idx = f.tid;
                        switch_context(block.scheduler, f.ctx);
                        ran = true;
                        if (!block.error.empty()) break;
                    }
                    if (!block.error.empty())  // already "emulator: ..."
                        throw std::runtime_error(block.error + " (block " + std::to_string(x) + "," +
                                                 std::to_string(y) + "," + std::to_string(z) + ")");
                    if (block.live > 0 && !ran) fail("deadlock: every live thread waits");
                }
            }
}

// Runs one kernel over the grid now, block after block (the kernel tests'
// direct launches, with no stream).
template <class Kernel, class Params>
void launch(Dim grid, int threads, size_t smem_bytes, Kernel kernel, const Params& p) {
    check_launch(grid, threads, smem_bytes);
    if (geometry_only) return;
    run_blocks(grid, threads, smem_bytes, [&] { kernel(p); });
}

// Where a launch on a stream runs: at once, unless the emulated runtime
// (tests/emulated_runtime.h) installs its streams, which queue the work and
// run it when the stream gets to it.
inline void (*submit_to_stream)(const void* stream, std::function<void()> work) = nullptr;

// A launch on a stream (PRISM_LAUNCH): checked now, its blocks run when
// the stream runs it; `kernel` holds its own copy of the arguments, as
// the device takes them at the launch.
inline void launch_on(const void* stream, Dim grid, int threads, size_t smem_bytes, std::function<void()> kernel) {
    check_launch(grid, threads, smem_bytes);
    if (geometry_only) return;
    std::function<void()> work = [grid, threads, smem_bytes, kernel = std::move(kernel)] {
        run_blocks(grid, threads, smem_bytes, kernel);
    };
    if (submit_to_stream) submit_to_stream(stream, std::move(work));
    else work();
}

}  // namespace prism::emu

#define threadIdx (::prism::emu::thread_idx)
#define blockIdx (::prism::emu::block_idx)
#define gridDim (::prism::emu::grid_dim)
#define blockDim (::prism::emu::block_dim)
#define PRISM_DEVICE inline
#define PRISM_HOST_DEVICE inline
#define PRISM_KERNEL(threads) inline void  // inline: a .cuh may be in several tests
#define PRISM_UNROLL
#define PRISM_SMEM(name) unsigned char* name = ::prism::emu::block.smem.data()
// kernel<<<grid, threads, smem, stream>>>(args...) (primitives.cuh): checked
// now, run when its stream gets to it (launch_on). The kernel's address
// (for the shared-memory opt-in) is taken as a pointer to a function of the
// arguments' own types, so that a template kernel's deduced instance is
// found: the arguments must have the kernel's parameter types exactly (the
// emulated build does not compile otherwise; the device would convert).
#define PRISM_LAUNCH(grid, threads, smem, stream, ...)                                           \
    [&](const auto&... prism_launch_args_) {                                                     \
        /* the kernel the call below makes, a template's deduced from the arguments */          \
        void (*prism_kernel_)(std::decay_t<decltype(prism_launch_args_)>...) = __VA_ARGS__;      \
        ::prism::emu::check_smem_opt_in(::prism::emu::kernel_address(prism_kernel_), (smem));    \
        ::prism::emu::launch_on(static_cast<const void*>(stream), (grid), (threads), (smem),     \
                                [prism_kernel_, prism_args_ = std::make_tuple(prism_launch_args_...)] { \
                                    std::apply(prism_kernel_, prism_args_);                      \
                                });                                                              \
    }

namespace prism {
float half_to_float(uint16_t h);  // data/shard.cpp
}

// The primitives of kernels/cuda/primitives.cuh (in its emulated namespace, see there).
namespace prism::primitives {
inline namespace emulated {

inline void mma_bf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    struct In {
        const uint32_t* a;
        uint32_t b0, b1;
    } in{a, b0, b1};
    emu::warp_collective("mma", &in, d, [](const void* const* ins, void* const* outs) {
        float A[16][16], B[16][8], C[16][8];
        for (int l = 0; l < 32; l++) {
            const In& x = *static_cast<const In*>(ins[l]);
            const float* c = static_cast<const float*>(outs[l]);
            const int g = l >> 2, t = l & 3;
            A[g][2 * t] = emu::lo(x.a[0]), A[g][2 * t + 1] = emu::hi(x.a[0]);
            A[g + 8][2 * t] = emu::lo(x.a[1]), A[g + 8][2 * t + 1] = emu::hi(x.a[1]);
            A[g][2 * t + 8] = emu::lo(x.a[2]), A[g][2 * t + 9] = emu::hi(x.a[2]);
            A[g + 8][2 * t + 8] = emu::lo(x.a[3]), A[g + 8][2 * t + 9] = emu::hi(x.a[3]);
            B[2 * t][g] = emu::lo(x.b0), B[2 * t + 1][g] = emu::hi(x.b0);
            B[2 * t + 8][g] = emu::lo(x.b1), B[2 * t + 9][g] = emu::hi(x.b1);
            C[g][2 * t] = c[0], C[g][2 * t + 1] = c[1], C[g + 8][2 * t] = c[2], C[g + 8][2 * t + 1] = c[3];
        }
        float D[16][8];
        for (int i = 0; i < 16; i++)
            for (int j = 0; j < 8; j++) {
                double s = C[i][j];
                for (int k = 0; k < 16; k++) s += double(A[i][k]) * B[k][j];
                D[i][j] = float(s);
            }
        for (int l = 0; l < 32; l++) {
            float* d = static_cast<float*>(outs[l]);
            const int g = l >> 2, t = l & 3;
            d[0] = D[g][2 * t], d[1] = D[g][2 * t + 1], d[2] = D[g + 8][2 * t], d[3] = D[g + 8][2 * t + 1];
        }
    });
}

// Lanes 8j..8j+7 address the rows of matrix j; lane l receives, of each
// matrix, row l/4, columns 2(l%4) and 2(l%4)+1 (transposed: rows 2(l%4) and
// 2(l%4)+1 of column l/4).
inline void ldsm(uint32_t (&r)[4], const uint16_t* row, bool trans) {
    emu::check_shared(row, 16, 16, "ldmatrix");
    emu::shared_read(row, 16);
    emu::warp_collective(trans ? "ldmatrix.trans" : "ldmatrix", row, r,
                         [trans](const void* const* ins, void* const* outs) {
        for (int l = 0; l < 32; l++) {
            uint32_t* out = static_cast<uint32_t*>(outs[l]);
            for (int j = 0; j < 4; j++) {
                auto at = [&](int rr, int cc) { return static_cast<const uint16_t*>(ins[8 * j + rr])[cc]; };
                const int a = l >> 2, b = 2 * (l & 3);
                const uint16_t x0 = trans ? at(b, a) : at(a, b);
                const uint16_t x1 = trans ? at(b + 1, a) : at(a, b + 1);
                out[j] = uint32_t(x0) | uint32_t(x1) << 16;
            }
        }
    });
}
inline void ldsm_x4(uint32_t (&r)[4], const uint16_t* row) { ldsm(r, row, false); }
inline void ldsm_x4_trans(uint32_t (&r)[4], const uint16_t* row) { ldsm(r, row, true); }

inline void cp_async_16(void* smem, const void* gmem, bool valid) {
    emu::check_shared(smem, 16, 16, "cp.async");
    if (valid && (uintptr_t)gmem % 16) emu::fail("cp.async: misaligned global address");
    emu::self().pending.push_back({smem, gmem, valid, emu::block.bar_gen});
}
inline void cp_async_commit() {
    emu::Fiber& f = emu::self();
    f.groups.push_back(std::move(f.pending));
    f.pending.clear();
}
inline void cp_async_wait_all() {
    emu::Fiber& f = emu::self();
    for (const auto& group : f.groups)
        for (const emu::Copy& c : group) {
            emu::shared_write(c.dst, 16, c.issued, emu::block.bar_gen);
            if (c.valid) std::memcpy(c.dst, c.src, 16);
            else std::memset(c.dst, 0, 16);
        }
    f.groups.clear();
}
inline void block_sync() {
    emu::Block& b = emu::block;
    const uint64_t gen = b.bar_gen;
    if (++b.bar_arrived == b.live) {
        b.bar_arrived = 0;
        b.bar_gen++;
        return;
    }
    emu::block_until(&b.bar_gen, gen);
}
// One 32-bit word (a float or an int: both are shfl.b32) from lane ^ mask.
template <class W>
inline W shfl_xor_word(W v, int mask) {
    static_assert(sizeof(W) == 4, "shfl moves 32-bit words");
    struct In {
        W v;
        int mask;
    } in{v, mask};
    W out;
    emu::warp_collective("shfl.xor", &in, &out, [](const void* const* ins, void* const* outs) {
        for (int l = 0; l < 32; l++) {
            const In& mine = *static_cast<const In*>(ins[l]);
            const In& other = *static_cast<const In*>(ins[l ^ mine.mask]);
            if (other.mask != mine.mask) emu::fail("shfl.xor: lanes use different masks");
            *static_cast<W*>(outs[l]) = other.v;
        }
    });
    return out;
}
inline float shfl_xor(float v, int mask) { return shfl_xor_word(v, mask); }
inline int shfl_xor(int v, int mask) { return shfl_xor_word(v, mask); }
inline unsigned match_any(int v) {
    unsigned out;
    emu::warp_collective("match.any", &v, &out, [](const void* const* ins, void* const* outs) {
        for (int l = 0; l < 32; l++) {
            unsigned same = 0;
            for (int m = 0; m < 32; m++)
                if (*static_cast<const int*>(ins[m]) == *static_cast<const int*>(ins[l])) same |= 1u << m;
            *static_cast<unsigned*>(outs[l]) = same;
        }
    });
    return out;
}
inline void warp_sync() {
    int none = 0;
    emu::warp_collective("bar.warp.sync", &none, &none, [](const void* const*, void* const*) {});
}
inline void atomic_add_shared(int* p, int v) {
    emu::check_shared(p, 4, 4, "shared atomic");
    emu::shared_atomic(p);
    *p += v;
}
// The fibers of a block take turns only at the collectives, so a plain
// read-modify-write is atomic here.
inline void atomic_min_global(int* p, int v) { *p = v < *p ? v : *p; }
inline float half_to_float(uint16_t h) { return ::prism::half_to_float(h); }
inline uint32_t pack_bf16(float lo, float hi) {
    return uint32_t(emu::bf16_bits(lo)) | uint32_t(emu::bf16_bits(hi)) << 16;
}
// 4-byte words (float, int) and 8-byte ones (double: two words)
template <class T>
inline T ld_shared(const T* p) {
    static_assert(sizeof(T) == 4 || sizeof(T) == 8, "a shared word or two");
    emu::check_shared(p, sizeof(T), sizeof(T), "shared load");
    emu::shared_read(p, sizeof(T));
    return *p;
}
template <class T>
inline void st_shared(T* p, T v) {
    static_assert(sizeof(T) == 4 || sizeof(T) == 8, "a shared word or two");
    emu::check_shared(p, sizeof(T), sizeof(T), "shared store");
    emu::shared_write(p, sizeof(T), emu::block.bar_gen, emu::block.bar_gen);
    *p = v;
}
inline void device_trap(const char* why) { emu::fail(std::string("trap: ") + why); }
inline void load_f8(float (&v)[8], const float* p) {
    if ((uintptr_t)p % 16) emu::fail("load_f8: misaligned global address");
    std::memcpy(v, p, sizeof v);
}
inline void store_shared_16(void* p, uint32_t a, uint32_t b, uint32_t c, uint32_t d) {
    emu::check_shared(p, 16, 16, "16-byte shared store");
    emu::shared_write(p, 16, emu::block.bar_gen, emu::block.bar_gen);
    const uint32_t w[4] = {a, b, c, d};
    std::memcpy(p, w, 16);
}
inline void load_f2(float& x, float& y, const float* p) {
    if ((uintptr_t)p % 8) emu::fail("float2 load: misaligned");
    x = p[0], y = p[1];
}
inline void store_f2(float* p, float x, float y) {
    if ((uintptr_t)p % 8) emu::fail("float2 store: misaligned");
    p[0] = x, p[1] = y;
}
inline void store_bf16x2(uint16_t* p, float x, float y) {
    if ((uintptr_t)p % 4) emu::fail("bf16x2 store: misaligned");
    p[0] = emu::bf16_bits(x), p[1] = emu::bf16_bits(y);
}
inline void load_bf16x2(float& x, float& y, const uint16_t* p) {
    if ((uintptr_t)p % 4) emu::fail("bf16x2 load: misaligned");
    x = emu::bf16_float(p[0]), y = emu::bf16_float(p[1]);
}
inline void add_f2(float* p, float x, float y) {
    if ((uintptr_t)p % 8) emu::fail("float2 add: misaligned");
    p[0] += x, p[1] += y;
}
inline float load_elem(const uint16_t* p) { return emu::bf16_float(*p); }
inline void store_elem(uint16_t* p, float v) { *p = emu::bf16_bits(v); }

}  // inline namespace emulated
}  // namespace prism::primitives
