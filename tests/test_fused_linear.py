"""FusedLinearGRPOLoss against the unfused path (full logits, then token_logprobs +
per_token_kl + grpo.grpo_loss): the loss, the metrics and the gradients to the hidden states,
the LM-head weight and bias, for every KL estimator and loss_agg_mode, both gradient modes."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import tike_cuda
from conftest import DEVICES
from tike_cuda import grpo
from tike_cuda.estimators import ESTIMATORS
from tike_cuda.fused_linear import (GRADIENT_MODES, chunk_rows, fused_linear_grpo_loss,
                                    unfused_linear_grpo_loss)

B, T, H, V = 3, 11, 24, 97  # N = 33 rows


def make(gen, dtype=torch.float32, *, B=B, T=T, H=H, V=V, mask_p=0.3, bias=True, H_ref=None):
    """Policy and reference heads close to each other (as in RL), tokens drawn from the
    policy's own distribution, masked positions holding the padding id -100."""
    H_ref = H_ref or H
    f = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)
    h, w = f(B, T, H), f(V, H) * 0.6
    rh = f(B, T, H_ref) if H_ref != H else h + 0.2 * f(B, T, H)
    rw = f(V, H_ref) * 0.6 if H_ref != H else w + 0.1 * f(V, H)
    b, rb = (0.3 * f(V), 0.3 * f(V)) if bias else (None, None)
    logits = h @ w.T + (b if bias else 0)
    tokens = torch.multinomial(logits.reshape(-1, V).softmax(-1), 1, generator=gen).view(B, T)
    lp = logits.log_softmax(-1).gather(-1, tokens[..., None])[..., 0]
    mask = torch.rand(B, T, generator=gen) > mask_p
    mask[0, 0] = True
    tokens = torch.where(mask, tokens, torch.full_like(tokens, -100))
    cast = lambda x, g=False: None if x is None else x.to(dtype).requires_grad_(g)
    return dict(hidden=cast(h, True), weight=cast(w, True), bias=cast(b, True),
                ref_hidden=cast(rh), ref_weight=cast(rw), ref_bias=cast(rb),
                sampled_tokens=tokens, old_logprobs=(lp + 0.3 * f(B, T)).float(),
                advantages=f(B).float(), response_mask=mask)


def run(fn, inp, **kw):
    """(loss, metrics, grads of hidden, weight, bias) of one path."""
    a = dict(inp)
    args = [a.pop(n) for n in ("hidden", "weight", "sampled_tokens", "old_logprobs",
                               "advantages", "response_mask", "ref_hidden", "ref_weight")]
    loss, metrics = fn(*args, **a, **kw)
    wrt = [t for t in (inp["hidden"], inp["weight"], inp["bias"]) if t is not None]
    grads = torch.autograd.grad(loss, wrt)
    return loss, metrics, grads


def assert_same(fused, unfused, rtol=1e-5):
    (l1, m1, g1), (l2, m2, g2) = fused, unfused
    assert set(m1) == set(m2)
    torch.testing.assert_close(l1, l2, rtol=rtol, atol=rtol * 1e-2)
    for key in m2:
        torch.testing.assert_close(m1[key], m2[key], rtol=rtol, atol=rtol * 1e-2, msg=key)
    for a, b in zip(g1, g2):
        assert a.dtype == b.dtype and a.shape == b.shape
        scale = b.abs().max().item()
        torch.testing.assert_close(a.double(), b.double(), rtol=rtol, atol=rtol * scale)


SETTINGS = dict(beta=0.1, k=4, temperature=0.8, clip_eps=0.2, clip_eps_high=0.28,
                return_entropy=True)


@pytest.mark.parametrize("gradient", GRADIENT_MODES)
@pytest.mark.parametrize("mode", grpo.AGG_MODES)
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_matches_unfused(gen, estimator, mode, gradient):
    inp = make(gen)
    kw = dict(SETTINGS, kl_estimator=estimator, loss_agg_mode=mode)
    assert_same(run(fused_linear_grpo_loss, inp, chunk_size=8, gradient=gradient, **kw),
                run(unfused_linear_grpo_loss, inp, **kw))


