"""CUDA kernels against the CPU op and the float64 reference on the same inputs.

Covers what only the device code can get wrong: the warp top-k (ties, k up to 256 and the
sorted path above), rows split over several CTAs (few rows), misaligned rows (odd V),
strided [B, T, V] views, 64-bit offsets (N·V > 2^31), the in-place backward and bitwise
run-to-run reproducibility. Skipped where no CUDA device is visible.
"""
import pytest
import torch

import tike_cuda
from tike_cuda.reference import (full_kl_reference, token_logprobs_reference, topk_indices,
                                 topk_kl_reference)

from conftest import GRAD_RTOL, assert_grads, assert_values, make_logits

pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
              pytest.mark.cuda]

OPS = torch.ops.tike_cuda
BIG_V = 151936
# float32 outputs of the CUDA kernels against the CPU kernels (both float32 inside, with
# different summation orders and exp implementations).
CPU_ATOL, CPU_RTOL = 1e-4, 1e-4


def _cases():
    out = []
    for V in (1, 15, 16, 4099, BIG_V):
        for k in (1, 16, 64, 256):
            if k <= V:
                out.append((V, k))
    out.append((15, 16))  # k = V + 1: rejected
    return out


def _inputs(N, V, dtype, gen, sampled=True):
    z = make_logits((N, V), dtype, "cuda", generator=gen)
    zr = make_logits((N, V), dtype, "cuda", generator=gen)
    tok = torch.randint(0, V, (N,), generator=gen).cuda() if sampled else None
    old = (torch.randn(N, generator=gen) * 0.1 - 2.0).cuda() if sampled else None
    return z, zr, tok, old


def _close(a, b, atol=CPU_ATOL, rtol=CPU_RTOL):
    torch.testing.assert_close(a.cpu(), b.cpu(), atol=atol, rtol=rtol, equal_nan=True)


def _raw_topk(z, zr, k, tok, old, mask, tau, union, tail):
    return OPS.topk_kl(z, zr, k, tok, old, mask, tau, union, tail)


def _to_cpu(*xs):
    return [None if x is None else x.cpu() for x in xs]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("V,k", _cases())
def test_topk_kl_matches_cpu_and_reference(V, k, dtype, gen):
    N = 3 if V == BIG_V else 33  # 3 rows of a long vocabulary: the split-row path
    z, zr, tok, old = _inputs(N, V, dtype, gen)
    mask = torch.rand(N, generator=gen).cuda() > 0.2
    if k > V:
        with pytest.raises((ValueError, RuntimeError)):
            tike_cuda.topk_kl(z, zr, k)
        return
    for tail in (False, True):
        got = _raw_topk(z, zr, k, tok, old, mask, 0.7, True, tail)
        exp = _raw_topk(*_to_cpu(z, zr), k, *_to_cpu(tok, old, mask), 0.7, True, tail)
        out, lse, idx, coef, shift, stats = got
        assert torch.equal(idx.cpu(), exp[2]), "S~ differs from the CPU kernel"
        for a, b in zip((out, lse, coef, shift, stats), (exp[0], exp[1], exp[3], exp[4], exp[5])):
            _close(a, b)
    # Public API: value and gradient against float64 autograd.
    zg = z.clone().requires_grad_()
    val = tike_cuda.topk_kl(zg, zr, k, sampled_tokens=tok, old_logprobs=old, mask=mask,
                            temperature=0.7, tail="bucket")
    z64 = z.double().cpu().requires_grad_()
    ref = topk_kl_reference(z64, zr.cpu(), k, sampled_tokens=tok.cpu(), old_logprobs=old.cpu(),
                            mask=mask.cpu(), temperature=0.7, tail="bucket")
    assert_values(val, ref, atol=5e-5)
    g = torch.randn(N, generator=gen, dtype=torch.float64)
    (grad,) = torch.autograd.grad(val, zg, g.cuda().float())
    (grad64,) = torch.autograd.grad(ref, z64, g)
    assert_grads(grad, grad64, dtype)


