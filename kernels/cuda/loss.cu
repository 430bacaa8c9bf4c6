// Softmax cross-entropy over the classifier's logits (kernels/cpu/loss.cpp):
// one warp per row, then one fixed-order sum of the rows' losses.
#include <climits>

#include "kernels/cuda/common.cuh"

namespace prism::cuda_ops {
using namespace cuda_detail;

namespace {

constexpr int kRowsPerBlock = 8;

// probs, row_loss[b] = −log p[label], hit[b] = (argmax == label); argmax ties
// → the lower class, as the CPU's strict '>' scan.
__global__ void cross_entropy_rows_kernel(float* probs, float* row_loss, int* hit,
                                          const float* logits, const int32_t* labels, int B,
                                          int K) {
    const int b = blockIdx.x * kRowsPerBlock + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (b >= B) return;
    const float* z = logits + (int64_t)b * K;
    float best = -INFINITY;
    int arg = INT_MAX;
    for (int c = lane; c < K; c += 32)
        if (z[c] > best) {  // ascending c: the first of equal values stays
            best = z[c];
            arg = c;
        }
    for (int o = 16; o > 0; o >>= 1) {
        const float ob = __shfl_xor_sync(0xffffffffu, best, o);
        const int oa = __shfl_xor_sync(0xffffffffu, arg, o);
        if (ob > best || (ob == best && oa < arg)) {
            best = ob;
            arg = oa;
        }
    }
    float* p = probs + (int64_t)b * K;
    float sum = 0.f;
    for (int c = lane; c < K; c += 32) {
        p[c] = expf(z[c] - best);
        sum += p[c];
    }
    sum = warp_sum(sum);
    for (int c = lane; c < K; c += 32) p[c] = p[c] / sum;
    if (lane == 0) {
        row_loss[b] = -(z[labels[b]] - best - logf(sum));
        hit[b] = arg == labels[b];
    }
}

// One thread: the mean loss and the hit count, rows in order.
__global__ void cross_entropy_total_kernel(float* loss, int* correct, const float* row_loss,
                                           const int* hit, int B) {
    if (threadIdx.x != 0 || blockIdx.x != 0) return;
    float total = 0.f;
    int hits = 0;
    for (int b = 0; b < B; b++) {
        total += row_loss[b];
        hits += hit[b];
    }
    *loss = total / B;
    if (correct) *correct = hits;
}

__global__ void cross_entropy_backward_kernel(float* dlogits, const float* probs,
                                              const int32_t* labels, int B, int K,
                                              float grad_scale) {
    PRISM_GRID_STRIDE(i, (int64_t)B * K) {
        const int b = (int)(i / K), c = (int)(i % K);
        dlogits[i] += grad_scale * (probs[i] - float(c == labels[b])) / float(B);
    }
}

}  // namespace

void cross_entropy_forward(float* loss, float* probs, const float* logits, const int32_t* labels,
                           int B, int K, int* correct, cudaStream_t stream) {
    PRISM_CUDA_REQUIRE(B > 0 && K > 0, "cross_entropy_forward: empty logits");
    Scratch scratch((sizeof(float) + sizeof(int)) * (size_t)B, stream);
    float* row_loss = scratch.as<float>();
    int* hit = reinterpret_cast<int*>(row_loss + B);
    cross_entropy_rows_kernel<<<(B + kRowsPerBlock - 1) / kRowsPerBlock, kRowsPerBlock * 32, 0,
                                stream>>>(probs, row_loss, hit, logits, labels, B, K);
    PRISM_LAUNCH_CHECK();
    cross_entropy_total_kernel<<<1, 32, 0, stream>>>(loss, correct, row_loss, hit, B);
    PRISM_LAUNCH_CHECK();
}

void cross_entropy_backward(float* dlogits, const float* probs, const int32_t* labels, int B,
                            int K, float grad_scale, cudaStream_t stream) {
    cross_entropy_backward_kernel<<<grid_for((int64_t)B * K), kThreads, 0, stream>>>(
        dlogits, probs, labels, B, K, grad_scale);
    PRISM_LAUNCH_CHECK();
}

}  // namespace prism::cuda_ops
