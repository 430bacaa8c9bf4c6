// Linear layers y = x·Wᵀ + b (W stored [out, in]) and MoE-ViT's per-channel
// expert projections: kernels/cpu/linear.cpp on the device. The products are
// cuBLAS fp32 GEMMs (no TF32, no atomics: bit-reproducible on one device), and
// for the bf16 linear cuBLASLt GEMMs with fp32 accumulation; bias gradients
// are deterministic column sums.
//
// Row-major X [rows, in] is column-major Xᵀ, so in cuBLAS's column-major terms
//   forward  Yᵀ [out, rows]  = op_T(W) · Xᵀ
//   dx       dXᵀ [in, rows] += W · dYᵀ          (W seen as [in, out], no transpose)
//   dW       dWᵀ [in, out]  += Xᵀ · op_T(dYᵀ)
// (linear.cuh's forward_product, dx_product and dw_product). The experts run
// as one batched GEMM over the (image, channel) groups, their weight pointers
// chosen on the device from S, so no index leaves the GPU; the kernels around
// the products are in linear.cuh.
#include <climits>
#include <map>
#include <memory>
#include <mutex>
#include <tuple>

#include "kernels/cuda/blas.cuh"
#include "kernels/cuda/common.cuh"
#include "kernels/cuda/linear.cuh"

