// Softmax cross-entropy over the classifier's logits (kernels/cpu/loss.cpp) on
// the device; the kernels are in loss.cuh.
#include "kernels/cuda/common.cuh"
#include "kernels/cuda/loss.cuh"

namespace prism::cuda_ops {
using namespace cuda_detail;

void cross_entropy_forward(float* loss, float* probs, const float* logits, const int32_t* labels,
                           int B, int K, int* correct, cudaStream_t stream) {
    PRISM_CUDA_REQUIRE(B > 0 && K > 0, "cross_entropy_forward: empty logits");
    Scratch scratch((sizeof(float) + sizeof(int)) * (size_t)B, stream);
    float* row_loss = scratch.as<float>();
    int* hit = reinterpret_cast<int*>(row_loss + B);
    const cross_entropy::RowsParams rows{probs, row_loss, hit, logits, labels, B, K};
    const unsigned row_blocks = cross_entropy::row_blocks(B);
    PRISM_LAUNCH(row_blocks, cross_entropy::kRowThreads, 0, stream, cross_entropy::rows_kernel)(rows);
    PRISM_LAUNCH_CHECK();
    const cross_entropy::TotalParams total{loss, correct, row_loss, hit, B};
    PRISM_LAUNCH(1, 32, 0, stream, cross_entropy::total_kernel)(total);
    PRISM_LAUNCH_CHECK();
}

void cross_entropy_backward(float* dlogits, const float* probs, const int32_t* labels, int B,
                            int K, float grad_scale, cudaStream_t stream) {
    const cross_entropy::BackwardParams p{dlogits, probs, labels, B, K, grad_scale};
    const unsigned blocks = cross_entropy::element_blocks((int64_t)B * K);
    PRISM_LAUNCH(blocks, cross_entropy::kElementThreads, 0, stream, cross_entropy::backward_kernel)(p);
    PRISM_LAUNCH_CHECK();
}

}  // namespace prism::cuda_ops
