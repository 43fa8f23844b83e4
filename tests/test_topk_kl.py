"""topk_kl against the float64 reference: values, gradients, shapes, layouts, semantics."""
import pytest
import torch

import tike_cuda
from tike_cuda.reference import topk_indices, topk_kl_reference

from conftest import DEVICES, DTYPES, assert_grads, assert_values, make_logits

K = 16


def _run(logits, ref_logits, k, gen, **kw):
    """Fused and reference value + gradient for one random upstream gradient."""
    out = tike_cuda.topk_kl(logits, ref_logits, k, **kw)
    z64 = logits.detach().double().cpu().requires_grad_()
    kw64 = {n: (v.cpu() if isinstance(v, torch.Tensor) else v) for n, v in kw.items()}
    exp = topk_kl_reference(z64, ref_logits.detach().cpu(), k, **kw64)
    if isinstance(out, tuple):
        out, stats = out
        exp, exp_stats = exp
        for a, b in zip(stats, exp_stats):
            assert_values(a, b, atol=1e-5)
    g = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    (grad,) = torch.autograd.grad(out, logits, g.to(out.device, torch.float32))
    (grad64,) = torch.autograd.grad(exp, z64, g)
    return out, exp, grad, grad64


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("V", [1, K - 1, K, 4099])
@pytest.mark.parametrize("tail", ["none", "bucket"])
def test_values_and_grads(device, dtype, V, tail, gen):
    N = 7
    k = min(K, V)
    z = make_logits((N, V), dtype, device, generator=gen, requires_grad=True)
    zr = make_logits((N, V), dtype, device, generator=gen)
    tokens = torch.randint(0, V, (N,), generator=gen).to(device)
    old = (torch.randn(N, generator=gen) - 2.0).to(device)
    out, exp, grad, grad64 = _run(z, zr, k, gen, sampled_tokens=tokens, old_logprobs=old,
                                  temperature=0.8, tail=tail, return_stats=True)
    assert out.shape == (N,)
    assert_values(out, exp)
    assert_grads(grad, grad64, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_qwen_vocabulary(device, dtype, gen):
    V = 151936
    z = make_logits((2, V), dtype, device, generator=gen, requires_grad=True)
    zr = (z.detach().float() + 0.5 * torch.randn(2, V, generator=gen).to(device)).to(dtype)
    tokens = torch.randint(0, V, (2,), generator=gen).to(device)
    for tail in ("none", "bucket"):
        out, exp, grad, grad64 = _run(z, zr, K, gen, sampled_tokens=tokens, tail=tail)
        assert_values(out, exp)
        assert_grads(grad, grad64, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k", [1, 5, 64, 300])
def test_k_range(device, k, gen):
    z = make_logits((3, 1000), torch.float32, device, generator=gen, requires_grad=True)
    zr = make_logits((3, 1000), torch.float32, device, generator=gen)
    out, exp, grad, grad64 = _run(z, zr, k, gen)
    assert_values(out, exp)
    assert_grads(grad, grad64, torch.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("N", [0, 1])
def test_zero_and_one_rows(device, N, gen):
    z = make_logits((N, 50), torch.float32, device, generator=gen, requires_grad=True)
    zr = make_logits((N, 50), torch.float32, device, generator=gen)
    out = tike_cuda.topk_kl(z, zr, 8)
    assert out.shape == (N,)
    assert_values(out, topk_kl_reference(z.detach(), zr, 8))
    out.sum().backward()
    assert z.grad.shape == (N, 50)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_batch_time_layouts(device, dtype, gen):
    """[B, T, V] inputs, the usual logits[:, :-1] slice, a transposed view, a strided vocab."""
    B, T, V = 3, 6, 333
    full = make_logits((B, T + 1, V), dtype, device, generator=gen)
    ref_full = make_logits((B, T + 1, V), dtype, device, generator=gen)
    tokens = torch.randint(0, V, (B, T), generator=gen).to(device)
    views = {
        "contiguous": (full[:, :T].contiguous(), ref_full[:, :T].contiguous()),
        "shifted slice": (full[:, :-1], ref_full[:, 1:]),
        "transposed": (full.transpose(0, 1)[:T].transpose(0, 1), ref_full[:, :T]),
    }
    wide = make_logits((B, T, 2 * V), dtype, device, generator=gen)
    views["strided vocab"] = (wide[..., ::2], ref_full[:, :T])
    for name, (z_view, zr_view) in views.items():
        z = z_view.detach().requires_grad_()
        out, exp, grad, grad64 = _run(z, zr_view, K, gen, sampled_tokens=tokens)
        assert out.shape == (B, T), name
        assert_values(out, exp)
        assert_grads(grad, grad64, dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_ties_go_to_the_lower_index(device):
    """bf16 rounds many logits to the same value: S must take the lower indices."""
    V = 2000
    z = torch.zeros(2, V, dtype=torch.bfloat16, device=device)
    z[:, ::7] = 1.0      # 286 tied maxima per row: S is the first k of them
    z[1, 1500] = 2.0     # a unique maximum first, then the tie
    zr = torch.zeros_like(z)
    _, _, idx, _, _, _ = torch.ops.tike_cuda.topk_kl(z, zr, K, None, None, None, 1.0, True, False)
    expected = topk_indices(z.cpu(), K).to(torch.int32)
    assert torch.equal(idx.cpu(), expected)
    assert idx[0].tolist() == list(range(0, 7 * K, 7))


@pytest.mark.parametrize("device", DEVICES)
def test_sampled_token_counted_once(device, gen):
    z = make_logits((4, 100), torch.float32, device, generator=gen)
    zr = make_logits((4, 100), torch.float32, device, generator=gen)
    inside = topk_indices(z.cpu(), K)[:, 0].to(device)       # the top token: already in S
    outside = topk_indices(z.cpu(), 100)[:, -1].to(device)   # the lowest: not in S
    plain = tike_cuda.topk_kl(z, zr, K)
    assert torch.equal(tike_cuda.topk_kl(z, zr, K, sampled_tokens=inside), plain)
    united = tike_cuda.topk_kl(z, zr, K, sampled_tokens=outside)
    assert_values(united, topk_kl_reference(z, zr, K, sampled_tokens=outside))
    assert not torch.equal(united, plain)
    alone = tike_cuda.topk_kl(z, zr, K, sampled_tokens=outside, union_sampled=False)
    assert torch.equal(alone, plain)


@pytest.mark.parametrize("device", DEVICES)
def test_mask_rows_not_read(device, gen):
    z = make_logits((5, 64), torch.float32, device, generator=gen)
    z[1] = float("nan")  # a masked row may hold anything
    z.requires_grad_()
    zr = make_logits((5, 64), torch.float32, device, generator=gen)
    mask = torch.tensor([True, False, True, False, True], device=device)
    out, stats = tike_cuda.topk_kl(z, zr, 8, mask=mask, return_stats=True)
    assert out[~mask].eq(0).all() and all(s[~mask].eq(0).all() for s in stats)
    assert_values(out, topk_kl_reference(z.detach(), zr, 8, mask=mask))
    out.sum().backward()
    assert z.grad[~mask].eq(0).all() and torch.isfinite(z.grad).all()


@pytest.mark.parametrize("device", DEVICES)
def test_nan_stays_in_its_row_and_inf_is_legal(device, gen):
    z = make_logits((3, 64), torch.float32, device, generator=gen)
    zr = make_logits((3, 64), torch.float32, device, generator=gen)
    z[0, 5] = float("nan")
    z[2, :10] = float("-inf")   # a masked vocabulary
    zr[2, :10] = float("-inf")
    out = tike_cuda.topk_kl(z, zr, 16)
    assert torch.isnan(out[0]) and torch.isfinite(out[1:]).all()
    assert_values(out[1:], topk_kl_reference(z[1:], zr[1:], 16))


@pytest.mark.parametrize("device", DEVICES)
def test_reference_gets_no_gradient_and_is_weight_carries_none(device, gen):
    z = make_logits((4, 80), torch.float32, device, generator=gen, requires_grad=True)
    zr = make_logits((4, 80), torch.float32, device, generator=gen, requires_grad=True)
    tokens = torch.randint(0, 80, (4,), generator=gen).to(device)
    old = (torch.randn(4, generator=gen) - 3.0).to(device).requires_grad_()
    tike_cuda.topk_kl(z, zr, 8, sampled_tokens=tokens, old_logprobs=old).sum().backward()
    assert zr.grad is None and old.grad is None
    assert z.grad is not None


@pytest.mark.parametrize("device", DEVICES)
def test_bitwise_reproducible(device, gen):
    z = make_logits((9, 5000), torch.bfloat16, device, generator=gen, requires_grad=True)
    zr = make_logits((9, 5000), torch.bfloat16, device, generator=gen)
    runs = []
    for _ in range(2):
        out = tike_cuda.topk_kl(z, zr, 32, tail="bucket")
        (grad,) = torch.autograd.grad(out.sum(), z)
        runs.append((out, grad))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_inplace_backward_matches(device, dtype, gen):
    z = make_logits((5, 3000), dtype, device, generator=gen)
    zr = make_logits((5, 3000), dtype, device, generator=gen)
    tokens = torch.randint(0, 3000, (5,), generator=gen).to(device)
    mask = torch.tensor([True, True, False, True, True], device=device)
    op = torch.ops.tike_cuda
    _, lse, idx, coef, shift, _ = op.topk_kl(z, zr, 16, tokens, None, mask, 1.3, True, True)
    g = torch.randn(5, generator=gen).to(device)
    grad = op.topk_kl_backward(g, z, lse, idx, coef, shift, mask, 1.3)
    buf = z.clone()
    op.topk_kl_backward_(g, buf, lse, idx, coef, shift, mask, 1.3)
    assert torch.equal(buf, grad)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_inplace_backward_api(device, dtype, gen):
    """inplace_backward=True: the same gradient, written over the logits buffer."""
    x = make_logits((4, 2, 700), dtype, device, generator=gen, requires_grad=True)
    zr = make_logits((4, 2, 700), dtype, device, generator=gen)
    tokens = torch.randint(0, 700, (4, 2), generator=gen).to(device)
    mask = torch.rand(4, 2, generator=gen).to(device) > 0.3
    kw = dict(sampled_tokens=tokens, mask=mask, tail="bucket")
    (expected,) = torch.autograd.grad(tike_cuda.topk_kl(x * 1, zr, 16, **kw).sum(), x)
    logits = x * 1  # an activation, as the output of an lm_head would be
    out = tike_cuda.topk_kl(logits, zr, 16, inplace_backward=True, **kw)
    assert_values(out, tike_cuda.topk_kl(x.detach(), zr, 16, **kw).double())
    (grad,) = torch.autograd.grad(out.sum(), x)
    assert torch.equal(grad, expected)
    assert torch.equal(logits.detach(), expected)  # the buffer now holds the gradient


def test_inplace_backward_refuses_a_shared_buffer(gen):
    """Another op that saved the same logits fails autograd's check instead of misreading."""
    x = make_logits((3, 200), torch.float32, "cpu", generator=gen, requires_grad=True)
    logits = x * 1
    other = logits.pow(2).sum()  # saves `logits`; its backward runs after topk_kl's
    kl = tike_cuda.topk_kl(logits, logits.detach() + 0.1, 8, inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (kl.sum() + other).backward()
