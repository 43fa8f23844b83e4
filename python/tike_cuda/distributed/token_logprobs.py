r"""log p(token) and the entropy over a vocabulary split across the ranks of a group.

Each shard's single-device ``token_logprobs`` pass gives its (max, log-sum) pair and the
entropy ``H_i`` of its own normalized distribution; with the shards' masses ``w_i``
(:mod:`._lse`) the whole row's are

.. math::
    \log p_o = (z_o − M)/τ − ℓ, \qquad
    H = −\sum_v p_v \log p_v = \sum_i w_i (H_i − \log w_i),

``z_o`` coming from the rank that owns ``o``. The backward is ``token_logprobs_backward``
on each shard with the global lse and ``H``; the one-hot term ``1[j = o]`` only where
``o`` lies (the other ranks pass the token −1, which adds none).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from .. import _checks
from . import _first_order, _group, _lse, _pack

__all__ = ["vocab_parallel_token_logprobs"]

_op = torch.ops.tike_cuda
_NAME = "vocab_parallel_token_logprobs"


@torch.compiler.disable
def vocab_parallel_token_logprobs(logits: Tensor, tokens: Tensor, *, group=None,
                                  temperature: float = 1.0, return_entropy: bool = False,
                                  mask: Optional[Tensor] = None,
                                  shard_sizes: Optional[Sequence[int]] = None):
    r""":func:`tike_cuda.token_logprobs` of the whole vocabulary from this rank's shard.

    ``logits``: ``[..., V_i]``, this rank's contiguous slice of the vocabulary (shards in
    the rank order of ``group``, sizes may differ); ``tokens``: global ids ``[...]``.
    Returns ``log p(tokens)`` (and with ``return_entropy=True`` the entropy ``H``), float32,
    the same on every rank and equal to the single-process op's. ``mask``: masked positions
    give 0 and their ids are not looked up. The backward gives this rank's shard of
    ``∂/∂z`` with no communication (the upstream gradient must be the same on every rank);
    first order only. Communication: one all-gather of 12 bytes per row and rank (16 with
    the entropy). ``shard_sizes``: see :func:`vocab_parallel_topk_kl`.
    """
    _checks.logits(logits)
    if tokens is None:
        raise ValueError("tokens must be given (one token id per logits row)")
    mask = _checks.mask(mask, logits)
    tokens = _checks.per_token(tokens, logits, "tokens", "int")
    temperature = _checks.temperature(temperature)
    _checks.flag(return_entropy, "return_entropy")
    layout = _group.shard_layout(logits, group, shard_sizes,
                                 (_NAME, temperature, return_entropy, str(logits.dtype),
                                  mask is not None))
    _checks.tokens(tokens, logits, "tokens", mask, vocab=layout.V)
    logp, entropy = _Function.apply(logits, _checks.rows(tokens, torch.int64),
                                    _checks.rows(mask, torch.bool), temperature,
                                    return_entropy, layout)[:2]
    shape = logits.shape[:-1]
    if return_entropy:
        return logp.reshape(shape), entropy.reshape(shape)
    return logp.reshape(shape)


def _forward(logits, tok, live, tau, with_entropy, layout):
    N = logits.numel() // logits.shape[-1]
    owned = layout.owned(tok)
    if live is not None:
        owned = owned & live
    local_tok = torch.where(owned, tok - layout.offset, torch.zeros_like(tok))
    _, H_i, lse = _op.token_logprobs(logits, local_tok, tau, with_entropy)
    z_o = logits.gather(-1, local_tok.reshape(*logits.shape[:-1], 1)).reshape(N).float()
    M_i, ell_i = _lse.local_pair(lse)
    cols = [M_i, ell_i, torch.where(owned, z_o, torch.zeros_like(z_o))]
    if with_entropy:
        cols.append(H_i)
    (st,) = _pack.gather_fields([torch.stack(cols, 1)], layout)   # [N, R, 3 or 4]

    s = float(torch.tensor(1.0 / tau, dtype=torch.float32))
    M, ell, log_w = _lse.combine(st[..., 0], st[..., 1], s)
    logp = (st[..., 2].sum(1).double() - M) * s - ell  # only the owner wrote z_o
    undefined = ~(torch.isfinite(M) & torch.isfinite(ell))
    bad = undefined | ((tok < 0) | (tok >= layout.V))
    zero = torch.zeros((), dtype=torch.float64, device=logits.device)
    nan = torch.full((), float("nan"), dtype=torch.float64, device=logits.device)
    logp = torch.where(bad, nan, logp)
    H = torch.zeros(0, dtype=torch.float64, device=logits.device)
    if with_entropy:
        # Σ_i w_i (H_i − log w_i); a shard without mass adds nothing (its H_i is undefined).
        terms = log_w.exp() * (st[..., 3].double() - log_w)
        H = torch.where(undefined, nan, torch.where(log_w == -float("inf"), zero, terms).sum(1))
    # An undefined row's backward reads NaN pairs: its whole gradient is NaN on every rank.
    # Masked rows keep their pairs (their upstream gradient is 0), as the single-process
    # op, which computes them too.
    M, ell = torch.where(undefined, nan, M), torch.where(undefined, nan, ell)
    if live is not None:
        logp = torch.where(live, logp, zero)
        H = torch.where(live, H, zero) if with_entropy else H
    bwd_tok = torch.where(owned, local_tok, torch.full_like(local_tok, -1))
    return (logp.float(), H.float(), _lse.saved_like(M, ell, s, lse), bwd_tok)


def _setup_context(ctx, inputs, output):
    logits, _, live, tau, with_entropy, _ = inputs
    _, H, lse, bwd_tok = output
    ctx.save_for_backward(logits, lse, H, bwd_tok, live)
    ctx.tau, ctx.with_entropy = tau, with_entropy
    ctx.mark_non_differentiable(*((lse, bwd_tok) if with_entropy else (H, lse, bwd_tok)))


def _backward(ctx, g_lp, g_h, *_):
    logits, lse, H, bwd_tok, live = ctx.saved_tensors

    def rows(g):
        g = (torch.zeros(logits.numel() // logits.shape[-1], device=logits.device)
             if g is None else g.reshape(-1).float())
        return g if live is None else torch.where(live, g, torch.zeros_like(g))

    grad = _op.token_logprobs_backward(rows(g_lp), rows(g_h) if ctx.with_entropy else None,
                                       logits, bwd_tok, lse, H, ctx.tau)
    return (grad.reshape(logits.shape),) + (None,) * 5


_Function = _first_order.function(_NAME, _forward, _setup_context, _backward)
