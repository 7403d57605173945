// Fused log-probs on the GPU: one block per row; an online (max, sum of exp, sum of p * x) reduction
// in registers, then a block reduction. Backward recomputes p from the saved log-sum-exp.
#include <cuda_bf16.h>

#include "kernels.h"

namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ float load(const void* base, int dtype, int64_t i) {
    return dtype == 0 ? static_cast<const float*>(base)[i]
                      : __bfloat162float(static_cast<const __nv_bfloat16*>(base)[i]);
}

__device__ __forceinline__ void store(void* base, int dtype, int64_t i, float value) {
    if (dtype == 0) {
        static_cast<float*>(base)[i] = value;
    } else {
        static_cast<__nv_bfloat16*>(base)[i] = __float2bfloat16(value);
    }
}

struct Online {
    float max, sum, dot;  // running max, sum of exp(x - max), sum of exp(x - max) * x
};

__device__ __forceinline__ Online merge(Online a, Online b) {
    const float m = fmaxf(a.max, b.max);
    if (m == -INFINITY) return a;
    const float ea = __expf(a.max - m), eb = __expf(b.max - m);
    return {m, a.sum * ea + b.sum * eb, a.dot * ea + b.dot * eb};
}

__global__ void forward_kernel(const void* logits, int dtype, const int64_t* targets, int64_t vocab, bool entropy,
                               float* logprobs, float* entropies, float* lses) {
    const int64_t row = blockIdx.x;
    const int64_t base = row * vocab;
    Online acc{-INFINITY, 0.f, 0.f};
    for (int64_t v = threadIdx.x; v < vocab; v += kThreads) {
        const float x = load(logits, dtype, base + v);
        acc = merge(acc, Online{x, 1.f, x});
    }
    __shared__ Online shared[kThreads];
    shared[threadIdx.x] = acc;
    __syncthreads();
    for (int width = kThreads / 2; width > 0; width /= 2) {
        if (threadIdx.x < width) shared[threadIdx.x] = merge(shared[threadIdx.x], shared[threadIdx.x + width]);
        __syncthreads();
    }
    if (threadIdx.x == 0) {
        const Online total = shared[0];
        const float lse = total.max + logf(total.sum);
        const int64_t target = targets[row];
        logprobs[row] = (target >= 0 && target < vocab) ? load(logits, dtype, base + target) - lse : 0.f;
        lses[row] = lse;
        if (entropy) entropies[row] = lse - total.dot / total.sum;
    }
}

__global__ void backward_kernel(const void* logits, int dtype, const int64_t* targets, const float* lses,
                                const float* entropies, const float* grad_logprobs, const float* grad_entropies,
                                int64_t vocab, void* grad) {
    const int64_t row = blockIdx.x;
    const int64_t base = row * vocab;
    const float lse = lses[row], g_lp = grad_logprobs[row];
    const float g_h = grad_entropies ? grad_entropies[row] : 0.f;
    const float centre = grad_entropies ? lse - entropies[row] : 0.f;
    const int64_t target = targets[row];
    for (int64_t v = threadIdx.x; v < vocab; v += kThreads) {
        const float x = load(logits, dtype, base + v);
        const float p = __expf(x - lse);
        float g = -p * (g_lp + g_h * (x - centre));
        if (v == target) g += g_lp;
        store(grad, dtype, base + v, g);
    }
}

}  // namespace

void ds_realloc_logprobs_forward(const void* logits, int dtype, const int64_t* targets, int64_t rows,
                                 int64_t vocab, bool entropy, float* logprobs, float* entropies, float* lses,
                                 cudaStream_t stream) {
    if (rows == 0) return;
    forward_kernel<<<rows, kThreads, 0, stream>>>(logits, dtype, targets, vocab, entropy, logprobs, entropies, lses);
}

void ds_realloc_logprobs_backward(const void* logits, int dtype, const int64_t* targets, const float* lses,
                                  const float* entropies, const float* grad_logprobs, const float* grad_entropies,
                                  int64_t rows, int64_t vocab, void* grad, cudaStream_t stream) {
    if (rows == 0) return;
    backward_kernel<<<rows, kThreads, 0, stream>>>(logits, dtype, targets, lses, entropies, grad_logprobs,
                                                   grad_entropies, vocab, grad);
}
