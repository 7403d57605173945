// torch binding of the CUDA interval copy (same interface as the CPU op).
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include "kernels.h"

namespace {

void copy(torch::Tensor flat, torch::Tensor starts, torch::Tensor lengths, torch::Tensor packed, bool gather) {
    TORCH_CHECK(flat.is_cuda() && packed.is_cuda() && flat.is_contiguous() && packed.is_contiguous(),
                "interval copy (CUDA) needs contiguous CUDA tensors");
    TORCH_CHECK(flat.scalar_type() == packed.scalar_type(), "interval copy: dtypes differ");
    auto s = starts.to(flat.device(), torch::kInt64).contiguous();
    auto l = lengths.to(flat.device(), torch::kInt64).contiguous();
    auto offsets = (l.cumsum(0) - l).contiguous();
    ds_realloc_interval_copy(static_cast<char*>(flat.data_ptr()), static_cast<char*>(packed.data_ptr()),
                             s.data_ptr<int64_t>(), l.data_ptr<int64_t>(), offsets.data_ptr<int64_t>(), s.numel(),
                             flat.element_size(), gather, c10::cuda::getCurrentCUDAStream());
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("gather", [](torch::Tensor f, torch::Tensor s, torch::Tensor l, torch::Tensor p) { copy(f, s, l, p, true); });
    m.def("scatter", [](torch::Tensor f, torch::Tensor s, torch::Tensor l, torch::Tensor p) { copy(f, s, l, p, false); });
}
