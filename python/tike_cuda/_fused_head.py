"""The chunk machinery of :mod:`tike_cuda.fused_linear`: per chunk of response rows, both
models' logits from their hidden states, the fused kernels over them, and the gradient
through the LM head; two autograd Functions (gradient formed in the forward, or logits
recomputed in the backward)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import grpo
from .estimators import SAMPLED_ESTIMATORS, kl_penalty
from .sparse import SparseReference

# "in_forward" (default): each chunk's gradient is formed right after its forward (the
# aggregation's per-token weights depend on the mask only, so they are known up front) and
# the backward only scales it: 3 policy-head matmuls per chunk. "recompute": the forward
# keeps O(N·k) kernel outputs and the backward recomputes each chunk's logits: 4 matmuls.
# Measured on the CPU (docs/benchmarks.md, N = 2048, H = 1024, V = 32,768 fp32 and 151,936
# bf16): recompute took 15-27 % more CPU time in every pair, and its peak was one chunk
# buffer lower (in_forward holds the gradients while both models' chunks are alive;
# recompute holds the gradients with the policy chunk only). The matmuls dominate on a GPU
# too, so the chunk buffer is the cheaper price.
GRADIENT_MODES = ("in_forward", "recompute")


@dataclass
class _Settings:
    beta: float
    clip_eps: float
    clip_eps_high: Optional[float]
    temperature: float
    kl_estimator: Optional[str]  # None: no reference (beta == 0)
    k: int
    return_entropy: bool
    chunk: int


# ----------------------------------------------------------------------------- per chunk

@dataclass
class _Batch:
    """Per-token inputs of the response rows (mask true) only, flattened to [M]: masked
    rows get no logits at all, which is exact since they carry no loss and no gradient."""
    cfg: _Settings
    tok: Tensor      # int64
    old: Optional[Tensor]  # rollout log-probs (TIKE's importance weight); None: r = 1
    adv: Tensor
    weight: Tensor   # float32 d loss / d (per-token loss): grpo.aggregate's weights
    where: Optional[Tensor]  # [M] row ids in [0, N); None when every row is a response row
    n_rows: int
    need: tuple      # gradients wanted for (hidden, weight, bias)
    # A SparseReference over the response rows [M]: the reference comes from the store (its
    # log q(o), or TIKE on its S~), and no reference head is read.
    sref: Optional[SparseReference] = None


@dataclass
class _Rows:
    """Both models' heads over the response rows."""
    h: Tensor
    w: Tensor
    b: Optional[Tensor]
    rh: Optional[Tensor]
    rw: Optional[Tensor]
    rb: Optional[Tensor]

    @staticmethod
    def take(batch: _Batch, h, w, b, rh, rw, rb) -> "_Rows":
        def rows(x):
            if x is None:
                return None
            x = x.detach().reshape(batch.n_rows, x.shape[-1])
            return x if batch.where is None else x.index_select(0, batch.where)
        detach = lambda x: None if x is None else x.detach()
        return _Rows(rows(h), w.detach(), detach(b), rows(rh), detach(rw), detach(rb))

    def logits(self, s: int, e: int, ref: bool = False) -> Tensor:
        if ref:
            return F.linear(self.rh[s:e], self.rw, self.rb)
        return F.linear(self.h[s:e], self.w, self.b)


