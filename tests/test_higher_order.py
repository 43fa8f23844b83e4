"""Beyond first-order reverse mode: double backward (Hessian- and Fisher-vector products),
forward mode (JVPs), vmap and torch.func, each against float64 autograd of the reference."""
import warnings

import pytest
import torch
from torch.autograd import forward_ad

import tike_cuda
from tike_cuda.reference import full_kl_reference, token_logprobs_reference, topk_kl_reference

from conftest import DEVICES, GRAD_RTOL, make_logits, on_emulation

N, V, K = 6, 37, 5


def _inputs(device, gen, dtype=torch.float32):
    z = make_logits((N, V), dtype, device, scale=1.5, generator=gen)
    zr = make_logits((N, V), dtype, device, scale=1.5, generator=gen)
    tok = torch.randint(0, V, (N,), generator=gen).to(device)
    old = (0.3 * torch.randn(N, generator=gen) - 3.6).to(device)  # r = π/π_old near 1
    mask = torch.tensor([1, 1, 0, 1, 1, 1], device=device)  # verl-style integer mask
    return z, zr, tok, old, mask


def _fused(op, zr, tok, old, mask):
    """The fused op as a per-row function of the logits."""
    top = dict(sampled_tokens=tok, old_logprobs=old, temperature=0.7, mask=mask)
    return {
        "full_kl": lambda x: tike_cuda.full_kl(x, zr, temperature=0.7, mask=mask),
        "token_logprobs": lambda x: sum(tike_cuda.token_logprobs(
            x, tok, temperature=0.7, return_entropy=True, mask=mask)),
        "topk_kl": lambda x: tike_cuda.topk_kl(x, zr, K, **top),
        "topk_kl_bucket": lambda x: tike_cuda.topk_kl(x, zr, K, tail="bucket", **top),
    }[op]


def _reference(op, zr, tok, old, mask):
    """The float64 reference of _fused (on the CPU)."""
    zr, tok, old, mask = zr.cpu(), tok.cpu(), old.cpu(), mask.bool().cpu()
    top = dict(sampled_tokens=tok, old_logprobs=old, temperature=0.7, mask=mask)
    return {
        "full_kl": lambda x: full_kl_reference(x, zr, temperature=0.7, mask=mask),
        "token_logprobs": lambda x: sum(token_logprobs_reference(
            x, tok, temperature=0.7, return_entropy=True, mask=mask)),
        "topk_kl": lambda x: topk_kl_reference(x, zr, K, **top),
        "topk_kl_bucket": lambda x: topk_kl_reference(x, zr, K, tail="bucket", **top),
    }[op]


def _pair(op, *args):
    return _fused(op, *args), _reference(op, *args)


OPS = ["full_kl", "token_logprobs", "topk_kl", "topk_kl_bucket"]


def _double_backward(fn, z, w, v):
    """First derivative of Σ w·fn(z), then the derivatives of <that, v> with respect to z
    (a Hessian-vector product) and to w (gradgradcheck's second half)."""
    z = z.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    (g,) = torch.autograd.grad((fn(z) * w).sum(), z, create_graph=True)
    hz, hw = torch.autograd.grad((g * v).sum(), (z, w))
    return g.detach(), hz, hw


def _close(actual, expected, rtol):
    exp = expected.double().cpu()
    scale = max(exp.abs().max().item(), 1.0)
    torch.testing.assert_close(actual.double().cpu(), exp, rtol=rtol, atol=rtol * scale)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("op", OPS)
def test_double_backward_matches_float64(device, dtype, op, gen):
    z, zr, tok, old, mask = _inputs(device, gen, dtype)
    fused, ref = _pair(op, zr, tok, old, mask)
    w = torch.randn(N, generator=gen, dtype=torch.float64)
    v = torch.randn(N, V, generator=gen, dtype=torch.float64)
    g, hz, hw = _double_backward(fused, z, w.float().to(device), v.to(device, dtype))
    g64, hz64, hw64 = _double_backward(ref, z.double().cpu(), w, v.to(dtype).double())
    assert hz.abs().max() > 0 and hz64.abs().max() > 0.01  # not the old silent zero
    rtol = max(GRAD_RTOL[dtype], 2e-5)
    _close(g, g64, rtol)
    _close(hz, hz64, 4 * rtol)
    _close(hw, hw64, 4 * rtol)


