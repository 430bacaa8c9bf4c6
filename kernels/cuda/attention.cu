// Attention on the device in fp32: the host side. The kernels and the design
// notes are in attention.cuh; the bf16 tensor-core versions of dense and
// routed attention are in flash_attention.cu (kernels/backend.h picks).
#include <climits>
#include <cmath>
#include <string>

#include "kernels/cuda/attention.cuh"
#include "kernels/cuda/common.cuh"

namespace prism::cuda_ops {
using cuda_detail::Scratch;
using namespace prism::fused;

namespace {

// The shapes the kernels support.
void check_heads(int D, int Hd) {
    PRISM_CUDA_REQUIRE(Hd > 0 && D % Hd == 0, "attention: D must be a multiple of the head count");
    PRISM_CUDA_REQUIRE(D / Hd <= kMaxDh, "attention: head dim above 128 is not supported");
}

// Launches with the dynamic shared memory the kernel needs (above 48 KiB, at
// head dims near 128, it has to be allowed per kernel first).
template <class Params>
void launch(void (*kernel)(Params), dim3 grid, size_t smem, cudaStream_t stream, const Params& p) {
    if (grid.x == 0 || grid.y == 0 || grid.z == 0) return;
    if (smem > 48 * 1024)
        PRISM_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
    PRISM_LAUNCH(grid, kThreads, smem, stream, kernel)(p);
    PRISM_LAUNCH_CHECK();
}

unsigned tiles(int64_t n, int tile) {
    const int64_t t = (n + tile - 1) / tile;
    PRISM_CUDA_REQUIRE(t <= 65535, "attention: too many query or key tiles for one grid");
    return (unsigned)t;
}

// max_queries bounds any set's query count (the grid's query tiles).
void fused_forward(const FwdParams& p, int sets, int max_queries, cudaStream_t stream) {
    if (sets <= 0 || max_queries <= 0 || p.a.M <= 0) return;
    launch(fused_fwd_kernel, dim3(sets, p.a.Hd, tiles(max_queries, kQT)), fwd_smem(p.a.dh), stream, p);
}

// stat_rows: the rows of the δ scratch, indexed like lse (dense sets·nq; routed
// an upper bound on the gathered rows, whose count lives on the device).
void fused_backward(BwdParams p, int sets, int max_queries, int64_t stat_rows, cudaStream_t stream) {
    if (sets <= 0 || max_queries <= 0 || p.a.M <= 0) return;
    Scratch delta(sizeof(float) * (size_t)stat_rows * p.a.Hd, stream);
    p.delta = delta.as<float>();
    launch(fused_bwd_dq_kernel, dim3(sets, p.a.Hd, tiles(max_queries, kQT)), dq_smem(p.a.dh), stream, p);
    launch(fused_bwd_dkv_kernel, dim3(sets, p.a.Hd, tiles(p.a.M, kKT)), dkv_smem(p.a.dh), stream, p);
}

}  // namespace

// ---- dense: a set is an image ------------------------------------------------------
void attention_forward(float* out, float* lse, const float* qkv, int B, int L, int D, int Hd,
                       cudaStream_t stream) {
    check_heads(D, Hd);
    fused_forward(FwdParams{dense_attn(qkv, L, D, Hd), {out, (int64_t)L * D, D}, lse}, B, L, stream);
}

void attention_backward(float* dqkv, const float* dout, const float* qkv, const float* out,
                        const float* lse, int B, int L, int D, int Hd, cudaStream_t stream) {
    check_heads(D, Hd);
    const int64_t img = (int64_t)L * 3 * D;
    const BwdParams p{dense_attn(qkv, L, D, Hd),
                      {dout, (int64_t)L * D, D},
                      {out, (int64_t)L * D, D},
                      lse,
                      nullptr,
                      {dqkv, img, 3 * D},
                      {dqkv + D, img, 3 * D},
                      {dqkv + 2 * D, img, 3 * D}};
    fused_backward(p, B, L, (int64_t)B * L, stream);
}

// ---- routed: a set is group g = b*nS + s ------------------------------------------------
// A group holds at most one slot per token of its image: at most nS*N queries.
void routed_attention_forward(float* og, float* lse, const float* qg, const float* k,
                              const float* v, const int* offsets, int B, int nS, int N, int D,
                              int Hd, cudaStream_t stream) {
    check_heads(D, Hd);
    PRISM_CUDA_REQUIRE((int64_t)B * nS * N <= INT_MAX, "routed attention: B*nS*N must fit an int");
    fused_forward(FwdParams{routed_attn(qg, k, v, offsets, N, D, Hd), {og, 0, D}, lse}, B * nS, nS * N,
                  stream);
}

void routed_attention_backward(float* dqg, float* dk, float* dv, const float* dog,
                               const float* qg, const float* k, const float* v, const float* og,
                               const float* lse, const int* offsets, int B, int nS, int N, int slots,
                               int D, int Hd, cudaStream_t stream) {
    check_heads(D, Hd);
    PRISM_CUDA_REQUIRE(slots >= 1 && slots <= nS, "routed_attention_backward: need 1 <= slots (k) <= nS");
    const BwdParams p{routed_attn(qg, k, v, offsets, N, D, Hd),
                      {dog, 0, D},
                      {og, 0, D},
                      lse,
                      nullptr,
                      {dqg, 0, D},
                      {dk, (int64_t)N * D, D},
                      {dv, (int64_t)N * D, D}};
    // δ per gathered row: B·nS·N·slots of them; a group has up to nS·N.
    PRISM_CUDA_REQUIRE((int64_t)B * nS * N <= INT_MAX, "routed attention: B*nS*N must fit an int");
    fused_backward(p, B * nS, nS * N, (int64_t)B * nS * N * slots, stream);
}

// ---- CLS: a set is an image with one query ----------------------------------------------
namespace {
template <class E>
void cls_forward(E* out, int64_t out_image_stride, float* probs, const E* q, int64_t q_image_stride, const E* k,
                 const E* v, int B, int M, int D, int Hd, cudaStream_t stream) {
    check_heads(D, Hd);
    if (B <= 0 || M <= 0) return;
    const ClsFwdParams<E> p{cls_attn(q, q_image_stride, k, v, M, D, Hd), {out, out_image_stride, 0}, probs};
    launch(cls_fwd_kernel<E>, dim3(B, Hd), cls_smem(D / Hd), stream, p);
}

template <class E>
void cls_backward(float* dq, int64_t dq_image_stride, float* dk, float* dv, const float* dout,
                  int64_t dout_image_stride, const E* q, int64_t q_image_stride, const E* k, const E* v,
                  const float* probs, int B, int M, int D, int Hd, cudaStream_t stream) {
    check_heads(D, Hd);
    if (B <= 0 || M <= 0) return;
    Scratch ds(sizeof(float) * (size_t)B * Hd * M, stream);
    const ClsBwdParams<E> p{cls_attn(q, q_image_stride, k, v, M, D, Hd),
                            probs,
                            {dout, dout_image_stride, 0},
                            {dq, dq_image_stride, 0},
                            {dk, (int64_t)M * D, D},
                            {dv, (int64_t)M * D, D},
                            ds.as<float>()};
    launch(cls_bwd_kernel<E>, dim3(B, Hd), cls_smem(D / Hd), stream, p);
}
}  // namespace

void cls_attention_forward(float* out, int64_t out_image_stride, float* probs, const float* q,
                           int64_t q_image_stride, const float* k, const float* v, int B, int M,
                           int D, int Hd, cudaStream_t stream) {
    cls_forward(out, out_image_stride, probs, q, q_image_stride, k, v, B, M, D, Hd, stream);
}
void cls_attention_forward_bf16(uint16_t* out, int64_t out_image_stride, float* probs, const uint16_t* q,
                                int64_t q_image_stride, const uint16_t* k, const uint16_t* v, int B, int M, int D,
                                int Hd, cudaStream_t stream) {
    cls_forward(out, out_image_stride, probs, q, q_image_stride, k, v, B, M, D, Hd, stream);
}

void cls_attention_backward(float* dq, int64_t dq_image_stride, float* dk, float* dv,
                            const float* dout, int64_t dout_image_stride, const float* q,
                            int64_t q_image_stride, const float* k, const float* v,
                            const float* probs, int B, int M, int D, int Hd,
                            cudaStream_t stream) {
    cls_backward(dq, dq_image_stride, dk, dv, dout, dout_image_stride, q, q_image_stride, k, v, probs, B, M, D,
                 Hd, stream);
}
void cls_attention_backward_bf16(float* dq, int64_t dq_image_stride, float* dk, float* dv, const float* dout,
                                 int64_t dout_image_stride, const uint16_t* q, int64_t q_image_stride,
                                 const uint16_t* k, const uint16_t* v, const float* probs, int B, int M, int D,
                                 int Hd, cudaStream_t stream) {
    cls_backward(dq, dq_image_stride, dk, dv, dout, dout_image_stride, q, q_image_stride, k, v, probs, B, M, D,
                 Hd, stream);
}

}  // namespace prism::cuda_ops
