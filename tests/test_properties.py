"""Identities of design.md §1, checked on inputs drawn by hypothesis (CPU)."""
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tike_cuda

SETTINGS = settings(max_examples=40, deadline=None)


@st.composite
def rows(draw, max_v=300):
    """A small batch of policy/reference logits with an entropy spread from peaked to flat."""
    n = draw(st.integers(1, 4))
    v = draw(st.integers(1, max_v))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    scale = draw(st.floats(0.1, 8.0))
    z = torch.randn(n, v, generator=g, dtype=torch.float64) * scale
    zr = z + draw(st.floats(0.0, 2.0)) * torch.randn(n, v, generator=g, dtype=torch.float64)
    return z.float(), zr.float(), g


@SETTINGS
@given(rows(), st.floats(0.3, 3.0))
def test_k_equal_v_is_the_full_kl(data, temperature):
    z, zr, _ = data
    V = z.shape[-1]
    a = tike_cuda.topk_kl(z, zr, V, temperature=temperature)
    b = tike_cuda.full_kl(z, zr, temperature=temperature)
    torch.testing.assert_close(a, b, atol=2e-5 * max(1.0, b.abs().max().item()), rtol=1e-4)


@SETTINGS
@given(rows(), st.integers(1, 40))
def test_tail_bucket_between_zero_and_full(data, k):
    z, zr, _ = data
    k = min(k, z.shape[-1])
    bucket = tike_cuda.topk_kl(z, zr, k, tail="bucket")
    full = tike_cuda.full_kl(z, zr)
    tol = 2e-5 * max(1.0, full.abs().max().item())
    assert (bucket >= -tol).all()
    assert (bucket <= full + tol).all()


@SETTINGS
@given(rows(), st.integers(1, 40))
def test_tail_bucket_has_zero_gradient_at_p_equal_q(data, k):
    z, _, _ = data
    k = min(k, z.shape[-1])
    z = z.clone().requires_grad_()
    (grad,) = torch.autograd.grad(tike_cuda.topk_kl(z, z.detach(), k, tail="bucket").sum(), z)
    assert grad.abs().max().item() < 1e-5
    # plain truncation does not have that property: its gradient there is p_j (1[j∈S] − m)
    (plain,) = torch.autograd.grad(tike_cuda.topk_kl(z, z.detach(), k).sum(), z)
    p = torch.softmax(z.detach().double(), -1)
    inside = torch.zeros_like(p, dtype=torch.bool).scatter_(-1, torch.topk(z.detach(), k).indices, True)
    m = (p * inside).sum(-1, keepdim=True)
    torch.testing.assert_close(plain.double(), p * (inside.double() - m), atol=1e-5, rtol=1e-3)


@SETTINGS
@given(rows(), st.integers(1, 40), st.floats(-3.0, 3.0))
def test_is_weight_scales_the_gradient_but_carries_none(data, k, shift):
    z, zr, g = data
    k = min(k, z.shape[-1])
    tokens = torch.randint(0, z.shape[-1], (z.shape[0],), generator=g)
    lp = torch.log_softmax(z.double(), -1).gather(-1, tokens[:, None]).squeeze(-1)
    old = (lp + shift).float()        # r = exp(−shift) for every row
    z1 = z.clone().requires_grad_()
    z2 = z.clone().requires_grad_()
    weighted = tike_cuda.topk_kl(z1, zr, k, sampled_tokens=tokens, old_logprobs=old)
    plain = tike_cuda.topk_kl(z2, zr, k, sampled_tokens=tokens)
    r = torch.exp(torch.tensor(-shift))
    torch.testing.assert_close(weighted, plain * r, rtol=1e-4, atol=1e-6)
    weighted.sum().backward()
    plain.sum().backward()
    # a differentiable r would add D · ∂r/∂z, which is not there
    torch.testing.assert_close(z1.grad, z2.grad * r, rtol=1e-4, atol=1e-6 * max(1.0, float(r)))


@SETTINGS
@given(rows(), st.integers(1, 40), st.data())
def test_masked_rows_give_zero_and_no_gradient(data, k, draw):
    z, zr, _ = data
    k = min(k, z.shape[-1])
    mask = torch.tensor(draw.draw(st.lists(st.booleans(), min_size=z.shape[0], max_size=z.shape[0])))
    z = z.clone().requires_grad_()
    for fn in (lambda: tike_cuda.topk_kl(z, zr, k, mask=mask, tail="bucket"),
               lambda: tike_cuda.full_kl(z, zr, mask=mask)):
        out = fn()
        assert out[~mask].eq(0).all()
        (grad,) = torch.autograd.grad(out.sum(), z)
        assert grad[~mask].eq(0).all()
