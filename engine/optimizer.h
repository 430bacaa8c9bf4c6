// AdamW with decoupled weight decay (on rank >= 2 weights, not biases or
// LayerNorm parameters), global-norm clipping, and the learning-rate schedule:
// linear warmup, then cosine to min_lr.
//
// ZeRO-1 (train.zero = 1, several ranks): each rank keeps the moments of its
// shard of the parameters alone (comm_shard), updates that shard from its
// shard of the summed gradients (comm_reduce_scatter_sum, or
// nccl_reduce_to_owners on GPUs), and all-gathers the parameters after the
// update, so that every rank again holds all of them, bit-identical.
#pragma once
#include "engine/arena.h"
#include "engine/comm.h"
#include "engine/config.h"
#include "engine/model.h"

namespace prism {

double learning_rate(const TrainConfig& t, int64_t step, int64_t total_steps, int64_t warmup_steps);

template <class T>
class AdamW {
public:
    // The moments live where the model does (`device`). zero: shard the
    // optimizer over these ranks (ZeRO-1); null or a world of one: no sharding.
    AdamW(const TrainConfig& cfg, int64_t num_params, bool verbose, Device device = Device::cpu,
          const Comm* zero = nullptr);
    ~AdamW() { state_.release(); }
    // One update of model.params() from model.grads(). Returns the gradient's
    // global L2 norm before clipping.
    double step(Model<T>& model, double lr);
    // The same in two halves, so that a caller can look at the norm (NaN?)
    // before any weight changes: the norm, then the update clipped with it.
    // Sharded, both are collective: the norm sums the ranks' shards (every
    // rank gets the same value), apply ends with the all-gather.
    double grad_norm(Model<T>& model) const;
    void apply(Model<T>& model, double lr, double grad_norm);
    int64_t steps_taken() const { return t_; }
    // The part of the parameters this rank updates (all of them unsharded).
    Shard shard() const { return shard_; }
    bool sharded() const { return zero_ != nullptr; }
    // Host copies of all the moments (param_elems() elements each), for the
    // training state. Sharded, moments_to_host is collective (the shards are
    // gathered to every rank); moments_from_host takes this rank's shard.
    void moments_to_host(T* m, T* v, const Model<T>& model) const;
    void moments_from_host(const T* m, const T* v, const Model<T>& model);
    void set_steps_taken(int64_t t) { t_ = t; }

private:
    TrainConfig cfg_;
    int64_t n_;
    const Comm* zero_ = nullptr;  // the ranks the state is sharded over, or null
    Shard shard_;
    Arena state_{"optimizer state", true};  // the moments start at zero
    T *m_ = nullptr, *v_ = nullptr;
    double* norm_slot_ = nullptr;  // Σ g², written where the moments live
    int64_t t_ = 0;
};

}  // namespace prism
