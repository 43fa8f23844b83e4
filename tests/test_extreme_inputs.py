"""Inputs at the edges of float32 against the float64 reference: tiny temperatures, logits
near the float limit, tails too small for a float, infinite logits (docs/kernels.md).

Each case is one that a float `lse` or a float sum of tail terms got wrong: values and,
where float32 can hold them, gradients are checked for all three ops.
"""
import math

import pytest
import torch

import tike_cuda
from tike_cuda.reference import (full_kl_reference, token_logprobs_reference, topk_indices,
                                 topk_kl_reference)

from conftest import DEVICES, assert_grads, assert_values, make_logits

FMAX = torch.finfo(torch.float32).max


def _grad(out, x, g):
    (grad,) = torch.autograd.grad(out, x, g.to(out.device, out.dtype))
    return grad


def _check_three_ops(z, zr, tokens, temperature, gen, *, grads=True, rtol=1e-4):
    """topk_kl (plain and with the tail bucket), full_kl and token_logprobs + entropy."""
    z = z.detach().requires_grad_()
    z64 = z.detach().double().cpu().requires_grad_()
    zr64, tok64 = zr.double().cpu(), tokens.cpu()
    N = z.shape[0]
    cases = [
        (lambda a, b: tike_cuda.topk_kl(a, b, 8, sampled_tokens=tokens, temperature=temperature),
         lambda a, b: topk_kl_reference(a, b, 8, sampled_tokens=tok64, temperature=temperature)),
        (lambda a, b: tike_cuda.topk_kl(a, b, 8, temperature=temperature, tail="bucket"),
         lambda a, b: topk_kl_reference(a, b, 8, temperature=temperature, tail="bucket")),
        (lambda a, b: tike_cuda.full_kl(a, b, temperature=temperature),
         lambda a, b: full_kl_reference(a, b, temperature=temperature)),
        (lambda a, b: tike_cuda.token_logprobs(a, tokens, temperature=temperature,
                                               return_entropy=True),
         lambda a, b: token_logprobs_reference(a, tok64, temperature=temperature,
                                               return_entropy=True)),
    ]
    for fused, reference in cases:
        outs, exps = fused(z, zr), reference(z64, zr64)
        outs, exps = (outs, exps) if isinstance(outs, tuple) else ((outs,), (exps,))
        loss, loss64 = 0, 0
        for a, b in zip(outs, exps):
            assert torch.isfinite(b).all(), "the case must have a finite reference"
            assert_values(a, b, atol=rtol * max(1.0, b.abs().max().item()), rtol=rtol)
            g = torch.randn(N, generator=gen, dtype=torch.float64)
            loss = loss + (a * g.to(a.device, torch.float32)).sum()
            loss64 = loss64 + (b * g).sum()
        if grads:
            assert_grads(_grad(loss, z, torch.ones(())), _grad(loss64, z64, torch.ones(())),
                         z.dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("temperature", [1e-3, 1e-6])
def test_low_temperature(device, temperature, gen):
    """log p = (z − max)/τ − ℓ keeps its digits where z/τ − lse (floats of ~1e4..1e7) cannot."""
    z = make_logits((5, 3001), torch.float32, device, generator=gen)
    zr = (z.cpu() + 1e-3 * torch.randn(z.shape, generator=gen)).to(device)
    z[1, 7] = z[1].max()  # a tie at the top: p = 1/2 each however small τ is
    tokens = torch.randint(0, 3001, (5,), generator=gen).to(device)
    tokens[1] = 7
    _check_three_ops(z, zr, tokens, temperature, gen)


@pytest.mark.parametrize("device", DEVICES)
def test_tiny_temperature_values(device, gen):
    """τ = 1e-30: outputs near 1e30 stay finite (gradients, ~1/τ², do not fit a float)."""
    z = make_logits((3, 500), torch.float32, device, generator=gen)
    zr = make_logits((3, 500), torch.float32, device, generator=gen)
    tokens = topk_indices(z.cpu(), 1)[:, 0].to(device)  # log p(o) = 0, not −1e30
    _check_three_ops(z, zr, tokens, 1e-30, gen, grads=False)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_logits_at_the_float_limit(device, dtype, temperature, gen):
    """Every entry ±3.4e38: z/τ overflows, z − zr overflows; log-softmax is still exact."""
    N, V = 4, 300
    big = float(torch.finfo(dtype).max)
    sign = torch.rand(N, V, generator=gen) < 0.3
    sign[:, 0] = True
    z = torch.where(sign, big, -big).to(device, dtype)
    zr = torch.where(sign | (torch.rand(N, V, generator=gen) < 0.2), big, -big).to(device, dtype)
    # tokens where z = +max: log p = −log(#max), finite (elsewhere it is −6.8e38 < −FMAX)
    tokens = torch.multinomial(sign.double(), 1, generator=gen)[:, 0].to(device)
    _check_three_ops(z, zr, tokens, temperature, gen)


def _expected_coef_shift(z, zr, idx, temperature):
    """coef and shift of topk_kl (docs/kernels.md) in float64, no sampled token: r = 1."""
    lp = torch.log_softmax(z.double() / temperature, -1)
    lq = torch.log_softmax(zr.double() / temperature, -1)
    inside = torch.zeros_like(lp, dtype=torch.bool).scatter_(-1, idx.long(), True)
    p, q = lp.exp(), lq.exp()
    t_p = torch.where(inside, 0.0, p).sum(-1)
    t_q = torch.where(inside, 0.0, q).sum(-1)
    # log t_p − log t_q from log-sum-exps: t_p is far below what a float can hold
    log_tp = torch.logsumexp(torch.where(inside, -math.inf, lp), -1)
    log_tq = torch.logsumexp(torch.where(inside, -math.inf, lq), -1)
    b = torch.where(t_p > 0, log_tp - log_tq + 1.0, 0.0)
    L = (lp - lq).gather(-1, idx.long())
    p_s = p.gather(-1, idx.long())
    coef = (L + 1.0 - b[:, None]) / temperature
    shift = ((p_s * (L + 1.0)).sum(-1) - p_s.sum(-1) * b) / temperature
    return coef, shift, t_p


@pytest.mark.parametrize("device", DEVICES)
def test_tail_far_below_a_float(device, gen):
    """t_p ~ 1e-60: summed as floats relative to the row max it flushed to 0, so b = 0."""
    N, V, k, tau = 3, 3001, 300, 0.05
    z = make_logits((N, V), torch.float32, device, generator=gen)
    zr = make_logits((N, V), torch.float32, device, generator=gen)
    out, _, idx, coef, shift, _ = torch.ops.tike_cuda.topk_kl(z, zr, k, None, None, None, tau,
                                                             True, True)
    exp_coef, exp_shift, t_p = _expected_coef_shift(z.cpu(), zr.cpu(), idx.cpu(), tau)
    assert (t_p < 1e-38).all() and (t_p > 0).all(), "the case must have a sub-float tail"
    torch.testing.assert_close(coef.double().cpu(), exp_coef, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(shift.double().cpu(), exp_shift, rtol=1e-4, atol=1e-3)
    assert_values(out, topk_kl_reference(z, zr, k, temperature=tau, tail="bucket").cpu())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lead", [2047, 2048, 5000])
def test_tail_when_the_reference_row_starts_with_minus_inf(device, lead, gen):
    """Tail mass of p where zr = −inf for the first tiles (p finite there): counted."""
    N, V, k = 3, 6001, 16
    z = make_logits((N, V), torch.float32, device, generator=gen, scale=1.0)
    z[:, :lead] -= 2.0  # S (the top-k) lies after the lead, where q > 0
    zr = make_logits((N, V), torch.float32, device, generator=gen)
    zr[:, :lead] = float("-inf")
    z.requires_grad_()
    out = tike_cuda.topk_kl(z, zr, k, tail="bucket")
    z64 = z.detach().double().requires_grad_()
    exp = topk_kl_reference(z64, zr, k, tail="bucket")
    assert torch.isfinite(exp).all()
    assert_values(out, exp)
    assert_grads(_grad(out, z, torch.ones(N)), _grad(exp, z64, torch.ones(N)), torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_plus_inf_logit_makes_its_row_nan(device, gen):
    """A +inf logit (policy or reference): that row is NaN, as log_softmax makes it."""
    N, V = 4, 3000
    z = make_logits((N, V), torch.float32, device, generator=gen)
    zr = make_logits((N, V), torch.float32, device, generator=gen)
    z[0, 2500] = float("inf")
    zr[2, 10] = float("inf")
    tokens = torch.randint(0, V, (N,), generator=gen).to(device)
    for tail in ("none", "bucket"):
        out = tike_cuda.topk_kl(z, zr, 16, sampled_tokens=tokens, tail=tail)
        assert torch.isnan(out[[0, 2]]).all() and torch.isfinite(out[[1, 3]]).all()
        assert torch.isnan(topk_kl_reference(z.cpu(), zr.cpu(), 16, sampled_tokens=tokens.cpu(),
                                             tail=tail)[[0, 2]]).all()
    out = tike_cuda.full_kl(z, zr)
    assert torch.isnan(out[[0, 2]]).all() and torch.isfinite(out[[1, 3]]).all()
    logp, ent = tike_cuda.token_logprobs(z, tokens, return_entropy=True)
    assert torch.isnan(logp[0]) and torch.isnan(ent[0]) and torch.isfinite(logp[1:]).all()
    exp_lp, exp_ent = token_logprobs_reference(z.cpu(), tokens.cpu(), return_entropy=True)
    assert torch.isnan(exp_lp[0]) and torch.isnan(exp_ent[0])


@pytest.mark.parametrize("device", DEVICES)
def test_full_kl_is_inf_where_q_is_zero_and_p_is_not(device, gen):
    """zr = −inf where z is finite: +inf, never NaN, however small p_v is in float32; a
    −FLT_MAX mask value is a finite (huge) log-ratio, as in float64."""
    N, V, tau = 4, 5000, 0.5
    z = make_logits((N, V), torch.float32, device, generator=gen)
    zr = make_logits((N, V), torch.float32, device, generator=gen)
    top = z.max(-1).values
    zr[0, z[0].argmax()] = float("-inf")          # at the max: p_v ~ 1e-3
    z[1, 17] = top[1] - 200 * tau                 # p_v = e^-200: 0 in float32, > 0 in float64
    zr[1, 17] = float("-inf")
    z[2, 40:60] = zr[2, 40:60] = float("-inf")    # both 0: 0 · log(0/0) = 0
    zr[3, 4000] = -FMAX                           # log q_v = −6.8e38: p_v log(p_v/q_v) ~ 1e23
    z.requires_grad_()
    out = tike_cuda.full_kl(z, zr, temperature=tau)
    z64 = z.detach().double().cpu().requires_grad_()
    exp = full_kl_reference(z64, zr.cpu(), temperature=tau)
    assert exp[0] == exp[1] == math.inf and torch.isfinite(exp[2:]).all()
    assert out[0] == out[1] == math.inf
    assert_values(out[2:], exp[2:], rtol=1e-4, atol=1e-4 * exp[3].item())
    # row 3's gradient (rows 0 and 1, at +inf, have none to compare)
    assert_grads(_grad(out[3], z, torch.ones(()))[3], _grad(exp[3], z64, torch.ones(()))[3],
                 torch.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k", [16, 300, 1000])
def test_topk_selection_with_many_ties(device, k, gen):
    """Logits on a coarse grid (thousands of ties, as bf16 rounding gives), NaN and −inf:
    S is the k largest, ties to the lower index, NaN as −inf (reference.topk_indices)."""
    N, V = 4, 20000
    z = (torch.randn(N, V, generator=gen) * 3).round().to(device, torch.bfloat16)
    z[1, ::3] = float("-inf")
    z[2, 100:200] = float("nan")
    z[3, : V - k // 2] = float("-inf")  # fewer than k finite values
    zr = torch.zeros_like(z)
    idx = torch.ops.tike_cuda.topk_kl(z, zr, k, None, None, None, 1.0, True, False)[2]
    assert torch.equal(idx.cpu(), topk_indices(z.cpu(), k).to(torch.int32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [16, 256, 1000])
def test_topk_selection_at_the_block_max_floor(dtype, k, gen):
    """Rows of many 64-column blocks whose maxima tie with the k-th largest block max (the
    CPU selection's lower bound of the k-th best value): values equal to it are members,
    in index order, and a block holding several of the best values is read whole. CPU
    only: the CUDA selection has no such bound (the emulation would be slow at this V)."""
    device = "cpu"
    N, V = 5, 64 * 700 + 37
    z = torch.randn(N, V, generator=gen) - 4.0
    blocks = torch.arange(0, V, 64)
    col = blocks + torch.randint(0, 64, blocks.shape, generator=gen).clamp(max=V - 1 - blocks)
    z[0, col] = (torch.randn(len(col), generator=gen) * 2).round()  # block maxima tie
    z[1, col] = 1.0                      # every block max equal: the first k of them
    z[2, :64 * 3] = 5.0 + torch.rand(64 * 3, generator=gen)  # the best few in 3 blocks
    z[3, col] = 1.0
    z[3, col[::2] + 0] = float("nan")    # NaN ranks as −inf
    z[4, -37:] = 9.0                     # the best ones in the short last block
    z = z.to(device, dtype)
    assert torch.equal(tike_cuda.topk_indices(z, k).cpu().long(), topk_indices(z.cpu(), k))
    idx = torch.ops.tike_cuda.topk_kl(z, z, k, None, None, None, 1.0, True, False)[2]
    assert torch.equal(idx.cpu().long(), topk_indices(z.cpu(), k))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("temperature", [1e-25, 1e-30])
def test_token_logprobs_at_a_tiny_temperature_is_float_exact(device, temperature, gen):
    """log p(o) ~ −1e31 for tokens below the max: within float32 rounding of float64 (an
    absolute difference of 1e23 is one float ulp there, not an error)."""
    z = make_logits((6, 777), torch.float32, device, generator=gen)
    tokens = torch.randint(0, 777, (6,), generator=gen)
    tokens[0] = topk_indices(z.cpu(), 1)[0, 0]  # log p = 0 exactly
    logp = tike_cuda.token_logprobs(z, tokens.to(device), temperature=temperature)
    exp = token_logprobs_reference(z.cpu().double(), tokens, temperature=temperature)
    assert (exp[1:] < -1e20).all()
    torch.testing.assert_close(logp.double().cpu(), exp, rtol=2e-7, atol=0.0)


@pytest.mark.parametrize("device", DEVICES)
def test_tail_bucket_with_the_top_k_where_the_reference_is_minus_inf(device, gen):
    """S inside a leading run of −inf reference logits (whole tiles skipped): those S
    entries have q = 0 < p, so that row's value is +inf, as in float64 — and the tail
    pass walks S~ past the skipped tiles (it once wrote before its buffer there)."""
    N, V, k = 3, 40000, 16
    z = make_logits((N, V), torch.float32, device, generator=gen)
    zr = make_logits((N, V), torch.float32, device, generator=gen)
    zr[2, :20000] = float("-inf")
    z[2, 100:4100:250] += 20.0  # S of row 2 lies in the −inf part of its reference
    z.requires_grad_()
    out = tike_cuda.topk_kl(z, zr, k, tail="bucket")
    z64 = z.detach().double().cpu().requires_grad_()
    exp = topk_kl_reference(z64, zr.cpu(), k, tail="bucket")
    assert exp[2] == math.inf and torch.isfinite(exp[:2]).all()
    assert_values(out, exp)
    assert_grads(_grad(out[:2].sum(), z, torch.ones(()))[:2],
                 _grad(exp[:2].sum(), z64, torch.ones(()))[:2], torch.float32)
