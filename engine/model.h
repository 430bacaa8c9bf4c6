// The three architectures of DESIGN.md §1 (vit, chvit, moevit) as one model
// whose forward and backward are written against kernels/backend.h (the ops
// of kernels/ops.h on the CPU or their CUDA twins). Memory comes from three
// arenas sized from the config and the batch capacity: parameters (with their
// gradients), optimizer state (engine/optimizer.h) and activations. On CUDA
// the arenas are device memory, and the batch is uploaded by forward().
#pragma once
#include <functional>
#include <string>
#include <vector>
#include "engine/arena.h"
#include "engine/common.h"
#include "engine/config.h"
#include "kernels/backend.h"

namespace prism {

struct ParamInfo {
    std::string name;             // checkpoint name (DESIGN.md §2)
    std::vector<int64_t> shape;
    int64_t offset = 0;           // elements from the start of the parameter block
    int64_t numel = 0;
    bool decay = false;           // AdamW weight decay applies (rank >= 2, not a bias)
};

// Names, shapes and offsets of every parameter, in checkpoint order.
std::vector<ParamInfo> param_layout(const ModelConfig& cfg);
// The number of parameters.
int64_t param_count(const std::vector<ParamInfo>& layout);

// Each tensor of the parameter block (and of the gradient block and the bf16
// mode's bf16 copy beside it) starts at a multiple of 128 elements: 512
// bytes in fp32, 256 in bf16, the alignment cuBLASLt's heuristic assumes. A
// tensor of odd size (a router bias of 18 channels, a head of 17 classes)
// would otherwise leave every tensor after it at a 4-byte boundary, where
// cuBLASLt has only its slowest kernels and cannot read an epilogue bias at
// all. The padding between tensors is zero and stays zero: no product reads
// it (only whole-block passes do: the bf16 rounding, the gradient norm,
// AdamW), its gradient is zero, AdamW maps zeros to zeros, and a loaded
// training state's is zeroed.
constexpr int64_t kParamAlignElems = 128;
constexpr int64_t align_param_offset(int64_t elems) {
    return (elems + kParamAlignElems - 1) / kParamAlignElems * kParamAlignElems;
}
// Elements of the parameter block: every tensor at its offset, the padding
// between them, and the last one's padded to the alignment.
int64_t param_block_elems(const std::vector<ParamInfo>& layout);

// One batch as the model sees it: normalized float images [B, C, H, W] with
// all C channels, and the sorted channel subset S present in this batch.
// Host memory, whatever the device.
struct Batch {
    const float* images = nullptr;
    const int32_t* labels = nullptr;
    int size = 0;                 // B, at most the model's batch capacity
    std::vector<int> channels;    // S, sorted; all of 0..C-1 unless HCS drew a subset
    int64_t first_image = 0;      // index of image 0 in the global batch (a rank's offset)
    // Instead of images: the stored pixels with what the input step needs
    // (kernels/ops.h's input_forward), which the model runs on its device.
    // prism train passes them on CUDA (data.device_input): a quarter of the
    // bytes cross the bus for uint8 pixels, and the host never widens them;
    // pinned memory lets the copy run asynchronously. (On the CPU the
    // loader's threads normalize in parallel with the step instead.)
    struct Stored {
        const void* pixels = nullptr;        // [B, C, H, W]
        ops::Pixel pixel = ops::Pixel::f32;
        const float *mean = nullptr, *inv_std = nullptr;  // [B, C]
        const ops::InputAug* aug = nullptr;  // [B], or nullptr: normalization only
    } stored{};
};

struct Losses {
    double total = 0, ce = 0, aux = 0, z = 0;
    int correct = 0;
    // Batch::stored only: the lowest image the input step made non-finite
    // (its losses are then meaningless), or -1.
    int nonfinite_image = -1;
};

// Pointers to each tensor of a parameter-shaped block (weights, or gradients).
template <class T>
struct Weights {
    T *patch_w, *patch_b, *cls_token, *pos_embed, *channel_embed;
    struct Block {
        T *norm1_w, *norm1_b, *qkv_w, *qkv_b;                         // vit, chvit
        T *router_w, *router_b, *q_w, *q_b, *k_w, *k_b, *v_w, *v_b;   // moevit
        T *proj_w, *proj_b, *norm2_w, *norm2_b, *fc1_w, *fc1_b, *fc2_w, *fc2_b;
    };
    std::vector<Block> blocks;
    T *norm_w, *norm_b, *head_w, *head_b;
};

template <class T>
struct Activations;  // model.cpp

template <class T>
class Model {
public:
    // batch_capacity: the largest batch forward() will be given. Device::cuda
    // needs T = float. bf16: the bf16 mode (train.precision = bf16 on CUDA):
    // the linear layers' products take bf16 inputs (fp32 accumulation;
    // weights, gradients and most activations stay fp32), moevit's
    // per-channel expert projections too, and so do dense and routed attention
    // where the head dim is 64 (the flash kernels, kernels/backend.h); the
    // router stays fp32. The matrices only products read (the LayerNorms' and
    // GELU's outputs) are stored in bf16, in the activation arena's layout.
    // On the CPU, bf16 keeps only that storage (products in fp32), so tests can
    // check it without a GPU.
    Model(const ModelConfig& cfg, int batch_capacity, bool verbose, Device device = Device::cpu,
          bool bf16 = false);
    ~Model();
    Model(const Model&) = delete;
    Model& operator=(const Model&) = delete;

    // timm-style initialization from the seed: bit-identical for the same seed.
    void init_weights(uint64_t seed);

