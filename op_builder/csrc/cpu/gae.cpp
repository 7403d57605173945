// Generalised advantage estimation over a packed batch: rewards [N] (the actions of all sequences,
// back to back, bounds in cu_seqlens [B + 1]), values [N + B] (each sequence's n + 1 state values:
// before every action and after the last). A sequence that ended (EOS) has terminal value 0; a
// truncated one bootstraps from its last value. Forward only; one sequence per OpenMP iteration.

#include <torch/extension.h>

#include <vector>

namespace {

template <typename T>
void gae_kernel(const T* rewards, const T* values, const int64_t* cu, const bool* truncated, int64_t batch,
                double gamma, double lam, T* advantages, T* returns) {
#pragma omp parallel for schedule(dynamic, 16) if (batch > 16)
    for (int64_t i = 0; i < batch; ++i) {
        const int64_t start = cu[i], end = cu[i + 1];
        const T* v = values + start + i;  // this sequence's n + 1 values
        const int64_t n = end - start;
        double following = truncated[i] ? static_cast<double>(v[n]) : 0.0;
        double last = 0.0;
        for (int64_t t = n - 1; t >= 0; --t) {
            const double value = static_cast<double>(v[t]);
            const double delta = static_cast<double>(rewards[start + t]) + gamma * following - value;
            last = delta + gamma * lam * last;
            advantages[start + t] = static_cast<T>(last);
            returns[start + t] = static_cast<T>(last + value);
            following = value;
        }
    }
}

std::vector<torch::Tensor> gae(torch::Tensor rewards, torch::Tensor values, torch::Tensor cu_seqlens,
                               torch::Tensor truncated, double gamma, double lam) {
    TORCH_CHECK(rewards.dim() == 1 && values.dim() == 1 && cu_seqlens.dim() == 1, "gae takes 1-D tensors");
    const int64_t batch = cu_seqlens.numel() - 1;
    TORCH_CHECK(batch >= 0 && truncated.numel() == batch, "gae: truncated needs one flag per sequence");
    TORCH_CHECK(values.numel() == rewards.numel() + batch, "gae: values must hold n + 1 entries per sequence (",
                rewards.numel() + batch, "), got ", values.numel());
    TORCH_CHECK(values.scalar_type() == rewards.scalar_type(), "gae: rewards and values differ in dtype");
    auto r = rewards.contiguous(), v = values.contiguous();
    auto cu = cu_seqlens.to(torch::kInt64).contiguous();
    auto done = truncated.to(torch::kBool).contiguous();
    TORCH_CHECK(batch == 0 || cu[batch].item<int64_t>() == rewards.numel(), "gae: cu_seqlens must end at N");
    auto advantages = torch::empty_like(r), returns = torch::empty_like(r);
    AT_DISPATCH_FLOATING_TYPES(r.scalar_type(), "ds_realloc_gae", [&] {
        gae_kernel<scalar_t>(r.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), cu.data_ptr<int64_t>(),
                             done.data_ptr<bool>(), batch, gamma, lam, advantages.data_ptr<scalar_t>(),
                             returns.data_ptr<scalar_t>());
    });
    return {advantages, returns};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("gae", &gae, "(advantages, returns) of a packed batch");
}