namespace prism::cuda_ops {
using namespace cuda_detail;

#ifdef PRISM_CUBLAS
namespace {

int as_int(int64_t v, const char* what) {
    PRISM_CUDA_REQUIRE(v >= 0 && v <= INT_MAX, what);
    return (int)v;
}

const float kOne = 1.f;

// ---- launchers of linear.cuh's kernels -------------------------------------------------
template <class O>
void fill_bias(O* out, const float* bias, int64_t rows, int out_dim, cudaStream_t stream) {
    const linear::FillBiasParams<O> p{out, bias, rows, out_dim};
    PRISM_LAUNCH(linear::element_blocks(rows * out_dim), linear::kElementThreads, 0, stream,
                 linear::fill_bias_kernel<O>)(p);
    PRISM_LAUNCH_CHECK();
}

template <class O>
void fill_expert_bias(O* out, const float* bias, const int* S, int B, int nS, int N, int out_dim,
                      cudaStream_t stream) {
    const linear::ExpertBiasParams<O> p{out, bias, S, B, nS, N, out_dim};
    const unsigned blocks = linear::element_blocks((int64_t)B * nS * N * out_dim);
    PRISM_LAUNCH(blocks, linear::kElementThreads, 0, stream, linear::fill_expert_bias_kernel<O>)(p);
    PRISM_LAUNCH_CHECK();
}

void used_experts_bf16(uint16_t* Wb, const float* W, const int* S, int nS, int64_t per_expert, cudaStream_t stream) {
    const linear::UsedExpertsParams p{Wb, W, S, nS, per_expert};
    PRISM_LAUNCH(linear::element_blocks(nS * per_expert), linear::kElementThreads, 0, stream,
                 linear::used_experts_bf16_kernel)(p);
    PRISM_LAUNCH_CHECK();
}

void patch_rows_bf16(uint16_t* xb, const float* x, int64_t x_image_stride, int B, int64_t per_image,
                     cudaStream_t stream) {
    const linear::PatchRowsParams p{xb, x, x_image_stride, B, per_image};
    PRISM_LAUNCH(linear::element_blocks(B * per_image), linear::kElementThreads, 0, stream,
                 linear::patch_rows_bf16_kernel)(p);
    PRISM_LAUNCH_CHECK();
}

template <class E, class X>
void channel_major(const linear::ChannelMajorParams<E, X>& p, cudaStream_t stream) {
    const unsigned blocks = linear::element_blocks((int64_t)p.nS * p.B * p.N * (p.in_dim + p.out_dim));
    PRISM_LAUNCH(blocks, linear::kElementThreads, 0, stream, linear::channel_major_kernel<E, X>)(p);
    PRISM_LAUNCH_CHECK();
}

template <class W, class I, class O>
void group_pointers(const linear::GroupPointersParams<W, I, O>& p, cudaStream_t stream) {
    PRISM_LAUNCH(linear::element_blocks((int64_t)p.B * p.nS), linear::kElementThreads, 0, stream,
                 linear::group_pointers_kernel<W, I, O>)(p);
    PRISM_LAUNCH_CHECK();
}

template <class E>
void weight_pointers(const linear::WeightPointersParams<E>& p, cudaStream_t stream) {
    PRISM_LAUNCH(linear::element_blocks(p.nS), linear::kElementThreads, 0, stream,
                 linear::weight_pointers_kernel<E>)(p);
    PRISM_LAUNCH_CHECK();
}

// ---- the products, as linear.cuh shapes them ------------------------------------------
cublasOperation_t op(bool trans) { return trans ? CUBLAS_OP_T : CUBLAS_OP_N; }

// cuBLAS's classic API takes int sizes.
struct IntShape {
    int m, n, k, lda, ldb, ldc;
};
IntShape int_shape(const linear::Product& p) {
    const char* what = "linear: a product's size must fit an int";
    return {as_int(p.m, what), as_int(p.n, what), as_int(p.k, what), as_int(p.lda, what), as_int(p.ldb, what),
            as_int(p.ldc, what)};
}

// C = op(A)·op(B) + beta·C in fp32 (no TF32).
void fp32_product(const linear::Product& p, const float* A, const float* B, float beta, float* C,
                  cudaStream_t stream) {
    const IntShape s = int_shape(p);
    PRISM_CUBLAS_CHECK(cublasSgemm(blas_handle(stream), op(p.trans_a), op(p.trans_b), s.m, s.n, s.k, &kOne, A, s.lda,
                                   B, s.ldb, &beta, C, s.ldc));
}

// C[g] += op(A[g])·op(B[g]) for g < count, in fp32.
void fp32_batched(const linear::Product& p, float* const* A, float* const* B, float* const* C, int count,
                  cudaStream_t stream) {
    const IntShape s = int_shape(p);
    PRISM_CUBLAS_CHECK(cublasSgemmBatched(blas_handle(stream), op(p.trans_a), op(p.trans_b), s.m, s.n, s.k, &kOne,
                                          A, s.lda, B, s.ldb, &kOne, C, s.ldc, count));
}

// The same with A and B bf16, C of c_type (fp32 or bf16), fp32 accumulation.
void bf16_batched(const linear::Product& p, void* const* A, void* const* B, void* const* C, cudaDataType_t c_type,
                  int count, cudaStream_t stream) {
    const IntShape s = int_shape(p);
    PRISM_CUBLAS_CHECK(cublasGemmBatchedEx(blas_handle(stream), op(p.trans_a), op(p.trans_b), s.m, s.n, s.k, &kOne,
                                           A, CUDA_R_16BF, s.lda, B, CUDA_R_16BF, s.ldb, &kOne, C, c_type, s.ldc,
                                           count, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

// ---- bf16 through cuBLASLt ------------------------------------------------------------
// Owners of cuBLASLt descriptors, destroyed (and checked) on scope exit.
struct LtLayout {
    cublasLtMatrixLayout_t p = nullptr;
    LtLayout(cudaDataType_t type, int64_t rows, int64_t cols, int64_t ld) {
        PRISM_CUBLAS_CHECK(
            cublasLtMatrixLayoutCreate(&p, type, (uint64_t)rows, (uint64_t)cols, ld));
    }
    ~LtLayout() {
        check_blas_or_abort(cublasLtMatrixLayoutDestroy(p), __FILE__, __LINE__,
                            "cublasLtMatrixLayoutDestroy");
    }
    LtLayout(const LtLayout&) = delete;
    LtLayout& operator=(const LtLayout&) = delete;
};
struct LtMatmulDesc {
    cublasLtMatmulDesc_t p = nullptr;
    LtMatmulDesc() {
        PRISM_CUBLAS_CHECK(cublasLtMatmulDescCreate(&p, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    }
    ~LtMatmulDesc() {
        check_blas_or_abort(cublasLtMatmulDescDestroy(p), __FILE__, __LINE__,
                            "cublasLtMatmulDescDestroy");
    }
    LtMatmulDesc(const LtMatmulDesc&) = delete;
    LtMatmulDesc& operator=(const LtMatmulDesc&) = delete;
};
struct LtPreference {
    cublasLtMatmulPreference_t p = nullptr;
    LtPreference() { PRISM_CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&p)); }
    ~LtPreference() {
        check_blas_or_abort(cublasLtMatmulPreferenceDestroy(p), __FILE__, __LINE__,
                            "cublasLtMatmulPreferenceDestroy");
    }
    LtPreference(const LtPreference&) = delete;
    LtPreference& operator=(const LtPreference&) = delete;
};

// The largest power of two up to 256 dividing both the address and the
// leading dimension in bytes.
uint32_t alignment(const void* p, int64_t ld_bytes) {
    uint32_t a = 256;
    while (a > 1 && (((uintptr_t)p % a) != 0 || (ld_bytes % a) != 0)) a /= 2;
    return a;
}

// One cuBLASLt product as the heuristic sees it: everything its descriptors
// and its choice of algorithm depend on. The step runs the same few shapes
// every time, so each is planned once (descriptors, layouts, the heuristic's
// first algorithm) and later calls only launch.
struct LtShape {
    int device;
    bool trans_a, trans_b, bias;
    int64_t m, n, k, lda, ldb, ldd;
    cudaDataType_t d_type;
    uint32_t align_a, align_b, align_d;  // the bias is always staged 16-byte aligned (lt_matmul)
    auto tie() const {
        return std::tie(device, trans_a, trans_b, bias, m, n, k, lda, ldb, ldd, d_type, align_a, align_b, align_d);
    }
    bool operator<(const LtShape& o) const { return tie() < o.tie(); }
};

struct LtPlan {
    LtMatmulDesc desc;
    std::unique_ptr<LtLayout> a, b, d;
    bool found = false;  // false: no Lt algorithm (cublasGemmEx instead)
    cublasLtMatmulAlgo_t algo{};
};

// The plan of `shape`, made on first use. Plans live for the process (a few
// per layer shape); the mutex only guards the map, and a plan is used by one
// stream at a time like the handle (blas.cuh).
LtPlan& lt_plan(const LtShape& shape, const LtContext& ctx, const void* bias) {
    static std::mutex mutex;
    static std::map<LtShape, std::unique_ptr<LtPlan>> plans;
    std::lock_guard<std::mutex> lock(mutex);
    std::unique_ptr<LtPlan>& slot = plans[shape];
    if (slot) return *slot;
    auto plan = std::make_unique<LtPlan>();
    cublasLtMatmulDesc_t desc = plan->desc.p;
    const int32_t op_a = shape.trans_a ? CUBLAS_OP_T : CUBLAS_OP_N,
                  op_b = shape.trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
    PRISM_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSA, &op_a, sizeof(op_a)));
    PRISM_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSB, &op_b, sizeof(op_b)));
    if (shape.bias) {
        const cublasLtEpilogue_t epilogue = CUBLASLT_EPILOGUE_BIAS;
        const int32_t bias_type = shape.d_type;  // fp32 bias for fp32 D, bf16 for bf16 D
        PRISM_CUBLAS_CHECK(
            cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_EPILOGUE, &epilogue, sizeof(epilogue)));
        PRISM_CUBLAS_CHECK(
            cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof(bias)));
        PRISM_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &bias_type,
                                                          sizeof(bias_type)));
    }
    // layouts describe the stored matrices: A is m×k (k×m when transposed), B k×n (n×k)
    const int64_t m = shape.m, n = shape.n, k = shape.k;
    plan->a = std::make_unique<LtLayout>(CUDA_R_16BF, shape.trans_a ? k : m, shape.trans_a ? m : k, shape.lda);
    plan->b = std::make_unique<LtLayout>(CUDA_R_16BF, shape.trans_b ? n : k, shape.trans_b ? k : n, shape.ldb);
    plan->d = std::make_unique<LtLayout>(shape.d_type, m, n, shape.ldd);
    LtPreference pref;
    const uint64_t ws = ctx.workspace_bytes;
    PRISM_CUBLAS_CHECK(
        cublasLtMatmulPreferenceSetAttribute(pref.p, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws)));
    // The heuristic assumes 256-byte aligned operands unless told: say what
    // the pointers and leading dimensions really allow.
    PRISM_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref.p, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
                                                            &shape.align_a, sizeof(shape.align_a)));
    PRISM_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref.p, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                                                            &shape.align_b, sizeof(shape.align_b)));
    PRISM_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref.p, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
                                                            &shape.align_d, sizeof(shape.align_d)));
    PRISM_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref.p, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES,
                                                            &shape.align_d, sizeof(shape.align_d)));
    cublasLtMatmulHeuristicResult_t result{};
    int found = 0;
    const cublasStatus_t st = cublasLtMatmulAlgoGetHeuristic(ctx.handle, desc, plan->a->p, plan->b->p,
                                                             plan->d->p, plan->d->p, pref.p, 1, &result, &found);
    if (st != CUBLAS_STATUS_NOT_SUPPORTED) PRISM_CUBLAS_CHECK(st);
    plan->found = st == CUBLAS_STATUS_SUCCESS && found > 0;
    plan->algo = result.algo;
    slot = std::move(plan);
    return *slot;
}

