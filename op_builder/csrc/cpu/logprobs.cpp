// Fused log-probs: log p(target) (and optionally the entropy) of every row of logits [T, V] without
// the [T, V] fp32 log-softmax: each row is reduced in one pass (max, sum of exp, and for the entropy
// the sum of p * x) in a per-thread fp32 row buffer. Backward recomputes p from the saved
// log-sum-exp: d logp / dx = onehot - p, d H / dx = -p (x - (lse - H)). Rows in parallel (OpenMP),
// columns vectorised with ATen's Vectorized (Sleef exp under AVX512 / AVX2).

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/extension.h>

#include <cmath>
#include <limits>
#include <vector>

namespace {

using Vec = at::vec::Vectorized<float>;

// the row as fp32 (a view of the input when it already is)
template <typename T>
const float* row_as_float(const T* row, int64_t vocab, std::vector<float>& buffer) {
    if constexpr (std::is_same_v<T, float>) {
        return row;
    } else {
        at::vec::convert(row, buffer.data(), vocab);
        return buffer.data();
    }
}

struct RowStats {
    float max, lse, expected_x;  // expected_x = sum p * x (for the entropy)
};

RowStats reduce_row(const float* x, int64_t vocab, bool entropy) {
    const int64_t step = Vec::size(), full = vocab - vocab % step;
    Vec vmax(-std::numeric_limits<float>::infinity());
    for (int64_t i = 0; i < full; i += step) vmax = at::vec::maximum(vmax, Vec::loadu(x + i));
    float max = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, vmax);
    for (int64_t i = full; i < vocab; ++i) max = std::max(max, x[i]);
    const Vec shift(max);
    Vec vsum(0.f), vdot(0.f);
    for (int64_t i = 0; i < full; i += step) {
        const Vec v = Vec::loadu(x + i);
        const Vec e = (v - shift).exp();
        vsum = vsum + e;
        if (entropy) vdot = at::vec::fmadd(e, v, vdot);
    }
    float sum = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, vsum);
    float dot = entropy ? at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, vdot) : 0.f;
    for (int64_t i = full; i < vocab; ++i) {
        const float e = std::exp(x[i] - max);
        sum += e;
        dot += e * x[i];
    }
    return {max, max + std::log(sum), dot / sum};
}

template <typename T>
void forward_kernel(const T* logits, const int64_t* targets, int64_t rows, int64_t vocab, bool entropy,
                    float* logprobs, float* entropies, float* lses) {
#pragma omp parallel
    {
        std::vector<float> buffer(std::is_same_v<T, float> ? 0 : vocab);
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; ++r) {
            const float* x = row_as_float(logits + r * vocab, vocab, buffer);
            const RowStats s = reduce_row(x, vocab, entropy);
            const int64_t target = targets[r];
            logprobs[r] = (target >= 0 && target < vocab) ? x[target] - s.lse : 0.f;
            lses[r] = s.lse;
            if (entropy) entropies[r] = s.lse - s.expected_x;
        }
    }
}

template <typename T>
void backward_kernel(const T* logits, const int64_t* targets, const float* lses, const float* entropies,
                     const float* grad_logprobs, const float* grad_entropies, int64_t rows, int64_t vocab,
                     T* grad) {
    const int64_t step = Vec::size();
#pragma omp parallel
    {
        std::vector<float> buffer(std::is_same_v<T, float> ? 0 : vocab);
        std::vector<float> out(std::is_same_v<T, float> ? 0 : vocab);
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; ++r) {
            const float* x = row_as_float(logits + r * vocab, vocab, buffer);
            float* g = std::is_same_v<T, float> ? reinterpret_cast<float*>(grad + r * vocab) : out.data();
            const float g_lp = grad_logprobs[r];
            const float g_h = grad_entropies ? grad_entropies[r] : 0.f;
            const float lse = lses[r];
            const float centre = grad_entropies ? lse - entropies[r] : 0.f;  // sum p * x
            // g_v = -p_v * (g_lp + g_h * (x_v - centre)), p_v = exp(x_v - lse)
            const Vec vlse(lse), vglp(g_lp), vgh(g_h), vcentre(centre), zero(0.f);
            const int64_t full = vocab - vocab % step;
            for (int64_t i = 0; i < full; i += step) {
                const Vec v = Vec::loadu(x + i);
                const Vec p = (v - vlse).exp();
                const Vec scale = at::vec::fmadd(vgh, v - vcentre, vglp);
                (zero - p * scale).store(g + i);
            }
            for (int64_t i = full; i < vocab; ++i) {
                const float p = std::exp(x[i] - lse);
                g[i] = -p * (g_lp + g_h * (x[i] - centre));
            }
            const int64_t target = targets[r];
            if (target >= 0 && target < vocab) g[target] += g_lp;
            if constexpr (!std::is_same_v<T, float>) at::vec::convert(g, grad + r * vocab, vocab);
        }
    }
}

