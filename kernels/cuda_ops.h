// The CUDA op interface: kernels/ops.h op by op, on device pointers, float32
// activations (for the bf16 mode also bf16 variants of the linear layers, and
// bf16 outputs of LayerNorm and GELU). Same names, same argument order and
// meaning as the CPU ops, plus a cudaStream_t last; every kernel of an op is
// queued on that stream and nothing waits for it.
//
// Differences from kernels/ops.h, all so that nothing is copied to the host:
// - Every pointer is a device pointer, index arrays (S, in_S, keep, experts,
//   offsets, counts, labels) included.
// - An op whose CPU version returns a value (a loss, sum_squares) writes it to
//   a device scalar given as its first argument instead.
// - Scratch memory comes from the stream-ordered allocator (cudaMallocAsync).
//
// Conventions kept from kernels/ops.h: backward ops accumulate (+=) into every
// gradient, but where an op takes an overwrite flag for one (then it writes
// it, each element once: the gradient has no other contributor); every
// reduction runs in a fixed order, with no floating-point atomics, so two
// runs give bit-identical results on the same device.
// Errors (CUDA, cuBLAS, bad sizes) throw std::runtime_error naming file:line.
//
// A plain header: usable from .cpp files without the CUDA headers.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>

#include "kernels/ops.h"  // Combine, AuxLoss

typedef struct CUstream_st* cudaStream_t;  // as <driver_types.h> declares it

namespace prism::cuda {
int device_count();  // 0 when there is no driver or no device (kernels/cuda/device.cu)
std::string device_name(int index);

// Device memory and streams for the engine (kernels/cuda/device.cu). Failures
// throw UserError (device_free and stream_destroy, called from destructors,
// print instead); an allocation that does not fit names `what`, the bytes it
// wanted and the device's free bytes.
void* device_alloc(size_t bytes, const std::string& what);
void device_free(void* p);
cudaStream_t stream_create();
void stream_destroy(cudaStream_t s);
void stream_sync(cudaStream_t s);
// cudaMemcpyDefault: either side may be host or device memory. Queued on `s`;
// from/to pageable host memory it returns once the host side is consumed.
void copy_async(void* dst, const void* src, size_t bytes, cudaStream_t s);
void zero_async(void* p, size_t bytes, cudaStream_t s);
void fill_bytes_async(void* p, uint8_t byte, size_t bytes, cudaStream_t s);
// NVTX ranges (Nsight Systems shows them as the model's structure).
void range_push(const char* name);
void range_pop();
}  // namespace prism::cuda

