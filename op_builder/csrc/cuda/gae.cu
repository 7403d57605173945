// Packed GAE on the GPU: one thread per sequence walks it backwards (sequences are independent).
#include "kernels.h"

__global__ void gae_kernel(const float* rewards, const float* values, const int64_t* cu, const bool* truncated,
                           int64_t batch, float gamma, float lam, float* advantages, float* returns) {
    const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
    if (i >= batch) return;
    const int64_t start = cu[i], n = cu[i + 1] - start;
    const float* v = values + start + i;
    float following = truncated[i] ? v[n] : 0.f, last = 0.f;
    for (int64_t t = n - 1; t >= 0; --t) {
        const float delta = rewards[start + t] + gamma * following - v[t];
        last = delta + gamma * lam * last;
        advantages[start + t] = last;
        returns[start + t] = last + v[t];
        following = v[t];
    }
}

void ds_realloc_gae(const float* rewards, const float* values, const int64_t* cu, const bool* truncated,
                    int64_t batch, float gamma, float lam, float* advantages, float* returns, cudaStream_t stream) {
    if (batch == 0) return;
    const int threads = 128;
    gae_kernel<<<(batch + threads - 1) / threads, threads, 0, stream>>>(rewards, values, cu, truncated, batch, gamma,
                                                                        lam, advantages, returns);
}