@pytest.mark.parametrize("device", DEVICES)
def test_raw_op_double_backward(device, gen):
    """The registered op (what torch.compile sees) has the same differentiable backward."""
    z, zr, _, _, _ = _inputs(device, gen)
    fused = lambda x: torch.ops.tike_cuda.full_kl(x, zr, None, 1.0)[0]  # noqa: E731
    ref = lambda x: full_kl_reference(x, zr.cpu())  # noqa: E731
    w, v = torch.randn(N, generator=gen), torch.randn(N, V, generator=gen)
    _, hz, _ = _double_backward(fused, z, w.to(device), v.to(device))
    _, hz64, _ = _double_backward(ref, z.double().cpu(), w.double(), v.double())
    _close(hz, hz64, 1e-4)


def test_fisher_vector_product_through_a_layer(gen):
    """The README's Hessian-vector product: a KL through nn.Linear, second derivatives
    with respect to the layer's parameters, against the float64 reference."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(12, V)
    h = torch.randn(8, 12, generator=gen)
    ref = torch.randn(8, V, generator=gen)
    vec = [torch.randn(p.shape, generator=gen) for p in lin.parameters()]

    def hvp(kl_fn, layer, dtype):
        params = [p.to(dtype).detach().requires_grad_() for p in layer.parameters()]
        logits = torch.nn.functional.linear(h.to(dtype), *params)
        kl = kl_fn(logits).mean()
        g = torch.autograd.grad(kl, params, create_graph=True)
        return torch.autograd.grad(sum((a * b.to(dtype)).sum() for a, b in zip(g, vec)), params)

    hv = hvp(lambda x: tike_cuda.full_kl(x, ref), lin, torch.float32)
    hv64 = hvp(lambda x: full_kl_reference(x, ref), lin, torch.float64)
    for a, b in zip(hv, hv64):
        assert b.norm() > 0.01
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("op", OPS)
def test_third_order_hessian(op, gen):
    """torch.func.hessian (forward over reverse mode), per row, against float64."""
    z, zr, tok, old, mask = _inputs("cpu", gen)
    fused, ref = _pair(op, zr, tok, old, mask)
    w = torch.randn(N, generator=gen)
    h = torch.func.hessian(lambda x: (fused(x) * w).sum())(z)
    h64 = torch.func.hessian(lambda x: (ref(x) * w.double()).sum())(z.double())
    assert h64.abs().max() > 0.1
    _close(h, h64, 1e-4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("op", OPS)
def test_jvp_matches_float64(device, dtype, op, gen):
    z, zr, tok, old, mask = _inputs(device, gen, dtype)
    fused, ref = _pair(op, zr, tok, old, mask)
    t = torch.randn(N, V, generator=gen).to(dtype)
    _, exp = torch.func.jvp(ref, (z.double().cpu(),), (t.double(),))
    assert exp.abs().max() > 0.01  # not the old silent zero
    _, got = torch.func.jvp(fused, (z,), (t.to(device),))
    _close(got, exp, max(GRAD_RTOL[dtype], 1e-5))
    with forward_ad.dual_level():
        out = fused(forward_ad.make_dual(z, t.to(device)))
        _close(forward_ad.unpack_dual(out).tangent, exp, max(GRAD_RTOL[dtype], 1e-5))


@pytest.mark.parametrize("device", DEVICES)
def test_jvp_of_each_output(device, gen):
    """token_logprobs' two outputs get their own tangents; topk_kl's stats get none."""
    z, zr, tok, _, _ = _inputs(device, gen)
    t = torch.randn(N, V, generator=gen)
    fn = lambda x: tike_cuda.token_logprobs(x, tok, return_entropy=True)  # noqa: E731
    _, (t_lp, t_h) = torch.func.jvp(fn, (z,), (t.to(device),))
    ref = lambda x: token_logprobs_reference(x, tok.cpu(), return_entropy=True)  # noqa: E731
    _, (e_lp, e_h) = torch.func.jvp(ref, (z.double().cpu(),), (t.double(),))
    _close(t_lp, e_lp, 1e-5)
    _close(t_h, e_h, 1e-5)
    with forward_ad.dual_level():
        out, stats = tike_cuda.topk_kl(forward_ad.make_dual(z, t.to(device)), zr, K,
                                       return_stats=True)
        assert forward_ad.unpack_dual(out).tangent is not None
        assert forward_ad.unpack_dual(stats.topk_mass).tangent is None  # detached by design


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", OPS)
def test_vmap_matches_a_loop(device, op, gen):
    """vmap over a batch of logits (and of tokens and masks), no host sync, no warning."""
    B = 3
    zs = make_logits((B, N, V), torch.float32, device, generator=gen)
    zr = make_logits((B, N, V), torch.float32, device, generator=gen)
    tok = torch.randint(0, V, (B, N), generator=gen).to(device)
    mask = torch.rand(B, N, generator=gen).to(device) > 0.3
    tok = torch.where(mask, tok, -100)  # padding in masked rows

    def fn(z, r, t, m):
        return _fused(op, r, t, torch.zeros(N, device=device) - 3.6, m)(z)

    with torch.autograd.set_grad_enabled(False), warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # e.g. a missing batching rule
        got = torch.func.vmap(fn)(zs, zr, tok, mask)
        exp = torch.stack([fn(zs[b], zr[b], tok[b], mask[b]) for b in range(B)])
        torch.testing.assert_close(got, exp)
        # only the logits batched: the rest broadcasts
        got = torch.func.vmap(fn, in_dims=(0, None, None, None))(zs, zr[0], tok[0], mask[0])
        exp = torch.stack([fn(zs[b], zr[0], tok[0], mask[0]) for b in range(B)])
        torch.testing.assert_close(got, exp)


@pytest.mark.parametrize("device", DEVICES)
def test_vmap_still_checks_tokens(device, gen):
    """Tokens out of range: an error from the CPU op; on CUDA (no host sync) NaN rows."""
    zs = make_logits((2, N, V), torch.float32, device, generator=gen)
    bad = torch.full((2, N), V, device=device)
    if device == "cpu" and not on_emulation(device):
        with pytest.raises(RuntimeError, match="tokens must be in"):
            torch.func.vmap(tike_cuda.token_logprobs)(zs, bad)
    else:
        assert torch.func.vmap(tike_cuda.token_logprobs)(zs, bad).isnan().all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", OPS)
def test_func_grad_and_vmap_of_grad(device, op, gen):
    z, zr, tok, old, mask = _inputs(device, gen)
    fused, ref = _pair(op, zr, tok, old, mask)
    w = torch.randn(N, generator=gen)
    got = torch.func.grad(lambda x: (fused(x) * w.to(device)).sum())(z)
    z64 = z.double().cpu().requires_grad_()
    (exp,) = torch.autograd.grad((ref(z64) * w.double()).sum(), z64)
    _close(got, exp, 2e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # e.g. a missing batching rule
        per_sample = torch.func.vmap(torch.func.grad(lambda x: (fused(x) * w.to(device)).sum()))(
            torch.stack([z, z]))
    torch.testing.assert_close(per_sample[1], got)


def test_backward_ops_are_not_silently_differentiated(gen):
    """A direct call of a backward kernel, differentiated: an error, not a zero."""
    z, zr, _, _, _ = _inputs("cpu", gen)
    z = z.requires_grad_()
    out, lse_p, lse_q = torch.ops.tike_cuda.full_kl(z.detach(), zr, None, 1.0)
    grad = torch.ops.tike_cuda.full_kl_backward(torch.ones(N), z, zr, out, lse_p, lse_q, None, 1.0)
    with pytest.raises(RuntimeError, match="backward kernel with no derivative of its own"):
        grad.sum().backward()
