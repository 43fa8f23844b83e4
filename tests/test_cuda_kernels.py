"""CUDA kernels against the CPU op and the float64 reference on the same inputs.

Every test runs on each `kdev` (tests/conftest.py): a real GPU ("cuda", collected where
there is one) and the CPU emulation of the CUDA execution model ("emu", always: the very kernel
sources and CUDA glue, run on fibers; one thread order per test case).

Covers what only the device code can get wrong: the warp top-k (ties, k up to 256 and the
sorted path above), rows split over several CTAs (few rows), misaligned rows (odd V, a
reference row aligned differently from the policy row), strided [B, T, V] views, NaN, −inf
and mostly −inf rows, the in-place backward, low temperatures and logits near the float
limit, bitwise run-to-run reproducibility and 64-bit offsets (GPU only: 20 GiB).

Where the CPU op is known to differ from the reference (tail sums below the float range,
low temperatures, logits near the float limit: being fixed in the CPU kernels), the CUDA
kernels are compared with the float64 reference only.
"""
import math
import subprocess
from pathlib import Path

import pytest
import torch

import tike_cuda
from tike_cuda.reference import (full_kl_reference, token_logprobs_reference, topk_indices,
                                 topk_kl_reference)

from conftest import GRAD_RTOL, assert_grads, assert_lse_pairs, assert_values, make_logits

CPU = torch.ops.tike_cuda
BIG_V = 151936
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# float32 outputs of the CUDA kernels against the CPU kernels (both float32 inside, with
# different summation orders and exp implementations).
CPU_ATOL, CPU_RTOL = 1e-4, 1e-4
NAN, INF = float("nan"), float("inf")


def _inputs(kdev, N, V, dtype, gen, sampled=True):
    z = make_logits((N, V), dtype, "cpu", generator=gen)
    zr = make_logits((N, V), dtype, "cpu", generator=gen)
    tok = torch.randint(0, V, (N,), generator=gen) if sampled else None
    old = torch.randn(N, generator=gen) * 0.1 - 2.0 if sampled else None
    return kdev.put(z), kdev.put(zr), kdev.put(tok), kdev.put(old)


def _close(a, b, atol=CPU_ATOL, rtol=CPU_RTOL):
    torch.testing.assert_close(a.cpu(), b.cpu(), atol=atol, rtol=rtol, equal_nan=True)


def _close_lse(a, b, tau, atol=CPU_ATOL, rtol=CPU_RTOL):
    assert_lse_pairs(a, b, tau, atol=atol, rtol=rtol)


def _close_outputs(got, exp, tau):
    """full_kl (out, lse_p, lse_q) or token_logprobs (logp, entropy, lse) of two devices."""
    for a, b in zip(got, exp):
        if a.dim() == 2:
            _close_lse(a, b, tau)
        else:
            _close(a, b)


def _cpu(*xs):
    return [None if x is None else x.cpu() for x in xs]


def _same_as_cpu_op(got, exp, tau):
    """topk_kl outputs (out, lse, idx, coef, shift, stats) of the device and the CPU op."""
    assert torch.equal(got[2].cpu(), exp[2]), "S~ differs from the CPU kernel"
    for i in (0, 3, 4, 5):
        _close(got[i], exp[i])
    _close_lse(got[1], exp[1], tau)


def _grad_matches_reference(kdev, z, zr, k, gen, **kw):
    """Public API on the device: value and gradient against float64 autograd."""
    zg = z.clone().requires_grad_()
    with kdev.api():
        val = tike_cuda.topk_kl(zg, zr, k, **kw)
        g = torch.randn(val.shape, generator=gen, dtype=torch.float64)
        (grad,) = torch.autograd.grad(val, zg, kdev.put(g.float()))
    z64 = z.double().cpu().requires_grad_()
    kw64 = {n: (v.cpu() if isinstance(v, torch.Tensor) else v) for n, v in kw.items()}
    ref = topk_kl_reference(z64, zr.cpu(), k, **kw64)
    assert_values(val, ref, atol=5e-5)
    (grad64,) = torch.autograd.grad(ref, z64, g)
    assert_grads(grad, grad64, z.dtype)


# ------------------------------------------------------------------ the topk_kl matrix

def _topk_cases():
    """V ∈ {1, k−1 (rejected), k, 37, 4099, 151936} for k ∈ {1, 5, 16, 64, 256, 300}; the
    three dtypes over V ≤ 4099, one dtype per k (rotating) for V = 151936."""
    out = []
    for i, k in enumerate((1, 5, 16, 64, 256, 300)):
        for V in sorted({1, k - 1, k, 37, 4099}):
            if V >= 1 and (V >= k or V == k - 1):
                out += [(V, k, dt) for dt in DTYPES]
        out.append((BIG_V, k, DTYPES[i % 3]))
    return out


