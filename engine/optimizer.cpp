#include "engine/optimizer.h"
#include <cmath>
#include <cstdio>
#include <algorithm>
#include <stdexcept>
#include <string>
#include <type_traits>
#include "engine/nccl.h"
#include "kernels/backend.h"

namespace prism {

double learning_rate(const TrainConfig& t, int64_t step, int64_t total_steps, int64_t warmup_steps) {
    if (step < warmup_steps) return t.lr * double(step + 1) / double(warmup_steps);
    const double span = double(std::max<int64_t>(1, total_steps - warmup_steps));
    const double progress = std::min(1.0, double(step - warmup_steps) / span);
    return t.min_lr + 0.5 * (t.lr - t.min_lr) * (1.0 + std::cos(M_PI * progress));
}

template <class T>
AdamW<T>::AdamW(const TrainConfig& cfg, int64_t num_params, bool verbose, Device device, const Comm* zero)
    : cfg_(cfg), n_(num_params), zero_(zero && zero->size > 1 ? zero : nullptr), shard_{0, num_params} {
    if (zero_) shard_ = comm_shard(*zero_, n_, zero_->rank);
    for (int pass = 0; pass < 2; pass++) {  // measure, then carve
        m_ = state_.take<T>(shard_.size());
        v_ = state_.take<T>(shard_.size());
        norm_slot_ = state_.take<double>(1);
        if (pass == 0) state_.allocate(device == Device::cuda);
    }
    if (verbose) {
        const std::string what = zero_ ? "AdamW moments of this rank's shard: " + std::to_string(shard_.size()) +
                                             " of the parameter block's " + std::to_string(n_) + ", ZeRO-1 over " +
                                             std::to_string(zero_->size) + " ranks"
                                       : "AdamW first and second moments";
        std::printf("arena %-22s %10s  (%s)\n", state_.name.c_str(), format_bytes(state_.capacity).c_str(),
                    what.c_str());
    }
}

template <class T>
double AdamW<T>::grad_norm(Model<T>& model) const {
    double sum = 0;
    op::sum_squares(model.exec(), norm_slot_, model.grads() + shard_.begin, shard_.size());
    op::download(model.exec(), &sum, norm_slot_, 1);
    if (zero_) comm_allreduce_sum(*zero_, &sum, 1);
    return std::sqrt(sum);
}

template <class T>
void AdamW<T>::apply(Model<T>& model, double lr, double norm) {
    const op::Exec& ex = model.exec();
    op::Range range(ex, "optimizer");
    T* g = model.grads();
    if (cfg_.grad_clip > 0 && norm > cfg_.grad_clip)
        op::scale_inplace(ex, g + shard_.begin, shard_.size(), T(cfg_.grad_clip / norm));
    t_++;
    // One update over the shard (the whole block unsharded), each element's
    // weight decay from its tensor's tile: elementwise, so the same bits as an
    // update per tensor, in one launch instead of one per run of tensors with
    // the same decay (174 for moevit). The padding goes along (zeros, which
    // the update keeps zero).
    ops::DecayTiles decay = model.decay_tiles();
    decay.first = shard_.begin;
    if (shard_.size() > 0)
        op::adamw_update(ex, model.params() + shard_.begin, g + shard_.begin, m_, v_, shard_.size(), lr,
                         cfg_.beta1, cfg_.beta2, cfg_.eps, cfg_.weight_decay, decay, t_);
    if (!zero_) return;
    if constexpr (std::is_same_v<T, float>) {
        if (ex.cuda) {
            nccl_allgather(*zero_, model.params(), n_, ex.stream);
            nccl_wait(*zero_, ex.stream, "the ZeRO-1 parameter all-gather");
        } else
            comm_allgather(*zero_, model.params(), n_);
    } else {
        throw std::logic_error("ZeRO-1 shards float parameters only");
    }
}

template <class T>
void AdamW<T>::moments_to_host(T* m, T* v, const Model<T>& model) const {
    op::download(model.exec(), m + shard_.begin, m_, shard_.size());
    op::download(model.exec(), v + shard_.begin, v_, shard_.size());
    if (!zero_) return;
    if constexpr (std::is_same_v<T, float>) {
        comm_allgather(*zero_, m, n_);  // host memory, over MPI, also on GPU ranks
        comm_allgather(*zero_, v, n_);
    } else {
        throw std::logic_error("ZeRO-1 shards float parameters only");
    }
}

template <class T>
void AdamW<T>::moments_from_host(const T* m, const T* v, const Model<T>& model) {
    op::upload(model.exec(), m_, m + shard_.begin, shard_.size());
    op::upload(model.exec(), v_, v + shard_.begin, shard_.size());
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