@pytest.mark.parametrize("union", [True, False])
def test_topk_kl_without_sampled_and_union_flag(union, gen):
    z, zr, tok, _ = _inputs(16, 4099, torch.bfloat16, gen)
    for t in (None, tok):
        got = _raw_topk(z, zr, 16, t, None, None, 1.0, union, True)
        exp = _raw_topk(z.cpu(), zr.cpu(), 16, None if t is None else t.cpu(), None, None, 1.0,
                        union, True)
        assert torch.equal(got[2].cpu(), exp[2])
        for a, b in zip(got, exp):
            _close(a, b)


def test_bf16_ties_lower_index_wins(gen):
    # Few distinct bf16 values: dozens of ties at the k-th value in every row.
    N, V, k = 8, 20000, 64
    z = torch.randint(-4, 5, (N, V), generator=gen).to(torch.bfloat16).cuda()
    zr = make_logits((N, V), torch.bfloat16, "cuda", generator=gen)
    idx = OPS.topk_kl(z, zr, k, None, None, None, 1.0, True, False)[2]
    assert torch.equal(idx.long().cpu(), topk_indices(z.cpu(), k))
    # NaN ranks as -inf, -0 ties with +0.
    z2 = z.clone()
    z2[:, 5] = float("nan")
    z2[:, 7] = -0.0
    z2[:, 3] = 0.0
    idx2 = OPS.topk_kl(z2, zr, 4096, None, None, None, 1.0, True, False)[2]
    exp2 = OPS.topk_kl(z2.cpu(), zr.cpu(), 4096, None, None, None, 1.0, True, False)[2]
    assert torch.equal(idx2.cpu(), exp2)


@pytest.mark.parametrize("k", [300, 4099])
def test_topk_kl_large_k_sorted_path(k, gen):
    z, zr, tok, old = _inputs(5, 4099, torch.float32, gen)
    got = _raw_topk(z, zr, k, tok, old, None, 1.0, True, True)
    exp = _raw_topk(*_to_cpu(z, zr), k, *_to_cpu(tok, old), None, 1.0, True, True)
    assert torch.equal(got[2].cpu(), exp[2])
    for a, b in zip(got, exp):
        _close(a, b)


def test_inplace_backward_equals_out_of_place(gen):
    z, zr, tok, old = _inputs(64, 4099, torch.bfloat16, gen)
    mask = torch.rand(64, generator=gen).cuda() > 0.1
    _, lse, idx, coef, shift, _ = _raw_topk(z, zr, 16, tok, old, mask, 0.9, True, True)
    g = torch.randn(64, generator=gen).cuda()
    grad = OPS.topk_kl_backward(g, z, lse, idx, coef, shift, mask, 0.9)
    buf = z.clone()
    OPS.topk_kl_backward_(g, buf, lse, idx, coef, shift, mask, 0.9)
    assert torch.equal(buf, grad)
    exp = OPS.topk_kl_backward(*_to_cpu(g, z, lse, idx, coef, shift, mask), 0.9)
    torch.testing.assert_close(grad.cpu().float(), exp.float(), rtol=GRAD_RTOL[torch.bfloat16],
                               atol=GRAD_RTOL[torch.bfloat16] * exp.float().abs().max().item())


def test_bitwise_reproducible(gen):
    for N in (2, 300):  # split-row and one-CTA-per-row paths
        z, zr, tok, old = _inputs(N, BIG_V, torch.bfloat16, gen)
        a = _raw_topk(z, zr, 64, tok, old, None, 1.0, True, True)
        b = _raw_topk(z, zr, 64, tok, old, None, 1.0, True, True)
        assert all(torch.equal(x, y) for x, y in zip(a, b))
        g = torch.randn(N, generator=gen).cuda()
        ga = OPS.topk_kl_backward(g, z, a[1], a[2], a[3], a[4], None, 1.0)
        gb = OPS.topk_kl_backward(g, z, b[1], b[2], b[3], b[4], None, 1.0)
        assert torch.equal(ga, gb)
        fa, fb = OPS.full_kl(z, zr, None, 1.0), OPS.full_kl(z, zr, None, 1.0)
        assert all(torch.equal(x, y) for x, y in zip(fa, fb))
        ta, tb = OPS.token_logprobs(z, tok, 1.0, True), OPS.token_logprobs(z, tok, 1.0, True)
        assert all(torch.equal(x, y) for x, y in zip(ta, tb))