@pytest.mark.parametrize("V,k,dtype", _topk_cases(), ids=lambda x: str(x).replace("torch.", ""))
def test_topk_kl_matches_cpu_and_reference(kdev, V, k, dtype, gen):
    N = 3 if V == BIG_V else 9  # 3 rows of a long vocabulary: the split-row path
    z, zr, tok, old = _inputs(kdev, N, V, dtype, gen)
    mask = kdev.put(torch.rand(N, generator=gen) > 0.2)
    if k > V:
        with pytest.raises(RuntimeError, match="k must be in"):
            kdev.ops.topk_kl(z, zr, k, tok, old, mask, 0.7, True, False)
        return
    for tail in (False, True):
        got = kdev.ops.topk_kl(z, zr, k, tok, old, mask, 0.7, True, tail)
        _same_as_cpu_op(got, CPU.topk_kl(*_cpu(z, zr), k, *_cpu(tok, old, mask), 0.7, True, tail),
                        0.7)
    _grad_matches_reference(kdev, z, zr, k, gen, sampled_tokens=tok, old_logprobs=old, mask=mask,
                            temperature=0.7, tail="bucket")


@pytest.mark.parametrize("union", [True, False])
def test_topk_kl_without_sampled_and_union_flag(kdev, union, gen):
    z, zr, tok, _ = _inputs(kdev, 6, 4099, torch.bfloat16, gen)
    for t in (None, tok):
        got = kdev.ops.topk_kl(z, zr, 16, t, None, None, 1.0, union, True)
        exp = CPU.topk_kl(*_cpu(z, zr), 16, *_cpu(t), None, None, 1.0, union, True)
        _same_as_cpu_op(got, exp, 1.0)


def test_bf16_ties_lower_index_wins(kdev, gen):
    # Few distinct bf16 values: dozens of ties at the k-th value in every row.
    N, V, k = 3, 20000, 64
    z = kdev.put(torch.randint(-4, 5, (N, V), generator=gen).to(torch.bfloat16))
    zr = kdev.put(make_logits((N, V), torch.bfloat16, "cpu", generator=gen))
    idx = kdev.ops.topk_kl(z, zr, k, None, None, None, 1.0, True, False)[2]
    assert torch.equal(idx.long().cpu(), topk_indices(z.cpu(), k))
    # -0 ties with +0; NaN ranks as -inf (and makes its row NaN).
    z2 = z.clone()
    z2[:, 7] = -0.0
    z2[:, 3] = 0.0
    z2[2, 5] = NAN
    for kk in (16, 300):
        got = kdev.ops.topk_kl(z2, zr, kk, None, None, None, 1.0, True, False)
        assert torch.equal(got[2].cpu(), CPU.topk_kl(*_cpu(z2, zr), kk, None, None, None, 1.0,
                                                     True, False)[2])


def test_topk_kl_large_k_sorted_path(kdev, gen):
    z, zr, tok, old = _inputs(kdev, 4, 4099, torch.float32, gen)
    for k in (300, 4099):
        got = kdev.ops.topk_kl(z, zr, k, tok, old, None, 1.0, True, True)
        _same_as_cpu_op(got, CPU.topk_kl(*_cpu(z, zr), k, *_cpu(tok, old), None, 1.0, True, True),
                        1.0)


@pytest.mark.parametrize("N", [1, 2, 5])
def test_small_n_split_rows(kdev, N, gen):
    z, zr, tok, old = _inputs(kdev, N, BIG_V, torch.bfloat16, gen)
    for k in (16, 256):
        got = kdev.ops.topk_kl(z, zr, k, tok, old, None, 1.0, True, True)
        _same_as_cpu_op(got, CPU.topk_kl(*_cpu(z, zr), k, *_cpu(tok, old), None, 1.0, True, True),
                        1.0)
    _close_outputs(kdev.ops.full_kl(z, zr, None, 1.0), CPU.full_kl(*_cpu(z, zr), None, 1.0), 1.0)
    _close_outputs(kdev.ops.token_logprobs(z, tok, 1.0, True),
                   CPU.token_logprobs(*_cpu(z, tok), 1.0, True), 1.0)