// Column-major D = op(A)·op(B) + beta·D (C is D, in place; p's ldc is D's) with
// A, B bf16, D of `d_type`, fp32 compute and scale. The heuristic's
// first algorithm: the same one every run for the same shapes (cublasGemmEx
// when the heuristic has none).
// bias (fp32, beta 0, packed D): D = op(A)·op(B) + bias[row], added in the
// GEMM's epilogue, so that D is written once and never read; a bf16 D takes
// the bias rounded to bf16 (cublasLt.h documents the epilogue's bias as D's
// type but for IMMA and fp8 kernels, so an fp32 one is not asked for); without an Lt
// algorithm for it, D is filled with the bias first and accumulated into.
// bias_bf16: the bias already rounded (the model's bf16 copy), for a bf16 D.
void lt_matmul(const linear::Product& p, const uint16_t* A, const uint16_t* B, float beta, void* D,
               cudaDataType_t d_type, cudaStream_t stream, const float* bias = nullptr,
               const uint16_t* bias_bf16 = nullptr) {
    const bool trans_a = p.trans_a, trans_b = p.trans_b;
    const int64_t m = p.m, n = p.n, k = p.k, lda = p.lda, ldb = p.ldb, ldd = p.ldc;
    PRISM_CUDA_REQUIRE(!bias || (beta == 0.f && ldd == m),
                       "lt_matmul: the bias epilogue takes a packed D and beta 0");
    const bool bf16_d = d_type == CUDA_R_16BF;
    // The epilogue reads a bias of D's type. cublasLt.h states no alignment
    // for it, but the epilogue is reported to fail on vectors not 16-byte
    // aligned. The model's biases, and their bf16 copies, are 256-byte aligned
    // (engine/model.h); a bias from another caller that is not, or a bf16 D's
    // bias given in fp32 alone, is copied to (256-byte aligned) scratch.
    const void* epilogue_bias = bf16_d ? (const void*)bias_bf16 : (const void*)bias;
    const bool stage_bias = bias && (!epilogue_bias || alignment(epilogue_bias, 0) < 16);
    Scratch staged_bias(stage_bias ? (bf16_d ? sizeof(uint16_t) : sizeof(float)) * (size_t)m : 0, stream);
    if (stage_bias) {
        if (bf16_d) to_bf16(staged_bias.as<uint16_t>(), bias, m, stream);
        else PRISM_CUDA_CHECK(cudaMemcpyAsync(staged_bias.as<float>(), bias, sizeof(float) * (size_t)m,
                                              cudaMemcpyDeviceToDevice, stream));
        epilogue_bias = staged_bias.as<void>();
    }
    const LtContext ctx = lt_context();
    LtShape shape{};
    PRISM_CUDA_CHECK(cudaGetDevice(&shape.device));
    shape.trans_a = trans_a;
    shape.trans_b = trans_b;
    shape.bias = bias != nullptr;
    shape.m = m, shape.n = n, shape.k = k, shape.lda = lda, shape.ldb = ldb, shape.ldd = ldd;
    shape.d_type = d_type;
    shape.align_a = alignment(A, lda * 2);
    shape.align_b = alignment(B, ldb * 2);
    shape.align_d = alignment(D, ldd * (d_type == CUDA_R_32F ? 4 : 2));
    LtPlan& plan = lt_plan(shape, ctx, epilogue_bias);
    const float alpha = 1.f;
    if (!plan.found) {
        // no Lt kernel for these shapes or alignments: cuBLAS's own GEMM, same types
        PRISM_CUDA_REQUIRE(m <= INT_MAX && n <= INT_MAX && k <= INT_MAX && lda <= INT_MAX && ldb <= INT_MAX &&
                               ldd <= INT_MAX,
                           "bf16 GEMM too large for cublasGemmEx");
        if (bias) {  // D [m, n] column-major is row-major [n, m]: bias[i % m]
            if (bf16_d) fill_bias(static_cast<uint16_t*>(D), bias, n, (int)m, stream);
            else fill_bias(static_cast<float*>(D), bias, n, (int)m, stream);
            beta = 1.f;
        }
        PRISM_CUBLAS_CHECK(cublasGemmEx(blas_handle(stream), trans_a ? CUBLAS_OP_T : CUBLAS_OP_N,
                                        trans_b ? CUBLAS_OP_T : CUBLAS_OP_N, (int)m, (int)n, (int)k,
                                        &alpha, A, CUDA_R_16BF, (int)lda, B, CUDA_R_16BF, (int)ldb,
                                        &beta, D, d_type, (int)ldd, CUBLAS_COMPUTE_32F,
                                        CUBLAS_GEMM_DEFAULT));
        return;
    }
    if (bias)  // this call's bias: the plan was made with another layer's
        PRISM_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(plan.desc.p, CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                                                          &epilogue_bias, sizeof(epilogue_bias)));
    PRISM_CUBLAS_CHECK(cublasLtMatmul(ctx.handle, plan.desc.p, &alpha, A, plan.a->p, B, plan.b->p, &beta, D,
                                      plan.d->p, D, plan.d->p, &plan.algo, ctx.workspace, ctx.workspace_bytes,
                                      stream));
}

}  // namespace

