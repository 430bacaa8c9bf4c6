// Softmax cross-entropy over the classifier's logits.
#include <cmath>
#include "kernels/ops.h"
#include "kernels/cpu/instantiate.h"

namespace prism::ops {

template <class T>
T cross_entropy_forward(T* probs, const T* logits, const int32_t* labels, int B, int K,
                        int* correct) {
    T loss = 0;
    int hits = 0;
    for (int b = 0; b < B; b++) {
        const T* z = logits + (int64_t)b * K;
        T* p = probs + (int64_t)b * K;
        int argmax = 0;
        for (int c = 1; c < K; c++) if (z[c] > z[argmax]) argmax = c;
        T sum = 0;
        for (int c = 0; c < K; c++) { p[c] = std::exp(z[c] - z[argmax]); sum += p[c]; }
        for (int c = 0; c < K; c++) p[c] /= sum;
        loss += -(z[labels[b]] - z[argmax] - std::log(sum));
        hits += argmax == labels[b];
    }
    if (correct) *correct = hits;
    return loss / B;
}
PRISM_INSTANTIATE(cross_entropy_forward)

template <class T>
void cross_entropy_backward(T* dlogits, const T* probs, const int32_t* labels, int B, int K,
                            T grad_scale) {
    for (int b = 0; b < B; b++)
        for (int c = 0; c < K; c++)
            dlogits[(int64_t)b * K + c] +=
                grad_scale * (probs[(int64_t)b * K + c] - T(c == labels[b])) / T(B);
}
PRISM_INSTANTIATE(cross_entropy_backward)

}  // namespace prism::ops
