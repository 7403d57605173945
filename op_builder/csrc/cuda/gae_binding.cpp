// torch binding of the CUDA packed GAE (same interface as the CPU op; float32).
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include "kernels.h"

std::vector<torch::Tensor> gae(torch::Tensor rewards, torch::Tensor values, torch::Tensor cu_seqlens,
                               torch::Tensor truncated, double gamma, double lam) {
    TORCH_CHECK(rewards.is_cuda() && rewards.scalar_type() == torch::kFloat, "gae (CUDA) takes float32 CUDA tensors");
    const int64_t batch = cu_seqlens.numel() - 1;
    TORCH_CHECK(values.numel() == rewards.numel() + batch, "gae: values must hold n + 1 entries per sequence");
    auto r = rewards.contiguous(), v = values.to(torch::kFloat).contiguous();
    auto cu = cu_seqlens.to(rewards.device(), torch::kInt64).contiguous();
    auto done = truncated.to(rewards.device(), torch::kBool).contiguous();
    auto advantages = torch::empty_like(r), returns = torch::empty_like(r);
    ds_realloc_gae(r.data_ptr<float>(), v.data_ptr<float>(), cu.data_ptr<int64_t>(), done.data_ptr<bool>(), batch,
                   static_cast<float>(gamma), static_cast<float>(lam), advantages.data_ptr<float>(),
                   returns.data_ptr<float>(), c10::cuda::getCurrentCUDAStream());
    return {advantages, returns};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("gae", &gae, "(advantages, returns) of a packed batch"); }