def test_last_segment_of_one_column_holds_the_sampled_token(kdev, gen):
    """N = 1, V = 130561: 31 segments of 4352 columns, the last one holding column V − 1
    alone, which is the sampled token (in S~ as entry k; its gradient is patched there)."""
    V = 130561
    z, zr, _, old = _inputs(kdev, 1, V, torch.float32, gen)
    tok = kdev.put(torch.tensor([V - 1]))
    for tail in (False, True):
        got = kdev.ops.topk_kl(z, zr, 16, tok, old, None, 0.9, True, tail)
        _same_as_cpu_op(got, CPU.topk_kl(*_cpu(z, zr), 16, *_cpu(tok, old), None, 0.9, True, tail),
                        0.9)
        assert got[2][0, 16].item() == V - 1
    _grad_matches_reference(kdev, z, zr, 16, gen, sampled_tokens=tok, old_logprobs=old,
                            temperature=0.9, tail="bucket")
    with kdev.api():
        zg = z.clone().requires_grad_()
        lp = tike_cuda.token_logprobs(zg, tok, temperature=0.9)
        (grad,) = torch.autograd.grad(lp.sum(), zg)
    z64 = z.cpu().double().requires_grad_()
    (g64,) = torch.autograd.grad(token_logprobs_reference(z64, tok.cpu(), temperature=0.9).sum(), z64)
    assert_grads(grad, g64, torch.float32)


def test_noncontiguous_btv_slices_and_misaligned_reference(kdev, gen):
    B, T, V = 2, 5, 4099  # odd V: every row starts at a different alignment
    full = kdev.put(make_logits((B, T + 1, V), torch.bfloat16, "cpu", generator=gen))
    ref_full = kdev.put(make_logits((B, T + 2, V + 1), torch.bfloat16, "cpu", generator=gen))
    # the reference rows start one element later than the policy rows: other alignments
    z, zr = full[:, :-1, :], ref_full[:, 2:, 1:]
    assert not z.is_contiguous() and not zr.is_contiguous()
    tok = kdev.put(torch.randint(0, V, (B, T), generator=gen))
    with kdev.api():
        got = tike_cuda.topk_kl(z, zr, 16, sampled_tokens=tok, return_stats=True, tail="bucket")
        exp = tike_cuda.topk_kl(z.contiguous(), zr.contiguous(), 16, sampled_tokens=tok,
                                return_stats=True, tail="bucket")
        fk, fk_c = tike_cuda.full_kl(z, zr), tike_cuda.full_kl(z.contiguous(), zr.contiguous())
    _close(got[0], exp[0], atol=1e-5, rtol=1e-5)
    for a, b in zip(got[1], exp[1]):
        _close(a, b, atol=1e-5, rtol=1e-5)
    _close(fk, fk_c, 1e-5, 1e-5)
    assert_values(got[0], topk_kl_reference(z.cpu(), zr.cpu(), 16, sampled_tokens=tok.cpu(),
                                            tail="bucket"), atol=5e-5)
    assert_values(fk, full_kl_reference(z.cpu(), zr.cpu()), atol=5e-5)
    # In-place backward over a strided view writes only the view's rows.
    _, lse, idx, coef, shift, _ = kdev.ops.topk_kl(z, zr, 16, None, None, None, 1.0, True, False)
    g = kdev.put(torch.randn(B * T, generator=gen))
    before = full[:, -1, :].clone()
    exp_grad = kdev.ops.topk_kl_backward(g, z, lse, idx, coef, shift, None, 1.0)
    kdev.ops.topk_kl_backward_(g, z, lse, idx, coef, shift, None, 1.0)
    assert torch.equal(full[:, -1, :], before)
    assert torch.equal(z.reshape(B * T, V), exp_grad.reshape(B * T, V))


@pytest.mark.parametrize("N,V", [(6, 4099), (2, 40000)])  # one CTA per row; split rows
def test_inplace_backward_equals_out_of_place(kdev, N, V, gen):
    z, zr, tok, old = _inputs(kdev, N, V, torch.bfloat16, gen)
    mask = kdev.put(torch.tensor([True, False] + [True] * (N - 2)))
    _, lse, idx, coef, shift, _ = kdev.ops.topk_kl(z, zr, 16, tok, old, mask, 0.9, True, True)
    g = kdev.put(torch.randn(N, generator=gen))
    grad = kdev.ops.topk_kl_backward(g, z, lse, idx, coef, shift, mask, 0.9)
    buf = z.clone()
    kdev.ops.topk_kl_backward_(g, buf, lse, idx, coef, shift, mask, 0.9)
    assert torch.equal(buf, grad)
    exp = CPU.topk_kl_backward(*_cpu(g, z, lse, idx, coef, shift, mask), 0.9)
    torch.testing.assert_close(grad.cpu().float(), exp.float(), rtol=GRAD_RTOL[torch.bfloat16],
                               atol=GRAD_RTOL[torch.bfloat16] * exp.float().abs().max().item())
    # through the public API: the same gradient, written over the logits buffer
    x = z.float().clone().requires_grad_()
    with kdev.api():
        (expected,) = torch.autograd.grad(tike_cuda.topk_kl(x * 1, zr.float(), 16).sum(), x)
        logits = x * 1
        out = tike_cuda.topk_kl(logits, zr.float(), 16, inplace_backward=True)
        (got,) = torch.autograd.grad(out.sum(), x)
    assert torch.equal(got, expected)


