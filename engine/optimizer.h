// AdamW with decoupled weight decay (on rank >= 2 weights, not biases or
// LayerNorm parameters), global-norm clipping, and the learning-rate schedule:
// linear warmup, then cosine to min_lr.
#pragma once
#include "engine/arena.h"
#include "engine/config.h"
#include "engine/model.h"

namespace prism {

double learning_rate(const TrainConfig& t, int64_t step, int64_t total_steps, int64_t warmup_steps);

template <class T>
class AdamW {
public:
    // The moments live where the model does (`device`).
    AdamW(const TrainConfig& cfg, int64_t num_params, bool verbose, Device device = Device::cpu);
    ~AdamW() { state_.release(); }
    // One update of model.params() from model.grads(). Returns the gradient's
    // global L2 norm before clipping.
    double step(Model<T>& model, double lr);
    // The same in two halves, so that a caller can look at the norm (NaN?)
    // before any weight changes: the norm, then the update clipped with it.
    double grad_norm(Model<T>& model) const;
    void apply(Model<T>& model, double lr, double grad_norm);
    int64_t steps_taken() const { return t_; }
    // Host copies of the moments (num_params() elements each), for the training state.
    void moments_to_host(T* m, T* v, const Model<T>& model) const;
    void moments_from_host(const T* m, const T* v, const Model<T>& model);
    void set_steps_taken(int64_t t) { t_ = t; }

private:
    TrainConfig cfg_;
    int64_t n_;
    Arena state_{"optimizer state"};
    T *m_ = nullptr, *v_ = nullptr;
    double* norm_slot_ = nullptr;  // Σ g², written where the moments live
    int64_t t_ = 0;
};

}  // namespace prism