@pytest.mark.parametrize("chunk", [1, 5, 32, 33, 34, 1000, None])
@pytest.mark.parametrize("estimator", ["tike", "k3", "full"])
def test_chunk_sizes(gen, chunk, estimator):
    # chunks that do not divide N, exactly N, more than N, and the budget's default
    inp = make(gen, mask_p=0.0)
    kw = dict(SETTINGS, kl_estimator=estimator)
    assert_same(run(fused_linear_grpo_loss, inp, chunk_size=chunk, **kw),
                run(unfused_linear_grpo_loss, inp, **kw))


@pytest.mark.parametrize("gradient", GRADIENT_MODES)
def test_flat_hidden_no_bias_other_reference_width(gen, gradient):
    # hidden as [B·T, H]; no bias; a reference of another hidden size
    inp = make(gen, bias=False, H_ref=40)
    inp["hidden"] = inp["hidden"].detach().reshape(B * T, H).requires_grad_()
    inp["ref_hidden"] = inp["ref_hidden"].reshape(B * T, 40)
    out = run(fused_linear_grpo_loss, inp, chunk_size=6, gradient=gradient)
    assert out[2][0].shape == (B * T, H)
    assert_same(out, run(unfused_linear_grpo_loss, inp))


@pytest.mark.parametrize("mask_kind", ["int", "float", "all", "none_valid"])
def test_masks(gen, mask_kind):
    inp = make(gen)
    m = inp["response_mask"]
    if mask_kind == "int":
        inp["response_mask"] = m.to(torch.int64)
    elif mask_kind == "float":
        inp["response_mask"] = m.float()
    elif mask_kind == "all":
        inp["response_mask"] = torch.ones_like(m)
        inp["sampled_tokens"] = inp["sampled_tokens"].clamp_min(0)
    else:
        inp["response_mask"] = torch.zeros_like(m)
    for gradient in GRADIENT_MODES:
        fused = run(fused_linear_grpo_loss, inp, chunk_size=7, gradient=gradient, **SETTINGS)
        assert_same(fused, run(unfused_linear_grpo_loss, inp, **SETTINGS))
    if mask_kind == "none_valid":
        assert fused[0].item() == 0 and all(g.eq(0).all() for g in fused[2])
    # masked rows get exactly zero gradient
    rows = ~(inp["response_mask"] != 0)
    assert fused[2][0][rows].eq(0).all()


@pytest.mark.parametrize("estimator", ["tike", "k3", "full"])
@pytest.mark.parametrize("gradient", GRADIENT_MODES)
def test_bfloat16(gen, estimator, gradient):
    inp = make(gen, torch.bfloat16)
    kw = dict(SETTINGS, kl_estimator=estimator)
    fused = run(fused_linear_grpo_loss, inp, chunk_size=7, gradient=gradient, **kw)
    unfused = run(unfused_linear_grpo_loss, inp, **kw)
    assert fused[0].dtype == torch.float32
    # The logits are the same bf16 numbers in both paths; the gradients over them are
    # rounded to bf16 once (fused) or per term (unfused), the weight's accumulated per chunk.
    assert_same(fused, unfused, rtol=1.6e-2)  # 4 bf16 roundings