void linear_forward(float* out, const float* x, const float* W, const float* b, int64_t rows,
                    int in_dim, int out_dim, cudaStream_t stream) {
    if (rows <= 0) return;
    if (b) fill_bias(out, b, rows, out_dim, stream);
    fp32_product(linear::forward_product(rows, in_dim, out_dim), W, x, b ? 1.f : 0.f, out, stream);
}

void linear_backward(float* dx, bool overwrite_dx, float* dW, float* db, const float* dout, const float* x,
                     const float* W, int64_t rows, int in_dim, int out_dim, cudaStream_t stream) {
    if (rows <= 0) return;
    if (dx) fp32_product(linear::dx_product(rows, in_dim, out_dim), W, dout, overwrite_dx ? 0.f : 1.f, dx, stream);
    fp32_product(linear::dw_product(rows, in_dim, out_dim), x, dout, 1.f, dW, stream);
    if (db)
        column_sum(1, rows, out_dim, RowMajor{dout, rows, out_dim}, AddTo{db, out_dim, nullptr},
                   stream);
}

void expert_linear_forward(float* out, const float* x, int64_t x_image_stride, const float* W,
                           const float* bias, const int* S, int B, int nS, int N, int in_dim,
                           int out_dim, cudaStream_t stream) {
    const int G = as_int((int64_t)B * nS, "expert linear: B*nS groups must fit an int");
    if (G <= 0 || N <= 0) return;
    fill_expert_bias(out, bias, S, B, nS, N, out_dim, stream);
    Scratch ptrs(3 * sizeof(float*) * (size_t)G, stream);
    float** w_ptr = ptrs.as<float*>();
    float** x_ptr = w_ptr + G;
    float** y_ptr = w_ptr + 2 * G;
    const linear::GroupAt x_at{x_image_stride, (int64_t)N * in_dim}, y_at{(int64_t)nS * N * out_dim,
                                                                           (int64_t)N * out_dim};
    group_pointers(linear::GroupPointersParams<float, float, float>{w_ptr, x_ptr, y_ptr, W, (int64_t)out_dim * in_dim,
                                                                    S, x, x_at, out, y_at, B, nS},
                   stream);
    fp32_batched(linear::forward_product(N, in_dim, out_dim), w_ptr, x_ptr, y_ptr, G, stream);
}