@pytest.mark.parametrize("N", [1, 2, 7])
def test_small_n_split_rows(N, gen):
    z, zr, tok, old = _inputs(N, BIG_V, torch.bfloat16, gen)
    for k in (16, 256):
        got = _raw_topk(z, zr, k, tok, old, None, 1.0, True, True)
        exp = _raw_topk(*_to_cpu(z, zr), k, *_to_cpu(tok, old), None, 1.0, True, True)
        assert torch.equal(got[2].cpu(), exp[2])
        for a, b in zip(got, exp):
            _close(a, b)
    for a, b in zip(OPS.full_kl(z, zr, None, 1.0), OPS.full_kl(z.cpu(), zr.cpu(), None, 1.0)):
        _close(a, b)
    for a, b in zip(OPS.token_logprobs(z, tok, 1.0, True),
                    OPS.token_logprobs(z.cpu(), tok.cpu(), 1.0, True)):
        _close(a, b)


def test_noncontiguous_btv_slices(gen):
    B, T, V = 3, 9, 4099  # odd V: every row starts at a different alignment
    full = make_logits((B, T + 1, V), torch.bfloat16, "cuda", generator=gen)
    ref_full = make_logits((B, T + 2, V), torch.bfloat16, "cuda", generator=gen)
    z, zr = full[:, :-1, :], ref_full[:, 2:, :]
    assert not z.is_contiguous() and not zr.is_contiguous()
    tok = torch.randint(0, V, (B, T), generator=gen).cuda()
    got = tike_cuda.topk_kl(z, zr, 16, sampled_tokens=tok, return_stats=True, tail="bucket")
    exp = tike_cuda.topk_kl(z.contiguous(), zr.contiguous(), 16, sampled_tokens=tok,
                            return_stats=True, tail="bucket")
    _close(got[0], exp[0], atol=1e-5, rtol=1e-5)
    for a, b in zip(got[1], exp[1]):
        _close(a, b, atol=1e-5, rtol=1e-5)
    _close(tike_cuda.full_kl(z, zr), tike_cuda.full_kl(z.contiguous(), zr.contiguous()), 1e-5, 1e-5)
    # In-place backward over a strided view writes only the view's rows.
    _, lse, idx, coef, shift, _ = OPS.topk_kl(z, zr, 16, None, None, None, 1.0, True, False)
    g = torch.randn(B * T, generator=gen).cuda()
    before = full[:, -1, :].clone()
    exp_grad = OPS.topk_kl_backward(g, z, lse, idx, coef, shift, None, 1.0)
    OPS.topk_kl_backward_(g, z, lse, idx, coef, shift, None, 1.0)
    assert torch.equal(full[:, -1, :], before)
    assert torch.equal(z.reshape(B * T, V), exp_grad.reshape(B * T, V))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("N,V", [(33, 1), (33, 4099), (3, BIG_V)])
def test_full_kl_and_token_logprobs(N, V, dtype, gen):
    z, zr, tok, _ = _inputs(N, V, dtype, gen)
    mask = torch.rand(N, generator=gen).cuda() > 0.2
    for a, b in zip(OPS.full_kl(z, zr, mask, 0.8), OPS.full_kl(z.cpu(), zr.cpu(), mask.cpu(), 0.8)):
        _close(a, b)
    for a, b in zip(OPS.token_logprobs(z, tok, 0.8, True),
                    OPS.token_logprobs(z.cpu(), tok.cpu(), 0.8, True)):
        _close(a, b)
    g = torch.randn(N, generator=gen, dtype=torch.float64)
    zg = z.clone().requires_grad_()
    val = tike_cuda.full_kl(zg, zr, temperature=0.8, mask=mask)
    z64 = z.double().cpu().requires_grad_()
    ref = full_kl_reference(z64, zr.cpu(), temperature=0.8, mask=mask.cpu())
    assert_values(val, ref, atol=5e-5)
    assert_grads(torch.autograd.grad(val, zg, g.cuda().float())[0],
                 torch.autograd.grad(ref, z64, g)[0], dtype)
    zg = z.clone().requires_grad_()
    lp, H = tike_cuda.token_logprobs(zg, tok, temperature=0.8, return_entropy=True)
    z64 = z.double().cpu().requires_grad_()
    lp64, H64 = token_logprobs_reference(z64, tok.cpu(), temperature=0.8, return_entropy=True)
    assert_values(lp, lp64, atol=5e-5)
    assert_values(H, H64, atol=5e-5)
    g2 = torch.randn(N, generator=gen, dtype=torch.float64)
    grad = torch.autograd.grad((lp, H), zg, (g.cuda().float(), g2.cuda().float()))[0]
    grad64 = torch.autograd.grad((lp64, H64), z64, (g, g2))[0]
    assert_grads(grad, grad64, dtype)