def test_bitwise_reproducible(kdev, gen):
    for N, V in ((2, 40000), (40, 3000)):  # split-row and one-CTA-per-row paths
        z, zr, tok, old = _inputs(kdev, N, V, torch.bfloat16, gen)
        ops = kdev.ops
        a = ops.topk_kl(z, zr, 64, tok, old, None, 1.0, True, True)
        b = ops.topk_kl(z, zr, 64, tok, old, None, 1.0, True, True)
        assert all(torch.equal(x, y) for x, y in zip(a, b))
        g = kdev.put(torch.randn(N, generator=gen))
        ga = ops.topk_kl_backward(g, z, a[1], a[2], a[3], a[4], None, 1.0)
        gb = ops.topk_kl_backward(g, z, b[1], b[2], b[3], b[4], None, 1.0)
        assert torch.equal(ga, gb)
        fa, fb = ops.full_kl(z, zr, None, 1.0), ops.full_kl(z, zr, None, 1.0)
        assert all(torch.equal(x, y) for x, y in zip(fa, fb))
        ta, tb = ops.token_logprobs(z, tok, 1.0, True), ops.token_logprobs(z, tok, 1.0, True)
        assert all(torch.equal(x, y) for x, y in zip(ta, tb))


# ------------------------------------------------------------------ full_kl, token_logprobs

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N,V", [(9, 1), (9, 37), (9, 4099), (2, BIG_V)])
def test_full_kl_and_token_logprobs(kdev, N, V, dtype, gen):
    z, zr, tok, _ = _inputs(kdev, N, V, dtype, gen)
    mask = kdev.put(torch.rand(N, generator=gen) > 0.2)
    _close_outputs(kdev.ops.full_kl(z, zr, mask, 0.8), CPU.full_kl(*_cpu(z, zr, mask), 0.8), 0.8)
    _close_outputs(kdev.ops.token_logprobs(z, tok, 0.8, True),
                   CPU.token_logprobs(*_cpu(z, tok), 0.8, True), 0.8)
    g = torch.randn(N, generator=gen, dtype=torch.float64)
    g2 = torch.randn(N, generator=gen, dtype=torch.float64)
    zg = z.clone().requires_grad_()
    with kdev.api():
        val = tike_cuda.full_kl(zg, zr, temperature=0.8, mask=mask)
        (grad,) = torch.autograd.grad(val, zg, kdev.put(g.float()))
        zt = z.clone().requires_grad_()
        lp, H = tike_cuda.token_logprobs(zt, tok, temperature=0.8, return_entropy=True)
        (tgrad,) = torch.autograd.grad((lp, H), zt, (kdev.put(g.float()), kdev.put(g2.float())))
    z64 = z.double().cpu().requires_grad_()
    ref = full_kl_reference(z64, zr.cpu(), temperature=0.8, mask=mask.cpu())
    assert_values(val, ref, atol=5e-5)
    assert_grads(grad, torch.autograd.grad(ref, z64, g)[0], dtype)
    z64 = z.double().cpu().requires_grad_()
    lp64, H64 = token_logprobs_reference(z64, tok.cpu(), temperature=0.8, return_entropy=True)
    assert_values(lp, lp64, atol=5e-5)
    assert_values(H, H64, atol=5e-5)
    assert_grads(tgrad, torch.autograd.grad((lp64, H64), z64, (g, g2))[0], dtype)


# ------------------------------------------------------------------ NaN, ±inf, masks

def _topk_paths():
    """(N, V, k): one CTA per row, split rows (combine kernel), k > 256 (preselected S)."""
    return [(3, 1000, 5), (3, 40000, 16), (3, 3001, 300)]


