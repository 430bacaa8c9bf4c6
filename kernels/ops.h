// The op interface: every layer of the three architectures as a forward and a
// backward function over raw arrays. The model (engine/model.cpp) is written
// against these declarations only; kernels never see the model.
//
// Conventions
// - T is float (training) or double (gradient checks and the oracle test).
// - Activations are row-major: a sequence buffer is [B, L, D] with the CLS
//   token at row 0 of each image, then the patch tokens.
// - "Patch rows" of a sequence buffer are addressed with (ptr, image_stride):
//   row r of image b lives at ptr + b*image_stride + r*width.
// - Every backward ACCUMULATES (+=) into every gradient it produces, input
//   gradients included; the caller zeroes them. That makes residual streams
//   and tensors with several consumers (LN1's output feeds q, k, v and the
//   router) need no special casing.
// - Reductions run in a fixed order, so results are bit-identical run to run.
#pragma once
#include <cstddef>
#include <cstdint>

namespace prism::ops {

// ---- patch embedding -------------------------------------------------------
// The convolution with kernel = stride = P is a linear layer over patches, so
// patch embedding = patchify (here) + linear_forward with the conv weight seen
// as [D, C_in*P*P]. Images are float [B, C, H, W], already normalized.

// chvit/moevit: one row per (image, channel in S, patch): out [B, nS, N, P*P].
template <class T>
void patchify_channels(T* out, const float* images, int B, int C, int H, int W, int P,
                       const int* S, int nS);
// vit: one row per (image, patch) with all channels: out [B, N, C*P*P] in the
// conv weight's (c, py, px) order. Channels with keep[c] == 0 are zeroed and
// the rest scaled by `scale` (hierarchical channel sampling for vit).
template <class T>
void patchify_all(T* out, const float* images, int B, int C, int H, int W, int P,
                  const uint8_t* keep, T scale);

// ---- token assembly ----------------------------------------------------------
// seq [B, 1+nS*N, D]: row 0 = cls + pos[0]; row 1+s*N+n = patch[b,s,n] +
// pos[1+n] (+ chan[S[s]] when chan != nullptr; vit has nS == 1, no chan).
template <class T>
void embed_forward(T* seq, const T* patch, const T* cls, const T* pos, const T* chan,
                   const int* S, int B, int nS, int N, int D);
template <class T>
void embed_backward(T* dpatch, T* dcls, T* dpos, T* dchan, const T* dseq, const int* S,
                    int B, int nS, int N, int D);

// ---- layer norm (eps 1e-6), over the last dimension ---------------------------
template <class T>
void layernorm_forward(T* out, T* mean, T* rstd, const T* x, const T* w, const T* b,
                       int64_t rows, int D);
template <class T>
void layernorm_backward(T* dx, T* dw, T* db, const T* dout, const T* x, const T* w,
                        const T* mean, const T* rstd, int64_t rows, int D);
// The residual add and the LayerNorm after it in one pass over the rows:
//   sum = x + scale[b]·branch   (residual_forward, out of place),
//   out = LN(sum)                (layernorm_forward; mean, rstd of sum).
// Rows are [B, rows_per_image, D]. Backward is the two ops' backward: LN's
// into ∂sum, then residual_backward. Same arithmetic as the two ops in turn,
// so the results are bit-identical to them.
template <class T>
void residual_layernorm_forward(T* sum, T* out, T* mean, T* rstd, const T* x, const T* branch,
                                const T* scale, const T* w, const T* b, int B,
                                int64_t rows_per_image, int D);

// ---- linear: out = x·Wᵀ + b, W [out_dim, in_dim] ---------------------------------
template <class T>
void linear_forward(T* out, const T* x, const T* W, const T* b, int64_t rows, int in_dim,
                    int out_dim);
template <class T>  // dx, db may be nullptr
void linear_backward(T* dx, T* dW, T* db, const T* dout, const T* x, const T* W,
                     int64_t rows, int in_dim, int out_dim);

// Channel experts: the patch rows of channel S[s] in image b use W[S[s]], b[S[s]].
// x: patch rows (x, x_image_stride), nS*N rows per image, in_dim wide.
// out: [B, nS, N, out_dim] contiguous. W [C, out_dim, in_dim], bias [C, out_dim].
template <class T>
void expert_linear_forward(T* out, const T* x, int64_t x_image_stride, const T* W,
                           const T* bias, const int* S, int B, int nS, int N, int in_dim,
                           int out_dim);
template <class T>
void expert_linear_backward(T* dx, T* dW, T* dbias, const T* dout, const T* x,
                            int64_t x_image_stride, const T* W, const int* S, int B, int nS,
                            int N, int in_dim, int out_dim);

// ---- GELU (exact, erf) -----------------------------------------------------------
template <class T> void gelu_forward(T* out, const T* x, int64_t n);
template <class T> void gelu_backward(T* dx, const T* dout, const T* x, int64_t n);

// ---- residual with drop path ------------------------------------------------------
// out[b] = x[b] + scale[b] * branch[b] (scale == nullptr: 1); out may be x.
// scale is 0 for a dropped sample and 1/keep_prob otherwise.
template <class T>
void residual_forward(T* out, const T* x, const T* branch, const T* scale, int B,
                      int64_t per_image);
template <class T>
void residual_backward(T* dbranch, const T* dx, const T* scale, int B, int64_t per_image);

// ---- dense multi-head self-attention (vit, chvit) -------------------------------------
// qkv [B, L, 3D] (q | k | v, heads contiguous dh-wide inside each), out [B, L, D].
// Per image, head h and query i, over the image's L keys j:
//   s_ij = q_i·k_j/√dh,  lse_i = log Σ_j exp(s_ij),  out_i = Σ_j exp(s_ij − lse_i)·v_j.
// lse [B, Hd, L] (natural log) is what forward keeps for backward: the L×L
// probabilities are never stored. Backward recomputes them as exp(s − lse)
// and takes δ_i = Σ_d dO_id·out_id (= Σ_j P_ij·dP_ij), so it reads the
// forward's out as well.
template <class T>
void attention_forward(T* out, T* lse, const T* qkv, int B, int L, int D, int Hd);
template <class T>
void attention_backward(T* dqkv, const T* dout, const T* qkv, const T* out, const T* lse, int B,
                        int L, int D, int Hd);

// ---- MoE-ViT channel routing --------------------------------------------------------
// Patch tokens are numbered t = b*(nS*N) + r. The router logits z are patch rows
// (z, z_image_stride) of width C. in_S[c] != 0 marks the channels present.
// probs [T, C] (0 outside S); experts [T, k] hold positions s into S (so that
// S[experts] is the channel), sorted by descending probability, ties → lower
// channel; weights [T, k] the combine weights; lse [T] = logsumexp over S.
enum class Combine { softmax, renorm };
template <class T>
void router_forward(T* probs, int* experts, T* weights, T* lse, const T* z,
                    int64_t z_image_stride, const uint8_t* in_S, const int* S, int B, int nS,
                    int N, int C, int k, Combine combine);
// dprobs [T, C] holds gradients w.r.t. probs from the losses (may be nullptr);
// dweights [T, k] those w.r.t. the combine weights. Writes dz (+=).
template <class T>
void router_backward(T* dz, int64_t dz_image_stride, const T* probs, const int* experts,
                     const T* weights, const T* dweights, const T* dprobs, const int* S,
                     int B, int nS, int N, int C, int k, Combine combine);

// Load balance. kind: 0 = Switch (α·|S|·Σ f_c·P_c), 1 = importance (α·CV²).
// counts [nS] = token-slots routed to each position of S (from moe_dispatch).
// Returns the loss; adds its gradient times `grad_scale` to dprobs (unless null).
//
// Data parallel: the loss is that of the union of every rank's tokens. Each
// rank writes its aux_stats (stats [2*nS+1]: Σ_t p[t,S[s]], counts, tokens, in
// double), they are summed over ranks and passed as `all_ranks`; then the loss
// is the union's, and this rank's tokens get the union's gradient times
// (all tokens / this rank's tokens), as the ranks' gradients are averaged.
// all_ranks == nullptr: this rank's tokens alone.
enum class AuxLoss { none, switch_, importance };
template <class T>
void aux_stats(double* stats, const T* probs, const int* counts, const int* S, int64_t tokens,
               int nS, int C);
template <class T>
T aux_loss_forward_backward(T* dprobs, const T* probs, const int* counts, const int* S,
                            int64_t tokens, int nS, int C, int k_eff, AuxLoss kind, T coef,
                            T grad_scale, const double* all_ranks = nullptr);
// Router z-loss coef·mean_t lse². Returns it and adds grad·grad_scale to dz (unless null).
template <class T>
T z_loss_forward_backward(T* dz, int64_t dz_image_stride, const T* probs, const T* lse,
                          int B, int nS, int N, int C, T coef, T grad_scale);

// Dispatch: a stable counting sort of the T*k (token, slot) pairs by group
// g = b*nS + s. offsets [B*nS+1] is the exclusive scan of the group sizes; row
// i of the gathered buffer holds pair pair_of_row[i] = t*k + j; row_of_pair is
// its inverse. counts [nS] sums the groups over images (the f_c of Switch).
void moe_dispatch(int* offsets, int* pair_of_row, int* row_of_pair, int* counts,
                  const int* experts, int B, int nS, int N, int k);
// qg[i] = q[token of pair_of_row[i]]; q is patch rows (q, q_image_stride) of width D.
template <class T>
void moe_gather_forward(T* qg, const T* q, int64_t q_image_stride, const int* pair_of_row,
                        int B, int nS, int N, int k, int D);
// dq[t] += Σ_j dqg[row_of_pair[t*k+j]] in slot order.
template <class T>
void moe_gather_backward(T* dq, int64_t dq_image_stride, const T* dqg, const int* row_of_pair,
                         int B, int nS, int N, int k, int D);

// Routed cross-attention: the gathered queries of group g = (b, s) attend to
// the N keys/values of channel position s in image b. k, v [B, nS, N, D];
// og [T*k, D]; lse [T*k, Hd] per gathered row and head, with the meaning and
// the backward of dense attention's (no probabilities stored).
template <class T>
void routed_attention_forward(T* og, T* lse, const T* qg, const T* k, const T* v,
                              const int* offsets, int B, int nS, int N, int D, int Hd);
template <class T>
void routed_attention_backward(T* dqg, T* dk, T* dv, const T* dog, const T* qg, const T* k,
                               const T* v, const T* og, const T* lse, const int* offsets, int B,
                               int nS, int N, int D, int Hd);

// Combine: a[t] = Σ_j weights[t,j] · og[row_of_pair[t*k+j]], written to patch
// rows (a, a_image_stride).
template <class T>
void combine_forward(T* a, int64_t a_image_stride, const T* og, const T* weights,
                     const int* row_of_pair, int B, int nS, int N, int k, int D);
template <class T>
void combine_backward(T* dog, T* dweights, const T* da, int64_t da_image_stride, const T* og,
                      const T* weights, const int* row_of_pair, int B, int nS, int N, int k,
                      int D);

// CLS row: the CLS query of image b (row 0 of q, image stride q_image_stride)
// attends to all nS*N patch keys/values of image b (k, v [B, nS*N, D]); the
// result goes to row 0 of (out, out_image_stride). probs [B, Hd, nS*N] kept
// for backward: one query per image makes them a vector per (image, head), not
// a score matrix, so they are stored rather than recomputed.
template <class T>
void cls_attention_forward(T* out, int64_t out_image_stride, T* probs, const T* q,
                           int64_t q_image_stride, const T* k, const T* v, int B, int M, int D,
                           int Hd);
template <class T>
void cls_attention_backward(T* dq, int64_t dq_image_stride, T* dk, T* dv, const T* dout,
                            int64_t dout_image_stride, const T* q, int64_t q_image_stride,
                            const T* k, const T* v, const T* probs, int B, int M, int D,
                            int Hd);

// ---- head ---------------------------------------------------------------------------
// out[b] = x[b*stride .. +D]: the CLS rows of a sequence.
template <class T> void select_rows(T* out, const T* x, int64_t stride, int B, int D);
template <class T> void select_rows_backward(T* dx, const T* dout, int64_t stride, int B, int D);

// Mean softmax cross-entropy over B rows; probs [B, K] kept for backward.
// Returns the mean loss; `correct` (if not null) gets the number of argmax hits.
template <class T>
T cross_entropy_forward(T* probs, const T* logits, const int32_t* labels, int B, int K,
                        int* correct);
// dlogits += grad_scale * (probs - onehot) / B
template <class T>
void cross_entropy_backward(T* dlogits, const T* probs, const int32_t* labels, int B, int K,
                            T grad_scale);

// ---- optimizer ------------------------------------------------------------------------
// Σ x², accumulated in double in a fixed order.
template <class T> double sum_squares(const T* x, int64_t n);
template <class T> void scale_inplace(T* x, int64_t n, T s);
// Which elements of an update weight decay applies to: every one (decays
// null), or element i's if decays[(first + i) / tile] is nonzero: a byte per
// tile of the parameter block, where every tensor starts on a tile
// (Model::decay_tiles), so that one update covers tensors with and without.
struct DecayTiles {
    const uint8_t* decays = nullptr;
    int64_t first = 0;  // the block index of the update's element 0
    int64_t tile = 1;   // elements per tile
};
// AdamW step t (1-based) with decoupled weight decay: p -= lr*(m̂/(√v̂+eps) + wd*p),
// wd = weight_decay where `decay` says, else 0.
template <class T>
void adamw_update(T* param, const T* grad, T* m, T* v, int64_t n, double lr, double beta1,
                  double beta2, double eps, double weight_decay, const DecayTiles& decay, int64_t t);

// ---- input step: normalization and augmentation of a batch ---------------------------
// Stored pixels in the shard's encoding go in, the model's float input
// [B, C, H, W] comes out, in one pass. For image b and output pixel (c, y, x):
//   1. inside one of aug[b]'s dropout holes (rows hole_y[i] .. +hole_h, columns
//      hole_x[i] .. +hole_w): 0;
//   2. else (u, v) = where the dihedral transform takes (y, x) from:
//      out = fliplr^(d >> 2)(rot90^(d & 3)(crop)), rot90 counterclockwise as
//      numpy.rot90 (out[y][x] = in[x][W-1-y]); odd quarter turns need H == W;
//   3. the crop reads source pixel (u + dy, v + dx): 0 outside the image (the
//      padding), else (stored - mean[b*C + c]) * inv_std[b*C + c].
// 0 is the channel mean after normalization. aug == nullptr means no
// augmentation: pure normalization. Runs on the calling thread (the loader
// calls it from its reader threads). Returns the index of the first image
// with a non-finite output, or -1. kernels/cuda/input.cu is the device twin.
enum class Pixel : uint8_t { u8, u16, f16, f32 };
constexpr int kMaxHoles = 10;
struct InputAug {
    int dihedral = 0;            // 0..7
    int dy = 0, dx = 0;          // crop offset
    int holes = 0;               // 0..kMaxHoles
    int hole_h = 0, hole_w = 0;
    int hole_y[kMaxHoles] = {}, hole_x[kMaxHoles] = {};
};
size_t pixel_size(Pixel p);
int input_forward(float* out, const void* raw, Pixel pixel, int B, int C, int H, int W,
                  const float* mean, const float* inv_std, const InputAug* aug);

}  // namespace prism::ops
