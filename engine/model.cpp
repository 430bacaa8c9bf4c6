// ViT, channel-wise ViT and MoE-ViT, forward and backward, read top to bottom
// as DESIGN.md §1 writes them. Every line of math is an op of
// kernels/backend.h, run where ex_ says (CPU or CUDA).
#include "engine/model.h"
#include <algorithm>
#include <climits>
#include <cstdio>
#include <cstring>
#include "engine/common.h"
#include "engine/rng.h"
#include "kernels/backend.h"
#ifdef PRISM_CUDA
#include "kernels/cuda_util.h"
#endif

namespace prism {

namespace {
bool is_moe(const ModelConfig& c) { return c.arch == "moevit"; }
bool is_vit(const ModelConfig& c) { return c.arch == "vit"; }
int max_seq(const ModelConfig& c) { return 1 + (is_vit(c) ? 1 : c.channels) * c.num_patches(); }
// The same device and stream with every product in fp32.
op::Exec fp32(op::Exec ex) {
    ex.bf16_matmul = false;
    return ex;
}
op::AuxLoss aux_kind(const ModelConfig& c) {
    return c.aux == "switch" ? op::AuxLoss::switch_
         : c.aux == "importance" ? op::AuxLoss::importance : op::AuxLoss::none;
}
}  // namespace

std::vector<ParamInfo> param_layout(const ModelConfig& c) {
    const int64_t D = c.dim, C = c.channels, P = c.patch, N = c.num_patches(), H = c.hidden();
    std::vector<ParamInfo> out;
    auto add = [&](std::string name, std::vector<int64_t> shape) {
        ParamInfo p;
        p.numel = 1;
        for (int64_t s : shape) p.numel *= s;
        p.decay = shape.size() >= 2 && name.size() >= 5 && name.compare(name.size() - 5, 5, ".bias") != 0;
        p.name = std::move(name);
        p.shape = std::move(shape);
        p.offset = out.empty() ? 0 : align_param_offset(out.back().offset + out.back().numel);
        out.push_back(std::move(p));
    };
    add("patch_embed.weight", {D, is_vit(c) ? C : 1, P, P});
    add("patch_embed.bias", {D});
    add("cls_token", {1, 1, D});
    add("pos_embed", {1, 1 + N, D});
    if (!is_vit(c)) add("channel_embed", {C, D});
    for (int i = 0; i < c.depth; i++) {
        const std::string b = "blocks." + std::to_string(i) + ".";
        add(b + "norm1.weight", {D});
        add(b + "norm1.bias", {D});
        if (is_moe(c)) {
            add(b + "attn.router.weight", {C, D});
            add(b + "attn.router.bias", {C});
            add(b + "attn.q.weight", {D, D});
            add(b + "attn.q.bias", {D});
            add(b + "attn.k.weight", {C, D, D});
            add(b + "attn.k.bias", {C, D});
            add(b + "attn.v.weight", {C, D, D});
            add(b + "attn.v.bias", {C, D});
        } else {
            add(b + "attn.qkv.weight", {3 * D, D});
            add(b + "attn.qkv.bias", {3 * D});
        }
        add(b + "attn.proj.weight", {D, D});
        add(b + "attn.proj.bias", {D});
        add(b + "norm2.weight", {D});
        add(b + "norm2.bias", {D});
        add(b + "mlp.fc1.weight", {H, D});
        add(b + "mlp.fc1.bias", {H});
        add(b + "mlp.fc2.weight", {D, H});
        add(b + "mlp.fc2.bias", {D});
    }
    add("norm.weight", {D});
    add("norm.bias", {D});
    add("head.weight", {c.num_classes, D});
    add("head.bias", {c.num_classes});
    return out;
}

int64_t param_count(const std::vector<ParamInfo>& layout) {
    int64_t n = 0;
    for (const auto& p : layout) n += p.numel;
    return n;
}

int64_t param_block_elems(const std::vector<ParamInfo>& layout) {
    return layout.empty() ? 0 : align_param_offset(layout.back().offset + layout.back().numel);
}

template <class T>
static void bind_weights(Weights<T>& w, T* base, const std::vector<ParamInfo>& layout, int depth) {
    auto at = [&](const std::string& name) -> T* {
        for (const auto& p : layout)
            if (p.name == name) return base + p.offset;
        return nullptr;  // absent in this architecture
    };
    w.patch_w = at("patch_embed.weight");
    w.patch_b = at("patch_embed.bias");
    w.cls_token = at("cls_token");
    w.pos_embed = at("pos_embed");
    w.channel_embed = at("channel_embed");
    w.blocks.resize(depth);
    for (int i = 0; i < depth; i++) {
        const std::string b = "blocks." + std::to_string(i) + ".";
        auto& k = w.blocks[i];
        k.norm1_w = at(b + "norm1.weight");     k.norm1_b = at(b + "norm1.bias");
        k.qkv_w = at(b + "attn.qkv.weight");    k.qkv_b = at(b + "attn.qkv.bias");
        k.router_w = at(b + "attn.router.weight"); k.router_b = at(b + "attn.router.bias");
        k.q_w = at(b + "attn.q.weight");        k.q_b = at(b + "attn.q.bias");
        k.k_w = at(b + "attn.k.weight");        k.k_b = at(b + "attn.k.bias");
        k.v_w = at(b + "attn.v.weight");        k.v_b = at(b + "attn.v.bias");
        k.proj_w = at(b + "attn.proj.weight");  k.proj_b = at(b + "attn.proj.bias");
        k.norm2_w = at(b + "norm2.weight");     k.norm2_b = at(b + "norm2.bias");
        k.fc1_w = at(b + "mlp.fc1.weight");     k.fc1_b = at(b + "mlp.fc1.bias");
        k.fc2_w = at(b + "mlp.fc2.weight");     k.fc2_b = at(b + "mlp.fc2.bias");
    }
    w.norm_w = at("norm.weight");
    w.norm_b = at("norm.bias");
    w.head_w = at("head.weight");
    w.head_b = at("head.bias");
}

// What one block keeps from forward for backward. ln1, ln2, act and att_out
// are read by linear layers, qkv (q, k, v, qg, og: MoE attention) by
// attention, fc1 by GELU (op::MatrixIn: bf16 in the bf16 mode).
template <class T>
struct BlockActs {
    T *x_in;
    op::MatrixIn<T> ln1, ln2, act, qkv, fc1, att_out;
    T *ln1_mean, *ln1_rstd;
    T *att_lse;                                            // dense attention
    T *rprobs, *weights, *lse;                             // MoE attention
    op::MatrixIn<T> q, k, v, qg, og;
    T *route_lse, *cls_probs;
    int *experts, *offsets, *pair_of_row, *row_of_pair, *counts;
    double* aux_all;        // [2C+1] aux_stats summed over ranks (data-parallel training)
    bool aux_global;        // aux_all holds them for this forward
    T *x_mid, *ln2_mean, *ln2_rstd, *x_out;
    T *drop_attn, *drop_mlp;                               // per-image drop path scales
    bool dropping;
};

template <class T>
struct Activations {
    T *patches, *patch_tok, *seq;
    std::vector<BlockActs<T>> blocks;
    T *cls_rows, *lnf, *lnf_mean, *lnf_rstd, *logits, *ce_probs;
    Losses losses;
    // The batch uploaded (CUDA; on the CPU the ops read the caller's arrays),
    // the drop-path scales of every block [depth, 2, B], and the slots the
    // losses are written to: [ce, aux per block, z per block, scratch] and the hits.
    // images: the uploaded images, or (either device) the input step's.
    float* images;
    // Batch::stored, uploaded (CUDA; the CPU reads the caller's): up to 4
    // bytes a pixel (float32 shards), the per-image statistics and augmentation.
    void* stored;
    float *stored_mean, *stored_inv_std;
    ops::InputAug* stored_aug;
    int32_t* labels;
    int* S;
    uint8_t* in_S;
    T *drop_scales, *loss_slots;
    // The integers forward() reads back, one array so that one copy takes them:
    // the hits, the input step's verdict (the lowest non-finite image) and
    // every block's routing counts [depth, C].
    int *readback, *correct, *nonfinite_image, *counts;
    // Forward scratch, reused by every block: what only the next op reads
    // (the router's logits; a branch's output, which its residual add reads),
    // so that no block keeps it for backward.
    T *router_logits, *branch_out;
    // Backward scratch, reused by every block.
    T *dres, *dbranch, *datt, *dln, *dqkv, *dz, *drprobs, *dweights;
    // Read only by bf16 products (and GELU's backward, routed attention): bf16 in the bf16 mode
    op::MatrixIn<T> dfc1, dact, dog;
    T *dq, *dk, *dv, *dqg, *dcls, *dlnf, *dlogits, *dpatch;
};

template <class T>
Model<T>::Model(const ModelConfig& cfg, int batch_capacity, bool verbose, Device device, bool bf16)
    : cfg_(cfg), capacity_(batch_capacity), layout_(param_layout(cfg)) {
    if (device == Device::cuda) {
        if (!std::is_same_v<T, float>) throw UserError("the CUDA backend runs float32 models only");
#ifdef PRISM_CUDA
        ex_.cuda = true;
        ex_.stream = cuda::stream_create();
        // The ops' scratch comes from the stream-ordered pool; by default it
        // hands freed memory back to the driver at every synchronize (each
        // step has several), and the next step maps it again.
        cuda::keep_pool_memory();
#else
        throw UserError("this build has no CUDA backend");
#endif
    }
    bf16_storage_ = bf16 && std::is_same_v<T, float>;
    ex_.bf16_matmul = bf16_storage_ && ex_.cuda;
    param_elems_ = param_block_elems(layout_);
    // Where each block's parameters start (they are contiguous), and the head's.
    block_begin_.assign(cfg_.depth + 1, -1);
    for (const auto& p : layout_) {
        if (p.name == "norm.weight") block_begin_[cfg_.depth] = p.offset;
        for (int i = 0; i < cfg_.depth; i++)
            if (p.name == "blocks." + std::to_string(i) + ".norm1.weight") block_begin_[i] = p.offset;
    }
    for (int i = 0; i <= cfg_.depth; i++)
        PRISM_ASSERT(block_begin_[i] >= 0 && (i == 0 || block_begin_[i] > block_begin_[i - 1]));
    for (int pass = 0; pass < 2; pass++) {  // measure, then carve
        param_mem_ = param_arena_.take<T>(param_elems_);
        grad_mem_ = param_arena_.take<T>(param_elems_);
        if (ex_.bf16_matmul) param_bf16_ = param_arena_.take<uint16_t>(param_elems_);
        decay_tiles_ = param_arena_.take<uint8_t>(param_elems_ / kParamAlignElems);
        if (pass == 0) param_arena_.allocate(ex_.cuda);
    }
    std::vector<uint8_t> decays(size_t(param_elems_ / kParamAlignElems), 0);
    for (const auto& p : layout_) {
        const int64_t first = p.offset / kParamAlignElems;
        const int64_t end = align_param_offset(p.offset + p.numel) / kParamAlignElems;  // its padding's tile too
        for (int64_t t = first; t < end; t++) decays[size_t(t)] = p.decay;
    }
    op::upload(ex_, decay_tiles_, decays.data(), int64_t(decays.size()));
    bind_weights(w_, param_mem_, layout_, cfg_.depth);
    bind_weights(g_, grad_mem_, layout_, cfg_.depth);
    if (param_bf16_) bind_weights(w_bf16_, param_bf16_, layout_, cfg_.depth);
    else w_bf16_.blocks.resize(size_t(cfg_.depth));  // null pointers: the products round W themselves
    act_ = new Activations<T>();
    carve_activations();       // measure
    act_arena_.allocate(ex_.cuda);
    carve_activations();       // bind
    if (verbose)
        std::printf("arena %-22s %10s  (%lld parameters, %s each, with gradients%s; %s)\n"
                    "arena %-22s %10s  (batch capacity %d, sequence %d%s)\n",
                    param_arena_.name.c_str(), format_bytes(param_arena_.capacity).c_str(),
                    (long long)param_count(layout_), sizeof(T) == 4 ? "fp32" : "fp64",
                    param_bf16_ ? " and a bf16 copy" : "",
                    ex_.cuda ? "GPU memory" : "host memory",
                    act_arena_.name.c_str(), format_bytes(act_arena_.capacity).c_str(), capacity_,
                    max_seq(cfg_), bf16_storage_ ? "; the bf16 mode's matrices in bf16" : "");
}

template <class T>
Model<T>::~Model() {
    delete act_;
    act_arena_.release();
    param_arena_.release();
#ifdef PRISM_CUDA
    if (ex_.cuda) {
        cuda::stream_destroy(ex_.stream);
        cuda::release_pool_memory();  // the scratch it kept (keep_pool_memory)
    }
#endif
}

template <class T> void Model<T>::params_to_host(T* dst) const { op::download(ex_, dst, param_mem_, param_elems_); }
template <class T> void Model<T>::grads_to_host(T* dst) const { op::download(ex_, dst, grad_mem_, param_elems_); }
template <class T> void Model<T>::params_from_host(const T* src) {
    op::upload(ex_, param_mem_, src, param_elems_);
    op::sync(ex_);
}
template <class T> void Model<T>::grads_from_host(const T* src) {
    op::upload(ex_, grad_mem_, src, param_elems_);
    op::sync(ex_);
}

template <class T>
void Model<T>::carve_activations() {
    Arena& a = act_arena_;
    a.rewind();
    const int64_t B = capacity_, C = cfg_.channels, N = cfg_.num_patches(), D = cfg_.dim;
    const int64_t P = cfg_.patch, Hd = cfg_.heads, H = cfg_.hidden(), L = max_seq(cfg_);
    const int64_t k = cfg_.top_k, Tok = B * C * N, K = cfg_.num_classes;
    Activations<T>& x = *act_;
    const int64_t pixels = B * C * int64_t(cfg_.image) * cfg_.image;
    x.images = a.take<float>(pixels);
    x.stored = a.take<float>(ex_.cuda ? pixels : 0);
    x.stored_mean = a.take<float>(ex_.cuda ? B * C : 0);
    x.stored_inv_std = a.take<float>(ex_.cuda ? B * C : 0);
    x.stored_aug = a.take<ops::InputAug>(ex_.cuda ? B : 0);
    x.labels = a.take<int32_t>(ex_.cuda ? B : 0);
    x.S = a.take<int>(ex_.cuda ? C : 0);
    x.in_S = a.take<uint8_t>(ex_.cuda ? C : 0);
    x.drop_scales = a.take<T>(cfg_.depth * 2 * B);
    x.loss_slots = a.take<T>(2 + 2 * cfg_.depth);
    x.readback = a.take<int>(2 + cfg_.depth * C);
    x.correct = x.readback;
    x.nonfinite_image = x.readback + 1;
    x.counts = x.readback + 2;
    x.patches = a.take<T>(B * C * N * P * P);
    x.patch_tok = a.take<T>(B * (L - 1) * D);
    x.seq = a.take<T>(B * L * D);
    x.blocks.assign(cfg_.depth, BlockActs<T>{});
    // A matrix only products (and GELU) read: bf16 in the bf16 mode, else
    // fp32; both where something else reads it too (keep_full).
    auto matrix_in = [&](int64_t n, bool keep_full) {
        op::MatrixIn<T> m;
        if (!bf16_storage_ || keep_full) m.full = a.take<T>(n);
        if (bf16_storage_) m.bf16 = a.take<uint16_t>(n);
        return m;
    };
    // Attention's operands and output: bf16 where its products round them
    // anyway (the flash kernels' head dim).
    const bool attention_bf16 = op::attention_reads_bf16(bf16_storage_, int(D), int(Hd));
    auto attention_matrix = [&](int64_t n) {
        op::MatrixIn<T> m;
        if (attention_bf16) m.bf16 = a.take<uint16_t>(n);
        else m.full = a.take<T>(n);
        return m;
    };
    T* prev = x.seq;
    for (size_t i = 0; i < x.blocks.size(); i++) {
        auto& b = x.blocks[i];
        b.x_in = prev;
        b.counts = x.counts + i * C;  // (drop_attn, drop_mlp: set by forward, strided by its batch)
        b.ln1 = matrix_in(B * L * D, /*keep_full=*/is_moe(cfg_));  // the router reads it in fp32
        b.ln1_mean = a.take<T>(B * L);
        b.ln1_rstd = a.take<T>(B * L);
        if (is_moe(cfg_)) {
            b.rprobs = a.take<T>(Tok * C);
            b.experts = a.take<int>(Tok * k);
            b.weights = a.take<T>(Tok * k);
            b.lse = a.take<T>(Tok);
            b.q = attention_matrix(B * L * D);
            b.k = attention_matrix(Tok * D);
            b.v = attention_matrix(Tok * D);
            b.offsets = a.take<int>(B * C + 1);
            b.pair_of_row = a.take<int>(Tok * k);
            b.row_of_pair = a.take<int>(Tok * k);
            b.aux_all = a.take<double>(2 * C + 1);
            b.qg = attention_matrix(Tok * k * D);
            b.og = attention_matrix(Tok * k * D);
            b.route_lse = a.take<T>(Tok * k * Hd);
            b.cls_probs = a.take<T>(B * Hd * C * N);
            b.att_out = attention_matrix(B * L * D);  // written by the combine and the CLS row
        } else {
            b.qkv = attention_matrix(B * L * 3 * D);
            b.att_out = attention_matrix(B * L * D);  // read by the projection and attention's backward
            b.att_lse = a.take<T>(B * Hd * L);
        }
        b.x_mid = a.take<T>(B * L * D);
        b.ln2 = matrix_in(B * L * D, false);
        b.ln2_mean = a.take<T>(B * L);
        b.ln2_rstd = a.take<T>(B * L);
        b.fc1 = matrix_in(B * L * H, false);
        b.act = matrix_in(B * L * H, false);
        b.x_out = a.take<T>(B * L * D);
        prev = b.x_out;
    }
    x.router_logits = a.take<T>(is_moe(cfg_) ? B * L * C : 0);
    x.branch_out = a.take<T>(B * L * D);
    x.cls_rows = a.take<T>(B * D);
    x.lnf = a.take<T>(B * D);
    x.lnf_mean = a.take<T>(B);
    x.lnf_rstd = a.take<T>(B);
    x.logits = a.take<T>(B * K);
    x.ce_probs = a.take<T>(B * K);
    x.dres = a.take<T>(B * L * D);
    x.dbranch = a.take<T>(B * L * D);
    x.datt = a.take<T>(B * L * D);
    x.dln = a.take<T>(B * L * D);
    x.dfc1 = matrix_in(B * L * H, false);
    x.dact = matrix_in(B * L * H, false);
    if (is_moe(cfg_)) {
        x.dz = a.take<T>(B * L * C);
        x.drprobs = a.take<T>(Tok * C);
        x.dweights = a.take<T>(Tok * k);
        x.dq = a.take<T>(B * L * D);
        x.dk = a.take<T>(Tok * D);
        x.dv = a.take<T>(Tok * D);
        x.dqg = a.take<T>(Tok * k * D);
        x.dog = attention_matrix(Tok * k * D);
    } else {
        x.dqkv = a.take<T>(B * L * 3 * D);
    }
    x.dcls = a.take<T>(B * D);
    x.dlnf = a.take<T>(B * D);
    x.dlogits = a.take<T>(B * K);
    x.dpatch = a.take<T>(B * (L - 1) * D);
}

template <class T>
void Model<T>::init_weights(uint64_t seed) {
    Rng rng(seed, kInitStream);
    std::vector<T> host(param_elems_);  // the padding between tensors zero
    for (const auto& p : layout_) {
        T* w = host.data() + p.offset;
        const bool is_bias = p.name.size() >= 4 && p.name.compare(p.name.size() - 4, 4, "bias") == 0;
        const bool is_norm = p.name.find("norm") != std::string::npos;
        for (int64_t i = 0; i < p.numel; i++) {
            if (is_norm) w[i] = is_bias ? T(0) : T(1);              // LayerNorm: identity
            else if (is_bias) w[i] = T(0);
            else if (p.name == "cls_token") w[i] = T(rng.normal() * 1e-6);  // timm
            else if (p.name == "channel_embed") w[i] = T(rng.trunc_normal(cfg_.channel_embed_std));
            else w[i] = T(rng.trunc_normal(0.02));                  // weights, pos_embed
        }
    }
    params_from_host(host.data());
}

template <class T>
const T* Model<T>::logits() const {
    // Read back on first use: a training step never asks for them.
    if (logits_stale_) {
        logits_host_.resize(size_t(B_) * cfg_.num_classes);
        op::download(ex_, logits_host_.data(), act_->logits, int64_t(logits_host_.size()));
        logits_stale_ = false;
    }
    return logits_host_.data();
}

template <class T>
std::vector<std::vector<int>> Model<T>::routing_counts() const {
    std::vector<std::vector<int>> out;
    if (!is_moe(cfg_)) return out;
    for (const auto& b : act_->blocks) {
        std::vector<int> per_channel(cfg_.channels, 0);
        const int* counts = counts_host_.data() + (&b - act_->blocks.data()) * cfg_.channels;
        for (int s = 0; s < nS_; s++) per_channel[S_[s]] = counts[s];
        out.push_back(per_channel);
    }
    return out;
}

template <class T>
std::vector<int> Model<T>::routing_counts_per_image(int block) const {
    std::vector<int> out;
    if (!is_moe(cfg_)) return out;
    const int C = cfg_.channels, k = std::min(cfg_.top_k, nS_);
    const int64_t slots = int64_t(nS_) * cfg_.num_patches() * k;  // per image
    std::vector<int> experts(size_t(B_) * slots);                // [B, nS·N, k]: positions in S
    op::download(ex_, experts.data(), act_->blocks[block].experts, int64_t(experts.size()));
    out.assign(size_t(B_) * C, 0);
    for (int b = 0; b < B_; b++)
        for (int64_t j = 0; j < slots; j++) out[size_t(b) * C + S_[experts[b * slots + j]]]++;
    return out;
}

// ---------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------

template <class T>
Losses Model<T>::forward(const Batch& batch, bool training, uint64_t drop_seed) {
    PRISM_ASSERT(batch.size >= 1 && batch.size <= capacity_);
    PRISM_ASSERT(!batch.channels.empty());
    const int C = cfg_.channels, P = cfg_.patch, N = cfg_.num_patches(), D = cfg_.dim;
    B_ = batch.size;
    S_ = batch.channels;
    nS_ = int(S_.size());
    in_S_.assign(C, 0);
    for (int c : S_) in_S_[c] = 1;
    training_ = training;
    Activations<T>& x = *act_;
    op::Range range(ex_, training ? "forward" : "forward (eval)");
    // The bf16 mode's copy of the weights that this step's products read,
    // forward and backward: rounded once here, since the parameters change
    // between forwards (AdamW, a loaded checkpoint) and nowhere else.
    if constexpr (std::is_same_v<T, float>)
        if (param_bf16_) op::round_to_bf16(ex_, param_bf16_, param_mem_, param_elems_);
    PRISM_ASSERT(!batch.images != !batch.stored.pixels);
    const int64_t pixels = int64_t(B_) * C * cfg_.image * cfg_.image;
    images_ = batch.images;
    if (batch.stored.pixels) {
        Batch::Stored in = batch.stored;
        if (ex_.cuda) {
            op::upload(ex_, (uint8_t*)x.stored, (const uint8_t*)in.pixels, pixels * int64_t(ops::pixel_size(in.pixel)));
            op::upload(ex_, x.stored_mean, in.mean, int64_t(B_) * C);
            op::upload(ex_, x.stored_inv_std, in.inv_std, int64_t(B_) * C);
            if (in.aug) op::upload(ex_, x.stored_aug, in.aug, B_);
            in = {x.stored, in.pixel, x.stored_mean, x.stored_inv_std, in.aug ? x.stored_aug : nullptr};
        }
        const int none = INT_MAX;
        op::upload(ex_, x.nonfinite_image, &none, 1);
        op::input_forward(ex_, x.images, in.pixels, in.pixel, B_, C, cfg_.image, cfg_.image, in.mean, in.inv_std,
                          in.aug, x.nonfinite_image);
        images_ = x.images;
    } else if (ex_.cuda) {
        op::upload(ex_, x.images, batch.images, pixels);
        images_ = x.images;
    }
    if (ex_.cuda) {
        op::upload(ex_, x.S, S_.data(), nS_);
        op::upload(ex_, x.in_S, in_S_.data(), C);
        if (batch.labels) op::upload(ex_, x.labels, batch.labels, B_);
        labels_ = batch.labels ? x.labels : nullptr;
        S_at_ = x.S;
        in_S_at_ = x.in_S;
    } else {
        labels_ = batch.labels;
        S_at_ = S_.data();
        in_S_at_ = in_S_.data();
    }

    // Patch embedding: a shared linear map of each P×P patch (a stride-P conv).
    if (is_vit(cfg_)) {
        // vit sees all channels at once; under HCS the missing ones are zeroed
        // and the rest scaled by C/|S| so the input's scale is unchanged.
        op::patchify_all(ex_, x.patches, images_, B_, C, cfg_.image, cfg_.image, P, in_S_at_,
                         T(C) / T(nS_));
        op::linear_forward(ex_, x.patch_tok, x.patches, {w_.patch_w, w_bf16_.patch_w}, w_.patch_b,
                           int64_t(B_) * N, C * P * P, D);
        op::embed_forward(ex_, x.seq, x.patch_tok, w_.cls_token, w_.pos_embed, (const T*)nullptr,
                          S_at_, B_, 1, N, D);
    } else {
        // chvit/moevit: token (c, n) = conv(x[c])[n] + pos[1+n] + channel_embed[c]
        op::patchify_channels(ex_, x.patches, images_, B_, C, cfg_.image, cfg_.image, P, S_at_, nS_);
        op::linear_forward(ex_, x.patch_tok, x.patches, {w_.patch_w, w_bf16_.patch_w}, w_.patch_b,
                           int64_t(B_) * nS_ * N, P * P, D);
        op::embed_forward(ex_, x.seq, x.patch_tok, w_.cls_token, w_.pos_embed, w_.channel_embed,
                          S_at_, B_, nS_, N, D);
    }

    // Stochastic depth: rate grows linearly over depth; a dropped sample's
    // branch is skipped, a kept one is scaled by 1/keep. Each draw is keyed by
    // (block, branch, image's index in the global batch), so a rank holding a
    // slice of the batch draws what a single process would for those images.
    // Drawn on the host for every block, then uploaded at once.
    std::vector<T> scales(size_t(cfg_.depth) * 2 * B_, T(1));
    bool any_dropping = false;
    for (int i = 0; i < cfg_.depth; i++) {
        auto& b = x.blocks[i];
        const double rate = cfg_.depth > 1 ? cfg_.drop_path * i / (cfg_.depth - 1) : cfg_.drop_path;
        b.dropping = training && rate > 0;
        b.drop_attn = x.drop_scales + (2 * i) * B_;
        b.drop_mlp = x.drop_scales + (2 * i + 1) * B_;
        if (!b.dropping) continue;
        any_dropping = true;
        for (int branch = 0; branch < 2; branch++)
            for (int s = 0; s < B_; s++) {
                Rng draw(drop_seed, uint64_t(2 * i + branch), uint64_t(batch.first_image + s));
                scales[(2 * i + branch) * B_ + s] = draw.uniform() < rate ? T(0) : T(1.0 / (1.0 - rate));
            }
    }
    if (any_dropping) op::upload(ex_, x.drop_scales, scales.data(), int64_t(scales.size()));

    // Blocks without a router leave their aux and z slots at zero.
    op::zero(ex_, x.loss_slots, 1 + 2 * cfg_.depth);
    for (int i = 0; i < cfg_.depth; i++) block_forward(i, training);

    // Head: final LayerNorm and the classifier on the CLS token.
    const int64_t L = 1 + int64_t(is_vit(cfg_) ? 1 : nS_) * N;
    const T* x_last = cfg_.depth ? x.blocks.back().x_out : x.seq;
    op::select_rows(ex_, x.cls_rows, x_last, L * D, B_, D);
    op::layernorm_forward(ex_, x.lnf, x.lnf_mean, x.lnf_rstd, x.cls_rows, w_.norm_w, w_.norm_b, B_, D);
    op::linear_forward(ex_, x.logits, x.lnf, {w_.head_w, w_bf16_.head_w}, w_.head_b, B_, D, cfg_.num_classes);
    if (labels_)
        op::cross_entropy_forward(ex_, x.loss_slots, x.ce_probs, x.logits, labels_, B_,
                                  cfg_.num_classes, x.correct);

    // Read back what every step needs: the losses, the hits, the input
    // step's verdict and the routing counts (the logits only when asked for:
    // logits()).
    logits_stale_ = true;
    std::vector<T> slots(1 + 2 * cfg_.depth);
    op::download(ex_, slots.data(), x.loss_slots, int64_t(slots.size()));
    std::vector<int> ints(2 + (is_moe(cfg_) ? size_t(cfg_.depth) * C : 0));
    op::download(ex_, ints.data(), x.readback, int64_t(ints.size()));
    counts_host_.assign(ints.begin() + 2, ints.end());
    Losses losses;
    if (labels_) {
        losses.ce = double(slots[0]);
        losses.correct = ints[0];
    }
    for (int i = 0; i < cfg_.depth; i++) {
        losses.aux += double(slots[1 + i]) / cfg_.depth;
        losses.z += double(slots[1 + cfg_.depth + i]) / cfg_.depth;
    }
    losses.total = losses.ce + losses.aux + losses.z;
    if (batch.stored.pixels && ints[1] != INT_MAX) losses.nonfinite_image = ints[1];
    x.losses = losses;
    return losses;
}

template <class T>
void Model<T>::block_forward(int i, bool training) {
    const int64_t N = cfg_.num_patches(), D = cfg_.dim, Hd = cfg_.heads, H = cfg_.hidden();
    const int64_t C = cfg_.channels;
    const int64_t L = 1 + int64_t(is_vit(cfg_) ? 1 : nS_) * N, rows = B_ * L;
    const auto& w = w_.blocks[i];
    const auto& wb = w_bf16_.blocks[i];
    auto& b = act_->blocks[i];
    T* aux_slot = act_->loss_slots + 1 + i;
    T* z_slot = act_->loss_slots + 1 + cfg_.depth + i;
    op::Range range(ex_, "block");

    // y = LN1(x)
    op::layernorm_forward(ex_, b.ln1, b.ln1_mean, b.ln1_rstd, b.x_in, w.norm1_w, w.norm1_b, rows, int(D));

    if (!is_moe(cfg_)) {
        // Dense multi-head attention over the whole sequence.
        op::linear_forward(ex_, b.qkv, b.ln1, {w.qkv_w, wb.qkv_w}, w.qkv_b, rows, int(D), int(3 * D), wb.qkv_b);
        op::attention_forward(ex_, b.att_out, b.att_lse, b.qkv, B_, int(L), int(D), int(Hd));
    } else {
        // Channel-MoE attention. Patch rows of a [B, L, ·] buffer start at row 1.
        const int k = std::min(cfg_.top_k, nS_);
        const int64_t tokens = int64_t(B_) * nS_ * N;
        const auto combine = cfg_.combine == "renorm" ? op::Combine::renorm : op::Combine::softmax;
        // Router: z = y·W_rᵀ + b_r; p = softmax over S; E(t) = top-k; R = combine weights.
        // The router's product stays fp32 in the bf16 mode: a rounding must not
        // flip which channels a token attends to.
        T* z = act_->router_logits;
        op::linear_forward(fp32(ex_), z, b.ln1.full, w.router_w, w.router_b, rows, int(D), int(C));
        op::router_forward(ex_, b.rprobs, b.experts, b.weights, b.lse, z + C, L * C, in_S_at_,
                           S_at_, B_, nS_, int(N), int(C), k, combine);
        // Dispatch: sort the (token, slot) pairs into (image, channel) groups.
        op::moe_dispatch(ex_, b.offsets, b.pair_of_row, b.row_of_pair, b.counts, b.experts, B_, nS_,
                         int(N), k);
        // q shared by all tokens; k, v from each channel's own expert.
        op::linear_forward(ex_, b.q, b.ln1, {w.q_w, wb.q_w}, w.q_b, rows, int(D), int(D), wb.q_b);
        op::expert_linear_forward(ex_, b.k, b.ln1.at(D), L * D, {w.k_w, wb.k_w}, w.k_b, S_at_, B_, nS_, int(N),
                                  int(D), int(D));
        op::expert_linear_forward(ex_, b.v, b.ln1.at(D), L * D, {w.v_w, wb.v_w}, w.v_b, S_at_, B_, nS_, int(N),
                                  int(D), int(D));
        // a[t] = Σ_{c∈E(t)} R[t,c]·MHA(q[t], K_{b,c}, V_{b,c})
        op::moe_gather_forward(ex_, b.qg, b.q.at(D), L * D, b.pair_of_row, B_, nS_, int(N), k, int(D));
        op::routed_attention_forward(ex_, b.og, b.route_lse, b.qg, b.k, b.v, b.offsets, B_, nS_,
                                     int(N), k, int(D), int(Hd));
        op::combine_forward(ex_, b.att_out.at(D), L * D, b.og, b.weights, b.row_of_pair, B_, nS_, int(N), k,
                            int(D));
        // The CLS row attends densely to every patch key of its image.
        op::cls_attention_forward(ex_, b.att_out, L * D, b.cls_probs, b.q, L * D, b.k, b.v, B_,
                                  int(nS_ * N), int(D), int(Hd));
        // Load-balance and z losses (their gradients are taken in backward).
        // Under data parallelism the balance is that of the global batch.
        b.aux_global = training_ && reduce_over_ranks_;
        if (b.aux_global) {
            op::aux_stats(ex_, b.aux_all, b.rprobs, b.counts, S_at_, tokens, nS_, int(C));
            reduce_over_ranks_(b.aux_all, 2 * int64_t(nS_) + 1);
        }
        op::aux_loss_forward_backward<T>(ex_, aux_slot, nullptr, b.rprobs, b.counts, S_at_, tokens, nS_,
                                         int(C), k, aux_kind(cfg_), T(cfg_.aux_coef), T(0),
                                         b.aux_global ? b.aux_all : nullptr);
        op::z_loss_forward_backward<T>(ex_, z_slot, nullptr, 0, b.rprobs, b.lse, B_, nS_, int(N),
                                       int(C), T(cfg_.z_loss_coef), T(0));
    }
    // x_mid = x + drop_path(attn_out·W_oᵀ + b_o)
    // and LN2(x_mid) in the same pass over the rows
    // (a branch's output is read by its residual add alone: one buffer for every block)
    T* branch = act_->branch_out;
    op::linear_forward(ex_, branch, b.att_out, {w.proj_w, wb.proj_w}, w.proj_b, rows, int(D), int(D));
    op::residual_layernorm_forward(ex_, b.x_mid, b.ln2, b.ln2_mean, b.ln2_rstd, b.x_in, branch,
                                   b.dropping ? b.drop_attn : nullptr, w.norm2_w, w.norm2_b, B_, L,
                                   int(D));
    // x_out = x_mid + drop_path(MLP(LN2(x_mid)))
    op::linear_forward(ex_, b.fc1, b.ln2, {w.fc1_w, wb.fc1_w}, w.fc1_b, rows, int(D), int(H), wb.fc1_b);
    op::gelu_forward(ex_, b.act, b.fc1, rows * H);
    op::linear_forward(ex_, branch, b.act, {w.fc2_w, wb.fc2_w}, w.fc2_b, rows, int(H), int(D));
    op::residual_forward(ex_, b.x_out, b.x_mid, branch, b.dropping ? b.drop_mlp : nullptr, B_, L * D);
}

// ---------------------------------------------------------------------------
// Backward: the same steps in reverse. Every op accumulates, so each
// gradient buffer is zeroed right before the ops that fill it, but for those
// with a single writer, which writes it (op::overwrite).
// ---------------------------------------------------------------------------

template <class T>
void Model<T>::backward() {
    PRISM_ASSERT(labels_ != nullptr);
    const int C = cfg_.channels, P = cfg_.patch, N = cfg_.num_patches(), D = cfg_.dim;
    const int K = cfg_.num_classes;
    const int64_t L = 1 + int64_t(is_vit(cfg_) ? 1 : nS_) * N;
    Activations<T>& x = *act_;
    op::Range range(ex_, "backward");
    op::zero(ex_, grad_mem_, param_elems_);

    op::zero(ex_, x.dlogits, int64_t(B_) * K);
    op::cross_entropy_backward(ex_, x.dlogits, x.ce_probs, labels_, B_, K, T(1));
    op::linear_backward(ex_, op::overwrite(x.dlnf), g_.head_w, g_.head_b, x.dlogits, x.lnf,
                        {w_.head_w, w_bf16_.head_w}, B_, D, K);
    op::zero(ex_, x.dcls, int64_t(B_) * D);
    op::layernorm_backward(ex_, x.dcls, g_.norm_w, g_.norm_b, x.dlnf, x.cls_rows, w_.norm_w,
                           x.lnf_mean, x.lnf_rstd, B_, D);
    op::zero(ex_, x.dres, B_ * L * D);
    op::select_rows_backward(ex_, x.dres, x.dcls, L * D, B_, D);
    grads_ready(block_begin_[cfg_.depth], param_elems_);  // head and final norm

    for (int i = cfg_.depth - 1; i >= 0; i--) {
        block_backward(i);
        grads_ready(block_begin_[i], block_begin_[i + 1]);
    }

    const int64_t patch_rows = int64_t(B_) * (L - 1);
    op::zero(ex_, x.dpatch, patch_rows * D);
    if (is_vit(cfg_)) {
        op::embed_backward(ex_, x.dpatch, g_.cls_token, g_.pos_embed, (T*)nullptr, x.dres, S_at_,
                           B_, 1, N, D);
        op::linear_backward(ex_, (T*)nullptr, g_.patch_w, g_.patch_b, x.dpatch, x.patches,
                            {w_.patch_w, w_bf16_.patch_w}, patch_rows, C * P * P, D);
    } else {
        op::embed_backward(ex_, x.dpatch, g_.cls_token, g_.pos_embed, g_.channel_embed, x.dres,
                           S_at_, B_, nS_, N, D);
        op::linear_backward(ex_, (T*)nullptr, g_.patch_w, g_.patch_b, x.dpatch, x.patches,
                            {w_.patch_w, w_bf16_.patch_w}, patch_rows, P * P, D);
    }
    grads_ready(0, block_begin_[0]);  // patch embedding, cls token, position and channel embeddings
}

template <class T>
void Model<T>::block_backward(int i) {
    const int64_t N = cfg_.num_patches(), D = cfg_.dim, Hd = cfg_.heads, H = cfg_.hidden();
    const int64_t C = cfg_.channels;
    const int64_t L = 1 + int64_t(is_vit(cfg_) ? 1 : nS_) * N, rows = B_ * L;
    const auto& w = w_.blocks[i];
    const auto& wb = w_bf16_.blocks[i];
    auto& g = g_.blocks[i];
    auto& b = act_->blocks[i];
    Activations<T>& x = *act_;
    op::Range range(ex_, "block backward");
    // x.dres holds ∂loss/∂x_out on entry and ∂loss/∂x_in on exit.

    // ∂branch = drop-path scale · ∂x_out: without drop path, ∂x_out itself
    // (read by the branch's first product before LN's backward adds to it).
    auto branch_grad = [&](const T* scale) -> const T* {
        if (!b.dropping) return x.dres;
        op::zero(ex_, x.dbranch, rows * D);
        op::residual_backward(ex_, x.dbranch, x.dres, scale, B_, L * D);
        return x.dbranch;
    };

    // MLP branch (a gradient with one writer is written by it: op::overwrite)
    const T* dmlp = branch_grad(b.drop_mlp);
    op::linear_backward(ex_, op::overwrite(x.dact), g.fc2_w, g.fc2_b, dmlp, b.act, {w.fc2_w, wb.fc2_w}, rows, int(H),
                        int(D));
    op::gelu_backward(ex_, op::overwrite(x.dfc1), x.dact, b.fc1, rows * H);
    op::linear_backward(ex_, op::overwrite(x.dln), g.fc1_w, g.fc1_b, x.dfc1, b.ln2, {w.fc1_w, wb.fc1_w}, rows, int(D),
                        int(H));
    op::layernorm_backward(ex_, x.dres, g.norm2_w, g.norm2_b, x.dln, b.x_mid, w.norm2_w, b.ln2_mean,
                           b.ln2_rstd, rows, int(D));

    // Attention branch
    const T* dattn = branch_grad(b.drop_attn);
    op::linear_backward(ex_, op::overwrite(x.datt), g.proj_w, g.proj_b, dattn, b.att_out, {w.proj_w, wb.proj_w},
                        rows, int(D), int(D));
    if (!is_moe(cfg_)) {
        op::attention_backward(ex_, op::overwrite(x.dqkv), x.datt, b.qkv, b.att_out, b.att_lse, B_, int(L), int(D),
                               int(Hd));
        op::linear_backward(ex_, op::overwrite(x.dln), g.qkv_w, g.qkv_b, x.dqkv, b.ln1, {w.qkv_w, wb.qkv_w}, rows,
                            int(D), int(3 * D));
    } else {
        // LN1's output feeds q, k, v and the router: their input gradients add up in dln.
        op::zero(ex_, x.dln, rows * D);
        const int k = std::min(cfg_.top_k, nS_);
        const int64_t tokens = int64_t(B_) * nS_ * N;
        const auto combine = cfg_.combine == "renorm" ? op::Combine::renorm : op::Combine::softmax;
        op::zero(ex_, x.dq, rows * D);
        op::zero(ex_, x.dk, tokens * D);
        op::zero(ex_, x.dv, tokens * D);
        op::zero(ex_, x.dweights, tokens * k);
        op::zero(ex_, x.drprobs, tokens * C);
        op::zero(ex_, x.dz, rows * C);
        op::cls_attention_backward(ex_, x.dq, L * D, x.dk, x.dv, x.datt, L * D, b.q, L * D, b.k, b.v,
                                   b.cls_probs, B_, int(nS_ * N), int(D), int(Hd));
        op::combine_backward(ex_, op::overwrite(x.dog), x.dweights, x.datt + D, L * D, b.og, b.weights,
                             b.row_of_pair, B_, nS_, int(N), k, int(D));
        op::routed_attention_backward(ex_, op::overwrite(x.dqg), x.dk, x.dv, x.dog, b.qg, b.k, b.v, b.og,
                                      b.route_lse, b.offsets, B_, nS_, int(N), k, int(D), int(Hd));
        op::moe_gather_backward(ex_, x.dq + D, L * D, x.dqg, b.row_of_pair, B_, nS_, int(N), k, int(D));
        op::expert_linear_backward(ex_, x.dln + D, g.k_w, g.k_b, x.dk, b.ln1.at(D), L * D, {w.k_w, wb.k_w},
                                   S_at_, B_, nS_, int(N), int(D), int(D));
        op::expert_linear_backward(ex_, x.dln + D, g.v_w, g.v_b, x.dv, b.ln1.at(D), L * D, {w.v_w, wb.v_w},
                                   S_at_, B_, nS_, int(N), int(D), int(D));
        op::linear_backward(ex_, x.dln, g.q_w, g.q_b, x.dq, b.ln1, {w.q_w, wb.q_w}, rows, int(D), int(D));
        // The model's aux and z losses are means over blocks.
        const T per_block = T(1) / T(cfg_.depth);
        T* unused_loss = x.loss_slots + 1 + 2 * cfg_.depth;  // forward recorded these losses
        op::aux_loss_forward_backward(ex_, unused_loss, x.drprobs, b.rprobs, b.counts, S_at_, tokens, nS_,
                                      int(C), k, aux_kind(cfg_), T(cfg_.aux_coef), per_block,
                                      b.aux_global ? b.aux_all : nullptr);
        op::z_loss_forward_backward(ex_, unused_loss, x.dz + C, L * C, b.rprobs, b.lse, B_, nS_, int(N),
                                    int(C), T(cfg_.z_loss_coef), per_block);
        op::router_backward(ex_, x.dz + C, L * C, b.rprobs, b.experts, b.weights, x.dweights,
                            x.drprobs, S_at_, B_, nS_, int(N), int(C), k, combine);
        op::linear_backward(fp32(ex_), x.dln, g.router_w, g.router_b, x.dz, b.ln1.full, w.router_w, rows,
                            int(D), int(C));
    }
    op::layernorm_backward(ex_, x.dres, g.norm1_w, g.norm1_b, x.dln, b.x_in, w.norm1_w, b.ln1_mean,
                           b.ln1_rstd, rows, int(D));
}

template class Model<float>;
template class Model<double>;

}  // namespace prism