    // training: drop path active (masks drawn from drop_seed). Leaves what
    // backward() needs in the activation arena. Returns the losses.
    Losses forward(const Batch& batch, bool training, uint64_t drop_seed = 0);
    // Gradients of forward()'s total loss, written (not accumulated) to grads().
    void backward();

    const ModelConfig& config() const { return cfg_; }
    const std::vector<ParamInfo>& layout() const { return layout_; }
    // Length of the parameter block, and of the gradient block: the
    // parameters at their layout offsets and the zero padding between them
    // (param_block_elems). param_count(layout()) is the number of parameters.
    int64_t param_elems() const { return param_elems_; }
    Device device() const { return ex_.cuda ? Device::cuda : Device::cpu; }
    const op::Exec& exec() const { return ex_; }
    // The bf16 mode's products run (CUDA), and its bf16 storage (both devices).
    bool bf16_matmul() const { return ex_.bf16_matmul; }
    bool bf16_storage() const { return bf16_storage_; }
    // Where the model's device keeps them (device memory on CUDA).
    T* params() { return param_mem_; }
    T* grads() { return grad_mem_; }
    // Which elements of the block weight decay applies to, a byte per
    // kParamAlignElems-element tile (every tensor starts on one, so each tile
    // is one tensor's and its padding's), where the parameters live: AdamW
    // updates the whole block (its shard) in one pass with it.
    ops::DecayTiles decay_tiles() const { return {decay_tiles_, 0, kParamAlignElems}; }
    // Copies between those and host memory of param_elems() elements (the
    // padding included).
    void params_to_host(T* dst) const;
    void params_from_host(const T* src);
    void grads_to_host(T* dst) const;
    void grads_from_host(const T* src);
    const T* logits() const;   // [B, classes] of the last forward, in host memory
    // Per block: token-slots routed to each channel in the last forward ([C]; moevit).
    std::vector<std::vector<int>> routing_counts() const;
    // Block `block`'s token-slots of each image of the last forward routed to
    // each channel ([B, C] row-major; moevit, else empty).
    std::vector<int> routing_counts_per_image(int block) const;
    size_t param_arena_bytes() const { return param_arena_.capacity; }
    // Data-parallel training: sums a few doubles over the ranks (in place), so
    // that the load-balance loss is that of the global batch. Unset: this
    // process's batch is the whole batch. The doubles live where the model's
    // data lives: on CUDA they are device memory, and the sum is to be queued
    // on exec().stream (the next kernels there read it).
    void set_reduce_over_ranks(std::function<void(double*, int64_t)> sum) { reduce_over_ranks_ = std::move(sum); }
    // Data-parallel training: backward() calls this as soon as a range of
    // grads() is final, so that its all-reduce can overlap the rest of the
    // backward pass: the head and final norm right after they are computed,
    // each block's range after block_backward (the last block first), the
    // embeddings at the end. The ranges partition [0, param_elems()): every
    // element is in exactly one call per backward(). On CUDA "final" means on
    // exec().stream: the work that wrote the range is queued there, not done.
    void set_on_grads_ready(std::function<void(int64_t offset, int64_t count)> hook) {
        on_grads_ready_ = std::move(hook);
    }
    size_t activation_arena_bytes() const { return act_arena_.capacity; }

private:
    void carve_activations();
    void block_forward(int i, bool training);
    void block_backward(int i);

    ModelConfig cfg_;
    int capacity_;
    std::vector<ParamInfo> layout_;
    int64_t param_elems_ = 0;
    Arena param_arena_{"parameters+gradients"}, act_arena_{"activations"};
    T* param_mem_ = nullptr;
    T* grad_mem_ = nullptr;
    uint8_t* decay_tiles_ = nullptr;
    Weights<T> w_, g_;
    // The bf16 mode on CUDA: bf16(parameters), rounded once at the start of
    // each forward for every product of the step (null pointers otherwise).
    uint16_t* param_bf16_ = nullptr;
    Weights<uint16_t> w_bf16_{};
    Activations<T>* act_ = nullptr;
    // The batch of the last forward.
    int B_ = 0, nS_ = 0;
    std::vector<int> S_;
    std::vector<uint8_t> in_S_;
    // The batch where the ops read it: the caller's host arrays on the CPU,
    // their uploaded copies on CUDA.
    const int* S_at_ = nullptr;
    const uint8_t* in_S_at_ = nullptr;
    const float* images_ = nullptr;
    const int32_t* labels_ = nullptr;
    // What forward() reads back to the host: logits and routing counts.
    mutable std::vector<T> logits_host_;   // logits() reads them back once per forward
    mutable bool logits_stale_ = false;
    std::vector<int> counts_host_;     // [depth, C]: positions in S (moevit)
    op::Exec ex_;
    bool bf16_storage_ = false;
    bool training_ = false;
    std::function<void(double*, int64_t)> reduce_over_ranks_;
    std::function<void(int64_t, int64_t)> on_grads_ready_;
    // Parameter ranges (offsets into the parameter block) of the layout's
    // three parts: embeddings [0, block_begin_[0]), block i
    // [block_begin_[i], block_begin_[i+1]) with block_begin_[depth] = the head's
    // start, head and final norm [block_begin_[depth], param_elems_).
    std::vector<int64_t> block_begin_;
    void grads_ready(int64_t begin, int64_t end) {
        if (on_grads_ready_ && end > begin) on_grads_ready_(begin, end - begin);
    }
};

}  // namespace prism