void expert_linear_backward(float* dx, float* dW, float* dbias, const float* dout, const float* x,
                            int64_t x_image_stride, const float* W, const int* S, int B, int nS,
                            int N, int in_dim, int out_dim, cudaStream_t stream) {
    const int G = as_int((int64_t)B * nS, "expert linear: B*nS groups must fit an int");
    if (G <= 0 || N <= 0) return;
    const int64_t per_expert = (int64_t)out_dim * in_dim;
    // dx of group (b, s) += dout(b, s) · W[S[s]]
    {
        Scratch ptrs(3 * sizeof(float*) * (size_t)G, stream);
        float** w_ptr = ptrs.as<float*>();
        float** g_ptr = w_ptr + G;
        float** dx_ptr = w_ptr + 2 * G;
        const linear::GroupAt g_at{(int64_t)nS * N * out_dim, (int64_t)N * out_dim},
            dx_at{x_image_stride, (int64_t)N * in_dim};
        group_pointers(linear::GroupPointersParams<float, float, float>{w_ptr, g_ptr, dx_ptr, W, per_expert, S, dout,
                                                                        g_at, dx, dx_at, B, nS},
                       stream);
        fp32_batched(linear::dx_product(N, in_dim, out_dim), w_ptr, g_ptr, dx_ptr, G, stream);
    }
    // dW[S[s]] += Σ_b dout(b, s)ᵀ · x(b, s): each channel's rows made contiguous,
    // then one GEMM per channel with K = B·N (images summed inside the GEMM).
    const int64_t per_channel = (int64_t)B * N;
    const int K = as_int(per_channel, "expert_linear_backward: B*N must fit an int");
    Scratch xp(sizeof(float) * (size_t)(nS * per_channel) * in_dim, stream);
    Scratch gp(sizeof(float) * (size_t)(nS * per_channel) * out_dim, stream);
    channel_major(linear::ChannelMajorParams<float, float>{xp.as<float>(), gp.as<float>(), x, x_image_stride, dout, B,
                                                           nS, N, in_dim, out_dim},
                  stream);
    Scratch ptrs(3 * sizeof(float*) * (size_t)nS, stream);
    float** dw_ptr = ptrs.as<float*>();
    float** xp_ptr = dw_ptr + nS;
    float** gp_ptr = dw_ptr + 2 * nS;
    weight_pointers(linear::WeightPointersParams<float>{dw_ptr, xp_ptr, gp_ptr, dW, xp.as<float>(), gp.as<float>(),
                                                        S, nS, per_channel, in_dim, out_dim},
                    stream);
    fp32_batched(linear::dw_product(K, in_dim, out_dim), xp_ptr, gp_ptr, dw_ptr, nS, stream);
    // dbias[S[s]] += column sums of channel s's dout rows
    column_sum(nS, per_channel, out_dim, RowMajor{gp.as<float>(), per_channel, out_dim},
               AddTo{dbias, out_dim, S}, stream);
}

void linear_forward_bf16(uint16_t* out, const uint16_t* x, const uint16_t* W, const float* b,
                         int64_t rows, int in_dim, int out_dim, cudaStream_t stream) {
    if (rows <= 0) return;
    if (b) fill_bias(out, b, rows, out_dim, stream);
    lt_matmul(linear::forward_product(rows, in_dim, out_dim), W, x, b ? 1.f : 0.f, out, CUDA_R_16BF, stream);
}

void linear_backward_bf16(uint16_t* dx, float* dW, float* db, const uint16_t* dout,
                          const uint16_t* x, const uint16_t* W, int64_t rows, int in_dim,
                          int out_dim, cudaStream_t stream) {
    if (rows <= 0) return;
    if (dx)
        lt_matmul(linear::dx_product(rows, in_dim, out_dim), W, dout, 1.f, dx, CUDA_R_16BF, stream);
    lt_matmul(linear::dw_product(rows, in_dim, out_dim), x, dout, 1.f, dW, CUDA_R_32F, stream);
    if (db)
        column_sum(1, rows, out_dim, linear::Bf16RowMajor{dout, out_dim}, AddTo{db, out_dim, nullptr},
                   stream);
}

// ---- the bf16 mode of the model: fp32 tensors, bf16 matrix inputs ----------------------
// The operands are rounded to bf16 into stream-ordered scratch, the products
// run on the tensor cores with fp32 accumulation, and the results land in the
// fp32 tensors (beta = 1 where they accumulate). An operand the model already
// keeps in bf16 (x_bf16, dout_bf16: written so by the op that made it) is
// read as it is: no rounding pass, in forward or in backward.

