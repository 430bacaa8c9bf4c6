#include "data/loader.h"
#include <cstring>
#include "engine/rng.h"

namespace prism {

Loader::Loader(const Dataset& d, int batch_size, bool shuffle_each_epoch, uint64_t run_seed)
    : data(&d), batch(batch_size), shuffle(shuffle_each_epoch), seed(run_seed) {
    start_epoch();
}

void Loader::start_epoch() {
    const int64_t n = data->count();
    order.resize(n);
    for (int64_t i = 0; i < n; i++) order[i] = i;
    if (shuffle) {  // Fisher-Yates from a stream keyed by the epoch
        Rng rng(seed, kShuffleStream, uint64_t(epoch));
        for (int64_t i = n - 1; i > 0; i--) std::swap(order[i], order[rng.below(uint64_t(i + 1))]);
    }
    cursor = 0;
}

int64_t Loader::batches_per_epoch() const {
    const int64_t n = data->count();
    return shuffle ? n / batch : (n + batch - 1) / batch;
}

int Loader::next(std::vector<float>& images, std::vector<int32_t>& labels) {
    const int64_t n = data->count();
    if (shuffle && cursor + batch > n) { epoch++; start_epoch(); }
    if (cursor >= n) return 0;
    const int size = int(std::min<int64_t>(batch, n - cursor));
    const size_t per_image = size_t(data->shape.channels) * data->shape.height * data->shape.width;
    images.resize(size_t(batch) * per_image);
    labels.resize(batch);
    for (int i = 0; i < size; i++) {
        const int64_t src = order[cursor + i];
        std::memcpy(images.data() + i * per_image, data->images.data() + src * per_image,
                    per_image * sizeof(float));
        labels[i] = data->labels[src];
    }
    cursor += size;
    return size;
}

}  // namespace prism