void check(const torch::Tensor& logits, const torch::Tensor& targets) {
    TORCH_CHECK(logits.dim() == 2 && logits.is_contiguous(), "fused logprobs takes contiguous [T, V] logits");
    TORCH_CHECK(targets.dim() == 1 && targets.numel() == logits.size(0) && targets.scalar_type() == torch::kInt64,
                "fused logprobs takes int64 targets [T]");
}

#define DISPATCH(TYPE, ...)                                                                  \
    switch (TYPE) {                                                                          \
        case torch::kFloat: { using scalar_t = float; __VA_ARGS__(); break; }                \
        case torch::kBFloat16: { using scalar_t = c10::BFloat16; __VA_ARGS__(); break; }     \
        case torch::kHalf: { using scalar_t = c10::Half; __VA_ARGS__(); break; }             \
        default: TORCH_CHECK(false, "fused logprobs: unsupported dtype ", TYPE);               \
    }

std::vector<torch::Tensor> forward(torch::Tensor logits, torch::Tensor targets, bool entropy) {
    check(logits, targets);
    const int64_t rows = logits.size(0), vocab = logits.size(1);
    auto options = logits.options().dtype(torch::kFloat);
    auto logprobs = torch::empty({rows}, options), lses = torch::empty({rows}, options);
    auto entropies = torch::empty({entropy ? rows : 0}, options);
    auto t = targets.contiguous();
    DISPATCH(logits.scalar_type(), [&] {
        forward_kernel<scalar_t>(logits.data_ptr<scalar_t>(), t.data_ptr<int64_t>(), rows, vocab, entropy,
                                 logprobs.data_ptr<float>(), entropy ? entropies.data_ptr<float>() : nullptr,
                                 lses.data_ptr<float>());
    });
    return {logprobs, entropies, lses};
}

// With `inplace`, the gradient overwrites the logits (each element is read before it is written):
// the loss paths' logits are fresh LM-head outputs used once, so no [T, V] buffer is allocated.
torch::Tensor backward(torch::Tensor logits, torch::Tensor targets, torch::Tensor lses, torch::Tensor entropies,
                       torch::Tensor grad_logprobs, torch::Tensor grad_entropies, bool inplace) {
    check(logits, targets);
    const int64_t rows = logits.size(0), vocab = logits.size(1);
    auto grad = inplace ? logits : torch::empty_like(logits);
    auto t = targets.contiguous(), l = lses.contiguous(), glp = grad_logprobs.to(torch::kFloat).contiguous();
    const bool with_entropy = grad_entropies.numel() > 0;
    auto gh = grad_entropies.to(torch::kFloat).contiguous(), h = entropies.contiguous();
    DISPATCH(logits.scalar_type(), [&] {
        backward_kernel<scalar_t>(logits.data_ptr<scalar_t>(), t.data_ptr<int64_t>(), l.data_ptr<float>(),
                                  with_entropy ? h.data_ptr<float>() : nullptr, glp.data_ptr<float>(),
                                  with_entropy ? gh.data_ptr<float>() : nullptr, rows, vocab,
                                  grad.data_ptr<scalar_t>());
    });
    return grad;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("forward", &forward, "(logprobs, entropies, lse) of logits [T, V] at targets [T]");
    m.def("backward", &backward, "d(logprobs, entropies)/d logits");
}