// x_bf16 if given, else bf16(x) in `scratch`.
static const uint16_t* bf16_operand(Scratch& scratch, const float* x, const uint16_t* x_bf16, int64_t n,
                                    cudaStream_t stream) {
    if (x_bf16) return x_bf16;
    PRISM_CUDA_REQUIRE(x != nullptr, "bf16 product: no input");
    to_bf16(scratch.as<uint16_t>(), x, n, stream);
    return scratch.as<uint16_t>();
}

// out [rows, out_dim] of out_type (fp32, or bf16) = x·Wᵀ + b.
static void mixed_forward(void* out, cudaDataType_t out_type, const float* x, const uint16_t* x_bf16,
                          const float* W, const uint16_t* W_bf16, const float* b, const uint16_t* b_bf16,
                          int64_t rows, int in_dim, int out_dim, cudaStream_t stream) {
    if (rows <= 0) return;
    Scratch xs(x_bf16 ? 0 : sizeof(uint16_t) * (size_t)(rows * in_dim), stream);
    Scratch ws(W_bf16 ? 0 : sizeof(uint16_t) * (size_t)out_dim * in_dim, stream);
    const uint16_t* xb = bf16_operand(xs, x, x_bf16, rows * in_dim, stream);
    const uint16_t* wb = bf16_operand(ws, W, W_bf16, (int64_t)out_dim * in_dim, stream);
    lt_matmul(linear::forward_product(rows, in_dim, out_dim), wb, xb, 0.f, out, out_type, stream, b, b_bf16);
}

void linear_forward_mixed(float* out, const float* x, const uint16_t* x_bf16, const float* W, const uint16_t* W_bf16,
                          const float* b, int64_t rows, int in_dim, int out_dim, cudaStream_t stream) {
    mixed_forward(out, CUDA_R_32F, x, x_bf16, W, W_bf16, b, nullptr, rows, in_dim, out_dim, stream);
}

void linear_forward_mixed_to_bf16(uint16_t* out_bf16, const float* x, const uint16_t* x_bf16, const float* W,
                                  const uint16_t* W_bf16, const float* b, const uint16_t* b_bf16, int64_t rows,
                                  int in_dim, int out_dim, cudaStream_t stream) {
    mixed_forward(out_bf16, CUDA_R_16BF, x, x_bf16, W, W_bf16, b, b_bf16, rows, in_dim, out_dim, stream);
}

void linear_backward_mixed(float* dx, uint16_t* dx_bf16, bool overwrite_dx, float* dW, float* db, const float* dout,
                           const uint16_t* dout_bf16, const float* x, const uint16_t* x_bf16, const float* W,
                           const uint16_t* W_bf16, int64_t rows, int in_dim, int out_dim, cudaStream_t stream) {
    if (rows <= 0) return;
    PRISM_CUDA_REQUIRE(!(dx && dx_bf16) && (!dx_bf16 || overwrite_dx),
                       "linear_backward_mixed: dx is fp32 or, overwritten, bf16");
    Scratch gs(dout_bf16 ? 0 : sizeof(uint16_t) * (size_t)(rows * out_dim), stream);
    Scratch xs(x_bf16 ? 0 : sizeof(uint16_t) * (size_t)(rows * in_dim), stream);
    const uint16_t* gb = bf16_operand(gs, dout, dout_bf16, rows * out_dim, stream);
    const uint16_t* xb = bf16_operand(xs, x, x_bf16, rows * in_dim, stream);
    if (dx || dx_bf16) {
        Scratch ws(W_bf16 ? 0 : sizeof(uint16_t) * (size_t)out_dim * in_dim, stream);
        const uint16_t* wb = bf16_operand(ws, W, W_bf16, (int64_t)out_dim * in_dim, stream);
        const linear::Product dx_shape = linear::dx_product(rows, in_dim, out_dim);
        if (dx_bf16) lt_matmul(dx_shape, wb, gb, 0.f, dx_bf16, CUDA_R_16BF, stream);
        else lt_matmul(dx_shape, wb, gb, overwrite_dx ? 0.f : 1.f, dx, CUDA_R_32F, stream);
    }
    lt_matmul(linear::dw_product(rows, in_dim, out_dim), xb, gb, 1.f, dW, CUDA_R_32F, stream);
    if (db && dout_bf16)  // the gradient exists in bf16 only
        column_sum(1, rows, out_dim, linear::Bf16RowMajor{dout_bf16, out_dim}, AddTo{db, out_dim, nullptr}, stream);
    else if (db)  // from the fp32 gradient: the bias sum needs no rounding
        column_sum(1, rows, out_dim, RowMajor{dout, rows, out_dim}, AddTo{db, out_dim, nullptr}, stream);
}

// The experts' bf16 weights where the batched products read them: W_bf16
// (all C experts) indexed through S, or the used experts rounded into a
// compact copy in `scratch` (of compact_experts_bytes), indexed by position.
static size_t compact_experts_bytes(const uint16_t* W_bf16, int nS, int64_t per_expert) {
    return W_bf16 ? 0 : sizeof(uint16_t) * (size_t)(nS * per_expert);
}
static const uint16_t* expert_weights_bf16(Scratch& scratch, const int** S_at, const float* W,
                                           const uint16_t* W_bf16, const int* S, int nS, int64_t per_expert,
                                           cudaStream_t stream) {
    if (W_bf16) {
        *S_at = S;
        return W_bf16;
    }
    used_experts_bf16(scratch.as<uint16_t>(), W, S, nS, per_expert, stream);
    *S_at = nullptr;
    return scratch.as<uint16_t>();
}

