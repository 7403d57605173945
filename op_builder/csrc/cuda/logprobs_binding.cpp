// torch binding of the CUDA fused log-probs (same interface as the CPU op; float32 / bf16 logits).
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include "kernels.h"

namespace {

int dtype_code(const torch::Tensor& logits) {
    TORCH_CHECK(logits.is_cuda() && logits.dim() == 2 && logits.is_contiguous(),
                "fused logprobs (CUDA) takes contiguous [T, V] CUDA logits");
    if (logits.scalar_type() == torch::kFloat) return 0;
    TORCH_CHECK(logits.scalar_type() == torch::kBFloat16, "fused logprobs (CUDA): float32 or bf16 logits");
    return 1;
}

std::vector<torch::Tensor> forward(torch::Tensor logits, torch::Tensor targets, bool entropy) {
    const int code = dtype_code(logits);
    const int64_t rows = logits.size(0);
    auto options = logits.options().dtype(torch::kFloat);
    auto logprobs = torch::empty({rows}, options), lses = torch::empty({rows}, options);
    auto entropies = torch::empty({entropy ? rows : 0}, options);
    auto t = targets.to(logits.device(), torch::kInt64).contiguous();
    ds_realloc_logprobs_forward(logits.data_ptr(), code, t.data_ptr<int64_t>(), rows, logits.size(1), entropy,
                                logprobs.data_ptr<float>(), entropy ? entropies.data_ptr<float>() : nullptr,
                                lses.data_ptr<float>(), c10::cuda::getCurrentCUDAStream());
    return {logprobs, entropies, lses};
}

torch::Tensor backward(torch::Tensor logits, torch::Tensor targets, torch::Tensor lses, torch::Tensor entropies,
                       torch::Tensor grad_logprobs, torch::Tensor grad_entropies, bool inplace) {
    const int code = dtype_code(logits);
    auto grad = inplace ? logits : torch::empty_like(logits);  // each element is read before it is written
    auto t = targets.to(logits.device(), torch::kInt64).contiguous();
    auto glp = grad_logprobs.to(torch::kFloat).contiguous(), gh = grad_entropies.to(torch::kFloat).contiguous();
    const bool with_entropy = gh.numel() > 0;
    ds_realloc_logprobs_backward(logits.data_ptr(), code, t.data_ptr<int64_t>(), lses.data_ptr<float>(),
                                 with_entropy ? entropies.data_ptr<float>() : nullptr, glp.data_ptr<float>(),
                                 with_entropy ? gh.data_ptr<float>() : nullptr, logits.size(0), logits.size(1),
                                 grad.data_ptr(), c10::cuda::getCurrentCUDAStream());
    return grad;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("forward", &forward, "(logprobs, entropies, lse) of logits [T, V] at targets [T]");
    m.def("backward", &backward, "d(logprobs, entropies)/d logits");
}
