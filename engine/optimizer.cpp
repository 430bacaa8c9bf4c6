#include "engine/optimizer.h"
#include <cmath>
#include <cstdio>
#include "kernels/backend.h"

namespace prism {

double learning_rate(const TrainConfig& t, int64_t step, int64_t total_steps, int64_t warmup_steps) {
    if (step < warmup_steps) return t.lr * double(step + 1) / double(warmup_steps);
    const double span = double(std::max<int64_t>(1, total_steps - warmup_steps));
    const double progress = std::min(1.0, double(step - warmup_steps) / span);
    return t.min_lr + 0.5 * (t.lr - t.min_lr) * (1.0 + std::cos(M_PI * progress));
}

template <class T>
AdamW<T>::AdamW(const TrainConfig& cfg, int64_t num_params, bool verbose, Device device)
    : cfg_(cfg), n_(num_params) {
    for (int pass = 0; pass < 2; pass++) {  // measure, then carve
        m_ = state_.take<T>(n_);
        v_ = state_.take<T>(n_);
        norm_slot_ = state_.take<double>(1);
        if (pass == 0) state_.allocate(device == Device::cuda);
    }
    if (verbose)
        std::printf("arena %-22s %10s  (AdamW first and second moments)\n", state_.name.c_str(),
                    format_bytes(state_.capacity).c_str());
}

template <class T>
double AdamW<T>::grad_norm(Model<T>& model) const {
    double sum = 0;
    op::sum_squares(model.exec(), norm_slot_, model.grads(), n_);
    op::download(model.exec(), &sum, norm_slot_, 1);
    return std::sqrt(sum);
}

template <class T>
void AdamW<T>::apply(Model<T>& model, double lr, double norm) {
    const op::Exec& ex = model.exec();
    op::Range range(ex, "optimizer");
    T* g = model.grads();
    if (cfg_.grad_clip > 0 && norm > cfg_.grad_clip)
        op::scale_inplace(ex, g, n_, T(cfg_.grad_clip / norm));
    t_++;
    for (const auto& p : model.layout())
        op::adamw_update(ex, model.params() + p.offset, g + p.offset, m_ + p.offset, v_ + p.offset,
                         p.numel, lr, cfg_.beta1, cfg_.beta2, cfg_.eps,
                         p.decay ? cfg_.weight_decay : 0.0, t_);
}

template <class T>
void AdamW<T>::moments_to_host(T* m, T* v, const Model<T>& model) const {
    op::download(model.exec(), m, m_, n_);
    op::download(model.exec(), v, v_, n_);
}

template <class T>
void AdamW<T>::moments_from_host(const T* m, const T* v, const Model<T>& model) {
    op::upload(model.exec(), m_, m, n_);
    op::upload(model.exec(), v_, v, n_);
    op::sync(model.exec());
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