def test_nan_rows_stay_local(gen):
    z, zr, tok, old = _inputs(6, 4099, torch.float32, gen)
    z[2, 100] = float("nan")
    zr[4, 7] = float("nan")
    out = _raw_topk(z, zr, 16, tok, old, None, 1.0, True, True)[0].cpu()
    assert out[2].isnan() and out[4].isnan()
    assert out[[0, 1, 3, 5]].isfinite().all()
    fk = OPS.full_kl(z, zr, None, 1.0)[0].cpu()
    assert fk[2].isnan() and fk[4].isnan() and fk[[0, 1, 3, 5]].isfinite().all()


def test_nan_row_gradients_stay_nan(gen):
    # A NaN logit makes its row's gradient NaN everywhere, as on the CPU (a p > 0 test
    # would turn NaN p into 0 and hide the row), and leaves every other row finite.
    z, zr, tok, old = _inputs(6, 4099, torch.float32, gen)
    z[2, 100] = float("nan")
    g = torch.randn(6, generator=gen).cuda()

    def check(got, exp):
        assert got[2].isnan().all() and got[[0, 1, 3, 4, 5]].isfinite().all()
        assert torch.equal(got.isnan().cpu(), exp.isnan())

    _, lse, idx, coef, shift, _ = _raw_topk(z, zr, 16, tok, old, None, 1.0, True, True)
    check(OPS.topk_kl_backward(g, z, lse, idx, coef, shift, None, 1.0),
          OPS.topk_kl_backward(*_to_cpu(g, z, lse, idx, coef, shift), None, 1.0))
    out, lp, lq = OPS.full_kl(z, zr, None, 1.0)
    check(OPS.full_kl_backward(g, z, zr, out, lp, lq, None, 1.0),
          OPS.full_kl_backward(*_to_cpu(g, z, zr, out, lp, lq), None, 1.0))
    _, ent, lse = OPS.token_logprobs(z, tok, 1.0, True)
    check(OPS.token_logprobs_backward(g, g, z, tok, lse, ent, 1.0),
          OPS.token_logprobs_backward(*_to_cpu(g, g, z, tok, lse, ent), 1.0))

def test_int64_offsets_beyond_2_31():
    V = BIG_V
    N = (2**31) // V + 3  # N·V > 2^31
    if torch.cuda.get_device_properties(0).total_memory < 24 * 2**30:
        pytest.skip("needs ~20 GiB of device memory")
    gen = torch.Generator(device="cuda").manual_seed(7)
    z = torch.randn((N, V), generator=gen, device="cuda").mul_(3).to(torch.bfloat16)
    zr = torch.randn((N, V), generator=gen, device="cuda").mul_(3).to(torch.bfloat16)
    rows = torch.tensor([0, N // 2, N - 2, N - 1], device="cuda")
    out, lse, idx, coef, shift, _ = OPS.topk_kl(z, zr, 16, None, None, None, 1.0, True, False)
    g = torch.ones(N, device="cuda")
    grad = OPS.topk_kl_backward(g, z, lse, idx, coef, shift, None, 1.0)
    zs, zrs = z[rows].cpu(), zr[rows].cpu()
    exp = OPS.topk_kl(zs, zrs, 16, None, None, None, 1.0, True, False)
    assert torch.equal(idx[rows].cpu(), exp[2])
    _close(out[rows], exp[0])
    _close(lse[rows], exp[1])
    exp_grad = OPS.topk_kl_backward(torch.ones(4), zs, exp[1], exp[2], exp[3], exp[4], None, 1.0)
    torch.testing.assert_close(grad[rows].cpu().float(), exp_grad.float(), rtol=1e-2,
                               atol=1e-2 * exp_grad.float().abs().max().item())
    fk = OPS.full_kl(z, zr, None, 1.0)[0]
    _close(fk[rows], OPS.full_kl(zs, zrs, None, 1.0)[0])
