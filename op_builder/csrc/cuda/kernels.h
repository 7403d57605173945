// Launchers of ds_realloc's CUDA kernels: plain CUDA (no torch headers), called by the bindings.
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

// interval copy, bytes: gather (packed <- flat) or scatter (flat <- packed)
void ds_realloc_interval_copy(char* flat, char* packed, const int64_t* starts, const int64_t* lengths,
                              const int64_t* offsets, int64_t count, int64_t item_bytes, bool gather,
                              cudaStream_t stream);

// packed GAE over float rewards [N], values [N + B], cu_seqlens [B + 1], truncated [B]
void ds_realloc_gae(const float* rewards, const float* values, const int64_t* cu, const bool* truncated,
                    int64_t batch, float gamma, float lam, float* advantages, float* returns, cudaStream_t stream);

// fused log-probs of float / bf16 logits [rows, vocab]: dtype 0 = float, 1 = bf16
void ds_realloc_logprobs_forward(const void* logits, int dtype, const int64_t* targets, int64_t rows,
                                 int64_t vocab, bool entropy, float* logprobs, float* entropies, float* lses,
                                 cudaStream_t stream);
void ds_realloc_logprobs_backward(const void* logits, int dtype, const int64_t* targets, const float* lses,
                                  const float* entropies, const float* grad_logprobs, const float* grad_entropies,
                                  int64_t rows, int64_t vocab, void* grad, cudaStream_t stream);