namespace prism::cuda_ops {

using ops::AuxLoss;
using ops::Combine;

// False when the build found no cuBLAS (see the Makefile's CUBLAS_HOME): the
// linear ops (fp32 and bf16) then throw, everything else works.
bool has_cublas();
// Destroys the cuBLAS handles made on first use (one per device). Optional:
// for tools that check for leaks at exit.
void release_context();

// ---- the input step -------------------------------------------------------
// Device twin of ops::input_forward (kernels/cuda/input.cu). *bad_image
// (device int, may be null; the caller sets it to INT_MAX first) ends at the
// lowest image index whose output has a non-finite value.
void input_forward(float* out, const void* raw, ops::Pixel pixel, int B, int C, int H, int W, const float* mean,
                   const float* inv_std, const ops::InputAug* aug, int* bad_image, cudaStream_t stream);

// ---- patch embedding -------------------------------------------------------
void patchify_channels(float* out, const float* images, int B, int C, int H, int W, int P,
                       const int* S, int nS, cudaStream_t stream);
void patchify_all(float* out, const float* images, int B, int C, int H, int W, int P,
                  const uint8_t* keep, float scale, cudaStream_t stream);

// ---- token assembly ----------------------------------------------------------
void embed_forward(float* seq, const float* patch, const float* cls, const float* pos,
                   const float* chan, const int* S, int B, int nS, int N, int D,
                   cudaStream_t stream);
void embed_backward(float* dpatch, float* dcls, float* dpos, float* dchan, const float* dseq,
                    const int* S, int B, int nS, int N, int D, cudaStream_t stream);

// ---- layer norm (eps 1e-6) -----------------------------------------------------
// out (fp32) and/or out_bf16 (the bf16 mode's stored matrix input): either may be null.
void layernorm_forward(float* out, uint16_t* out_bf16, float* mean, float* rstd, const float* x,
                       const float* w, const float* b, int64_t rows, int D, cudaStream_t stream);
void layernorm_backward(float* dx, float* dw, float* db, const float* dout, const float* x,
                        const float* w, const float* mean, const float* rstd, int64_t rows,
                        int D, cudaStream_t stream);
// sum = x + scale[b]·branch, out = LN(sum): one warp per row, one read of x and branch.
void residual_layernorm_forward(float* sum, float* out, uint16_t* out_bf16, float* mean, float* rstd,
                                const float* x, const float* branch, const float* scale, const float* w,
                                const float* b, int B, int64_t rows_per_image, int D,
                                cudaStream_t stream);

// ---- linear: out = x·Wᵀ + b (cuBLAS, fp32, no TF32) ------------------------------
void linear_forward(float* out, const float* x, const float* W, const float* b, int64_t rows,
                    int in_dim, int out_dim, cudaStream_t stream);
// overwrite_dx: dx is written (= dout·W), not added into: it need not be zeroed.
void linear_backward(float* dx, bool overwrite_dx, float* dW, float* db, const float* dout, const float* x,
                     const float* W, int64_t rows, int in_dim, int out_dim, cudaStream_t stream);
void expert_linear_forward(float* out, const float* x, int64_t x_image_stride, const float* W,
                           const float* bias, const int* S, int B, int nS, int N, int in_dim,
                           int out_dim, cudaStream_t stream);
void expert_linear_backward(float* dx, float* dW, float* dbias, const float* dout,
                            const float* x, int64_t x_image_stride, const float* W,
                            const int* S, int B, int nS, int N, int in_dim, int out_dim,
                            cudaStream_t stream);

// ---- bf16 (the first step of the bf16 mode): bf16 values stored as uint16_t bits ----
// Round to nearest even / widen exactly.
void to_bf16(uint16_t* out, const float* x, int64_t n, cudaStream_t stream);
void from_bf16(float* out, const uint16_t* x, int64_t n, cudaStream_t stream);
// cuBLASLt, bf16 inputs, fp32 accumulation. out = bf16(x·Wᵀ + bf16(b)); b fp32, may be null.
void linear_forward_bf16(uint16_t* out, const uint16_t* x, const uint16_t* W, const float* b,
                         int64_t rows, int in_dim, int out_dim, cudaStream_t stream);
// dx (bf16, may be null) += dout·W, rounded once; dW (fp32) += doutᵀ·x; db (fp32, may
// be null) += the column sums of dout.
void linear_backward_bf16(uint16_t* dx, float* dW, float* db, const uint16_t* dout,
                          const uint16_t* x, const uint16_t* W, int64_t rows, int in_dim,
                          int out_dim, cudaStream_t stream);

// The model's bf16 mode (train.precision = bf16): the fp32 linear layer with
// x, W and (backward) dout rounded to bf16 for the product, fp32 accumulation
// and fp32 results; the bias and its gradient stay fp32. Same contract as
// linear_forward / linear_backward otherwise. x_bf16, when not null, is x as
// the model stores it in bf16 (then x is not read and may be null): the
// product reads it directly instead of rounding x. W_bf16 likewise: W's bf16
// copy, which the model rounds once per forward for every call of the step
// (null: W is rounded into scratch by each call).
void linear_forward_mixed(float* out, const float* x, const uint16_t* x_bf16, const float* W, const uint16_t* W_bf16,
                          const float* b, int64_t rows, int in_dim, int out_dim, cudaStream_t stream);
// The same product with its result stored in bf16 (the bf16 mode's qkv and
// fc1, which only bf16 products and GELU read): out_bf16 = bf16(x·Wᵀ + bf16(b)),
// the bias added in cuBLASLt's epilogue. b_bf16, when not null, is bf16(b)
// as the model keeps it (else each call rounds b).
void linear_forward_mixed_to_bf16(uint16_t* out_bf16, const float* x, const uint16_t* x_bf16, const float* W,
                                  const uint16_t* W_bf16, const float* b, const uint16_t* b_bf16, int64_t rows,
                                  int in_dim, int out_dim, cudaStream_t stream);
// dx_bf16: dx written in bf16 instead (overwrite_dx only; dx then null), the
// bf16 mode's stored gradient of GELU's output. dout_bf16: dout as the bf16
// mode stores it (then dout is not read, and the bias gradient sums it).
void linear_backward_mixed(float* dx, uint16_t* dx_bf16, bool overwrite_dx, float* dW, float* db, const float* dout,
                           const uint16_t* dout_bf16, const float* x, const uint16_t* x_bf16, const float* W,
                           const uint16_t* W_bf16, int64_t rows, int in_dim, int out_dim, cudaStream_t stream);
// The same for MoE-ViT's per-channel expert projections (expert_linear_*):
// x, the used experts' W[S[s]] and (backward) dout rounded to bf16 once per
// call into compact copies, the batched products on the tensor cores with
// fp32 accumulation; the weights' bias and its gradient are fp32. x_bf16 as
// above, with x's image stride; W_bf16 as above, all C experts (read at
// S[s], no copy). Forward writes out (fp32: + b) or out_bf16
// (the bf16 mode's stored k and v: bf16(x·Wᵀ + bf16(b)), the product added
// to the bias rounded to bf16 first), one of them.
void expert_linear_forward_mixed(float* out, uint16_t* out_bf16, const float* x, const uint16_t* x_bf16,
                                 int64_t x_image_stride, const float* W, const uint16_t* W_bf16, const float* bias,
                                 const int* S, int B, int nS, int N, int in_dim, int out_dim, cudaStream_t stream);
void expert_linear_backward_mixed(float* dx, float* dW, float* dbias, const float* dout, const float* x,
                                  const uint16_t* x_bf16, int64_t x_image_stride, const float* W,
                                  const uint16_t* W_bf16, const int* S, int B, int nS, int N, int in_dim,
                                  int out_dim, cudaStream_t stream);

// ---- GELU (exact, erf) and the residual with drop path ------------------------------
// out (fp32) and/or out_bf16: either may be null. x_bf16, when not null, is x
// as the bf16 mode stores it (then x is not read).
void gelu_forward(float* out, uint16_t* out_bf16, const float* x, const uint16_t* x_bf16, int64_t n,
                  cudaStream_t stream);
// overwrite_dx: dx is written, not added into.
// dx_bf16: dx written in bf16 instead (overwrite_dx only); dout_bf16 as x_bf16.
void gelu_backward(float* dx, uint16_t* dx_bf16, bool overwrite_dx, const float* dout, const uint16_t* dout_bf16,
                   const float* x, const uint16_t* x_bf16, int64_t n, cudaStream_t stream);
void residual_forward(float* out, const float* x, const float* branch, const float* scale, int B,
                      int64_t per_image, cudaStream_t stream);
void residual_backward(float* dbranch, const float* dx, const float* scale, int B,
                       int64_t per_image, cudaStream_t stream);

// ---- dense multi-head self-attention -------------------------------------------------------
// The contract of ops::attention_forward/backward (lse [B, Hd, L], no
// probabilities stored), as fused fp32 kernels (kernels/cuda/attention.cu):
// the scores never reach global memory. Head dim at most 128.
void attention_forward(float* out, float* lse, const float* qkv, int B, int L, int D, int Hd,
                       cudaStream_t stream);
void attention_backward(float* dqkv, const float* dout, const float* qkv, const float* out,
                        const float* lse, int B, int L, int D, int Hd, cudaStream_t stream);

// Fused ("flash") attention on tensor cores (kernels/cuda/flash_attention.cu):
// the same contract as attention_forward/backward, lse [B, Hd, L] (natural
// log, fp32) in the same layout, so either one's forward can feed the other's
// backward. q, k, v and dO enter the products as bf16 with fp32 accumulation
// (DESIGN.md §7: bf16 tolerance); softmax, lse and gradients are fp32. Head
// dim kFlashHeadDim only (else a clear error); out, dout and dqkv 16-byte
// aligned. Deterministic, no atomics; backward accumulates into dqkv, or
// with overwrite_dqkv writes it (each element has one writer: no memset needed).
// qkv_bf16, when not null, is qkv as the bf16 mode stores it (then qkv is not
// read and may be null): the kernels read it as it is instead of rounding qkv.
// Likewise the output: out (fp32) and/or out_bf16 in forward, and backward
// reads out_bf16 when not null (then out may be null).
constexpr int kFlashHeadDim = 64;
void flash_attention_forward(float* out, uint16_t* out_bf16, float* lse, const float* qkv, const uint16_t* qkv_bf16,
                             int B, int L, int D, int Hd, cudaStream_t stream);
void flash_attention_backward(float* dqkv, const float* dout, const float* qkv, const uint16_t* qkv_bf16,
                              const float* out, const uint16_t* out_bf16, const float* lse, int B, int L, int D,
                              int Hd, bool overwrite_dqkv, cudaStream_t stream);

// ---- MoE-ViT channel routing ------------------------------------------------------------
// router_forward needs 1 <= k <= nS.
void router_forward(float* probs, int* experts, float* weights, float* lse, const float* z,
                    int64_t z_image_stride, const uint8_t* in_S, const int* S, int B, int nS,
                    int N, int C, int k, Combine combine, cudaStream_t stream);
void router_backward(float* dz, int64_t dz_image_stride, const float* probs, const int* experts,
                     const float* weights, const float* dweights, const float* dprobs,
                     const int* S, int B, int nS, int N, int C, int k, Combine combine,
                     cudaStream_t stream);
// The load-balance statistics of ops::aux_stats, stats [2*nS+1] doubles on the
// device: Σ_t p[t, S[s]] accumulated in double in a fixed order (fixed chunks
// of tokens, then the chunks in order: the same bits in every run, and the
// CPU's token-order sum to within double rounding), the counts, the tokens.
void aux_stats(double* stats, const float* probs, const int* counts, const int* S, int64_t tokens,
               int nS, int C, cudaStream_t stream);
// loss: device scalar (the CPU op's return value); 0 for AuxLoss::none or coef == 0.
// all_ranks: device stats summed over the ranks (data parallel), or null for
// this process's tokens alone; the loss is computed from the statistics as
// the CPU op computes it.
void aux_loss_forward_backward(float* loss, float* dprobs, const float* probs, const int* counts,
                               const int* S, int64_t tokens, int nS, int C, int k_eff,
                               AuxLoss kind, float coef, float grad_scale, const double* all_ranks,
                               cudaStream_t stream);
void z_loss_forward_backward(float* loss, float* dz, int64_t dz_image_stride, const float* probs,
                             const float* lse, int B, int nS, int N, int C, float coef,
                             float grad_scale, cudaStream_t stream);
// The stable counting sort of ops::moe_dispatch, on the device: the same rows
// in the same order.
void moe_dispatch(int* offsets, int* pair_of_row, int* row_of_pair, int* counts,
                  const int* experts, int B, int nS, int N, int k, cudaStream_t stream);
// q and qg both fp32, or both bf16 (the bf16 mode's stored q: the other pair null).
void moe_gather_forward(float* qg, uint16_t* qg_bf16, const float* q, const uint16_t* q_bf16,
                        int64_t q_image_stride, const int* pair_of_row, int B, int nS, int N, int k, int D,
                        cudaStream_t stream);
void moe_gather_backward(float* dq, int64_t dq_image_stride, const float* dqg,
                         const int* row_of_pair, int B, int nS, int N, int k, int D,
                         cudaStream_t stream);
// Routed attention (ops::routed_attention_*: lse [rows, Hd], backward reads
// og), fused fp32 kernels like attention_forward's. A group's queries stream
// past its keys; groups without queries cost nothing. slots: each token's k
// (the backward's δ scratch holds B·nS·N·slots rows).
void routed_attention_forward(float* og, float* lse, const float* qg, const float* k,
                              const float* v, const int* offsets, int B, int nS, int N, int D,
                              int Hd, cudaStream_t stream);
void routed_attention_backward(float* dqg, float* dk, float* dv, const float* dog,
                               const float* qg, const float* k, const float* v, const float* og,
                               const float* lse, const int* offsets, int B, int nS, int N, int slots,
                               int D, int Hd, cudaStream_t stream);
// The flash versions of the two above (see flash_attention_forward), same
// contract and layouts (but overwrite_dqg: dqg's rows are written, not added
// into); every buffer 16-byte aligned; slots: each token's k,
// so that offsets[B·nS] ≤ B·nS·N·slots (more traps the device). A group's K
// and V stay in shared memory while its queries stream through (N ≤ 256;
// larger N streams key tiles). The kernels walk work lists made on the device
// from the offsets: groups without queries get no blocks, the largest pieces
// of work go first.
void flash_routed_attention_forward(float* og, float* lse, const float* qg, const float* k, const float* v,
                                    const int* offsets, int B, int nS, int N, int slots, int D, int Hd,
                                    cudaStream_t stream);
void flash_routed_attention_backward(float* dqg, float* dk, float* dv, const float* dog, const float* qg,
                                     const float* k, const float* v, const float* og, const float* lse,
                                     const int* offsets, int B, int nS, int N, int slots, int D, int Hd,
                                     bool overwrite_dqg, cudaStream_t stream);
// The same on the bf16 mode's stored operands: qg, k, v, og and dog in bf16,
// read as they are (the gradients fp32, added into).
void flash_routed_attention_forward_bf16(uint16_t* og, float* lse, const uint16_t* qg, const uint16_t* k,
                                         const uint16_t* v, const int* offsets, int B, int nS, int N, int slots, int D,
                                         int Hd, cudaStream_t stream);
void flash_routed_attention_backward_bf16(float* dqg, float* dk, float* dv, const uint16_t* dog,
                                          const uint16_t* qg, const uint16_t* k, const uint16_t* v,
                                          const uint16_t* og, const float* lse, const int* offsets, int B, int nS,
                                          int N, int slots, int D, int Hd, bool overwrite_dqg,
                                          cudaStream_t stream);
// og and a both fp32, or both bf16 (the bf16 mode's stored og and attention output).
void combine_forward(float* a, uint16_t* a_bf16, int64_t a_image_stride, const float* og, const uint16_t* og_bf16,
                     const float* weights, const int* row_of_pair, int B, int nS, int N, int k, int D,
                     cudaStream_t stream);
// og fp32 or (og_bf16) bf16. overwrite_dog: dog is written, not added into
// (each row has one writer); dog_bf16: written in bf16 instead (overwrite
// and og_bf16 only; dog then null). dweights is added into.
void combine_backward(float* dog, uint16_t* dog_bf16, bool overwrite_dog, float* dweights, const float* da,
                      int64_t da_image_stride, const float* og, const uint16_t* og_bf16, const float* weights,
                      const int* row_of_pair, int B, int nS, int N, int k, int D, cudaStream_t stream);
// The CLS row keeps its probabilities [B, Hd, M] (ops::cls_attention_*).
void cls_attention_forward(float* out, int64_t out_image_stride, float* probs, const float* q,
                           int64_t q_image_stride, const float* k, const float* v, int B, int M,
                           int D, int Hd, cudaStream_t stream);
void cls_attention_backward(float* dq, int64_t dq_image_stride, float* dk, float* dv,
                            const float* dout, int64_t dout_image_stride, const float* q,
                            int64_t q_image_stride, const float* k, const float* v,
                            const float* probs, int B, int M, int D, int Hd,
                            cudaStream_t stream);
// The same with q, k, v (and forward's out) stored in bf16 by the bf16 mode;
// the sums, the probabilities and the gradients fp32.
void cls_attention_forward_bf16(uint16_t* out, int64_t out_image_stride, float* probs, const uint16_t* q,
                                int64_t q_image_stride, const uint16_t* k, const uint16_t* v, int B, int M, int D,
                                int Hd, cudaStream_t stream);
void cls_attention_backward_bf16(float* dq, int64_t dq_image_stride, float* dk, float* dv, const float* dout,
                                 int64_t dout_image_stride, const uint16_t* q, int64_t q_image_stride,
                                 const uint16_t* k, const uint16_t* v, const float* probs, int B, int M, int D,
                                 int Hd, cudaStream_t stream);

// ---- head ---------------------------------------------------------------------------------
void select_rows(float* out, const float* x, int64_t stride, int B, int D, cudaStream_t stream);
void select_rows_backward(float* dx, const float* dout, int64_t stride, int B, int D,
                          cudaStream_t stream);
// loss: device scalar, the mean loss; correct (device, may be null): argmax hits.
void cross_entropy_forward(float* loss, float* probs, const float* logits, const int32_t* labels,
                           int B, int K, int* correct, cudaStream_t stream);
void cross_entropy_backward(float* dlogits, const float* probs, const int32_t* labels, int B,
                            int K, float grad_scale, cudaStream_t stream);

// ---- optimizer ------------------------------------------------------------------------------
// out: device scalar, Σ x² accumulated in double in a fixed order.
void sum_squares(double* out, const float* x, int64_t n, cudaStream_t stream);
void scale_inplace(float* x, int64_t n, float s, cudaStream_t stream);
void adamw_update(float* param, const float* grad, float* m, float* v, int64_t n, double lr,
                  double beta1, double beta2, double eps, double weight_decay, const ops::DecayTiles& decay,
                  int64_t t, cudaStream_t stream);

}  // namespace prism::cuda_ops
