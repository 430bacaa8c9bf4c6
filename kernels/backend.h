// The op interface the model is written against: every op of kernels/ops.h
// with an Exec first, which says where the arrays live. On the CPU it is the
// op itself; with Exec::cuda (float only) it is the same op from
// kernels/cuda_ops.h, queued on Exec::stream. The model never branches on the
// device; this file is the only place that does.
//
// Differences from kernels/ops.h, so one call reads the same on both sides:
// - An op whose CPU version returns a value (a loss, Σx²) writes it to a slot
//   in the same memory as its arrays (a device scalar on CUDA); the caller
//   reads the slots after download().
// - Index arrays (S, in_S, labels, experts, offsets) live where the data lives.
// - Memory moves (copy, zero, upload, download) go through here too.
#pragma once
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>
#include "kernels/bf16.h"
#include "kernels/ops.h"
#ifdef PRISM_CUDA
#include "kernels/cuda_ops.h"
#else
typedef struct CUstream_st* cudaStream_t;
#endif

namespace prism::op {

using ops::AuxLoss;
using ops::Combine;

struct Exec {
    bool cuda = false;
    cudaStream_t stream = nullptr;
    // CUDA only, the bf16 mode: the linear layers take bf16 matrix inputs
    // (tensor cores, fp32 accumulation), and so does attention where the flash
    // kernels apply (see attention_forward); tensors stay fp32 but for the
    // matrix inputs the model stores in bf16 (MatrixIn).
    bool bf16_matmul = false;
};

// A matrix that products (linear layers, attention) or GELU read, stored by
// the op that produces it (a LayerNorm, GELU, a product, attention) in fp32
// (`full`), in bf16 (`bf16`), or both. The bf16 mode stores such a matrix in
// bf16 (DESIGN.md §7), so that every op that reads it, forward and backward,
// takes it as it is instead of rounding it again; `full` is kept too only
// where something else reads it (moevit's router reads LN1's output in
// fp32). An op reads `bf16` when present.
// On the CPU the products stay fp32: a bf16-stored matrix is widened back,
// which is what the CUDA products see (tests check the model's bf16 storage
// on the CPU that way).
template <class T>
struct MatrixIn {
    T* full = nullptr;
    uint16_t* bf16 = nullptr;
    MatrixIn() = default;
    MatrixIn(T* full_, uint16_t* bf16_) : full(full_), bf16(bf16_) {}
    MatrixIn(T* full_) : full(full_) {}                          // an fp32 output or input
    MatrixIn(const T* full_) : full(const_cast<T*>(full_)) {}    // an fp32 input (never written through)
    // The same matrix from element `offset` on (patch rows of a sequence).
    MatrixIn at(int64_t offset) const {
        return {full ? full + offset : nullptr, bf16 ? bf16 + offset : nullptr};
    }
};

// Where a backward op puts an input gradient: added into, as every op of
// kernels/ops.h does (a plain T*, which the caller has zeroed or which holds
// other consumers' shares), or written (overwrite(p): this op is the
// gradient's only writer, and p holds nothing yet). On the CPU an overwritten
// gradient is zeroed and accumulated into, so the reference ops stay as they
// are; the CUDA ops write it directly (the GEMM's beta = 0), which saves the
// memset and the read of the zeros. An overwritten gradient that only bf16
// products read may be stored in bf16 (overwrite of a MatrixIn: the bf16
// mode's ∂act and ∂fc1).
template <class T>
struct GradOut {
    T* p = nullptr;
    bool overwrite = false;
    uint16_t* bf16 = nullptr;  // written in bf16 instead (overwrite only)
    GradOut(T* p_) : p(p_) {}
    GradOut(T* p_, bool overwrite_, uint16_t* bf16_ = nullptr) : p(p_), overwrite(overwrite_), bf16(bf16_) {}
};
template <class T> GradOut<T> overwrite(T* p) { return {p, true}; }
template <class T> GradOut<T> overwrite(const MatrixIn<T>& m) { return {m.full, true, m.bf16}; }

// T as a non-deduced parameter type: the argument converts to it (a T* to a
// MatrixIn<T> or a GradOut<T>) once T is known from the other arguments.
template <class T> struct Same { using type = T; };
template <class T> using NoDeduce = typename Same<T>::type;

namespace detail {
// CPU: the matrix's first n elements as T: `full`, or `bf16` widened into tmp.
template <class T>
const T* widened(const MatrixIn<T>& x, int64_t n, std::vector<T>& tmp) {
    if (!x.bf16) return x.full;
    tmp.resize(size_t(n));
    for (int64_t i = 0; i < n; i++) tmp[size_t(i)] = T(bf16_value(x.bf16[i]));
    return tmp.data();
}
// CPU: where a producing op writes its n outputs (`full`, or tmp), and the
// rounding into `bf16` once it has.
template <class T>
T* output_of(const MatrixIn<T>& out, int64_t n, std::vector<T>& tmp) {
    if (out.full) return out.full;
    tmp.resize(size_t(n));
    return tmp.data();
}
template <class T>
void round_into(uint16_t* dst, const T* values, int64_t n) {
    if (dst)
        for (int64_t i = 0; i < n; i++) dst[i] = bf16_bits(float(values[i]));
}
// CPU: the same for an output of B images at `stride` elements apart, of
// which the op writes the first per_image elements each (rows of a sequence).
template <class T>
void round_images_into(uint16_t* dst, const T* values, int B, int64_t stride, int64_t per_image) {
    if (dst)
        for (int b = 0; b < B; b++) round_into(dst + b * stride, values + b * stride, per_image);
}
// The elements of B images at `stride` apart, the first per_image each.
inline int64_t image_span(int B, int64_t stride, int64_t per_image) {
    return B > 0 ? (B - 1) * stride + per_image : 0;
}
// An op whose matrices are all fp32 or all bf16-stored (the bf16 pointers
// given): true for bf16. A mixture is a wiring error, on either device.
inline bool all_bf16(const char* op, std::initializer_list<const void*> bf16) {
    size_t present = 0;
    for (const void* p : bf16) present += p != nullptr;
    if (present != 0 && present != bf16.size())
        throw std::logic_error(std::string(op) + ": its matrices are all fp32 or all bf16-stored");
    return present != 0;
}
// CUDA's fp32 kernels (products outside the bf16 mode; attention off the
// flash kernels' head dim or alignment) take fp32 matrices only.
inline void require_full(const void* bf16, const char* op) {
    if (bf16) throw std::logic_error(std::string(op) + ": a bf16-stored matrix for the op's fp32 kernels");
}
// CPU: where an op accumulates the n elements of its input gradient: the
// gradient itself, zeroed first when it is overwritten, or (bf16-stored)
// tmp, zeroed, which the caller then rounds into g.bf16.
template <class T>
T* grad_of(const GradOut<T>& g, int64_t n, std::vector<T>& tmp) {
    if (g.bf16) {
        if (g.p || !g.overwrite) throw std::logic_error("a bf16 gradient is written alone, not added into");
        tmp.assign(size_t(n), T(0));
        return tmp.data();
    }
    if (g.p && g.overwrite) std::memset(g.p, 0, sizeof(T) * size_t(n));
    return g.p;
}
// CPU: the routed ops' gathered rows, offsets[B·nS]; more than the
// B·nS·N·slots the caller announced is the caller's bug (the CUDA kernels,
// whose work lists are sized for that many, trap on it).
inline int64_t routed_rows(const char* op, const int* offsets, int B, int nS, int N, int slots) {
    const int64_t rows = B > 0 ? offsets[int64_t(B) * nS] : 0;
    if (rows > int64_t(B) * nS * N * slots)
        throw std::logic_error(std::string(op) + ": more gathered rows than B·nS·N·slots");
    return rows;
}
}  // namespace detail

// PRISM_OP(cpu_call, cuda_call): the CUDA call for float on a CUDA Exec, else
// the CPU call. Calls are written without their namespace.
#ifdef PRISM_CUDA
#define PRISM_OP(cpu_call, cuda_call)                                                     \
    do {                                                                                  \
        if constexpr (std::is_same_v<T, float>) {                                         \
            if (ex.cuda) { cuda_ops::cuda_call; return; }                                 \
        }                                                                                 \
        ops::cpu_call;                                                                    \
    } while (0)
#else
#define PRISM_OP(cpu_call, cuda_call) ops::cpu_call
#endif

// ---- memory ----------------------------------------------------------------------
template <class T> void copy(const Exec& ex, T* dst, const T* src, int64_t n) {
#ifdef PRISM_CUDA
    if (ex.cuda) return cuda::copy_async(dst, src, sizeof(T) * size_t(n), ex.stream);
#endif
    std::memcpy(dst, src, sizeof(T) * size_t(n));
}
template <class T> void zero(const Exec& ex, T* p, int64_t n) {
#ifdef PRISM_CUDA
    if (ex.cuda) return cuda::zero_async(p, sizeof(T) * size_t(n), ex.stream);
#endif
    std::memset(p, 0, sizeof(T) * size_t(n));
}
// Host → where the data lives, and back. download waits for the queued work.
template <class T> void upload(const Exec& ex, T* dst, const T* host, int64_t n) { copy(ex, dst, host, n); }
template <class T> void download(const Exec& ex, T* host, const T* src, int64_t n) {
    copy(ex, host, src, n);
#ifdef PRISM_CUDA
    if (ex.cuda) cuda::stream_sync(ex.stream);
#endif
}
inline void sync(const Exec& ex) {
#ifdef PRISM_CUDA
    if (ex.cuda) cuda::stream_sync(ex.stream);
#endif
}
// dst = bf16(src), rounded to nearest even, as every bf16 product rounds its inputs.
inline void round_to_bf16(const Exec& ex, uint16_t* dst, const float* src, int64_t n) {
#ifdef PRISM_CUDA
    if (ex.cuda) return cuda_ops::to_bf16(dst, src, n, ex.stream);
#endif
    detail::round_into(dst, src, n);
}

// A named range in the Nsight Systems timeline for as long as it lives.
struct Range {
    Range(const Exec& ex, const char* name) : on(ex.cuda) {
#ifdef PRISM_CUDA
        if (on) cuda::range_push(name);
#endif
    }
    ~Range() {
#ifdef PRISM_CUDA
        if (on) cuda::range_pop();
#endif
    }
    Range(const Range&) = delete;
    Range& operator=(const Range&) = delete;
    bool on;
};

// ---- the input step --------------------------------------------------------------------
// Stored pixels to normalized (and augmented) float images, as kernels/ops.h
// defines it. *nonfinite, in the arrays' memory and set to INT_MAX first,
// ends at the lowest image with a non-finite output if there is one.
inline void input_forward(const Exec& ex, float* out, const void* raw, ops::Pixel pixel, int B, int C, int H,
                          int W, const float* mean, const float* inv_std, const ops::InputAug* aug,
                          int* nonfinite) {
#ifdef PRISM_CUDA
    if (ex.cuda)
        return cuda_ops::input_forward(out, raw, pixel, B, C, H, W, mean, inv_std, aug, nonfinite, ex.stream);
#endif
    const int bad = ops::input_forward(out, raw, pixel, B, C, H, W, mean, inv_std, aug);
    if (bad >= 0 && bad < *nonfinite) *nonfinite = bad;
}

// ---- patch embedding and tokens -----------------------------------------------------
template <class T>
void patchify_channels(const Exec& ex, T* out, const float* images, int B, int C, int H, int W, int P,
                       const int* S, int nS) {
    PRISM_OP(patchify_channels(out, images, B, C, H, W, P, S, nS),
             patchify_channels(out, images, B, C, H, W, P, S, nS, ex.stream));
}
template <class T>
void patchify_all(const Exec& ex, T* out, const float* images, int B, int C, int H, int W, int P,
                  const uint8_t* keep, T scale) {
    PRISM_OP(patchify_all(out, images, B, C, H, W, P, keep, scale),
             patchify_all(out, images, B, C, H, W, P, keep, scale, ex.stream));
}
template <class T>
void embed_forward(const Exec& ex, T* seq, const T* patch, const T* cls, const T* pos, const T* chan,
                   const int* S, int B, int nS, int N, int D) {
    PRISM_OP(embed_forward(seq, patch, cls, pos, chan, S, B, nS, N, D),
             embed_forward(seq, patch, cls, pos, chan, S, B, nS, N, D, ex.stream));
}
template <class T>
void embed_backward(const Exec& ex, T* dpatch, T* dcls, T* dpos, T* dchan, const T* dseq, const int* S,
                    int B, int nS, int N, int D) {
    PRISM_OP(embed_backward(dpatch, dcls, dpos, dchan, dseq, S, B, nS, N, D),
             embed_backward(dpatch, dcls, dpos, dchan, dseq, S, B, nS, N, D, ex.stream));
}

// ---- layer norm, linear, GELU, residual ------------------------------------------------
template <class T>
void layernorm_forward(const Exec& ex, const NoDeduce<MatrixIn<T>>& out, T* mean, T* rstd, const T* x, const T* w,
                       const T* b, int64_t rows, int D) {
#ifdef PRISM_CUDA
    if constexpr (std::is_same_v<T, float>) {
        if (ex.cuda)
            return cuda_ops::layernorm_forward(out.full, out.bf16, mean, rstd, x, w, b, rows, D, ex.stream);
    }
#endif
    std::vector<T> tmp;
    T* o = detail::output_of(out, rows * D, tmp);
    ops::layernorm_forward(o, mean, rstd, x, w, b, rows, D);
    detail::round_into(out.bf16, o, rows * D);
}
template <class T>
void layernorm_backward(const Exec& ex, T* dx, T* dw, T* db, const T* dout, const T* x, const T* w,
                        const T* mean, const T* rstd, int64_t rows, int D) {
    PRISM_OP(layernorm_backward(dx, dw, db, dout, x, w, mean, rstd, rows, D),
             layernorm_backward(dx, dw, db, dout, x, w, mean, rstd, rows, D, ex.stream));
}
template <class T>
void residual_layernorm_forward(const Exec& ex, T* sum, const MatrixIn<T>& out, T* mean, T* rstd, const T* x,
                                const T* branch, const T* scale, const T* w, const T* b, int B,
                                int64_t rows_per_image, int D) {
#ifdef PRISM_CUDA
    if constexpr (std::is_same_v<T, float>) {
        if (ex.cuda)
            return cuda_ops::residual_layernorm_forward(sum, out.full, out.bf16, mean, rstd, x, branch, scale, w,
                                                        b, B, rows_per_image, D, ex.stream);
    }
#endif
    std::vector<T> tmp;
    T* o = detail::output_of(out, B * rows_per_image * D, tmp);
    ops::residual_layernorm_forward(sum, o, mean, rstd, x, branch, scale, w, b, B, rows_per_image, D);
    detail::round_into(out.bf16, o, B * rows_per_image * D);
}
// out: fp32 (a plain T*), or bf16 alone (the bf16 mode's stored qkv).
// W: the fp32 weights (`full`, always) and, in the bf16 mode on CUDA, their
// bf16 copy (`bf16`: the products read it instead of rounding W each call).
// The CPU's products read `full`. b may be null; b_bf16 is its bf16 copy,
// which a bf16 output's epilogue reads instead of rounding b each call.
template <class T>
void linear_forward(const Exec& ex, const NoDeduce<MatrixIn<T>>& out, const NoDeduce<MatrixIn<T>>& x,
                    const NoDeduce<MatrixIn<T>>& W, const T* b, int64_t rows, int in_dim, int out_dim,
                    const uint16_t* b_bf16 = nullptr) {
    if (out.full && out.bf16) throw std::logic_error("linear_forward: one output, fp32 or bf16");
#ifdef PRISM_CUDA
    if constexpr (std::is_same_v<T, float>) {
        if (ex.cuda && ex.bf16_matmul && out.bf16)
            return cuda_ops::linear_forward_mixed_to_bf16(out.bf16, x.full, x.bf16, W.full, W.bf16, b, b_bf16, rows,
                                                          in_dim, out_dim, ex.stream);
        if (ex.cuda && ex.bf16_matmul)
            return cuda_ops::linear_forward_mixed(out.full, x.full, x.bf16, W.full, W.bf16, b, rows, in_dim, out_dim,
                                                  ex.stream);
        if (ex.cuda) {
            detail::require_full(x.bf16, "linear_forward");
            detail::require_full(out.bf16, "linear_forward");
            return cuda_ops::linear_forward(out.full, x.full, W.full, b, rows, in_dim, out_dim, ex.stream);
        }
    }
#endif
    std::vector<T> tmp_x, tmp_out;
    T* o = detail::output_of(out, rows * out_dim, tmp_out);
    ops::linear_forward(o, detail::widened(x, rows * in_dim, tmp_x), W.full, b, rows, in_dim, out_dim);
    detail::round_into(out.bf16, o, rows * out_dim);
}
// dx may be null (no input gradient wanted); dout fp32 or bf16-stored; W as above.
template <class T>
void linear_backward(const Exec& ex, const NoDeduce<GradOut<T>>& dx, T* dW, T* db, const NoDeduce<MatrixIn<T>>& dout,
                     const NoDeduce<MatrixIn<T>>& x, const NoDeduce<MatrixIn<T>>& W, int64_t rows, int in_dim,
                     int out_dim) {
#ifdef PRISM_CUDA
    if constexpr (std::is_same_v<T, float>) {
        if (ex.cuda && ex.bf16_matmul)
            return cuda_ops::linear_backward_mixed(dx.p, dx.bf16, dx.overwrite, dW, db, dout.full, dout.bf16, x.full,
                                                   x.bf16, W.full, W.bf16, rows, in_dim, out_dim, ex.stream);
        if (ex.cuda) {
            detail::require_full(x.bf16, "linear_backward");
            detail::require_full(dout.bf16, "linear_backward");
            detail::require_full(dx.bf16, "linear_backward");
            return cuda_ops::linear_backward(dx.p, dx.overwrite, dW, db, dout.full, x.full, W.full, rows, in_dim,
                                             out_dim, ex.stream);
        }
    }
#endif
    std::vector<T> tmp_x, tmp_dout, tmp_dx;
    T* dxp = detail::grad_of(dx, rows * in_dim, tmp_dx);
    ops::linear_backward(dxp, dW, db, detail::widened(dout, rows * out_dim, tmp_dout),
                         detail::widened(x, rows * in_dim, tmp_x), W.full, rows, in_dim, out_dim);
    detail::round_into(dx.bf16, dxp, rows * in_dim);
}
// x: the patch rows (x, x_image_stride) of a sequence matrix, so the first
// (B-1)·x_image_stride + nS·N·in_dim elements are what the ops may read.
// out: fp32, or bf16 alone (the bf16 mode's stored k and v).
template <class T>
void expert_linear_forward(const Exec& ex, const NoDeduce<MatrixIn<T>>& out, const NoDeduce<MatrixIn<T>>& x,
                           int64_t x_image_stride, const NoDeduce<MatrixIn<T>>& W, const T* bias, const int* S, int B,
                           int nS, int N, int in_dim, int out_dim) {
    if (out.full && out.bf16) throw std::logic_error("expert_linear_forward: one output, fp32 or bf16");
#ifdef PRISM_CUDA
    if constexpr (std::is_same_v<T, float>) {
        if (ex.cuda && ex.bf16_matmul)
            return cuda_ops::expert_linear_forward_mixed(out.full, out.bf16, x.full, x.bf16, x_image_stride, W.full,
                                                         W.bf16, bias, S, B, nS, N, in_dim, out_dim, ex.stream);
        if (ex.cuda) {
            detail::require_full(x.bf16, "expert_linear_forward");
            detail::require_full(out.bf16, "expert_linear_forward");
            return cuda_ops::expert_linear_forward(out.full, x.full, x_image_stride, W.full, bias, S, B, nS, N,
                                                   in_dim, out_dim, ex.stream);
        }
    }
#endif
    std::vector<T> tmp, tmp_out;
    const int64_t n_out = int64_t(B) * nS * N * out_dim;
    const int64_t x_span = detail::image_span(B, x_image_stride, int64_t(nS) * N * in_dim);
    T* o = detail::output_of(out, n_out, tmp_out);
    ops::expert_linear_forward(o, detail::widened(x, x_span, tmp), x_image_stride, W.full, bias, S, B, nS, N,
                               in_dim, out_dim);
    detail::round_into(out.bf16, o, n_out);
}
template <class T>
void expert_linear_backward(const Exec& ex, T* dx, T* dW, T* dbias, const T* dout, const NoDeduce<MatrixIn<T>>& x,
                            int64_t x_image_stride, const NoDeduce<MatrixIn<T>>& W, const int* S, int B, int nS,
                            int N, int in_dim, int out_dim) {
#ifdef PRISM_CUDA
    if constexpr (std::is_same_v<T, float>) {
        if (ex.cuda && ex.bf16_matmul)
            return cuda_ops::expert_linear_backward_mixed(dx, dW, dbias, dout, x.full, x.bf16, x_image_stride,
                                                          W.full, W.bf16, S, B, nS, N, in_dim, out_dim, ex.stream);
        if (ex.cuda) {
            detail::require_full(x.bf16, "expert_linear_backward");
            return cuda_ops::expert_linear_backward(dx, dW, dbias, dout, x.full, x_image_stride, W.full, S, B, nS,
                                                    N, in_dim, out_dim, ex.stream);
        }
    }
#endif
    std::vector<T> tmp;
    const int64_t x_span = detail::image_span(B, x_image_stride, int64_t(nS) * N * in_dim);
    ops::expert_linear_backward(dx, dW, dbias, dout, detail::widened(x, x_span, tmp), x_image_stride, W.full, S, B,
                                nS, N, in_dim, out_dim);
}
// x: fp32, or the bf16 mode's stored fc1 output.
template <class T> void gelu_forward(const Exec& ex, const MatrixIn<T>& out, const MatrixIn<T>& x, int64_t n) {
#ifdef PRISM_CUDA
    if constexpr (std::is_same_v<T, float>) {
        if (ex.cuda) return cuda_ops::gelu_forward(out.full, out.bf16, x.full, x.bf16, n, ex.stream);
    }
#endif
    std::vector<T> tmp_out, tmp_x;
    T* o = detail::output_of(out, n, tmp_out);
    ops::gelu_forward(o, detail::widened(x, n, tmp_x), n);
    detail::round_into(out.bf16, o, n);
}
template <class T>
void gelu_backward(const Exec& ex, const GradOut<T>& dx, const MatrixIn<T>& dout, const MatrixIn<T>& x, int64_t n) {
#ifdef PRISM_CUDA
    if constexpr (std::is_same_v<T, float>) {
        if (ex.cuda)
            return cuda_ops::gelu_backward(dx.p, dx.bf16, dx.overwrite, dout.full, dout.bf16, x.full, x.bf16, n,
                                           ex.stream);
    }
#endif
    std::vector<T> tmp_x, tmp_dout, tmp_dx;
    T* dxp = detail::grad_of(dx, n, tmp_dx);
    ops::gelu_backward(dxp, detail::widened(dout, n, tmp_dout), detail::widened(x, n, tmp_x), n);
    detail::round_into(dx.bf16, dxp, n);
}
template <class T>
void residual_forward(const Exec& ex, T* out, const T* x, const T* branch, const T* scale, int B,
                      int64_t per_image) {
    PRISM_OP(residual_forward(out, x, branch, scale, B, per_image),
             residual_forward(out, x, branch, scale, B, per_image, ex.stream));
}
template <class T>
void residual_backward(const Exec& ex, T* dbranch, const T* dx, const T* scale, int B, int64_t per_image) {
    PRISM_OP(residual_backward(dbranch, dx, scale, B, per_image),
             residual_backward(dbranch, dx, scale, B, per_image, ex.stream));
}

// ---- attention ------------------------------------------------------------------------
// Dense and routed attention keep the logsumexp of each query row, never the
// probabilities (kernels/ops.h). On the CPU: the reference ops. On CUDA, one
// of two implementations of that contract:
// - the flash kernels (kernels/cuda/flash_attention.cu: bf16 tensor cores,
//   fp32 softmax) in the bf16 mode (Exec::bf16_matmul), when the head dim
//   D/Hd is 64 and every buffer they access in 16-byte vectors is 16-byte
//   aligned (the arenas' are);
// - otherwise the fused fp32 kernels (kernels/cuda/attention.cu), within
//   DESIGN.md §7's fp32 tolerance of the CPU.
// Both write and read lse in the same layout, so forward and backward may
// take different ones (the alignment of the buffers each sees decides).
//
// The head dim of the flash kernels: where the bf16 mode runs attention on
// them, their products round q, k and v to bf16 anyway, so the model may
// store qkv in bf16 (MatrixIn). The same answer on both devices, so that the
// CPU's bf16 storage is the GPU's.
constexpr int kBf16AttentionHeadDim = 64;
#ifdef PRISM_CUDA
static_assert(kBf16AttentionHeadDim == cuda_ops::kFlashHeadDim, "the flash kernels' head dim");
#endif
inline bool attention_reads_bf16(bool bf16_mode, int D, int Hd) {
    return bf16_mode && Hd > 0 && D == kBf16AttentionHeadDim * Hd;
}
#ifdef PRISM_CUDA
inline bool use_flash(const Exec& ex, int D, int Hd, std::initializer_list<const void*> vector_buffers) {
    if (!ex.cuda || !attention_reads_bf16(ex.bf16_matmul, D, Hd)) return false;
    for (const void* p : vector_buffers)
        if (reinterpret_cast<uintptr_t>(p) % 16 != 0) return false;
    return true;
}
#endif

// qkv and out: fp32, or (only where attention_reads_bf16) stored in bf16.
template <class T>
void attention_forward(const Exec& ex, const NoDeduce<MatrixIn<T>>& out, T* lse, const NoDeduce<MatrixIn<T>>& qkv,
                       int B, int L, int D, int Hd) {
#ifdef PRISM_CUDA
    if constexpr (std::is_same_v<T, float>) {
        if (use_flash(ex, D, Hd, {out.full, out.bf16, qkv.bf16}))
            return cuda_ops::flash_attention_forward(out.full, out.bf16, lse, qkv.full, qkv.bf16, B, L, D, Hd,
                                                     ex.stream);
        if (ex.cuda) {
            detail::require_full(qkv.bf16, "attention_forward");
            detail::require_full(out.bf16, "attention_forward");
            return cuda_ops::attention_forward(out.full, lse, qkv.full, B, L, D, Hd, ex.stream);
        }
    }
#endif
    std::vector<T> tmp_qkv, tmp_out;
    T* o = detail::output_of(out, int64_t(B) * L * D, tmp_out);
    ops::attention_forward(o, lse, detail::widened(qkv, int64_t(B) * L * 3 * D, tmp_qkv), B, L, D, Hd);
    detail::round_into(out.bf16, o, int64_t(B) * L * D);
}
// dqkv: added into, or written (overwrite: the flash kernels store it; the
// fp32 ones and the CPU accumulate into it zeroed).
template <class T>
void attention_backward(const Exec& ex, const NoDeduce<GradOut<T>>& dqkv, const T* dout,
                        const NoDeduce<MatrixIn<T>>& qkv, const NoDeduce<MatrixIn<T>>& out, const T* lse, int B, int L,
                        int D, int Hd) {
    detail::require_full(dqkv.bf16, "attention_backward");
#ifdef PRISM_CUDA
    if constexpr (std::is_same_v<T, float>) {
        if (use_flash(ex, D, Hd, {dqkv.p, dout, out.full, out.bf16, qkv.bf16}))
            return cuda_ops::flash_attention_backward(dqkv.p, dout, qkv.full, qkv.bf16, out.full, out.bf16, lse, B, L,
                                                      D, Hd, dqkv.overwrite, ex.stream);
    }
#endif
    if (dqkv.overwrite) zero(ex, dqkv.p, int64_t(B) * L * 3 * D);
#ifdef PRISM_CUDA
    if constexpr (std::is_same_v<T, float>) {
        if (ex.cuda) {
            detail::require_full(qkv.bf16, "attention_backward");
            detail::require_full(out.bf16, "attention_backward");
            return cuda_ops::attention_backward(dqkv.p, dout, qkv.full, out.full, lse, B, L, D, Hd, ex.stream);
        }
    }
#endif
    std::vector<T> tmp_qkv, tmp_out;
    ops::attention_backward(dqkv.p, dout, detail::widened(qkv, int64_t(B) * L * 3 * D, tmp_qkv),
                            detail::widened(out, int64_t(B) * L * D, tmp_out), lse, B, L, D, Hd);
}

// ---- MoE-ViT channel routing -------------------------------------------------------------
template <class T>
void router_forward(const Exec& ex, T* probs, int* experts, T* weights, T* lse, const T* z,
                    int64_t z_image_stride, const uint8_t* in_S, const int* S, int B, int nS, int N,
                    int C, int k, Combine combine) {
    PRISM_OP(router_forward(probs, experts, weights, lse, z, z_image_stride, in_S, S, B, nS, N, C, k,
                            combine),
             router_forward(probs, experts, weights, lse, z, z_image_stride, in_S, S, B, nS, N, C, k,
                            combine, ex.stream));
}
template <class T>
void router_backward(const Exec& ex, T* dz, int64_t dz_image_stride, const T* probs, const int* experts,
                     const T* weights, const T* dweights, const T* dprobs, const int* S, int B, int nS,
                     int N, int C, int k, Combine combine) {
    PRISM_OP(router_backward(dz, dz_image_stride, probs, experts, weights, dweights, dprobs, S, B, nS,
                             N, C, k, combine),
             router_backward(dz, dz_image_stride, probs, experts, weights, dweights, dprobs, S, B, nS,
                             N, C, k, combine, ex.stream));
}
// The data-parallel statistics of the load-balance loss (ops::aux_stats):
// stats [2*nS+1] doubles where the data lives (device memory on CUDA).
template <class T>
void aux_stats(const Exec& ex, double* stats, const T* probs, const int* counts, const int* S,
               int64_t tokens, int nS, int C) {
    PRISM_OP(aux_stats(stats, probs, counts, S, tokens, nS, C),
             aux_stats(stats, probs, counts, S, tokens, nS, C, ex.stream));
}
// *loss = the load-balance loss; its gradient × grad_scale is added to dprobs (unless null).
// all_ranks: aux_stats summed over the ranks, where the data lives, or null.
template <class T>
void aux_loss_forward_backward(const Exec& ex, T* loss, T* dprobs, const T* probs, const int* counts,
                               const int* S, int64_t tokens, int nS, int C, int k_eff, AuxLoss kind,
                               T coef, T grad_scale, const double* all_ranks) {
#ifdef PRISM_CUDA
    if constexpr (std::is_same_v<T, float>) {
        if (ex.cuda)
            return cuda_ops::aux_loss_forward_backward(loss, dprobs, probs, counts, S, tokens, nS, C, k_eff,
                                                       kind, coef, grad_scale, all_ranks, ex.stream);
    }
#endif
    *loss = ops::aux_loss_forward_backward(dprobs, probs, counts, S, tokens, nS, C, k_eff, kind, coef,
                                           grad_scale, all_ranks);
}
// *loss = the router z-loss; its gradient × grad_scale is added to dz (unless null).
template <class T>
void z_loss_forward_backward(const Exec& ex, T* loss, T* dz, int64_t dz_image_stride, const T* probs,
                             const T* lse, int B, int nS, int N, int C, T coef, T grad_scale) {
#ifdef PRISM_CUDA
    if constexpr (std::is_same_v<T, float>) {
        if (ex.cuda)
            return cuda_ops::z_loss_forward_backward(loss, dz, dz_image_stride, probs, lse, B, nS, N, C,
                                                     coef, grad_scale, ex.stream);
    }
#endif
    *loss = ops::z_loss_forward_backward(dz, dz_image_stride, probs, lse, B, nS, N, C, coef, grad_scale);
}
inline void moe_dispatch(const Exec& ex, int* offsets, int* pair_of_row, int* row_of_pair, int* counts,
                         const int* experts, int B, int nS, int N, int k) {
#ifdef PRISM_CUDA
    if (ex.cuda)
        return cuda_ops::moe_dispatch(offsets, pair_of_row, row_of_pair, counts, experts, B, nS, N, k,
                                      ex.stream);
#endif
    ops::moe_dispatch(offsets, pair_of_row, row_of_pair, counts, experts, B, nS, N, k);
}
// The bf16 mode stores q, k, v, the gathered queries qg, the routed output og
// and the attention output in bf16 where attention_reads_bf16 (moevit's
// flash kernels round them anyway): the ops below take each as a MatrixIn
// (fp32 or bf16, all of one op's the same) and write their outputs likewise.
template <class T>
void moe_gather_forward(const Exec& ex, const MatrixIn<T>& qg, const NoDeduce<MatrixIn<T>>& q,
                        int64_t q_image_stride, const int* pair_of_row, int B, int nS, int N, int k, int D) {
    detail::all_bf16("moe_gather_forward", {qg.bf16, q.bf16});
#ifdef PRISM_CUDA
    if constexpr (std::is_same_v<T, float>) {
        if (ex.cuda)
            return cuda_ops::moe_gather_forward(qg.full, qg.bf16, q.full, q.bf16, q_image_stride, pair_of_row, B, nS,
                                                N, k, D, ex.stream);
    }
#endif
    const int64_t R = int64_t(nS) * N, n_out = int64_t(B) * R * k * D;
    std::vector<T> tmp_q, tmp_out;
    T* o = detail::output_of(qg, n_out, tmp_out);
    ops::moe_gather_forward(o, detail::widened(q, detail::image_span(B, q_image_stride, R * D), tmp_q),
                            q_image_stride, pair_of_row, B, nS, N, k, D);
    detail::round_into(qg.bf16, o, n_out);
}
template <class T>
void moe_gather_backward(const Exec& ex, T* dq, int64_t dq_image_stride, const T* dqg,
                         const int* row_of_pair, int B, int nS, int N, int k, int D) {
    PRISM_OP(moe_gather_backward(dq, dq_image_stride, dqg, row_of_pair, B, nS, N, k, D),
             moe_gather_backward(dq, dq_image_stride, dqg, row_of_pair, B, nS, N, k, D, ex.stream));
}
// Routed attention: the dispatch of dense attention's (above). qg, k, v, og
// (and dog) all fp32, or all bf16 (the flash kernels only). slots: each
// token's k (the gathered rows are B·nS·N·slots).
template <class T>
void routed_attention_forward(const Exec& ex, const NoDeduce<MatrixIn<T>>& og, T* lse, const NoDeduce<MatrixIn<T>>& qg,
                              const NoDeduce<MatrixIn<T>>& k, const NoDeduce<MatrixIn<T>>& v, const int* offsets,
                              int B, int nS, int N, int slots, int D, int Hd) {
    const bool bf16 = detail::all_bf16("routed_attention_forward", {og.bf16, qg.bf16, k.bf16, v.bf16});
    (void)bf16;  // (a build without CUDA)
#ifdef PRISM_CUDA
    if constexpr (std::is_same_v<T, float>) {
        if (bf16 && use_flash(ex, D, Hd, {og.bf16, qg.bf16, k.bf16, v.bf16}))
            return cuda_ops::flash_routed_attention_forward_bf16(og.bf16, lse, qg.bf16, k.bf16, v.bf16, offsets, B,
                                                                 nS, N, slots, D, Hd, ex.stream);
        if (ex.cuda) {
            detail::require_full(qg.bf16, "routed_attention_forward");
            if (use_flash(ex, D, Hd, {og.full, qg.full, k.full, v.full}))
                return cuda_ops::flash_routed_attention_forward(og.full, lse, qg.full, k.full, v.full, offsets, B, nS,
                                                                N, slots, D, Hd, ex.stream);
            return cuda_ops::routed_attention_forward(og.full, lse, qg.full, k.full, v.full, offsets, B, nS, N, D, Hd,
                                                      ex.stream);
        }
    }
#endif
    const int64_t rows = detail::routed_rows("routed_attention_forward", offsets, B, nS, N, slots),
                  kv = int64_t(B) * nS * N * D;
    std::vector<T> tmp_q, tmp_k, tmp_v, tmp_out;
    T* o = detail::output_of(og, rows * D, tmp_out);
    ops::routed_attention_forward(o, lse, detail::widened(qg, rows * D, tmp_q), detail::widened(k, kv, tmp_k),
                                  detail::widened(v, kv, tmp_v), offsets, B, nS, N, D, Hd);
    detail::round_into(og.bf16, o, rows * D);
}
// dk, dv: added into; dqg: added into, or written (overwrite: the flash
// kernels store it, each row has one writer; the others accumulate into it zeroed).
template <class T>
void routed_attention_backward(const Exec& ex, const NoDeduce<GradOut<T>>& dqg, T* dk, T* dv,
                               const NoDeduce<MatrixIn<T>>& dog,
                               const NoDeduce<MatrixIn<T>>& qg, const NoDeduce<MatrixIn<T>>& k,
                               const NoDeduce<MatrixIn<T>>& v, const NoDeduce<MatrixIn<T>>& og, const T* lse,
                               const int* offsets, int B, int nS, int N, int slots, int D, int Hd) {
    const bool bf16 = detail::all_bf16("routed_attention_backward", {dog.bf16, qg.bf16, k.bf16, v.bf16, og.bf16});
    (void)bf16;
    detail::require_full(dqg.bf16, "routed_attention_backward");
#ifdef PRISM_CUDA
    if constexpr (std::is_same_v<T, float>) {
        if (bf16 && use_flash(ex, D, Hd, {dqg.p, dk, dv, dog.bf16, qg.bf16, k.bf16, v.bf16, og.bf16}))
            return cuda_ops::flash_routed_attention_backward_bf16(dqg.p, dk, dv, dog.bf16, qg.bf16, k.bf16, v.bf16,
                                                                  og.bf16, lse, offsets, B, nS, N, slots, D, Hd,
                                                                  dqg.overwrite, ex.stream);
        if (ex.cuda) {
            detail::require_full(qg.bf16, "routed_attention_backward");
            if (use_flash(ex, D, Hd, {dqg.p, dk, dv, dog.full, qg.full, k.full, v.full, og.full}))
                return cuda_ops::flash_routed_attention_backward(dqg.p, dk, dv, dog.full, qg.full, k.full, v.full,
                                                                 og.full, lse, offsets, B, nS, N, slots, D, Hd,
                                                                 dqg.overwrite, ex.stream);
            // The gathered rows' count lives on the device: zero the buffer's B·nS·N·slots.
            if (dqg.overwrite) zero(ex, dqg.p, int64_t(B) * nS * N * slots * D);
            return cuda_ops::routed_attention_backward(dqg.p, dk, dv, dog.full, qg.full, k.full, v.full, og.full, lse,
                                                       offsets, B, nS, N, slots, D, Hd, ex.stream);
        }
    }
#endif
    const int64_t rows = detail::routed_rows("routed_attention_backward", offsets, B, nS, N, slots),
                  kv = int64_t(B) * nS * N * D;
    std::vector<T> tmp_dog, tmp_q, tmp_k, tmp_v, tmp_og, unused;
    ops::routed_attention_backward(detail::grad_of(dqg, rows * D, unused), dk, dv,
                                   detail::widened(dog, rows * D, tmp_dog),
                                   detail::widened(qg, rows * D, tmp_q), detail::widened(k, kv, tmp_k),
                                   detail::widened(v, kv, tmp_v), detail::widened(og, rows * D, tmp_og), lse, offsets,
                                   B, nS, N, D, Hd);
}
// a: the patch rows (a, a_image_stride) of the attention output.
template <class T>
void combine_forward(const Exec& ex, const NoDeduce<MatrixIn<T>>& a, int64_t a_image_stride,
                     const NoDeduce<MatrixIn<T>>& og, const T* weights, const int* row_of_pair, int B, int nS, int N,
                     int k, int D) {
    detail::all_bf16("combine_forward", {a.bf16, og.bf16});
#ifdef PRISM_CUDA
    if constexpr (std::is_same_v<T, float>) {
        if (ex.cuda)
            return cuda_ops::combine_forward(a.full, a.bf16, a_image_stride, og.full, og.bf16, weights, row_of_pair,
                                             B, nS, N, k, D, ex.stream);
    }
#endif
    const int64_t R = int64_t(nS) * N, span = detail::image_span(B, a_image_stride, R * D);
    std::vector<T> tmp_og, tmp_out;
    T* o = detail::output_of(a, span, tmp_out);
    ops::combine_forward(o, a_image_stride, detail::widened(og, int64_t(B) * R * k * D, tmp_og), weights, row_of_pair,
                         B, nS, N, k, D);
    detail::round_images_into(a.bf16, o, B, a_image_stride, R * D);
}
// dog: added into, or written (overwrite; in bf16 too where og is); dweights: added into.
template <class T>
void combine_backward(const Exec& ex, const NoDeduce<GradOut<T>>& dog, T* dweights, const T* da,
                      int64_t da_image_stride, const NoDeduce<MatrixIn<T>>& og, const T* weights,
                      const int* row_of_pair, int B, int nS, int N, int k, int D) {
    if (dog.bf16) detail::all_bf16("combine_backward", {dog.bf16, og.bf16});
#ifdef PRISM_CUDA
    if constexpr (std::is_same_v<T, float>) {
        if (ex.cuda)
            return cuda_ops::combine_backward(dog.p, dog.bf16, dog.overwrite, dweights, da, da_image_stride, og.full,
                                              og.bf16, weights, row_of_pair, B, nS, N, k, D, ex.stream);
    }
#endif
    const int64_t n = int64_t(B) * nS * N * k * D;
    std::vector<T> tmp_og, tmp_dog;
    T* d = detail::grad_of(dog, n, tmp_dog);
    ops::combine_backward(d, dweights, da, da_image_stride, detail::widened(og, n, tmp_og), weights, row_of_pair, B,
                          nS, N, k, D);
    detail::round_into(dog.bf16, d, n);
}
// out: row 0 of each image (out, out_image_stride); q likewise; k, v [B, M, D].
template <class T>
void cls_attention_forward(const Exec& ex, const NoDeduce<MatrixIn<T>>& out, int64_t out_image_stride, T* probs,
                           const NoDeduce<MatrixIn<T>>& q, int64_t q_image_stride, const NoDeduce<MatrixIn<T>>& k,
                           const NoDeduce<MatrixIn<T>>& v, int B, int M, int D, int Hd) {
    const bool bf16 = detail::all_bf16("cls_attention_forward", {out.bf16, q.bf16, k.bf16, v.bf16});
    (void)bf16;
#ifdef PRISM_CUDA
    if constexpr (std::is_same_v<T, float>) {
        if (ex.cuda && bf16)
            return cuda_ops::cls_attention_forward_bf16(out.bf16, out_image_stride, probs, q.bf16, q_image_stride,
                                                        k.bf16, v.bf16, B, M, D, Hd, ex.stream);
        if (ex.cuda)
            return cuda_ops::cls_attention_forward(out.full, out_image_stride, probs, q.full, q_image_stride, k.full,
                                                   v.full, B, M, D, Hd, ex.stream);
    }
#endif
    const int64_t kv = int64_t(B) * M * D;
    std::vector<T> tmp_q, tmp_k, tmp_v, tmp_out;
    T* o = detail::output_of(out, detail::image_span(B, out_image_stride, D), tmp_out);
    const T* qw = detail::widened(q, detail::image_span(B, q_image_stride, D), tmp_q);
    ops::cls_attention_forward(o, out_image_stride, probs, qw, q_image_stride, detail::widened(k, kv, tmp_k),
                               detail::widened(v, kv, tmp_v), B, M, D, Hd);
    detail::round_images_into(out.bf16, o, B, out_image_stride, D);
}
template <class T>
void cls_attention_backward(const Exec& ex, T* dq, int64_t dq_image_stride, T* dk, T* dv, const T* dout,
                            int64_t dout_image_stride, const NoDeduce<MatrixIn<T>>& q, int64_t q_image_stride,
                            const NoDeduce<MatrixIn<T>>& k, const NoDeduce<MatrixIn<T>>& v, const T* probs, int B,
                            int M, int D, int Hd) {
    const bool bf16 = detail::all_bf16("cls_attention_backward", {q.bf16, k.bf16, v.bf16});
    (void)bf16;
#ifdef PRISM_CUDA
    if constexpr (std::is_same_v<T, float>) {
        if (ex.cuda && bf16)
            return cuda_ops::cls_attention_backward_bf16(dq, dq_image_stride, dk, dv, dout, dout_image_stride, q.bf16,
                                                         q_image_stride, k.bf16, v.bf16, probs, B, M, D, Hd,
                                                         ex.stream);
        if (ex.cuda)
            return cuda_ops::cls_attention_backward(dq, dq_image_stride, dk, dv, dout, dout_image_stride, q.full,
                                                    q_image_stride, k.full, v.full, probs, B, M, D, Hd, ex.stream);
    }
#endif
    const int64_t kv = int64_t(B) * M * D;
    std::vector<T> tmp_q, tmp_k, tmp_v;
    ops::cls_attention_backward(dq, dq_image_stride, dk, dv, dout, dout_image_stride,
                                detail::widened(q, detail::image_span(B, q_image_stride, D), tmp_q), q_image_stride,
                                detail::widened(k, kv, tmp_k), detail::widened(v, kv, tmp_v), probs, B, M, D, Hd);
}

// ---- head -----------------------------------------------------------------------------------
template <class T> void select_rows(const Exec& ex, T* out, const T* x, int64_t stride, int B, int D) {
    PRISM_OP(select_rows(out, x, stride, B, D), select_rows(out, x, stride, B, D, ex.stream));
}
template <class T>
void select_rows_backward(const Exec& ex, T* dx, const T* dout, int64_t stride, int B, int D) {
    PRISM_OP(select_rows_backward(dx, dout, stride, B, D),
             select_rows_backward(dx, dout, stride, B, D, ex.stream));
}
// *loss = the mean cross-entropy, *correct = argmax hits.
template <class T>
void cross_entropy_forward(const Exec& ex, T* loss, T* probs, const T* logits, const int32_t* labels,
                           int B, int K, int* correct) {
#ifdef PRISM_CUDA
    if constexpr (std::is_same_v<T, float>) {
        if (ex.cuda)
            return cuda_ops::cross_entropy_forward(loss, probs, logits, labels, B, K, correct, ex.stream);
    }
#endif
    *loss = ops::cross_entropy_forward(probs, logits, labels, B, K, correct);
}
template <class T>
void cross_entropy_backward(const Exec& ex, T* dlogits, const T* probs, const int32_t* labels, int B,
                            int K, T grad_scale) {
    PRISM_OP(cross_entropy_backward(dlogits, probs, labels, B, K, grad_scale),
             cross_entropy_backward(dlogits, probs, labels, B, K, grad_scale, ex.stream));
}

// ---- optimizer ----------------------------------------------------------------------------------
// *out = Σ x² in double, in a fixed order.
template <class T> void sum_squares(const Exec& ex, double* out, const T* x, int64_t n) {
#ifdef PRISM_CUDA
    if constexpr (std::is_same_v<T, float>) {
        if (ex.cuda) return cuda_ops::sum_squares(out, x, n, ex.stream);
    }
#endif
    *out = ops::sum_squares(x, n);
}
template <class T> void scale_inplace(const Exec& ex, T* x, int64_t n, T s) {
    PRISM_OP(scale_inplace(x, n, s), scale_inplace(x, n, s, ex.stream));
}
template <class T>
void adamw_update(const Exec& ex, T* param, const T* grad, T* m, T* v, int64_t n, double lr, double beta1,
                  double beta2, double eps, double weight_decay, const ops::DecayTiles& decay, int64_t t) {
    PRISM_OP(adamw_update(param, grad, m, v, n, lr, beta1, beta2, eps, weight_decay, decay, t),
             adamw_update(param, grad, m, v, n, lr, beta1, beta2, eps, weight_decay, decay, t, ex.stream));
}

#undef PRISM_OP

}  // namespace prism::op