@pytest.mark.parametrize("N,V,k", _topk_paths())
@pytest.mark.parametrize("tail", [False, True])
@pytest.mark.parametrize("with_old", [False, True])
def test_nan_rows_give_nan_on_every_path(kdev, N, V, k, tail, with_old, gen):
    """A NaN anywhere in a row (early: it goes to the tail sums; late; in the reference)
    makes out, coef and shift of that row NaN, whatever the path, tail and IS weight."""
    z, zr, tok, old = _inputs(kdev, N, V, torch.float32, gen)
    z[0, 11] = NAN           # early in the row: into the tail sums / never in a preselected S
    zr[1, V - 2] = NAN       # in the reference row
    old = old if with_old else None
    out, lse, idx, coef, shift, _ = kdev.ops.topk_kl(z, zr, k, tok, old, None, 1.0, True, tail)
    for r in (0, 1):
        assert out[r].isnan(), f"row {r}: out {out[r].item()}"
        assert shift[r].isnan() or r == 1, f"row {r}: shift {shift[r].item()}"
    assert coef[0][idx[0] >= 0].isnan().all() and shift[0].isnan()
    assert out[2:].isfinite().all() and coef[2:].isfinite().all() and shift[2:].isfinite().all()
    g = kdev.put(torch.ones(N))
    grad = kdev.ops.topk_kl_backward(g, z, lse, idx, coef, shift, None, 1.0)
    assert grad[0].isnan().all() and grad[2:].isfinite().all()


@pytest.mark.parametrize("N,V,k", _topk_paths())
def test_all_neg_inf_row_gives_nan(kdev, N, V, k, gen):
    """lse_p = −inf: p is undefined, as in the reference and the CPU op (NaN)."""
    z, zr, tok, _ = _inputs(kdev, N, V, torch.float32, gen)
    z[1] = -INF
    for tail in (False, True):
        out, _, _, coef, shift, _ = kdev.ops.topk_kl(z, zr, k, None, None, None, 1.0, True, tail)
        assert out[1].isnan() and coef[1].isnan().all() and shift[1].isnan()
        assert out[[0] + list(range(2, N))].isfinite().all()
        exp = CPU.topk_kl(*_cpu(z, zr), k, None, None, None, 1.0, True, tail)
        assert exp[0][1].isnan()
    ref = topk_kl_reference(z.cpu(), zr.cpu(), k)
    assert ref[1].isnan()
    assert kdev.ops.full_kl(z, zr, None, 1.0)[0][1].isnan()
    lp = kdev.ops.token_logprobs(z, kdev.put(torch.zeros(N, dtype=torch.long)), 1.0, False)[0]
    assert lp[1].isnan()


def test_pos_inf_logit_gives_a_nan_row(kdev, gen):
    """+inf logits: log_softmax (and the reference) give NaN; so do the kernels."""
    z, zr, tok, _ = _inputs(kdev, 4, 3000, torch.float32, gen)
    z[0, 5] = INF
    zr[1, 7] = INF
    out = kdev.ops.topk_kl(z, zr, 16, tok, None, None, 1.0, True, True)[0]
    assert out[0].isnan() and out[1].isnan() and out[2:].isfinite().all()
    ref = topk_kl_reference(z.cpu(), zr.cpu(), 16, sampled_tokens=tok.cpu(), tail="bucket")
    assert ref[:2].isnan().all()
    fk = kdev.ops.full_kl(z, zr, None, 1.0)[0]
    assert fk[0].isnan() and fk[1].isnan() and fk[2:].isfinite().all()
    assert full_kl_reference(z.cpu(), zr.cpu())[:2].isnan().all()
    lp = kdev.ops.token_logprobs(z, tok, 1.0, True)
    assert lp[0][0].isnan() and lp[1][0].isnan() and lp[0][1:].isfinite().all()


@pytest.mark.parametrize("N,V", [(3, 64), (3, 3000), (3, 40000)])
def test_full_kl_is_inf_where_q_is_zero_and_p_is_not(kdev, N, V, gen):
    """p_v > 0 with q_v = 0 (a −inf reference logit, or one ≳ 87τ nats below its row max):
    the KL is +inf, as the reference says, never NaN."""
    z, zr, _, _ = _inputs(kdev, N, V, torch.float32, gen)
    zr[0, 3] = -INF                 # where p is not small
    z[1, V - 2] = z[1].max() - 150.0  # p ≈ e^-150: 0 in float, not in float64 ...
    zr[1, V - 2] = -INF             # ... and q = 0 there
    z[2, :5] = zr[2, :5] = -INF     # both forbid: 0 · log(0/0) = 0
    out = kdev.ops.full_kl(z, zr, None, 1.0)[0]
    ref = full_kl_reference(z.cpu(), zr.cpu())
    assert ref[0] == ref[1] == INF
    assert out[0] == INF and out[1] == INF, out
    _close(out[2:], ref[2:].float())


