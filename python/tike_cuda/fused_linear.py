"""The GRPO loss with a TIKE (or any) KL penalty straight from hidden states: the LM head is
fused into the loss, chunk by chunk, so the N×V logits of neither model are ever held.

    loss_fn = tike_cuda.FusedLinearGRPOLoss(beta=1e-3, kl_estimator="tike", k=16)
    loss, metrics = loss_fn(hidden, lm_head.weight, responses, old_logprobs, advantages,
                            response_mask, ref_hidden, ref_lm_head.weight)

equals, in value and gradients, :func:`unfused_linear_grpo_loss` (logits = hidden @ W^T,
then ``token_logprobs`` + ``per_token_kl`` + ``grpo.grpo_loss``).
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _checks, grpo
from .estimators import ESTIMATORS, SAMPLED_ESTIMATORS, kl_penalty, per_token_kl
from .token_logprobs import token_logprobs

__all__ = ["FusedLinearGRPOLoss", "fused_linear_grpo_loss", "unfused_linear_grpo_loss",
           "DEFAULT_MEMORY_BUDGET", "GRADIENT_MODES"]

# Bytes of logits-sized chunk buffers held at once when chunk_size is not given.
DEFAULT_MEMORY_BUDGET = 256 << 20
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
# Logits-sized buffers alive at once per chunk: TIKE needs both models' logits together
# (its backward then runs in place over the policy's); the sampled-token estimators read
# the reference chunk, drop it, then the policy's; "full"'s backward re-reads both and
# writes a fresh gradient.
_CHUNK_BUFFERS = {"tike": 2, "tike_bucket": 2, "full": 3, None: 1}


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


# ----------------------------------------------------------------------------- checks

def _tensor(x, name: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def _head(hidden, weight, bias, which: str):
    """One model's (hidden [B, T, H] or [N, H], weight [V, H], bias [V] or None)."""
    h, w = f"{which}hidden", f"{which}weight"
    _checks.logits(_tensor(hidden, h), h)
    if hidden.dim() not in (2, 3):
        raise ValueError(f"{h} must be [B, T, H] or [N, H], got {tuple(hidden.shape)}")
    _tensor(weight, w)
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"{w} must be [V, H] with H = {h}.shape[-1] = {hidden.shape[-1]}, "
                         f"got {tuple(weight.shape)}")
    if bias is not None:
        _tensor(bias, f"{which}bias")
    for name, t in ((w, weight), (f"{which}bias", bias)):
        if t is None:
            continue
        if t.dtype != hidden.dtype:
            raise TypeError(f"{name} must have {h}'s dtype {hidden.dtype}, got {t.dtype}")
        if t.device != hidden.device:
            raise ValueError(f"{name} must be on {h}'s device {hidden.device}, got {t.device}")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"{which}bias must be [V] = [{weight.shape[0]}], got {tuple(bias.shape)}")


def _per_token(x, shape, device, name: str, kind: str) -> Tensor:
    _tensor(x, name)
    ok = {"int": not x.dtype.is_floating_point and not x.dtype.is_complex and x.dtype != torch.bool,
          "float": x.dtype.is_floating_point, "mask": not x.dtype.is_complex}[kind]
    if not ok:
        want = {"int": "an integer", "float": "a floating", "mask": "a bool or 0/1"}[kind]
        raise TypeError(f"{name} must have {want} dtype, got {x.dtype}")
    if x.shape != shape:
        raise ValueError(f"{name} must have shape {tuple(shape)} (the response tokens' [B, T]), "
                         f"got {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{name} must be on the hidden states' device {device}, got {x.device}")
    return x


def _number(x, name: str, lo: float = 0.0) -> float:
    if isinstance(x, bool) or not isinstance(x, numbers.Real) or not x == x or not lo <= x < float("inf"):
        raise ValueError(f"{name} must be a finite number >= {lo}, got {x!r}")
    return float(x)