def test_tied_embedding(gen):
    # The LM head shares the input embedding: both uses' gradients must add up.
    emb = torch.nn.Embedding(V, H).double()
    proj = torch.nn.Linear(H, H).double()
    ids = torch.randint(0, V, (B, T), generator=gen)
    inp = make(gen)
    grads = []
    for fn in (fused_linear_grpo_loss, unfused_linear_grpo_loss):
        e, p = emb.float(), proj.float()
        for mod in (e, p):
            mod.zero_grad()
        hidden = torch.tanh(p(e(ids)))
        ref_w = e.weight.detach() + 0.05
        loss, _ = fn(hidden, e.weight, inp["sampled_tokens"], inp["old_logprobs"],
                     inp["advantages"], inp["response_mask"], hidden.detach() * 0.9, ref_w,
                     **({"chunk_size": 5} if fn is fused_linear_grpo_loss else {}))
        loss.backward()
        grads.append((e.weight.grad.clone(), p.weight.grad.clone()))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())
    # both paths into the embedding: the head's gradient is dense, the lookup's is not
    assert grads[0][0].ne(0).all()


@pytest.mark.parametrize("gradient", GRADIENT_MODES)
def test_upstream_gradient_and_partial_requires_grad(gen, gradient):
    inp = make(gen)
    (l1, _, g1), = [run(fused_linear_grpo_loss, inp, chunk_size=9, gradient=gradient)]
    # the loss inside a larger graph: d(3·loss + x)/d params = 3 · d loss / d params
    loss, _ = fused_linear_grpo_loss(*(inp[n] for n in (
        "hidden", "weight", "sampled_tokens", "old_logprobs", "advantages", "response_mask",
        "ref_hidden", "ref_weight")), bias=inp["bias"], ref_bias=inp["ref_bias"], chunk_size=9,
        gradient=gradient)
    g3 = torch.autograd.grad(3 * loss + inp["hidden"].sum(), [inp["weight"]])[0]
    torch.testing.assert_close(g3, 3 * g1[1], rtol=1e-6, atol=1e-7)
    # a frozen backbone: only the head wants a gradient
    inp2 = dict(inp, hidden=inp["hidden"].detach(), bias=None, ref_bias=None)
    gw = [torch.autograd.grad(fn(*_args(inp2), **kw)[0], inp2["weight"])[0]
          for fn, kw in ((fused_linear_grpo_loss, dict(chunk_size=9, gradient=gradient)),
                         (unfused_linear_grpo_loss, {}))]
    torch.testing.assert_close(gw[0], gw[1], rtol=1e-5, atol=1e-5 * gw[1].abs().max().item())
    # no autograd at all: same values
    with torch.no_grad():
        l0, m0 = fused_linear_grpo_loss(*(inp[n] for n in (
            "hidden", "weight", "sampled_tokens", "old_logprobs", "advantages",
            "response_mask", "ref_hidden", "ref_weight")), bias=inp["bias"],
            ref_bias=inp["ref_bias"], gradient=gradient)
    torch.testing.assert_close(l0, l1.detach(), rtol=1e-6, atol=0)
    assert not l0.requires_grad


def _args(inp):
    return [inp[n] for n in ("hidden", "weight", "sampled_tokens", "old_logprobs", "advantages",
                             "response_mask", "ref_hidden", "ref_weight")]


def test_second_backward(gen):
    inp = make(gen)
    loss, _ = fused_linear_grpo_loss(*_args(inp), gradient="recompute", chunk_size=8)
    g1 = torch.autograd.grad(loss, inp["weight"], retain_graph=True)[0]
    g2 = torch.autograd.grad(loss, inp["weight"])[0]
    torch.testing.assert_close(g1, g2, rtol=0, atol=0)
    loss, _ = fused_linear_grpo_loss(*_args(inp), gradient="in_forward", chunk_size=8)
    torch.autograd.grad(loss, inp["weight"], retain_graph=True)
    with pytest.raises(RuntimeError, match="recompute"):
        torch.autograd.grad(loss, inp["weight"])


