#include "engine/optimizer.h"
#include <cmath>
#include <cstdio>
#include "kernels/ops.h"

namespace prism {

double learning_rate(const TrainConfig& t, int64_t step, int64_t total_steps, int64_t warmup_steps) {
    if (step < warmup_steps) return t.lr * double(step + 1) / double(warmup_steps);
    const double span = double(std::max<int64_t>(1, total_steps - warmup_steps));
    const double progress = std::min(1.0, double(step - warmup_steps) / span);
    return t.min_lr + 0.5 * (t.lr - t.min_lr) * (1.0 + std::cos(M_PI * progress));
}

template <class T>
AdamW<T>::AdamW(const TrainConfig& cfg, int64_t num_params, bool verbose) : cfg_(cfg), n_(num_params) {
    for (int pass = 0; pass < 2; pass++) {  // measure, then carve
        m_ = state_.take<T>(n_);
        v_ = state_.take<T>(n_);
        if (pass == 0) state_.allocate();
    }
    if (verbose)
        std::printf("arena %-22s %10s  (AdamW first and second moments)\n", state_.name.c_str(),
                    format_bytes(state_.capacity).c_str());
}

template <class T>
double AdamW<T>::grad_norm(Model<T>& model) const {
    return std::sqrt(ops::sum_squares(model.grads(), n_));
}

template <class T>
void AdamW<T>::apply(Model<T>& model, double lr, double norm) {
    T* g = model.grads();
    if (cfg_.grad_clip > 0 && norm > cfg_.grad_clip)
        ops::scale_inplace(g, n_, T(cfg_.grad_clip / norm));
    t_++;
    for (const auto& p : model.layout())
        ops::adamw_update(model.params() + p.offset, g + p.offset, m_ + p.offset, v_ + p.offset,
                          p.numel, lr, cfg_.beta1, cfg_.beta2, cfg_.eps,
                          p.decay ? cfg_.weight_decay : 0.0, t_);
}

template <class T>
double AdamW<T>::step(Model<T>& model, double lr) {
    const double norm = grad_norm(model);
    apply(model, lr, norm);
    return norm;
}

template class AdamW<float>;
template class AdamW<double>;

}  // namespace prism
