"""token_logprobs (and entropy) against the float64 reference."""
import pytest
import torch

import tike_cuda
from tike_cuda.reference import token_logprobs_reference

from conftest import DEVICES, DTYPES, assert_grads, assert_values, make_logits


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("V", [1, 15, 4099, 151936])
@pytest.mark.parametrize("entropy", [False, True])
def test_values_and_grads(device, dtype, V, entropy, gen):
    N = 2 if V > 10000 else 6
    z = make_logits((N, V), dtype, device, generator=gen, scale=4.0, requires_grad=True)
    tokens = torch.randint(0, V, (N,), generator=gen).to(device)
    out = tike_cuda.token_logprobs(z, tokens, temperature=0.6, return_entropy=entropy)
    z64 = z.detach().double().requires_grad_()
    exp = token_logprobs_reference(z64, tokens.cpu(), temperature=0.6, return_entropy=entropy)
    outs, exps = (out, exp) if entropy else ((out,), (exp,))
    loss, loss64 = 0, 0
    for a, b in zip(outs, exps):
        assert_values(a, b, atol=2e-5 * max(1.0, b.abs().max().item()))
        g = torch.randn(N, generator=gen, dtype=torch.float64)
        loss = loss + (a * g.to(device, torch.float32)).sum()
        loss64 = loss64 + (b * g).sum()
    (grad,) = torch.autograd.grad(loss, z)
    (grad64,) = torch.autograd.grad(loss64, z64)
    assert_grads(grad, grad64, dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_leading_dims_and_slices(device, gen):
    full = make_logits((3, 8, 500), torch.bfloat16, device, generator=gen)
    tokens = torch.randint(0, 500, (3, 7), generator=gen).to(device)
    logp, ent = tike_cuda.token_logprobs(full[:, :-1], tokens, return_entropy=True)
    exp_lp, exp_ent = token_logprobs_reference(full[:, :-1].cpu(), tokens.cpu(), return_entropy=True)
    assert logp.shape == ent.shape == (3, 7)
    assert_values(logp, exp_lp)
    assert_values(ent, exp_ent)
    assert tike_cuda.token_logprobs(full[:0, :-1], tokens[:0]).shape == (0, 7)
