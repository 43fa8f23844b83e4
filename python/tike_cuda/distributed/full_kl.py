r"""The exact full-vocabulary KL over a vocabulary split across the ranks of a group.

Each shard's single-device ``full_kl`` pass gives ``KL_i``, the KL between its own
normalized policy and reference distributions, and both (max, log-sum) pairs; with the
shards' masses ``w_i`` (policy) and ``u_i`` (reference) (:mod:`._lse`):

.. math::
    KL = \sum_v p_v (\log p_v − \log q_v) = \sum_i w_i \big(KL_i + \log w_i − \log u_i\big),

a shard without policy mass adding 0 and one with policy mass but no reference mass
``+inf`` (as the single-process op: ``q_v = 0 < p_v``). The backward is
``full_kl_backward`` on each shard with the global pairs and ``KL``.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from .. import _checks
from . import _first_order, _group, _lse, _pack

__all__ = ["vocab_parallel_full_kl"]

_op = torch.ops.tike_cuda
_INF = float("inf")
_NAME = "vocab_parallel_full_kl"


@torch.compiler.disable
def vocab_parallel_full_kl(logits: Tensor, ref_logits: Tensor, *, group=None,
                           temperature: float = 1.0, mask: Optional[Tensor] = None,
                           shard_sizes: Optional[Sequence[int]] = None) -> Tensor:
    r""":func:`tike_cuda.full_kl` of the whole vocabulary from this rank's shard.

    ``logits``, ``ref_logits``: ``[..., V_i]``, this rank's contiguous slice of the
    vocabulary (shards in the rank order of ``group``, sizes may differ). Returns the
    per-token ``KL(p || q)``, float32, the same on every rank and equal to the
    single-process op's. The backward gives this rank's shard of the gradient with no
    communication (the upstream gradient must be the same on every rank); first order
    only. Communication: one all-gather of 20 bytes per row and rank. ``shard_sizes``:
    see :func:`vocab_parallel_topk_kl`.
    """
    _checks.logits(logits)
    _checks.like_logits(ref_logits, logits, "ref_logits")
    temperature = _checks.temperature(temperature)
    mask = _checks.mask(mask, logits)
    layout = _group.shard_layout(logits, group, shard_sizes,
                                 (_NAME, temperature, str(logits.dtype), mask is not None))
    out = _Function.apply(logits, ref_logits.detach(), _checks.rows(mask, torch.bool),
                          temperature, layout)[0]
    return out.reshape(logits.shape[:-1])


def _forward(logits, ref_logits, live, tau, layout):
    kl_i, lse_p, lse_q = _op.full_kl(logits, ref_logits, live, tau)
    (st,) = _pack.gather_fields([torch.stack([*_lse.local_pair(lse_p), *_lse.local_pair(lse_q),
                                              kl_i.float()], 1)], layout)   # [N, R, 5]
    s = float(torch.tensor(1.0 / tau, dtype=torch.float32))
    Mp, lp, log_w = _lse.combine(st[..., 0], st[..., 1], s)
    Mq, lq, log_u = _lse.combine(st[..., 2], st[..., 3], s)
    kl_i = st[..., 4].double()
    zero = torch.zeros((), dtype=torch.float64, device=logits.device)
    inf = torch.full((), _INF, dtype=torch.float64, device=logits.device)
    # q_v = 0 < p_v somewhere on shard i: +inf however small p_v is (a shard with policy
    # mass and no reference mass, or KL_i = +inf).
    infinite = (log_u == -_INF) | (kl_i == _INF)
    terms = torch.where(log_w == -_INF, zero,
                        torch.where(infinite, inf, log_w.exp() * (kl_i + log_w - log_u)))
    bad = ~(torch.isfinite(Mp) & torch.isfinite(lp) & torch.isfinite(Mq) & torch.isfinite(lq))
    nan = torch.full_like(zero, float("nan"))
    out = torch.where(bad, nan, terms.sum(1))
    # An undefined row's backward reads NaN pairs: its whole gradient is NaN on every rank.
    Mp, lp, Mq, lq = (torch.where(bad, nan, x) for x in (Mp, lp, Mq, lq))
    if live is not None:
        out = torch.where(live, out, zero)
        Mp, lp, Mq, lq = (torch.where(live, x, zero) for x in (Mp, lp, Mq, lq))
    return out.float(), _lse.saved_like(Mp, lp, s, lse_p), _lse.saved_like(Mq, lq, s, lse_q)


def _setup_context(ctx, inputs, output):
    logits, ref_logits, live, tau, _ = inputs
    out, lse_p, lse_q = output
    ctx.save_for_backward(logits, ref_logits, out, lse_p, lse_q, live)
    ctx.tau = tau
    ctx.mark_non_differentiable(lse_p, lse_q)


def _backward(ctx, grad_out, *_):
    logits, ref_logits, out, lse_p, lse_q, live = ctx.saved_tensors
    grad = _op.full_kl_backward(grad_out.reshape(-1).float(), logits, ref_logits, out, lse_p,
                                lse_q, live, ctx.tau)
    return (grad.reshape(logits.shape),) + (None,) * 4

_Function = _first_order.function(_NAME, _forward, _setup_context, _backward)
