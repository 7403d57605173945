// Interval copy: gather many [start, start + length) intervals of a flat tensor into one contiguous
// buffer, and scatter a contiguous buffer back into the intervals. Byte copies, so any dtype.
// Used by the reallocation engine for strided (row-parallel, dim-1) shards: one interval per row.

#include <torch/extension.h>

#include <cstring>
#include <vector>

namespace {

void check(const torch::Tensor& flat, const torch::Tensor& starts, const torch::Tensor& lengths,
           const torch::Tensor& packed) {
    TORCH_CHECK(flat.is_contiguous() && packed.is_contiguous(), "interval copy needs contiguous tensors");
    TORCH_CHECK(flat.scalar_type() == packed.scalar_type(), "interval copy: dtypes differ");
    TORCH_CHECK(starts.scalar_type() == torch::kInt64 && lengths.scalar_type() == torch::kInt64,
                "interval copy: starts and lengths must be int64");
    TORCH_CHECK(starts.numel() == lengths.numel(), "interval copy: starts and lengths differ in size");
}

// offsets[i] = where interval i begins in the packed buffer (exclusive prefix sum of lengths)
std::vector<int64_t> packed_offsets(const int64_t* lengths, int64_t n, int64_t flat_numel, const int64_t* starts,
                                    int64_t packed_numel) {
    std::vector<int64_t> offsets(n);
    int64_t total = 0;
    for (int64_t i = 0; i < n; ++i) {
        TORCH_CHECK(lengths[i] >= 0 && starts[i] >= 0 && starts[i] + lengths[i] <= flat_numel,
                    "interval ", i, " [", starts[i], ", ", starts[i] + lengths[i], ") is outside the tensor of ",
                    flat_numel, " elements");
        offsets[i] = total;
        total += lengths[i];
    }
    TORCH_CHECK(total <= packed_numel, "interval copy: intervals hold ", total, " elements, the buffer ",
                packed_numel);
    return offsets;
}

template <bool kGather>
void copy_intervals(torch::Tensor flat, torch::Tensor starts, torch::Tensor lengths, torch::Tensor packed) {
    check(flat, starts, lengths, packed);
    auto s = starts.contiguous(), l = lengths.contiguous();
    const int64_t n = s.numel();
    const int64_t* start = s.data_ptr<int64_t>();
    const int64_t* length = l.data_ptr<int64_t>();
    const auto offsets = packed_offsets(length, n, flat.numel(), start, packed.numel());
    const size_t item = flat.element_size();
    char* flat_bytes = static_cast<char*>(flat.data_ptr());
    char* packed_bytes = static_cast<char*>(packed.data_ptr());
#pragma omp parallel for schedule(static) if (n > 64)
    for (int64_t i = 0; i < n; ++i) {
        char* a = flat_bytes + start[i] * item;
        char* b = packed_bytes + offsets[i] * item;
        if (kGather) {
            std::memcpy(b, a, length[i] * item);
        } else {
            std::memcpy(a, b, length[i] * item);
        }
    }
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("gather", &copy_intervals<true>, "packed <- flat[intervals] (flat, starts, lengths, packed)");
    m.def("scatter", &copy_intervals<false>, "flat[intervals] <- packed (flat, starts, lengths, packed)");
}