void expert_linear_forward_mixed(float* out, uint16_t* out_bf16, const float* x, const uint16_t* x_bf16,
                                 int64_t x_image_stride, const float* W, const uint16_t* W_bf16, const float* bias,
                                 const int* S, int B, int nS, int N, int in_dim, int out_dim, cudaStream_t stream) {
    const int G = as_int((int64_t)B * nS, "expert linear: B*nS groups must fit an int");
    if (G <= 0 || N <= 0) return;
    PRISM_CUDA_REQUIRE((out != nullptr) != (out_bf16 != nullptr), "expert_linear_forward_mixed: one output");
    const int64_t per_image = (int64_t)nS * N * in_dim, per_expert = (int64_t)out_dim * in_dim;
    // The groups' rows: x_bf16's patch rows as they are (image stride), or a
    // compact bf16 copy of x's (image stride per_image).
    Scratch xs(x_bf16 ? 0 : sizeof(uint16_t) * (size_t)(B * per_image), stream);
    const uint16_t* xb = x_bf16;
    int64_t xb_image_stride = x_image_stride;
    if (!x_bf16) {
        PRISM_CUDA_REQUIRE(x != nullptr, "expert_linear_forward_mixed: no input");
        patch_rows_bf16(xs.as<uint16_t>(), x, x_image_stride, B, per_image, stream);
        xb = xs.as<uint16_t>();
        xb_image_stride = per_image;
    }
    Scratch ws(compact_experts_bytes(W_bf16, nS, per_expert), stream);
    const int* w_S = nullptr;
    const uint16_t* wb = expert_weights_bf16(ws, &w_S, W, W_bf16, S, nS, per_expert, stream);
    // The bias first, then the product adds into it (beta = 1). A bf16 result
    // starts from the bias rounded to bf16, so it is rounded twice (the bias,
    // then the sum): within the bf16 tolerance, and no fp32 scratch.
    if (out_bf16) fill_expert_bias(out_bf16, bias, S, B, nS, N, out_dim, stream);
    else fill_expert_bias(out, bias, S, B, nS, N, out_dim, stream);
    Scratch ptrs(3 * sizeof(void*) * (size_t)G, stream);
    void** slots = ptrs.as<void*>();
    uint16_t** w_ptr = reinterpret_cast<uint16_t**>(slots);
    uint16_t** x_ptr = w_ptr + G;
    const linear::GroupAt x_at{xb_image_stride, (int64_t)N * in_dim},
        y_at{(int64_t)nS * N * out_dim, (int64_t)N * out_dim};
    if (out_bf16)
        group_pointers(linear::GroupPointersParams<uint16_t, uint16_t, uint16_t>{
                           w_ptr, x_ptr, reinterpret_cast<uint16_t**>(slots + 2 * G), wb, per_expert, w_S, xb, x_at,
                           out_bf16, y_at, B, nS},
                       stream);
    else
        group_pointers(linear::GroupPointersParams<uint16_t, uint16_t, float>{
                           w_ptr, x_ptr, reinterpret_cast<float**>(slots + 2 * G), wb, per_expert, w_S, xb, x_at,
                           out, y_at, B, nS},
                       stream);
    bf16_batched(linear::forward_product(N, in_dim, out_dim), slots, slots + G, slots + 2 * G,
                 out_bf16 ? CUDA_R_16BF : CUDA_R_32F, G, stream);
}

