"""full_kl against the float64 reference."""
import pytest
import torch

import tike_cuda
from tike_cuda.reference import full_kl_reference

from conftest import DEVICES, DTYPES, assert_grads, assert_values, make_logits


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("V", [1, 15, 16, 4099, 151936])
def test_values_and_grads(device, dtype, V, gen):
    N = 2 if V > 10000 else 6
    z = make_logits((N, V), dtype, device, generator=gen, requires_grad=True)
    zr = make_logits((N, V), dtype, device, generator=gen)
    mask = torch.ones(N, dtype=torch.bool, device=device)
    mask[-1] = V == 1  # mask a row unless the row count is tiny
    out = tike_cuda.full_kl(z, zr, temperature=1.7, mask=mask)
    z64 = z.detach().double().requires_grad_()
    exp = full_kl_reference(z64, zr.cpu(), temperature=1.7, mask=mask.cpu())
    assert_values(out, exp, atol=2e-5 * max(1.0, exp.abs().max().item()))
    g = torch.randn(N, generator=gen, dtype=torch.float64)
    (grad,) = torch.autograd.grad(out, z, g.to(device, torch.float32))
    (grad64,) = torch.autograd.grad(exp, z64, g)
    assert_grads(grad, grad64, dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_layouts_and_empty(device, gen):
    full = make_logits((2, 5, 300), torch.float32, device, generator=gen)
    ref = make_logits((2, 5, 300), torch.float32, device, generator=gen)
    z = full[:, 1:].detach().requires_grad_()
    out = tike_cuda.full_kl(z, ref[:, :-1])
    assert out.shape == (2, 4)
    assert_values(out, full_kl_reference(z.detach(), ref[:, :-1]))
    empty = tike_cuda.full_kl(torch.zeros(0, 300, device=device), torch.zeros(0, 300, device=device))
    assert empty.shape == (0,)


@pytest.mark.parametrize("device", DEVICES)
def test_infinite_logits(device, gen):
    z = make_logits((2, 64), torch.float32, device, generator=gen)
    zr = make_logits((2, 64), torch.float32, device, generator=gen)
    z[0, :5] = zr[0, :5] = float("-inf")    # both forbid: 0 · log(0/0) = 0
    zr[1, 3] = float("-inf")                # q = 0 where p > 0: the KL is infinite
    out = tike_cuda.full_kl(z, zr)
    assert_values(out[:1], full_kl_reference(z[:1], zr[:1]))
    assert out[1] == float("inf")