def _chunk_forward(cfg: _Settings, r: _Rows, bt: _Batch, s: int, e: int):
    """Per-token values of rows [s, e) — log p(o), the KL (for a sampled-token estimator:
    log q(o)), the entropy, the top-k mass — and what their backward needs; the policy
    chunk z (and, for "full", the reference chunk) is returned for an immediate backward."""
    ops, tau, tok = torch.ops.tike_cuda, cfg.temperature, bt.tok[s:e]
    est, ent, zr, ref_lp, mass = cfg.kl_estimator, None, None, None, None
    sref = None if bt.sref is None else bt.sref[s:e]
    if est is None or est in SAMPLED_ESTIMATORS:
        if sref is not None:  # log q(o), stored
            ref_lp = sref.token_logprobs(tok)
        elif est is not None:  # the reference chunk is read, reduced to log q(o) and dropped
            ref_lp = ops.token_logprobs(r.logits(s, e, ref=True), tok, tau, False)[0]
        z = r.logits(s, e)
        lp, ent, lse = ops.token_logprobs(z, tok, tau, cfg.return_entropy)
        return z, None, (lp, ref_lp, ent, None), (lse,)
    z = r.logits(s, e)
    zr = None if sref is not None else r.logits(s, e, ref=True)
    if est == "full":
        kl, lse_p, lse_q = ops.full_kl(z, zr, None, tau)
        # lse_p is [N, 2] = (max z, log Σ exp((z − max)/τ)) (docs/kernels.md)
        lp = (z.gather(1, tok[:, None])[:, 0].float() - lse_p[:, 0]) * (1.0 / tau) - lse_p[:, 1]
        saved = (kl, lse_p, lse_q)
    else:  # one pass gives the KL and log p(o) (the kernel's stats[:, 1])
        old = None if bt.old is None else bt.old[s:e]
        bucket = est == "tike_bucket"
        if sref is None:
            kl, lse, idx, coef, shift, stats = ops.topk_kl(z, zr, cfg.k, tok, old, None, tau,
                                                           True, bucket)
        else:  # TIKE on the stored S~: the same outputs, S~ given
            idx = sref.idx
            kl, lse, coef, shift, stats = ops.topk_kl_sparse(
                z, idx, sref.logprobs, sref.tail_logmass, tok, old, None, tau, bucket)
        lp, mass, zr, saved = stats[:, 1].contiguous(), stats[:, 0], None, (lse, idx, coef, shift)
    if cfg.return_entropy:  # no KL kernel computes the entropy: one more read of z
        ent = ops.token_logprobs(z, tok, tau, True)[1]
    return z, zr, (lp, kl, ent, mass), saved


def _chunk_grad_logits(cfg: _Settings, z: Tensor, zr: Optional[Tensor], tok: Tensor, saved,
                       g_lp: Tensor, g_kl: Optional[Tensor]) -> Tensor:
    """d loss / d z for a chunk, from the per-token multipliers g_lp = d loss / d log p(o)
    and g_kl = d loss / d kl. Overwrites z (returned) except for "full"."""
    ops, tau = torch.ops.tike_cuda, cfg.temperature
    inv = 1.0 / tau
    if cfg.kl_estimator == "full":
        grad = ops.full_kl_backward(g_kl, z, zr, *saved, None, tau)
        del zr
        lse_p = saved[1]
        grad += ops.token_logprobs_backward(g_lp, None, z, tok, lse_p, lse_p.new_empty(0), tau)
        return grad
    # topk_kl's backward writes g·p_j·(1[j∈S~]·coef − shift) over z. Scaling coef and shift
    # by g_kl and adding g_lp/τ to shift makes it the KL's gradient plus the −p_j·g_lp/τ of
    # log p(o)'s; the 1[j=o]·g_lp/τ left is set at o, with the whole o-entry recomputed in
    # float32 from z_o read first (adding to a rounded entry would cancel when p_o ≈ 1).
    c = z.shape[0]
    if cfg.kl_estimator in ("tike", "tike_bucket"):
        lse, idx, coef, shift = saved
        coef, shift = coef * g_kl[:, None], shift * g_kl + g_lp * inv
    else:
        lse, idx = saved[0], tok[:, None].to(torch.int32)
        coef, shift = z.new_zeros((c, 1), dtype=torch.float32), g_lp * inv
    rows = torch.arange(c, device=z.device)
    p_o = torch.exp((z[rows, tok].float() - lse[:, 0]) * inv - lse[:, 1])  # lse: (max, log-sum)
    coef_o = (coef * (idx == tok[:, None].to(torch.int32))).sum(1)
    ops.topk_kl_backward_(torch.ones_like(shift), z, lse, idx, coef, shift, None, tau)
    z[rows, tok] = (p_o * (coef_o - shift) + g_lp * inv).to(z.dtype)
    return z