@pytest.mark.parametrize("N,V,k", _topk_paths())
def test_neg_inf_entries_and_mostly_neg_inf_rows(kdev, N, V, k, gen):
    z, zr, tok, old = _inputs(kdev, N, V, torch.float32, gen)
    z[0, : V // 3] = -INF                                  # a masked part of the vocabulary
    zr[0, : V // 3] = -INF
    keep = torch.randperm(V, generator=gen)[: max(3, k // 2)]
    row = torch.full((V,), -INF)
    row[keep] = z[1, keep.to(z.device)].cpu()
    z[1] = kdev.put(row)                                   # fewer finite logits than k
    zr[2, : V // 2] = -INF                                 # the reference forbids, p does not
    tok[1] = keep[0].item()
    got = kdev.ops.topk_kl(z, zr, k, tok, old, None, 0.8, True, False)
    exp = CPU.topk_kl(*_cpu(z, zr), k, *_cpu(tok, old), None, 0.8, True, False)
    assert torch.equal(got[2].cpu(), exp[2])
    for i in (0, 3, 4, 5):
        torch.testing.assert_close(got[i].cpu(), exp[i], atol=CPU_ATOL, rtol=CPU_RTOL,
                                   equal_nan=True)
    _close_lse(got[1], exp[1], 0.8)
    # tail="bucket" against the reference only: the CPU op is being fixed for reference rows
    # that start with -inf (it corrupts memory on row 2 here)
    none = got[0]
    got = kdev.ops.topk_kl(z, zr, k, tok, old, None, 0.8, True, True)
    assert torch.equal(got[2][:, :k].long().cpu(), topk_indices(z.cpu(), k))
    for tail, out in (("none", none), ("bucket", got[0])):
        ref = topk_kl_reference(z.cpu(), zr.cpu(), k, sampled_tokens=tok.cpu(),
                                old_logprobs=old.cpu(), temperature=0.8, tail=tail)
        assert_values(out, ref, atol=5e-5)


def test_mostly_neg_inf_rows_take_the_fast_path(gen):
    """A row with 8 finite logits must not be scanned one element at a time: the warp
    top-k's fast path must not wait for k finite candidates. Counted under the emulation:
    the rounds of the slow path (one __ballot_sync each, topk_select.cuh) in one unsplit
    row, where each warp streams two steps: the first fills its buffer (16 rounds per warp
    in both rows); after it a dense row needs a round or two, a mostly −inf row none."""
    from conftest import _load_emulation
    testing = _load_emulation()
    V = 8191  # the longest row a single CTA takes (rows of 8192 and more are split)
    dense = make_logits((1, V), torch.float32, "cpu", generator=gen)
    sparse = torch.full((1, V), -INF)
    sparse[0, torch.randperm(V, generator=gen)[:8]] = dense[0, :8]
    zr = make_logits((1, V), torch.float32, "cpu", generator=gen)
    rounds = []
    for z in (dense, sparse):
        testing.reset_counters()
        out = torch.ops.tike_cuda_emu.topk_kl(z, zr, 16, None, None, None, 1.0, True, False)
        assert torch.equal(out[2].cpu(), CPU.topk_kl(z, zr, 16, None, None, None, 1.0, True, False)[2])
        rounds.append(sum(n for site, n in testing.warp_op_sites().items()
                          if "topk_select.cuh" in site and "__ballot_sync" in site))
    assert 0 < rounds[1] <= 1.2 * rounds[0], f"slow rounds: dense {rounds[0]}, mostly -inf {rounds[1]}"


def test_masked_rows_are_not_read(kdev, gen):
    z, zr, tok, old = _inputs(kdev, 4, 3000, torch.float32, gen)
    z[1] = NAN
    zr[3] = NAN
    mask = kdev.put(torch.tensor([True, False, True, False]))
    for k in (16, 300):
        out, lse, idx, coef, shift, stats = kdev.ops.topk_kl(z, zr, k, tok, old, mask, 1.0, True, True)
        assert out[1] == out[3] == 0 and (coef[1] == 0).all() and (idx[1] == -1).all()
        assert (stats[[1, 3]] == 0).all() and out[[0, 2]].isfinite().all()
        grad = kdev.ops.topk_kl_backward(kdev.put(torch.ones(4)), z, lse, idx, coef, shift, mask, 1.0)
        assert (grad[[1, 3]] == 0).all() and grad.isfinite().all()
    fk = kdev.ops.full_kl(z, zr, mask, 1.0)
    assert (fk[0][[1, 3]] == 0).all() and fk[0].isfinite().all()


def test_nan_row_gradients_stay_nan(kdev, gen):
    # A NaN logit makes its row's gradient NaN everywhere, as on the CPU (a p > 0 test
    # would turn NaN p into 0 and hide the row), and leaves every other row finite.
    z, zr, tok, old = _inputs(kdev, 6, 4099, torch.float32, gen)
    z[2, 100] = NAN
    g = kdev.put(torch.randn(6, generator=gen))
    ops = kdev.ops

    def check(got, exp):
        assert got[2].isnan().all() and got[[0, 1, 3, 4, 5]].isfinite().all()
        assert torch.equal(got.isnan().cpu(), exp.isnan())

    _, lse, idx, coef, shift, _ = ops.topk_kl(z, zr, 16, tok, old, None, 1.0, True, True)
    check(ops.topk_kl_backward(g, z, lse, idx, coef, shift, None, 1.0),
          CPU.topk_kl_backward(*_cpu(g, z, lse, idx, coef, shift), None, 1.0))
    out, lp, lq = ops.full_kl(z, zr, None, 1.0)
    check(ops.full_kl_backward(g, z, zr, out, lp, lq, None, 1.0),
          CPU.full_kl_backward(*_cpu(g, z, zr, out, lp, lq), None, 1.0))
    _, ent, lse = ops.token_logprobs(z, tok, 1.0, True)
    check(ops.token_logprobs_backward(g, g, z, tok, lse, ent, 1.0),
          CPU.token_logprobs_backward(*_cpu(g, g, z, tok, lse, ent), 1.0))


# ------------------------------------------------------------------ precision (issue 17)

@pytest.mark.parametrize("tau", [1e-3, 1e-6, 1e-30])
def test_low_temperature_agrees_with_float64(kdev, tau, gen):
    """τ → 0: p is nearly one-hot and the values grow like 1/τ; compared with the float64
    reference relative to their size (the CPU op is being fixed for the same cases)."""
    N, V = 4, 3000
    z, zr, tok, _ = _inputs(kdev, N, V, torch.float32, gen)
    for k in (16, 300):
        with kdev.api():
            got = tike_cuda.topk_kl(z, zr, k, sampled_tokens=tok, temperature=tau, tail="bucket")
        ref = topk_kl_reference(z.cpu(), zr.cpu(), k, sampled_tokens=tok.cpu(), temperature=tau,
                                tail="bucket")
        torch.testing.assert_close(got.double().cpu(), ref, rtol=1e-4, atol=1e-6)
    with kdev.api():
        fk = tike_cuda.full_kl(z, zr, temperature=tau)
        lp, H = tike_cuda.token_logprobs(z, tok, temperature=tau, return_entropy=True)
    torch.testing.assert_close(fk.double().cpu(), full_kl_reference(z.cpu(), zr.cpu(),
                                                                    temperature=tau),
                               rtol=1e-4, atol=1e-6)
    lp64, H64 = token_logprobs_reference(z.cpu(), tok.cpu(), temperature=tau, return_entropy=True)
    torch.testing.assert_close(lp.double().cpu(), lp64, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(H.double().cpu(), H64, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("tau", [1.0, 0.5])
def test_logits_near_the_float_limit_agree_with_float64(kdev, tau, gen):
    """Every entry ±3.4e38 (issue 17 item 5): z·log2(e)/τ overflows float, z − zr too;
    torch.log_softmax and the float64 reference give moderate values (p uniform over the
    +max entries). zr is +max wherever z is (else q_v = 0 < p_v makes full_kl's reference
    3.7e38, beyond float32). Values and gradients."""
    N, V = 3, 80
    big = torch.finfo(torch.float32).max
    plus = torch.rand(N, V, generator=gen) < 0.5
    plus[:, 0] = True
    z = torch.where(plus, big, -big)
    zr = torch.where(plus | (torch.rand(N, V, generator=gen) < 0.3), big, -big)
    tok = torch.multinomial(plus.double(), 1, generator=gen)[:, 0]  # log p(o) finite
    g = torch.randn(N, generator=gen, dtype=torch.float64)
    z64, zr64 = z.double().requires_grad_(), zr.double()
    cases = [
        (lambda a: tike_cuda.topk_kl(a, kdev.put(zr), 16, sampled_tokens=kdev.put(tok),
                                     tail="bucket", temperature=tau),
         topk_kl_reference(z64, zr64, 16, sampled_tokens=tok, tail="bucket", temperature=tau)),
        (lambda a: tike_cuda.full_kl(a, kdev.put(zr), temperature=tau),
         full_kl_reference(z64, zr64, temperature=tau)),
        (lambda a: tike_cuda.token_logprobs(a, kdev.put(tok), temperature=tau),
         token_logprobs_reference(z64, tok, temperature=tau)),
    ]
    for fused, exp in cases:
        assert torch.isfinite(exp).all()
        x = kdev.put(z.clone()).requires_grad_()
        with kdev.api():
            out = fused(x)
            (grad,) = torch.autograd.grad(out, x, kdev.put(g.float()))
        torch.testing.assert_close(out.double().cpu(), exp.detach(), rtol=1e-4, atol=1e-5)
        (grad64,) = torch.autograd.grad(exp, z64, g)
        assert_grads(grad.cpu(), grad64, torch.float32)


def test_tiny_tail_mass_agrees_with_float64(kdev, gen):
    """t_p ≈ 1e-60 (below the float range, V = 3001, k = 300, τ = 0.05): coef and shift
    keep the (r/τ)·b term of the tail bucket (compared with the reference's gradient)."""
    z, zr, _, _ = _inputs(kdev, 2, 3001, torch.float32, gen)
    _grad_matches_reference(kdev, z, zr, 300, gen, temperature=0.05, tail="bucket")
    _, _, idx, coef, shift, _ = kdev.ops.topk_kl(z, zr, 300, None, None, None, 0.05, True, True)
    z64 = z.cpu().double()
    lp = torch.log_softmax(z64 / 0.05, -1)
    lq = torch.log_softmax(zr.cpu().double() / 0.05, -1)
    inside = torch.zeros_like(lp, dtype=torch.bool).scatter_(1, idx.long().cpu(), True)
    t_p = torch.where(inside, 0.0, lp.exp()).sum(-1)
    t_q = torch.where(inside, 0.0, lq.exp()).sum(-1)
    b = (t_p.log() - t_q.log() + 1).where(t_p > 0, torch.zeros(()))
    L = (lp - lq).gather(1, idx.long().cpu())
    torch.testing.assert_close(coef.double().cpu(), (L + 1 - b[:, None]) / 0.05, rtol=1e-4, atol=1e-3)


# ------------------------------------------------------------------ build

def test_kernel_headers_link_from_two_translation_units(tmp_path):
    """Every kernel header can be included by several sources of one program (no
    non-template, non-inline definitions). Checked with the host compiler under the
    emulation header, which sees the same definitions nvcc does."""
    from conftest import _load_emulation
    testing = _load_emulation()
    csrc = Path(__file__).resolve().parent.parent / "csrc"
    src = ('#include "emu/cuda_emu.h"\n#include "kernels/topk_kl.cuh"\n'
           '#include "kernels/full_kl.cuh"\n#include "kernels/token_logprobs.cuh"\n')
    objs = []
    for name in ("a", "b"):
        f = tmp_path / f"{name}.cpp"
        f.write_text(src + f"void use_{name}() {{ (void)&tike::cuda::full_kl_forward; }}\n")
        objs.append(str(tmp_path / f"{name}.o"))
        subprocess.run(["g++", "-std=c++17", "-O0", "-c", str(f), "-o", objs[-1], f"-I{csrc}",
                        f"-I{testing.cuda_include_dir()}", "-Wno-unknown-pragmas"], check=True)
    r = subprocess.run(["g++", "-r", "-nostdlib", "-o", str(tmp_path / "ab.o")] + objs,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


# ------------------------------------------------------------------ GPU only

@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (20 GiB)")
def test_int64_offsets_beyond_2_31():
    V = BIG_V
    N = (2**31) // V + 3  # N·V > 2^31
    if torch.cuda.get_device_properties(0).total_memory < 24 * 2**30:
        pytest.skip("needs ~20 GiB of device memory")
    gen = torch.Generator(device="cuda").manual_seed(7)
    z = torch.randn((N, V), generator=gen, device="cuda").mul_(3).to(torch.bfloat16)
    zr = torch.randn((N, V), generator=gen, device="cuda").mul_(3).to(torch.bfloat16)
    rows = torch.tensor([0, N // 2, N - 2, N - 1], device="cuda")
    OPS = torch.ops.tike_cuda
    out, lse, idx, coef, shift, _ = OPS.topk_kl(z, zr, 16, None, None, None, 1.0, True, False)
    g = torch.ones(N, device="cuda")
    grad = OPS.topk_kl_backward(g, z, lse, idx, coef, shift, None, 1.0)
    zs, zrs = z[rows].cpu(), zr[rows].cpu()
    exp = OPS.topk_kl(zs, zrs, 16, None, None, None, 1.0, True, False)
    assert torch.equal(idx[rows].cpu(), exp[2])
    _close(out[rows], exp[0])
    _close_lse(lse[rows], exp[1], 1.0)
    exp_grad = OPS.topk_kl_backward(torch.ones(4), zs, exp[1], exp[2], exp[3], exp[4], None, 1.0)
    torch.testing.assert_close(grad[rows].cpu().float(), exp_grad.float(), rtol=1e-2,
                               atol=1e-2 * exp_grad.float().abs().max().item())
    fk = OPS.full_kl(z, zr, None, 1.0)[0]
    _close(fk[rows], OPS.full_kl(zs, zrs, None, 1.0)[0])