void expert_linear_backward_mixed(float* dx, float* dW, float* dbias, const float* dout, const float* x,
                                  const uint16_t* x_bf16, int64_t x_image_stride, const float* W,
                                  const uint16_t* W_bf16, const int* S, int B, int nS, int N, int in_dim,
                                  int out_dim, cudaStream_t stream) {
    const int G = as_int((int64_t)B * nS, "expert linear: B*nS groups must fit an int");
    if (G <= 0 || N <= 0) return;
    const int64_t per_expert = (int64_t)out_dim * in_dim, per_channel = (int64_t)B * N;
    // Channel-major bf16 copies of x and dout, one pass each: a channel's rows
    // are contiguous for its dW product (K = B·N), and each group's dout rows
    // (N of them) are contiguous too, so the dx products read the same copy.
    Scratch xp(sizeof(uint16_t) * (size_t)(nS * per_channel) * in_dim, stream);
    Scratch gp(sizeof(uint16_t) * (size_t)(nS * per_channel) * out_dim, stream);
    if (x_bf16)
        channel_major(linear::ChannelMajorParams<uint16_t, uint16_t>{xp.as<uint16_t>(), gp.as<uint16_t>(), x_bf16,
                                                                     x_image_stride, dout, B, nS, N, in_dim, out_dim},
                      stream);
    else
        channel_major(linear::ChannelMajorParams<uint16_t, float>{xp.as<uint16_t>(), gp.as<uint16_t>(), x,
                                                                  x_image_stride, dout, B, nS, N, in_dim, out_dim},
                      stream);
    // dx of group (b, s) += dout(b, s) · W[S[s]]
    {
        Scratch ws(compact_experts_bytes(W_bf16, nS, per_expert), stream);
        const int* w_S = nullptr;
        const uint16_t* wb = expert_weights_bf16(ws, &w_S, W, W_bf16, S, nS, per_expert, stream);
        Scratch ptrs(3 * sizeof(void*) * (size_t)G, stream);
        void** slots = ptrs.as<void*>();
        uint16_t** w_ptr = reinterpret_cast<uint16_t**>(slots);
        uint16_t** g_ptr = w_ptr + G;
        float** dx_ptr = reinterpret_cast<float**>(slots + 2 * G);
        const linear::GroupAt g_at{(int64_t)N * out_dim, per_channel * out_dim},
            dx_at{x_image_stride, (int64_t)N * in_dim};
        group_pointers(linear::GroupPointersParams<uint16_t, uint16_t, float>{w_ptr, g_ptr, dx_ptr, wb, per_expert,
                                                                              w_S, gp.as<uint16_t>(), g_at, dx, dx_at,
                                                                              B, nS},
                       stream);
        bf16_batched(linear::dx_product(N, in_dim, out_dim), slots, slots + G, slots + 2 * G, CUDA_R_32F, G,
                     stream);
    }
    // dW[S[s]] += Σ_b dout(b, s)ᵀ · x(b, s): one product per channel.
    const int K = as_int(per_channel, "expert_linear_backward: B*N must fit an int");
    Scratch ptrs(3 * sizeof(void*) * (size_t)nS, stream);
    void** slots = ptrs.as<void*>();
    float** dw_ptr = reinterpret_cast<float**>(slots);
    uint16_t** xp_ptr = reinterpret_cast<uint16_t**>(slots + nS);
    uint16_t** gp_ptr = reinterpret_cast<uint16_t**>(slots + 2 * nS);
    weight_pointers(linear::WeightPointersParams<uint16_t>{dw_ptr, xp_ptr, gp_ptr, dW, xp.as<uint16_t>(),
                                                           gp.as<uint16_t>(), S, nS, per_channel, in_dim, out_dim},
                    stream);
    bf16_batched(linear::dw_product(K, in_dim, out_dim), slots + nS, slots + 2 * nS, slots, CUDA_R_32F, nS,
                 stream);
    // dbias[S[s]] += column sums of channel s's fp32 dout rows (no rounding)
    column_sum(nS, per_channel, out_dim, linear::ChannelRows{dout, nS, N, out_dim}, AddTo{dbias, out_dim, S}, stream);
}

#else  // built without cuBLAS: the linear ops say so

namespace {
[[noreturn]] void no_cublas() {
    throw_error("CUDA op", __FILE__, __LINE__, "linear",
                "this build has no cuBLAS (set CUBLAS_HOME when building)");
}
}  // namespace

void linear_forward(float*, const float*, const float*, const float*, int64_t, int, int,
                    cudaStream_t) {
    no_cublas();
}
void linear_backward(float*, bool, float*, float*, const float*, const float*, const float*, int64_t, int,
                     int, cudaStream_t) {
    no_cublas();
}
void expert_linear_forward(float*, const float*, int64_t, const float*, const float*, const int*,
                           int, int, int, int, int, cudaStream_t) {
    no_cublas();
}
void expert_linear_backward(float*, float*, float*, const float*, const float*, int64_t,
                            const float*, const int*, int, int, int, int, int, cudaStream_t) {
    no_cublas();
}
void linear_forward_bf16(uint16_t*, const uint16_t*, const uint16_t*, const float*, int64_t, int,
                         int, cudaStream_t) {
    no_cublas();
}
void linear_backward_bf16(uint16_t*, float*, float*, const uint16_t*, const uint16_t*,
                          const uint16_t*, int64_t, int, int, cudaStream_t) {
    no_cublas();
}
void linear_forward_mixed(float*, const float*, const uint16_t*, const float*, const uint16_t*, const float*,
                          int64_t, int, int, cudaStream_t) {
    no_cublas();
}
void linear_forward_mixed_to_bf16(uint16_t*, const float*, const uint16_t*, const float*, const uint16_t*,
                                  const float*, const uint16_t*, int64_t, int, int, cudaStream_t) {
    no_cublas();
}
void linear_backward_mixed(float*, uint16_t*, bool, float*, float*, const float*, const uint16_t*, const float*,
                           const uint16_t*, const float*, const uint16_t*, int64_t, int, int, cudaStream_t) {
    no_cublas();
}
void expert_linear_forward_mixed(float*, uint16_t*, const float*, const uint16_t*, int64_t, const float*,
                                 const uint16_t*, const float*, const int*, int, int, int, int, int, cudaStream_t) {
    no_cublas();
}
void expert_linear_backward_mixed(float*, float*, float*, const float*, const float*, const uint16_t*, int64_t,
                                  const float*, const uint16_t*, const int*, int, int, int, int, int, cudaStream_t) {
    no_cublas();
}
#endif

}  // namespace prism::cuda_ops