def test_module_and_beta_zero_without_reference(gen):
    inp = make(gen)
    mod = tike_cuda.FusedLinearGRPOLoss(beta=0.05, kl_estimator="tike_bucket", k=3, chunk_size=4)
    assert "tike_bucket" in repr(mod)
    l1, m1 = mod(*_args(inp))
    l2, m2 = fused_linear_grpo_loss(*_args(inp), beta=0.05, kl_estimator="tike_bucket", k=3)
    torch.testing.assert_close(l1, l2)
    # beta = 0: no reference needed; the KL metric is 0
    inp0 = dict(inp, ref_hidden=None, ref_weight=None, ref_bias=None)
    fused = run(fused_linear_grpo_loss, inp0, beta=0.0, chunk_size=5, return_entropy=True)
    assert fused[1]["kl"].item() == 0
    assert_same(fused, run(unfused_linear_grpo_loss, inp0, beta=0.0, return_entropy=True))


class _LogitsWatch(TorchDispatchMode):
    """Records the largest number of rows of any new [rows, V] tensor an op produces."""

    def __init__(self, V):
        super().__init__()
        self.V, self.rows = V, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view:  # e.g. weight.t(): no new memory
            return out
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[-1] == self.V:
                self.rows = max(self.rows, t.numel() // self.V)
        return out


@pytest.mark.parametrize("gradient", GRADIENT_MODES)
@pytest.mark.parametrize("estimator", ["tike", "k3", "full"])
def test_never_more_than_a_chunk_of_logits(gen, estimator, gradient):
    inp = make(gen, mask_p=0.0, H=200)  # H > V: the weight's gradient [V, H] is not logits
    inp["weight"] = inp["weight"].detach()[:, :].requires_grad_()
    for fn, kw, limit in ((fused_linear_grpo_loss, dict(chunk_size=5, gradient=gradient), 5),
                          (unfused_linear_grpo_loss, {}, B * T)):
        watch = _LogitsWatch(V)
        with watch:
            loss, _ = fn(*_args(inp), bias=inp["bias"], ref_bias=inp["ref_bias"],
                         kl_estimator=estimator, **kw)
            loss.backward()
        assert watch.rows == limit  # the unfused path is the control: it does hold B·T rows


def test_chunk_rows_from_budget():
    assert chunk_rows(151936, torch.bfloat16, "tike", 256 << 20) == 384
    assert chunk_rows(151936, torch.bfloat16, "k3", 256 << 20) == 832
    assert chunk_rows(151936, torch.float32, "full", 1 << 20) == 1
    assert chunk_rows(100, torch.float32, None, 100 * 4 * 70) == 70


def test_bad_input(gen):
    inp = make(gen)
    a = _args(inp)

    def call(*args, **kw):
        return fused_linear_grpo_loss(*args, **kw)

    with pytest.raises(ValueError, match="ref_weight requires grad"):
        call(*a[:7], inp["weight"])  # the policy's own weight as the reference's
    with pytest.raises(ValueError, match="ref_bias requires grad"):
        call(*a, ref_bias=inp["bias"])
    with pytest.raises(ValueError, match="weight must be"):
        call(a[0], a[1][:, :-1], *a[2:])
    with pytest.raises(ValueError, match="hidden must be"):
        call(a[0][:, :-1], *a[1:])
    with pytest.raises(ValueError, match="ref_hidden must"):
        call(*a[:6], a[6][:, :-1], a[7])
    with pytest.raises(ValueError, match="vocabulary"):
        call(*a[:7], a[7][:-1])
    with pytest.raises(ValueError, match="old_logprobs must have shape"):
        call(*a[:3], a[3][:, :-1], *a[4:])
    with pytest.raises(ValueError, match="advantages"):
        call(*a[:4], a[4][:-1], *a[5:])
    with pytest.raises(ValueError, match="response_mask must have shape"):
        call(*a[:5], a[5].T, *a[6:])
    with pytest.raises(ValueError, match="sampled_tokens must be \\[B, T\\]"):
        call(a[0], a[1], a[2].reshape(-1), *a[3:])
    with pytest.raises(TypeError, match="sampled_tokens must have an integer"):
        call(a[0], a[1], a[2].float(), *a[3:])
    with pytest.raises(TypeError, match="weight must have hidden's dtype"):
        call(a[0], a[1].detach().double(), *a[2:])
    with pytest.raises(TypeError, match="hidden must be float32"):
        call(a[0].detach().double(), *a[1:])
    with pytest.raises(ValueError, match="ref_hidden must have hidden's dtype"):
        call(*a[:6], a[6].bfloat16(), a[7].bfloat16())
    with pytest.raises(ValueError, match="together"):
        call(*a[:6], a[6], None)
    with pytest.raises(ValueError, match="required when beta"):
        call(*a[:6])
    bad = a[2].clone()
    bad[0, 0] = V
    with pytest.raises(ValueError, match="sampled_tokens must be in"):
        call(a[0], a[1], bad, *a[3:])
    with pytest.raises(ValueError, match="kl_estimator"):
        call(*a, kl_estimator="k4")
    with pytest.raises(ValueError, match="loss_agg_mode"):
        call(*a, loss_agg_mode="mean")
    with pytest.raises(ValueError, match="k must be"):
        call(*a, k=V + 1)
    with pytest.raises(ValueError, match="chunk_size"):
        call(*a, chunk_size=0)
    with pytest.raises(ValueError, match="memory_budget"):
        call(*a, memory_budget=-1)
    with pytest.raises(ValueError, match="gradient"):
        call(*a, gradient="later")
    with pytest.raises(ValueError, match="beta"):
        call(*a, beta=float("nan"))
    with pytest.raises(ValueError, match="temperature"):
        call(*a, temperature=0.0)
    with pytest.raises(ValueError, match="bias must be"):
        call(*a, bias=inp["bias"][:-1])


def test_readme_snippet_runs(gen):
    import re
    from pathlib import Path
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text[text.index("### From hidden states"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    inp = make(gen)
    lm_head, ref_lm_head = torch.nn.Linear(H, V, bias=False), torch.nn.Linear(H, V, bias=False)
    ref_lm_head.requires_grad_(False)
    env = dict(hidden=inp["hidden"], ref_hidden=inp["ref_hidden"], lm_head=lm_head,
               ref_lm_head=ref_lm_head, responses=inp["sampled_tokens"],
               old_logprobs=inp["old_logprobs"], advantages=inp["advantages"],
               response_mask=inp["response_mask"])
    exec(compile(code, "README.md", "exec"), env)
    assert torch.isfinite(env["loss"]) and lm_head.weight.grad is not None
    assert inp["hidden"].grad is not None and set(env["metrics"]) >= {"loss", "kl", "pg_loss"}


@pytest.mark.skipif("seq-mean-token-sum-norm" not in grpo.AGG_MODES,
                    reason="grpo.aggregate without Dr. GRPO's loss_scale_factor")
@pytest.mark.parametrize("gradient", GRADIENT_MODES)
def test_loss_scale_factor(gen, gradient):
    inp = make(gen)
    kw = dict(SETTINGS, loss_agg_mode="seq-mean-token-sum-norm", loss_scale_factor=37.0)
    fused = run(fused_linear_grpo_loss, inp, chunk_size=6, gradient=gradient, **kw)
    assert_same(fused, run(unfused_linear_grpo_loss, inp, **kw))
    default = run(fused_linear_grpo_loss, inp, chunk_size=6, gradient=gradient,
                  **dict(kw, loss_scale_factor=None))
    torch.testing.assert_close(fused[0] * 37.0, default[0] * T)  # default: T


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("estimator", ["tike", "k3", "full"])
@pytest.mark.parametrize("device", DEVICES)
def test_on_device(gen, device, estimator, dtype):
    # the same check on every device (CUDA where present): matmuls through torch, per-chunk
    # work through the device's kernels, the in-place backward included
    inp = {n: (t.detach().to(device).requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor)
               else t) for n, t in make(gen, dtype).items()}
    kw = dict(SETTINGS, kl_estimator=estimator)
    for gradient in GRADIENT_MODES:
        fused = run(fused_linear_grpo_loss, inp, chunk_size=7, gradient=gradient, **kw)
        assert fused[0].device.type == device
        assert_same(fused, run(unfused_linear_grpo_loss, inp, **kw),
                    rtol=1e-5 if dtype == torch.float32 else 1.6e-2)


@pytest.mark.parametrize("with_old", [False, True])
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_logprobs_kl_building_block(gen, estimator, with_old):
    # per-token log p(o) and KL with their gradients under any downstream loss
    inp = make(gen)
    mask, tau = inp["response_mask"], 0.7
    old = inp["old_logprobs"] if with_old else None
    tokens = torch.where(mask, inp["sampled_tokens"], torch.zeros_like(inp["sampled_tokens"]))
    a, b = torch.randn(B, T, generator=gen), torch.randn(B, T, generator=gen)
    wrt = [inp["hidden"], inp["weight"], inp["bias"]]

    out = tike_cuda.fused_linear.fused_linear_logprobs_kl(
        *_args(inp)[:3], mask, inp["ref_hidden"], inp["ref_weight"], bias=inp["bias"],
        ref_bias=inp["ref_bias"], kl_estimator=estimator, k=5, temperature=tau,
        old_logprobs=old, return_entropy=True, chunk_size=7)
    g_fused = torch.autograd.grad(((out.logprobs * a + out.kl * b) * mask).sum(), wrt)

    logits = torch.nn.functional.linear(inp["hidden"], inp["weight"], inp["bias"])
    ref_logits = torch.nn.functional.linear(inp["ref_hidden"], inp["ref_weight"], inp["ref_bias"])
    lp, ent = tike_cuda.token_logprobs(logits, tokens, temperature=tau, return_entropy=True)
    kl = tike_cuda.per_token_kl(logits, ref_logits, estimator, sampled_tokens=tokens,
                                old_logprobs=old, k=5, temperature=tau, mask=mask)
    g_ref = torch.autograd.grad(((lp * a + kl * b) * mask).sum(), wrt)

    close = lambda x, y: torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5 * y.abs().max())
    close(out.logprobs[mask], lp[mask].detach())
    close(out.kl, kl.detach())
    close(out.entropy[mask], ent[mask].detach())
    assert out.logprobs[~mask].eq(0).all() and not out.entropy.requires_grad
    for x, y in zip(g_fused, g_ref):
        close(x, y)
    if estimator.startswith("tike"):
        stats = tike_cuda.topk_kl(logits.detach(), ref_logits, 5, sampled_tokens=tokens,
                                  temperature=tau, mask=mask, return_stats=True)[1]
        close(out.topk_mass, stats.topk_mass)
    else:
        assert out.topk_mass is None
    # without a reference: log-probs only
    only = tike_cuda.fused_linear.fused_linear_logprobs_kl(*_args(inp)[:3], mask, chunk_size=4,
                                                           bias=inp["bias"], temperature=tau)
    assert only.kl is None and only.entropy is None
    close(only.logprobs[mask], lp[mask].detach())


def _sparse_store(inp, gen, k=5, tau=0.7):
    """A SparseReference on an older policy's top-k (the policy has moved since)."""
    mask = inp["response_mask"]
    tokens = torch.where(mask, inp["sampled_tokens"], torch.zeros_like(inp["sampled_tokens"]))
    old_logits = torch.nn.functional.linear(inp["hidden"], inp["weight"], inp["bias"]).detach()
    old_logits = old_logits + 0.5 * torch.randn(old_logits.shape, generator=gen)
    ref_logits = torch.nn.functional.linear(inp["ref_hidden"], inp["ref_weight"], inp["ref_bias"])
    support = tike_cuda.topk_indices(old_logits, k, mask=mask)
    return tike_cuda.sparse_reference(ref_logits, support, sampled_tokens=tokens,
                                      temperature=tau, mask=mask), tokens


@pytest.mark.parametrize("estimator", ["tike", "tike_bucket", "k3", "k1"])
def test_logprobs_kl_with_a_sparse_reference(gen, estimator):
    # the reference as stored on a fixed S~: TIKE equals topk_kl on the store, values and
    # gradients; a sampled-token estimator reads log q(o) from it
    inp, tau = make(gen), 0.7
    mask, old = inp["response_mask"], inp["old_logprobs"]
    sref, tokens = _sparse_store(inp, gen, tau=tau)
    a, b = torch.randn(B, T, generator=gen), torch.randn(B, T, generator=gen)
    wrt = [inp["hidden"], inp["weight"], inp["bias"]]

    out = tike_cuda.fused_linear.fused_linear_logprobs_kl(
        *_args(inp)[:3], mask, bias=inp["bias"], sparse_ref=sref, kl_estimator=estimator,
        temperature=tau, old_logprobs=old, chunk_size=7)
    g_fused = torch.autograd.grad(((out.logprobs * a + out.kl * b) * mask).sum(), wrt)

    logits = torch.nn.functional.linear(inp["hidden"], inp["weight"], inp["bias"])
    lp = tike_cuda.token_logprobs(logits, tokens, temperature=tau)
    if estimator.startswith("tike"):
        kl, stats = tike_cuda.topk_kl(logits, sref, sampled_tokens=tokens, old_logprobs=old,
                                      temperature=tau, mask=mask, return_stats=True,
                                      tail="bucket" if estimator == "tike_bucket" else "none")
    else:
        kl = tike_cuda.kl_penalty(lp, sref.token_logprobs(tokens), estimator)
        kl = torch.where(mask, kl, torch.zeros_like(kl))
    g_ref = torch.autograd.grad(((lp * a + kl * b) * mask).sum(), wrt)

    close = lambda x, y: torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5 * y.abs().max())
    close(out.logprobs[mask], lp[mask].detach())
    close(out.kl, kl.detach())
    for x, y in zip(g_fused, g_ref):
        close(x, y)
    if estimator.startswith("tike"):
        close(out.topk_mass, stats.topk_mass)
        assert out.kl.abs().max() > 0.05  # a KL term that carries weight
    else:
        assert out.topk_mass is None