def _check_all(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, tokens, old_logprobs,
               advantages, response_mask):
    _head(hidden, weight, bias, "")
    _tensor(tokens, "sampled_tokens")
    if tokens.dim() != 2:
        raise ValueError(f"sampled_tokens must be [B, T], got {tuple(tokens.shape)}")
    B, T = tokens.shape
    rows = hidden.shape[:-1]
    if rows != (B, T) and rows != (B * T,):
        raise ValueError(f"hidden must be [B, T, H] = [{B}, {T}, H] or [B·T, H] = [{B * T}, H] "
                         f"(sampled_tokens is [B, T]), got {tuple(hidden.shape)}")
    dev = hidden.device
    _per_token(tokens, (B, T), dev, "sampled_tokens", "int")
    _per_token(old_logprobs, (B, T), dev, "old_logprobs", "float")
    _per_token(response_mask, (B, T), dev, "response_mask", "mask")
    _tensor(advantages, "advantages")
    if advantages.shape not in ((B,), (B, T)) or not advantages.dtype.is_floating_point:
        raise ValueError(f"advantages must be a floating [B] = [{B}] or [B, T] tensor, got "
                         f"{advantages.dtype} {tuple(advantages.shape)}")
    if ref_hidden is None and ref_weight is None:
        return
    if ref_hidden is None or ref_weight is None:
        raise ValueError("ref_hidden and ref_weight go together (both, or neither with beta=0)")
    for name, t in (("ref_weight", ref_weight), ("ref_bias", ref_bias)):
        if isinstance(t, Tensor) and t.requires_grad:
            raise ValueError(f"{name} requires grad, but the reference model is frozen: pass "
                             f"{name}.detach() (is it the policy's own parameter by mistake?)")
    _head(ref_hidden, ref_weight, ref_bias, "ref_")
    if ref_hidden.shape[:-1] != rows:
        raise ValueError(f"ref_hidden must have hidden's leading dims {tuple(rows)}, got "
                         f"{tuple(ref_hidden.shape)}")
    if ref_weight.shape[0] != weight.shape[0]:
        raise ValueError(f"ref_weight has V = {ref_weight.shape[0]} rows, the policy's weight "
                         f"{weight.shape[0]}: the two models must share the vocabulary")
    if ref_hidden.dtype != hidden.dtype or ref_hidden.device != dev:
        raise ValueError(f"ref_hidden must have hidden's dtype and device ({hidden.dtype}, {dev}), "
                         f"got ({ref_hidden.dtype}, {ref_hidden.device})")