def _token_multipliers(cfg: _Settings, lp: Tensor, kl: Optional[Tensor], ref_lp: Optional[Tensor],
                       old: Tensor, adv: Tensor, weight: Tensor):
    """(g_lp, g_kl) = d loss / d (log p(o), kl) per token, by autograd through the same
    grpo.clipped_surrogate and kl_penalty as the unfused loss; ``weight`` is the
    aggregation's per-token weight (the loss is linear in the per-token loss)."""
    with torch.enable_grad():
        lp = lp.detach().requires_grad_()
        leaves = [lp]
        if ref_lp is not None:
            kl = kl_penalty(lp, ref_lp, cfg.kl_estimator)
        elif kl is not None:
            kl = kl.detach().requires_grad_()
            leaves.append(kl)
        surr = grpo.clipped_surrogate(lp, old, adv, cfg.clip_eps, cfg.clip_eps_high)
        obj = (-surr * weight).sum()
        if kl is not None:
            obj = obj + cfg.beta * (kl.float() * weight).sum()
        grads = torch.autograd.grad(obj, leaves, allow_unused=True)
    g_lp = grads[0] if grads[0] is not None else torch.zeros_like(lp)
    g_kl = grads[1] if len(grads) > 1 else None
    return g_lp.detach().contiguous(), None if g_kl is None else g_kl.detach().contiguous()


def _accumulate(r: _Rows, grad_z: Tensor, s: int, e: int, grads, need):
    """Chain rule through the head: grad_h[s:e] = grad_z W, grad_W += grad_z^T h, grad_b += Σ grad_z."""
    gh, gw, gb = grads
    if need[0]:
        torch.mm(grad_z, r.w, out=gh[s:e])
    if need[1]:
        gw.addmm_(grad_z.t(), r.h[s:e])
    if need[2]:
        gb.add_(grad_z.sum(0, dtype=torch.float32))


def _new_grads(r: _Rows, need):
    return (r.h.new_empty(r.h.shape) if need[0] else None,
            torch.zeros_like(r.w) if need[1] else None,
            torch.zeros(r.w.shape[0], dtype=torch.float32, device=r.w.device) if need[2] else None)


# ----------------------------------------------------------------------------- autograd

def _chunks(bt: _Batch):
    M, c = bt.tok.shape[0], bt.cfg.chunk
    return [(s, min(s + c, M)) for s in range(0, M, c)]


def _per_token_outputs(bt: _Batch, values):
    """The chunks' (log p(o), KL or log q(o), entropy, top-k mass) as float32 [N], 0 at
    masked rows; an empty tensor for what was not computed."""
    dev = bt.tok.device

    def rows(xs, wanted: bool) -> Tensor:
        if not wanted:
            return torch.zeros(0, device=dev)
        out = torch.zeros(bt.n_rows, device=dev)
        if not xs:  # no response row at all
            return out
        x = torch.cat(xs).float()
        return x if bt.where is None else out.index_copy_(0, bt.where, x)
    est = bt.cfg.kl_estimator
    wanted = (True, est is not None, bt.cfg.return_entropy, est in ("tike", "tike_bucket"))
    return tuple(rows([v[i] for v in values], w) for i, w in enumerate(wanted))


def _from_rows(bt: _Batch, g: Tensor) -> Tensor:
    g = g.reshape(-1).float()
    return (g if bt.where is None else g.index_select(0, bt.where)).contiguous()


def _head_grads(bt: _Batch, grads, h_shape, b_dtype):
    """The accumulated gradients in the inputs' shapes and dtypes (hidden rows scattered)."""
    gh, gw, gb = grads
    if gh is not None and bt.where is not None:
        gh = gh.new_zeros(bt.n_rows, gh.shape[1]).index_copy_(0, bt.where, gh)
    return (None if gh is None else gh.view(h_shape), gw,
            None if gb is None else gb.to(b_dtype))


def _sampled(cfg: _Settings) -> bool:
    return cfg.kl_estimator in SAMPLED_ESTIMATORS


