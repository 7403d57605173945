"""The few-row linear: F.linear's product whichever way it is computed, chosen by shape alone."""

import pytest
import torch
import torch.nn.functional as F

from ds_realloc.models import linear as lin


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [4, 8, 16, 32, 48])
def test_the_product_matches_f_linear(rows, dtype):
    g = torch.Generator().manual_seed(rows)
    weight = torch.randn(3072, 256, generator=g).to(dtype)  # 3 * 2^18 elements
    bias = torch.randn(3072, generator=g).to(dtype)
    x = torch.randn(rows // 2, 2, 256, generator=g).to(dtype)
    assert lin.uses_transposed(x, weight) == (8 <= rows <= 32)
    expected = F.linear(x.double(), weight.double(), bias.double())
    y = lin.linear(x, weight, bias)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert y.shape == (rows // 2, 2, 3072) and y.dtype == dtype and y.is_contiguous()
    assert torch.allclose(y.double(), expected, rtol=tol, atol=tol * 16)


def test_small_weights_and_gradients_take_f_linear_exactly():
    small, big = torch.randn(3071, 256), torch.randn(3072, 256)
    x = torch.randn(16, 256)
    assert not lin.uses_transposed(x, small) and torch.equal(lin.linear(x, small), F.linear(x, small))
    wanted = torch.randn(16, 256, requires_grad=True)
    assert not lin.uses_transposed(wanted, big)
    lin.linear(wanted, big).sum().backward()
    assert torch.allclose(wanted.grad, big.sum(0).expand(16, -1), atol=1e-4)
    with torch.no_grad():
        assert lin.uses_transposed(wanted, big)


def test_a_process_wide_replacement_of_f_linear_is_not_taken(monkeypatch):
    """DeepSpeed ZeRO-3 swaps torch.nn.functional.linear for an autograd Function; inference calls skip it."""
    x, small = torch.randn(4, 64), torch.randn(32, 64)
    expected = F.linear(x, small)

    def patched(*args, **kwargs):
        raise AssertionError("the replaced F.linear was called")

    monkeypatch.setattr(torch.nn.functional, "linear", patched)
    assert torch.equal(lin.linear(x, small), expected)


def test_a_strided_view_is_computed_as_its_contiguous_copy():
    """The LM head of a scoring call reads the last positions of the hidden states, a strided view: the
    same product as on the copy, bit for bit (the copy is what makes it fast on CPU, module doc)."""
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(512, 64, generator=g).to(torch.bfloat16)
    hidden = torch.randn(8, 40, 64, generator=g).to(torch.bfloat16)
    view = hidden[:, -16:]
    assert not view.is_contiguous()
    assert torch.equal(lin.linear(view, weight), lin.linear(view.contiguous(), weight))
