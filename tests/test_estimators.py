"""kl_penalty and per_token_kl against independent float64 computations."""
import math

import pytest
import torch

from tike_cuda.estimators import ESTIMATORS, kl_penalty, per_token_kl


def _pair(rows=3, vocab=40, seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    z = scale * torch.randn(rows, vocab, generator=g)
    zr = z + 0.7 * torch.randn(rows, vocab, generator=g)
    return z, zr


def _kl64(z, zr):
    lp, lq = torch.log_softmax(z.double(), -1), torch.log_softmax(zr.double(), -1)
    return (lp.exp() * (lp - lq)).sum(-1)


X = [-30.0, -1.0, -1e-3, 0.0, 0.5, 25.0]


def _expected(kind, x):
    if kind in ("k1", "kl"):
        return -x
    if kind == "abs":
        return abs(x)
    if kind in ("k2", "mse"):
        return x * x / 2
    if kind == "k3":
        return math.exp(x) - x - 1
    xc = min(max(x, -20.0), 20.0)
    return min(max(math.exp(xc) - xc - 1, -10.0), 10.0)


@pytest.mark.parametrize("kind", ["k1", "kl", "abs", "k2", "mse", "k3", "low_var_kl"])
def test_kl_penalty_values(kind):
    x = torch.tensor(X, dtype=torch.float64)
    logprob = torch.full_like(x, -2.0)
    got = kl_penalty(logprob, logprob + x, kind)
    want = torch.tensor([_expected(kind, v) for v in X], dtype=torch.float64)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_low_var_kl_clamps():
    lp = torch.zeros(2)
    out = kl_penalty(lp, torch.tensor([-30.0, 25.0]), "low_var_kl")
    # x = -30 -> -20: exp(-20) + 19 > 10; x = 25 -> 20: exp(20) - 21 > 10
    assert out.tolist() == [10.0, 10.0]


def test_k3_keeps_small_differences_in_float32():
    lp = torch.tensor([-1.0])
    out = kl_penalty(lp, lp + 1e-3, "k3")
    assert out.dtype == torch.float32
    assert abs(out.item() - (math.exp(1e-3) - 1e-3 - 1)) < 1e-9


def test_kl_penalty_bfloat16_computes_in_float32():
    lp = torch.tensor([-1.0], dtype=torch.bfloat16)
    assert kl_penalty(lp, lp - 0.5, "k3").dtype == torch.float32


def test_kl_penalty_errors():
    a = torch.zeros(3)
    with pytest.raises(ValueError, match="kind"):
        kl_penalty(a, a, "k4")
    with pytest.raises(ValueError, match="ref_logprob"):
        kl_penalty(a, torch.zeros(4), "k1")
    with pytest.raises(ValueError, match="ref_logprob"):
        kl_penalty(a, torch.zeros(3, dtype=torch.float64), "k1")
    with pytest.raises(ValueError, match="logprob"):
        kl_penalty(torch.zeros(3, dtype=torch.long), a, "k1")


def _all_tokens(z, zr):
    """Every vocabulary entry as the sampled token of its own copy of each row."""
    R, V = z.shape
    zz = z[:, None, :].expand(R, V, V).contiguous()
    zzr = zr[:, None, :].expand(R, V, V).contiguous()
    return zz, zzr, torch.arange(V).expand(R, V).contiguous()


def test_sampled_estimators_exact_expectation():
    """E_{o ~ p}[k1] = E[k3] = KL exactly; k2 and abs are biased. The expectation is the
    p-weighted sum over the whole vocabulary: no Monte-Carlo noise in this test."""
    z, zr = _pair(rows=3, vocab=40)
    kl = _kl64(z, zr)
    p = torch.softmax(z.double(), -1)
    zz, zzr, tok = _all_tokens(z, zr)
    expect = {name: (p * per_token_kl(zz, zzr, name, sampled_tokens=tok).double()).sum(-1)
              for name in ("k1", "k2", "k3", "low_var_kl", "abs")}
    torch.testing.assert_close(expect["k1"], kl, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(expect["k3"], kl, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(expect["low_var_kl"], expect["k3"])  # no clamp active here
    assert ((expect["k2"] - kl).abs() / kl > 1e-2).all()
    assert (expect["abs"] > kl * 1.05).all()


def test_sampled_estimator_gradient():
    z, zr = _pair(rows=4, vocab=30, seed=1)
    tok = torch.tensor([0, 5, 29, 7])
    x = z.clone().requires_grad_()
    per_token_kl(x, zr, "k1", sampled_tokens=tok).sum().backward()
    # d(log p_o - log q_o)/dz = onehot(o) - p
    want = torch.nn.functional.one_hot(tok, 30).double() - torch.softmax(z.double(), -1)
    torch.testing.assert_close(x.grad.double(), want, rtol=1e-4, atol=1e-6)


def test_full_and_tike_converge_to_exact():
    z, zr = _pair(rows=5, vocab=64, seed=2)
    kl = _kl64(z, zr)
    torch.testing.assert_close(per_token_kl(z, zr, "full").double(), kl, rtol=1e-4, atol=1e-6)
    lp, lq = torch.log_softmax(z.double(), -1), torch.log_softmax(zr.double(), -1)
    terms = lp.exp() * (lp - lq)
    order = torch.argsort(z, dim=-1, descending=True)
    for k in (1, 4, 16, 63, 64):
        want = terms.gather(-1, order[:, :k]).sum(-1)
        got = per_token_kl(z, zr, "tike", k=k).double()
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    for name in ("tike", "tike_bucket"):
        torch.testing.assert_close(per_token_kl(z, zr, name, k=64).double(), kl,
                                   rtol=1e-4, atol=1e-6)


def test_tike_bucket_is_coarse_grained_kl():
    z, zr = _pair(rows=4, vocab=50, seed=3)
    lp, lq = torch.log_softmax(z.double(), -1), torch.log_softmax(zr.double(), -1)
    idx = torch.argsort(z, dim=-1, descending=True)[:, :8]
    ph, qh = lp.exp().gather(-1, idx), lq.exp().gather(-1, idx)
    tp, tq = 1 - ph.sum(-1), 1 - qh.sum(-1)
    want = (ph * (ph / qh).log()).sum(-1) + tp * (tp / tq).log()
    got = per_token_kl(z, zr, "tike_bucket", k=8).double()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    assert (got <= _kl64(z, zr) + 1e-6).all()


def test_tike_gradient_equals_full_gradient_at_k_equal_V():
    z, zr = _pair(rows=3, vocab=24, seed=4)
    grads = []
    for name in ("full", "tike"):
        x = z.clone().requires_grad_()
        per_token_kl(x, zr, name, k=24).sum().backward()
        grads.append(x.grad.double())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_tike_importance_weight_and_union():
    z, zr = _pair(rows=3, vocab=30, seed=5)
    tok = torch.argsort(z, -1)[:, 0]  # the least likely token: never in the top-k
    old = torch.tensor([-3.0, -5.0, -7.0])
    lp, lq = torch.log_softmax(z.double(), -1), torch.log_softmax(zr.double(), -1)
    terms = lp.exp() * (lp - lq)
    idx = torch.cat([torch.argsort(z, -1, descending=True)[:, :4], tok[:, None]], -1)
    r = torch.exp(lp.gather(-1, tok[:, None]).squeeze(-1) - old.double())
    want = r * terms.gather(-1, idx).sum(-1)
    got = per_token_kl(z, zr, "tike", k=4, sampled_tokens=tok, old_logprobs=old).double()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("name", ESTIMATORS)
def test_mask_zeroes_value_and_gradient(name):
    z, zr = _pair(rows=4, vocab=20, seed=6)
    mask = torch.tensor([True, False, True, False])
    tok = torch.tensor([3, -100, 7, -100])  # padding ids at masked positions are fine
    x = z.clone().requires_grad_()
    out = per_token_kl(x, zr, name, sampled_tokens=tok, k=4, mask=mask)
    assert out.shape == (4,) and out.dtype == torch.float32
    assert out[~mask].eq(0).all()
    out.sum().backward()
    assert x.grad[~mask].eq(0).all()
    assert x.grad[mask].abs().sum() > 0


def test_per_token_kl_errors():
    z, zr = _pair(rows=2, vocab=10)
    with pytest.raises(ValueError, match="sampled_tokens"):
        per_token_kl(z, zr, "k3")
    with pytest.raises(ValueError, match="estimator"):
        per_token_kl(z, zr, "k5", sampled_tokens=torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="ref_logits"):
        per_token_kl(z, zr[:, :5], "k1", sampled_tokens=torch.zeros(2, dtype=torch.long))


def test_reference_gets_no_gradient():
    z, zr = _pair(rows=2, vocab=12)
    zr = zr.clone().requires_grad_()
    x = z.clone().requires_grad_()
    per_token_kl(x, zr, "k3", sampled_tokens=torch.tensor([1, 2])).sum().backward()
    assert zr.grad is None and x.grad is not None


@pytest.mark.parametrize("alias,name", [("kl", "k1"), ("mse", "k2")])
def test_one_list_of_names(alias, name):
    """kl_penalty and per_token_kl accept the same names, verl's aliases included."""
    z, zr = _pair(rows=3, vocab=16, seed=8)
    tok = torch.tensor([1, 5, 9])
    torch.testing.assert_close(per_token_kl(z, zr, alias, sampled_tokens=tok),
                               per_token_kl(z, zr, name, sampled_tokens=tok))
    lp, lq = torch.randn(5), torch.randn(5)
    torch.testing.assert_close(kl_penalty(lp, lq, alias), kl_penalty(lp, lq, name))


def test_unknown_names_one_message():
    lp = torch.zeros(2)
    with pytest.raises(ValueError, match=r"kind must be one of 'k1', 'abs', 'k2', 'k3', "
                                         r"'low_var_kl' \(aliases: 'kl' = 'k1', 'mse' = 'k2'\)"):
        kl_penalty(lp, lp, "full")  # a dense estimator needs logits, not log-probs
    z, zr = _pair(rows=2, vocab=10)
    with pytest.raises(ValueError, match=r"estimator must be one of 'k1', .*'tike_bucket' "
                                         r"\(aliases: 'kl' = 'k1', 'mse' = 'k2'\), got 'k5'"):
        per_token_kl(z, zr, "k5", sampled_tokens=torch.zeros(2, dtype=torch.long))