class _GradInForward(torch.autograd.Function):
    """The loss, with its gradient formed chunk by chunk in the forward (the aggregation's
    per-token weights are known up front); the backward only scales it by the upstream
    gradient. Returns (loss, log p(o), kl, entropy, top-k mass), the last four detached [N]."""

    @staticmethod
    def forward(ctx, h, w, b, rh, rw, rb, bt: _Batch, finish):
        cfg, r = bt.cfg, _Rows.take(bt, h, w, b, rh, rw, rb)
        grads = _new_grads(r, bt.need)
        values = []
        for s, e in _chunks(bt):
            z, zr, (lp, kl, ent, mass), saved = _chunk_forward(cfg, r, bt, s, e)
            ref_lp = kl if _sampled(cfg) else None
            g_lp, g_kl = _token_multipliers(cfg, lp, None if _sampled(cfg) else kl, ref_lp,
                                            bt.old[s:e], bt.adv[s:e], bt.weight[s:e])
            if ref_lp is not None:
                kl = kl_penalty(lp, ref_lp, cfg.kl_estimator)
            if any(bt.need):
                _accumulate(r, _chunk_grad_logits(cfg, z, zr, bt.tok[s:e], saved, g_lp, g_kl),
                            s, e, grads, bt.need)
            del z, zr, saved
            values.append((lp, kl, ent, mass))
        ctx.grads = _head_grads(bt, grads, h.shape, None if b is None else b.dtype)
        outs = _per_token_outputs(bt, values)
        ctx.mark_non_differentiable(*outs)
        return (finish(outs[0], outs[1]), *outs)

    @staticmethod
    def backward(ctx, g_loss, *_unused):
        if ctx.grads is None:
            raise RuntimeError("fused_linear_grpo_loss(gradient='in_forward') formed its gradient "
                               "in the forward and the first backward used it; pass "
                               "gradient='recompute' to backward through the loss twice")
        gh, gw, gb = ctx.grads
        ctx.grads = None
        for g in (gh, gw, gb):
            if g is not None:
                g.mul_(g_loss.to(g.dtype))
        return gh, gw, gb, None, None, None, None, None


class _Recompute(torch.autograd.Function):
    """Per-token log p(o), the KL (for a sampled-token estimator: the reference's log q(o),
    detached), the entropy and the top-k mass (detached), [N] each, from the hidden states;
    the backward recomputes each chunk's logits from the saved O(N·k) kernel outputs."""

    @staticmethod
    def forward(ctx, h, w, b, rh, rw, rb, bt: _Batch):
        cfg, r = bt.cfg, _Rows.take(bt, h, w, b, rh, rw, rb)
        values, saved_all = [], []
        for s, e in _chunks(bt):
            z, zr, value, saved = _chunk_forward(cfg, r, bt, s, e)
            del z, zr
            values.append(value)
            saved_all.append(saved)
        if r.rh is not None and cfg.kl_estimator != "full":
            r.rh = r.rw = r.rb = None  # only "full"'s backward re-reads the reference
        ctx.bt, ctx.r, ctx.saved = bt, r, saved_all
        ctx.h_shape, ctx.b_dtype = h.shape, None if b is None else b.dtype
        lp, kl, ent, mass = _per_token_outputs(bt, values)
        ctx.mark_non_differentiable(ent, mass, *((kl,) if _sampled(cfg) else ()))
        return lp, kl, ent, mass

    @staticmethod
    def backward(ctx, g_lp, g_kl, _g_ent, _g_mass):
        bt, r, cfg = ctx.bt, ctx.r, ctx.bt.cfg
        g_lp = _from_rows(bt, g_lp) if g_lp is not None else bt.weight.new_zeros(bt.tok.shape)
        dense = cfg.kl_estimator is not None and not _sampled(cfg)
        if dense:
            g_kl = _from_rows(bt, g_kl) if g_kl is not None else torch.zeros_like(g_lp)
        grads = _new_grads(r, bt.need)
        for (s, e), saved in zip(_chunks(bt), ctx.saved):
            z = r.logits(s, e)
            zr = r.logits(s, e, ref=True) if cfg.kl_estimator == "full" else None
            grad_z = _chunk_grad_logits(cfg, z, zr, bt.tok[s:e], saved, g_lp[s:e],
                                        g_kl[s:e] if dense else None)
            del z, zr
            _accumulate(r, grad_z, s, e, grads, bt.need)
            del grad_z
        return (*_head_grads(bt, grads, ctx.h_shape, ctx.b_dtype), None, None, None, None)