def test_logprobs_kl_sparse_reference_bad_input(gen):
    inp = make(gen)
    mask = inp["response_mask"]
    sref, tokens = _sparse_store(inp, gen)
    fn = tike_cuda.fused_linear.fused_linear_logprobs_kl
    a = _args(inp)[:3]
    with pytest.raises(ValueError, match="'full'"):
        fn(*a, mask, sparse_ref=sref, kl_estimator="full")
    with pytest.raises(ValueError, match="not both"):
        fn(*a, mask, inp["ref_hidden"], inp["ref_weight"], sparse_ref=sref)
    with pytest.raises(TypeError, match="sparse_ref must be a tike_cuda.SparseReference"):
        fn(*a, mask, sparse_ref=sref.as_dict())
    with pytest.raises(ValueError, match=r"sparse_ref must describe.*\(3, 11\)"):
        fn(*a, mask, sparse_ref=sref[:2])
    no_o = tike_cuda.sparse_reference(torch.randn(B, T, V, generator=gen), sref.idx[..., :5],
                                      mask=mask)
    with pytest.raises(ValueError, match="built with sampled_tokens"):
        fn(*a, mask, sparse_ref=no_o)
    with pytest.raises(ValueError, match="k must be the SparseReference's support size 5"):
        fn(*a, mask, sparse_ref=sref, k=7)
    other = inp["sampled_tokens"].clone()
    row = mask.nonzero()[0].tolist()
    other[tuple(row)] = next(v for v in range(V) if v not in sref.idx[tuple(row)])
    with pytest.raises(ValueError, match="sampled_tokens differ"):
        fn(inp["hidden"], inp["weight"], other, mask, sparse_ref=sref)
