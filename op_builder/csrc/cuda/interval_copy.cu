// Interval copy on the GPU: one block per interval, threads stride over its bytes (16-byte words
// when the interval is aligned).
#include "kernels.h"

__global__ void interval_copy_kernel(char* flat, char* packed, const int64_t* starts, const int64_t* lengths,
                                     const int64_t* offsets, int64_t item_bytes, bool gather) {
    const int64_t i = blockIdx.x;
    char* a = flat + starts[i] * item_bytes;
    char* b = packed + offsets[i] * item_bytes;
    const int64_t bytes = lengths[i] * item_bytes;
    char* dst = gather ? b : a;
    const char* src = gather ? a : b;
    if (((reinterpret_cast<uintptr_t>(dst) | reinterpret_cast<uintptr_t>(src) | bytes) & 15) == 0) {
        const int4* s = reinterpret_cast<const int4*>(src);
        int4* d = reinterpret_cast<int4*>(dst);
        for (int64_t w = threadIdx.x; w < bytes / 16; w += blockDim.x) d[w] = s[w];
    } else {
        for (int64_t k = threadIdx.x; k < bytes; k += blockDim.x) dst[k] = src[k];
    }
}

void ds_realloc_interval_copy(char* flat, char* packed, const int64_t* starts, const int64_t* lengths,
                              const int64_t* offsets, int64_t count, int64_t item_bytes, bool gather,
                              cudaStream_t stream) {
    if (count == 0) return;
    interval_copy_kernel<<<count, 256, 0, stream>>>(flat, packed, starts, lengths, offsets, item_bytes, gather);
}