def chunk_rows(V: int, dtype: torch.dtype, kl_estimator: Optional[str],
               memory_budget: int = DEFAULT_MEMORY_BUDGET) -> int:
    """Rows per chunk so that the chunk's logits-sized buffers fit in ``memory_budget`` bytes
    (at least 1; a multiple of 64 from 128 rows up, for the matmuls)."""
    per_row = _CHUNK_BUFFERS.get(kl_estimator, 1) * V * torch.empty((), dtype=dtype).element_size()
    rows = max(1, memory_budget // per_row)
    return rows - rows % 64 if rows >= 128 else rows


# ----------------------------------------------------------------------------- per chunk

@dataclass
class _Batch:
    """Per-token inputs of the response rows (mask true) only, flattened to [M]: masked
    rows get no logits at all, which is exact since they carry no loss and no gradient."""
    cfg: _Settings
    tok: Tensor      # int64
    old: Tensor
    adv: Tensor
    weight: Tensor   # float32 d loss / d (per-token loss): grpo.aggregate's weights
    where: Optional[Tensor]  # [M] row ids in [0, N); None when every row is a response row
    n_rows: int
    need: tuple      # gradients wanted for (hidden, weight, bias)


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
    """Per-token values of rows [s, e) and what their backward needs; the policy chunk z
    (and, for "full", the reference chunk) is returned for an immediate backward."""
    ops, tau, tok = torch.ops.tike_cuda, cfg.temperature, bt.tok[s:e]
    est, ent, zr, ref_lp = cfg.kl_estimator, None, None, None
    if est is None or est in SAMPLED_ESTIMATORS:
        if est is not None:  # the reference chunk is read, reduced to log q(o) and dropped
            ref_lp = ops.token_logprobs(r.logits(s, e, ref=True), tok, tau, False)[0]
        z = r.logits(s, e)
        lp, ent, lse = ops.token_logprobs(z, tok, tau, cfg.return_entropy)
        return z, None, lp, ref_lp, ent, (lse,)
    z, zr = r.logits(s, e), r.logits(s, e, ref=True)
    if est == "full":
        kl, lse_p, lse_q = ops.full_kl(z, zr, None, tau)
        lp = z.gather(1, tok[:, None])[:, 0].float() * (1.0 / tau) - lse_p
        saved = (kl, lse_p, lse_q)
    else:  # one pass gives the KL and log p(o) (the kernel's stats[:, 1])
        kl, lse, idx, coef, shift, stats = ops.topk_kl(z, zr, cfg.k, tok, bt.old[s:e], None,
                                                       tau, True, est == "tike_bucket")
        lp, zr, saved = stats[:, 1].contiguous(), None, (lse, idx, coef, shift)
    if cfg.return_entropy:  # no KL kernel computes the entropy: one more read of z
        ent = ops.token_logprobs(z, tok, tau, True)[1]
    return z, zr, lp, kl, ent, saved


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
    p_o = torch.exp(z[rows, tok].float() * inv - lse)
    coef_o = (coef * (idx == tok[:, None].to(torch.int32))).sum(1)
    ops.topk_kl_backward_(torch.ones_like(lse), z, lse, idx, coef, shift, None, tau)
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


def _per_token_outputs(bt: _Batch, lps, kls, ents):
    """The chunks' log p(o), KL (or log q(o)) and entropy as float32 [N], 0 at masked rows;
    an empty tensor for what was not computed."""
    dev = bt.tok.device

    def rows(xs, wanted: bool) -> Tensor:
        if not wanted:
            return torch.zeros(0, device=dev)
        out = torch.zeros(bt.n_rows, device=dev)
        if not xs:  # no response row at all
            return out
        x = torch.cat(xs).float()
        return x if bt.where is None else out.index_copy_(0, bt.where, x)
    return (rows(lps, True), rows(kls, bt.cfg.kl_estimator is not None),
            rows(ents, bt.cfg.return_entropy))


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
    gradient. Returns (loss, log p(o) [N], kl [N], entropy [N]); the last three detached."""

    @staticmethod
    def forward(ctx, h, w, b, rh, rw, rb, bt: _Batch, finish):
        cfg, r = bt.cfg, _Rows.take(bt, h, w, b, rh, rw, rb)
        grads = _new_grads(r, bt.need)
        lps, kls, ents = [], [], []
        for s, e in _chunks(bt):
            z, zr, lp, kl, ent, saved = _chunk_forward(cfg, r, bt, s, e)
            ref_lp = kl if _sampled(cfg) else None
            g_lp, g_kl = _token_multipliers(cfg, lp, None if _sampled(cfg) else kl, ref_lp,
                                            bt.old[s:e], bt.adv[s:e], bt.weight[s:e])
            if ref_lp is not None:
                kl = kl_penalty(lp, ref_lp, cfg.kl_estimator)
            if any(bt.need):
                _accumulate(r, _chunk_grad_logits(cfg, z, zr, bt.tok[s:e], saved, g_lp, g_kl),
                            s, e, grads, bt.need)
            del z, zr, saved
            lps.append(lp)
            kls.append(kl)
            ents.append(ent)
        ctx.grads = _head_grads(bt, grads, h.shape, None if b is None else b.dtype)
        lp, kl, ent = _per_token_outputs(bt, lps, kls, ents)
        ctx.mark_non_differentiable(lp, kl, ent)
        return finish(lp, kl), lp, kl, ent

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
    """Per-token log p(o) [N], the KL [N] (for a sampled-token estimator: the reference's
    log q(o), detached) and the entropy [N] (detached) from the hidden states; the
    backward recomputes each chunk's logits from the saved O(N·k) kernel outputs."""

    @staticmethod
    def forward(ctx, h, w, b, rh, rw, rb, bt: _Batch):
        cfg, r = bt.cfg, _Rows.take(bt, h, w, b, rh, rw, rb)
        lps, kls, ents, saved_all = [], [], [], []
        for s, e in _chunks(bt):
            z, zr, lp, kl, ent, saved = _chunk_forward(cfg, r, bt, s, e)
            del z, zr
            lps.append(lp)
            kls.append(kl)
            ents.append(ent)
            saved_all.append(saved)
        if r.rh is not None and cfg.kl_estimator != "full":
            r.rh = r.rw = r.rb = None  # only "full"'s backward re-reads the reference
        ctx.bt, ctx.r, ctx.saved = bt, r, saved_all
        ctx.h_shape, ctx.b_dtype = h.shape, None if b is None else b.dtype
        lp, kl, ent = _per_token_outputs(bt, lps, kls, ents)
        ctx.mark_non_differentiable(ent, *((kl,) if _sampled(cfg) else ()))
        return lp, kl, ent

    @staticmethod
    def backward(ctx, g_lp, g_kl, _g_ent):
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


# ----------------------------------------------------------------------------- API

def fused_linear_grpo_loss(hidden: Tensor, weight: Tensor, sampled_tokens: Tensor,
                           old_logprobs: Tensor, advantages: Tensor, response_mask: Tensor,
                           ref_hidden: Optional[Tensor] = None, ref_weight: Optional[Tensor] = None,
                           *, bias: Optional[Tensor] = None, ref_bias: Optional[Tensor] = None,
                           beta: float = 1e-3, clip_eps: float = 0.2,
                           clip_eps_high: Optional[float] = None,
                           loss_agg_mode: str = "token-mean",
                           loss_scale_factor: Optional[float] = None, temperature: float = 1.0,
                           kl_estimator: str = "tike", k: int = 16, return_entropy: bool = False,
                           chunk_size: Optional[int] = None,
                           memory_budget: int = DEFAULT_MEMORY_BUDGET,
                           gradient: str = "in_forward"):
    r"""GRPO loss with a per-token KL penalty from the two models' last hidden states.

    The same ``(loss, metrics)`` — values and gradients to ``hidden``, ``weight`` and
    ``bias`` — as :func:`unfused_linear_grpo_loss`, i.e. ``grpo.grpo_loss`` fed by
    ``token_logprobs`` and ``per_token_kl`` on the full logits ``hidden @ weight^T + bias``
    (and ``ref_hidden @ ref_weight^T + ref_bias``), but computed over chunks of
    ``chunk_size`` response rows: at most one chunk of logits per model is alive at a
    time. Per chunk the policy logits are read once by the fused kernels for log p(o) and
    the KL (``topk_kl`` gives both; ``return_entropy`` adds one ``token_logprobs`` read
    for the dense estimators), the reference chunk once; the gradient over the policy chunk
    is written in place over it (``topk_kl_backward_``, with log p(o)'s gradient folded
    into its per-row coefficients), except for ``"full"`` whose backward re-reads both.

    Shapes: ``sampled_tokens``, ``old_logprobs``, ``response_mask`` are ``[B, T]``;
    ``advantages`` ``[B]`` or ``[B, T]``; ``hidden`` ``[B, T, H]`` or ``[B·T, H]``;
    ``weight`` ``[V, H]``, ``bias`` ``[V]``; the reference's likewise (its H may differ,
    V may not). ``response_mask`` is bool or 0/1; masked rows are skipped entirely (their
    ``sampled_tokens`` may be padding such as -100) — finding them is one host sync.
    ``ref_hidden``/``ref_weight`` may be omitted when ``beta == 0``. The reference is
    frozen: ``ref_hidden`` is detached, and a ``ref_weight``/``ref_bias`` that requires
    grad is refused (a reference sharing the policy's parameter is a bug).

    Settings: as ``grpo.grpo_loss`` (``beta``, ``clip_eps``, ``clip_eps_high``,
    ``loss_agg_mode`` — any of ``grpo.AGG_MODES``, all linear in the per-token loss,
    which the fused gradient relies on —, and ``loss_scale_factor``, passed on only when
    given, for the modes that take it) and ``per_token_kl`` (``kl_estimator`` — any of
    ``estimators.ESTIMATORS`` —, ``k``, ``temperature``). ``return_entropy`` adds
    ``metrics["entropy"]``, the entropy aggregated with ``loss_agg_mode``.

    ``chunk_size`` (rows) defaults to :func:`chunk_rows` of ``memory_budget`` bytes of
    logits-sized buffers. Peak extra memory: those buffers, O(N·k) per-token values, and
    the gradients themselves (``hidden``'s and ``weight``'s, accumulated in their dtype).

    ``gradient="in_forward"`` (default) forms the gradient inside the forward, chunk by
    chunk, and the backward scales it by the upstream gradient: 3 policy-head matmuls per
    chunk. ``"recompute"`` recomputes each chunk's logits in the backward (4 matmuls, and
    "full" recomputes the reference's too) but holds no gradient between forward and
    backward and supports a second backward with ``retain_graph=True``. Eager only.
    """
    _check_all(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, sampled_tokens,
               old_logprobs, advantages, response_mask)
    est = _checks.choice(kl_estimator, "kl_estimator", ESTIMATORS)
    beta = _number(beta, "beta")
    if ref_hidden is None:
        if beta != 0:
            raise ValueError("ref_hidden and ref_weight are required when beta != 0")
        est = None
    _number(clip_eps, "clip_eps")
    if clip_eps_high is not None:
        _number(clip_eps_high, "clip_eps_high")
    _checks.choice(loss_agg_mode, "loss_agg_mode", grpo.AGG_MODES)
    agg = _agg_kwargs(loss_agg_mode, loss_scale_factor)
    temperature = _checks.temperature(temperature)
    V = weight.shape[0]
    k = _checks.k_value(k, V)
    _checks.flag(return_entropy, "return_entropy")
    _checks.choice(gradient, "gradient", GRADIENT_MODES)
    if chunk_size is None:
        if isinstance(memory_budget, bool) or not isinstance(memory_budget, numbers.Integral) \
                or memory_budget < 1:
            raise ValueError(f"memory_budget must be a positive int (bytes), got {memory_budget!r}")
        chunk_size = chunk_rows(V, hidden.dtype, est, int(memory_budget))
    elif isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int (rows) or None, got {chunk_size!r}")

    B, T = sampled_tokens.shape
    mask = response_mask if response_mask.dtype == torch.bool else response_mask != 0
    flat = mask.reshape(-1)
    where = flat.nonzero()[:, 0]  # the one host sync: how many rows to compute
    if where.numel() == flat.numel():
        where = None
    take = (lambda x: x.reshape(-1)) if where is None else (lambda x: x.reshape(-1)[where])
    tok = take(sampled_tokens).long()
    if tok.numel() and tok.device.type == "cpu":
        lo, hi = int(tok.min()), int(tok.max())
        if lo < 0 or hi >= V:
            raise ValueError(f"sampled_tokens must be in [0, V={V}) at response positions, got "
                             f"values in [{lo}, {hi}]")
    with torch.enable_grad():  # the aggregation's per-token weights d agg / d loss_bt
        probe = torch.zeros(B, T, dtype=torch.float32, device=hidden.device, requires_grad=True)
        agg_w, = torch.autograd.grad(grpo.aggregate(probe, response_mask, **agg), probe)
    adv = advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages
    grad_on = torch.is_grad_enabled()
    need = tuple(bool(grad_on and t is not None and t.requires_grad) for t in (hidden, weight, bias))
    cfg = _Settings(beta, clip_eps, clip_eps_high, temperature, est, k,
                    return_entropy, int(chunk_size))
    bt = _Batch(cfg, tok, take(old_logprobs.detach()), take(adv.detach().expand(B, T)),
                take(agg_w), where, B * T, need)
    kl_of = lambda x: None if est is None else x.view(B, T)

    def finish(lp, kl):
        return grpo.grpo_loss(lp.view(B, T), old_logprobs, advantages, kl_of(kl), response_mask,
                              beta, clip_eps, clip_eps_high=clip_eps_high, **_loss_kwargs(agg))

    if gradient == "in_forward":
        loss, lp, kl, ent = _GradInForward.apply(hidden, weight, bias, ref_hidden, ref_weight,
                                                 ref_bias, bt, lambda lp, kl: finish(lp, kl)[0])
        with torch.no_grad():
            metrics = finish(lp, kl)[1]
        metrics["loss"] = loss.detach()
    else:
        lp, kl, ent = _Recompute.apply(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, bt)
        if est in SAMPLED_ESTIMATORS:  # kl holds log q(o); the penalty as per_token_kl forms it
            kl = torch.where(flat, kl_penalty(lp, kl, est), torch.zeros_like(lp))
        loss, metrics = finish(lp, kl)
    if return_entropy:
        metrics["entropy"] = grpo.aggregate(ent.view(B, T), response_mask, **agg).detach()
    return loss, metrics


def _agg_kwargs(mode: str, loss_scale_factor) -> dict:
    """grpo.aggregate's keywords; loss_scale_factor only when given."""
    if loss_scale_factor is None:
        return dict(mode=mode)
    return dict(mode=mode, loss_scale_factor=_number(loss_scale_factor, "loss_scale_factor", 1e-30))


def _loss_kwargs(agg: dict) -> dict:
    """The same for grpo.grpo_loss, which names the mode loss_agg_mode."""
    out = dict(agg, loss_agg_mode=agg["mode"])
    del out["mode"]
    return out


def unfused_linear_grpo_loss(hidden: Tensor, weight: Tensor, sampled_tokens: Tensor,
                             old_logprobs: Tensor, advantages: Tensor, response_mask: Tensor,
                             ref_hidden: Optional[Tensor] = None,
                             ref_weight: Optional[Tensor] = None, *, bias=None, ref_bias=None,
                             beta: float = 1e-3, clip_eps: float = 0.2, clip_eps_high=None,
                             loss_agg_mode: str = "token-mean", loss_scale_factor=None,
                             temperature: float = 1.0, kl_estimator: str = "tike", k: int = 16,
                             return_entropy: bool = False):
    """What :func:`fused_linear_grpo_loss` computes, written the plain way: full ``[B, T, V]``
    logits of both models, then ``token_logprobs`` + ``per_token_kl`` + ``grpo.grpo_loss``.
    The specification the fused form is tested against, and the benchmark's baseline."""
    B, T = sampled_tokens.shape
    mask = response_mask if response_mask.dtype == torch.bool else response_mask != 0
    tokens = torch.where(mask, sampled_tokens, torch.zeros_like(sampled_tokens))
    logits = F.linear(hidden.reshape(B, T, -1), weight, bias)
    out = token_logprobs(logits, tokens, temperature=temperature, return_entropy=return_entropy)
    logprobs, entropy = out if return_entropy else (out, None)
    kl = None
    if ref_hidden is not None:
        ref_logits = F.linear(ref_hidden.reshape(B, T, -1).detach(), ref_weight, ref_bias)
        kl = per_token_kl(logits, ref_logits, kl_estimator, sampled_tokens=tokens,
                          old_logprobs=old_logprobs, k=k, temperature=temperature, mask=mask)
    agg = _agg_kwargs(loss_agg_mode, loss_scale_factor)
    loss, metrics = grpo.grpo_loss(logprobs, old_logprobs, advantages, kl, response_mask, beta,
                                   clip_eps, clip_eps_high=clip_eps_high, **_loss_kwargs(agg))
    if return_entropy:
        metrics["entropy"] = grpo.aggregate(entropy.detach(), response_mask, **agg)
    return loss, metrics


class FusedLinearGRPOLoss(torch.nn.Module):
    """:func:`fused_linear_grpo_loss` with its settings held:

        loss_fn = FusedLinearGRPOLoss(beta=1e-3, kl_estimator="tike", k=16)
        loss, metrics = loss_fn(hidden, lm_head.weight, tokens, old_logprobs, advantages,
                                response_mask, ref_hidden, ref_lm_head.weight)
    """

    def __init__(self, *, beta: float = 1e-3, clip_eps: float = 0.2,
                 clip_eps_high: Optional[float] = None, loss_agg_mode: str = "token-mean",
                 loss_scale_factor: Optional[float] = None, temperature: float = 1.0, kl_estimator: str = "tike", k: int = 16,
                 return_entropy: bool = False, chunk_size: Optional[int] = None,
                 memory_budget: int = DEFAULT_MEMORY_BUDGET, gradient: str = "in_forward"):
        super().__init__()
        self.settings = dict(beta=beta, clip_eps=clip_eps, clip_eps_high=clip_eps_high,
                             loss_agg_mode=loss_agg_mode,
                             loss_scale_factor=loss_scale_factor, temperature=temperature,
                             kl_estimator=kl_estimator, k=k, return_entropy=return_entropy,
                             chunk_size=chunk_size, memory_budget=memory_budget,
                             gradient=gradient)

    def forward(self, hidden, weight, sampled_tokens, old_logprobs, advantages, response_mask,
                ref_hidden=None, ref_weight=None, bias=None, ref_bias=None):
        return fused_linear_grpo_loss(hidden, weight, sampled_tokens, old_logprobs, advantages,
                                      response_mask, ref_hidden, ref_weight, bias=bias,
                                      ref_bias=ref_bias, **self.settings)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.settings.items())
