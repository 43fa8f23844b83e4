r"""TIKE over a vocabulary split across the ranks of a process group.

Every quantity of ``topk_kl`` is a reduction that decomposes over the shards:

* ``S`` (the k largest policy logits, ties to the lower global id) is the top-k of the
  shards' local top-k lists: an entry of ``S`` on shard i has at most k − 1 entries above
  it anywhere, so it is in shard i's own top-k (all of the shard when ``V_i < k``).
* ``lse_p``, ``lse_q`` combine from the shards' (max, log-sum) pairs (:mod:`._lse`).
* the tail sums ``t_p = Σ_{v∉S~} p_v`` (``tail="bucket"``) are the shards' direct sums over
  their entries outside their own candidates, plus the candidates that lost the global
  selection: a direct sum again, never ``1 − head``.
* the head terms need ``z_v``, ``zr_v`` on ``S~`` only, which travel with the candidates;
  ``z_o``, ``zr_o`` come from the rank that owns the sampled token.

So one all-gather per call moves, per token and rank, the k candidate ids with their
policy and reference logits and a few row statistics (:func:`payload_bytes`); every rank
then forms the same ``S~``, value and backward constants (``coef``, ``shift``, the global
lse), and the backward is ``topk_kl_backward`` on the rank's shard with those constants —
S~ entries on other shards are −1 there, which it skips: no communication at all.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from .. import _checks
from ..reference import TopkStats
from . import _first_order, _group, _lse, _pack, _shard_op  # noqa: F401 (registers the op)

__all__ = ["vocab_parallel_topk_kl", "payload_bytes"]

_op = torch.ops.tike_cuda
_INF = float("inf")
_NAME = "vocab_parallel_topk_kl"


@torch.compiler.disable
def vocab_parallel_topk_kl(logits: Tensor, ref_logits: Tensor, k: int = 16, *, group=None,
                           sampled_tokens: Optional[Tensor] = None,
                           old_logprobs: Optional[Tensor] = None, temperature: float = 1.0,
                           mask: Optional[Tensor] = None, union_sampled: bool = True,
                           tail: str = "none", return_stats: bool = False,
                           shard_sizes: Optional[Sequence[int]] = None):
    r""":func:`tike_cuda.topk_kl` of the whole vocabulary, from this rank's shard of it.

    ``logits``, ``ref_logits``: ``[..., V_i]``, this rank's contiguous slice of the
    vocabulary; rank ``i`` of ``group`` (default: the default group) holds ids
    ``[V_0 + … + V_{i−1}, … + V_i)``, sizes may differ (``V_i < k`` too). ``k``,
    ``sampled_tokens`` (global ids), ``old_logprobs``, ``mask``, ``temperature``,
    ``union_sampled``, ``tail`` and ``return_stats`` mean what they mean for
    :func:`tike_cuda.topk_kl` on the concatenated vocabulary (``1 ≤ k ≤ V``), and must be
    the same on every rank. Every rank returns the same per-token float32 result, equal to
    the single-process op's: the value, ``S~`` (ties across shards to the lower global
    id), the statistics; a NaN (or +inf) on one shard makes the row NaN on every rank.

    Backward: the gradient of this rank's shard, ``∂out/∂z_j`` for its own ``j``, with no
    communication; the upstream gradient must be the same on every rank (a loss computed
    identically on every rank, as Megatron's vocab-parallel cross-entropy does).
    ``ref_logits`` gets no gradient. First order only (see ``_first_order``).

    ``shard_sizes`` (optional, every rank's ``V_i`` in rank order) saves the call's small
    all-gather of the sizes (and its host sync on a GPU). Communication: one all-gather of
    :func:`payload_bytes` per row and rank in the forward, nothing in the backward.
    """
    _checks.logits(logits)
    _checks.like_logits(ref_logits, logits, "ref_logits")
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    layout = _group.shard_layout(logits, group, shard_sizes,
                                 (_NAME, k, temperature, union_sampled, tail, str(logits.dtype),
                                  sampled_tokens is not None, old_logprobs is not None,
                                  mask is not None))
    # Checked once every rank knows V (a failure then raises on all ranks alike).
    k = _checks.k_value(k, layout.V)
    mask, sampled_tokens, old_logprobs, temperature = _checks.topk_options(
        logits, mask, sampled_tokens, old_logprobs, temperature, union_sampled, tail,
        return_stats, vocab=layout.V)

    out, stats = _Function.apply(logits, ref_logits.detach(), k,
                                 _checks.rows(sampled_tokens, torch.int64),
                                 _checks.rows(old_logprobs, torch.float32),
                                 _checks.rows(mask, torch.bool), temperature, union_sampled,
                                 tail == "bucket", layout)[:2]
    shape = logits.shape[:-1]
    out = out.reshape(shape)
    if not return_stats:
        return out
    return out, TopkStats(*(stats[:, i].reshape(shape) for i in range(3)))


def payload_bytes(k: int, dtype: torch.dtype, *, sampled_tokens: bool = True,
                  tail: str = "none") -> int:
    """Bytes each rank contributes per token to the forward's all-gather: k int32 ids, the
    k policy and reference logits in the logits' dtype, and float32 row statistics (the
    two (max, log-sum) pairs; the sampled token's two logits; the two tail log-masses)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    n_stats = 4 + (2 if sampled_tokens else 0) + (2 if tail == "bucket" else 0)
    return k * (4 + 2 * itemsize) + 4 * n_stats


# ------------------------------------------------------------------ the local pass

def _local_pass(z: Tensor, zr: Tensor, k: int, tok: Optional[Tensor], live: Optional[Tensor],
                tau: float, union: bool, bucket: bool, layout: "_group.ShardLayout"):
    """This rank's candidates and row statistics, as the fields of the all-gather:
    ids int32 [N, k] (global; −1 pads a shard smaller than k and masked rows), their
    logits z, zr [N, k] (logits dtype), and float32 [N, n] (M_p, ℓ_p, M_q, ℓ_q[, z_o,
    zr_o][, log t_p, log t_q]) — the pairs of :mod:`._lse`, the sampled token's logits
    where this shard owns it (0 elsewhere), the log of the local tail masses outside the
    candidates C_i = S_i (∪ o when it joins S~ and lies here), relative to the shard's
    own mass.

    One call of ``topk_kl_shard``: topk_kl's passes over the shard (one over z, one over
    zr) without its combination; then gathers of the sampled token's two logits.
    Returns (fields, lse_like): lse_like is a saved lse of the ops, for its layout.
    """
    V_i = z.shape[-1]
    lead = z.shape[:-1]
    N = z.numel() // V_i
    k_i = min(k, V_i)
    owned = local_tok = None
    if tok is not None:
        owned = layout.owned(tok)
        if live is not None:
            owned = owned & live
        local_tok = torch.where(owned, tok - layout.offset, torch.full_like(tok, -1))
    idx, vals, lse_p, lse_q, tails = _op.topk_kl_shard(
        z, zr, k_i, local_tok if union else None, live, tau, bucket)

    S = idx[:, :k_i]  # the candidates travel; the sampled token's slot k_i does not
    ids = torch.where(S >= 0, S + layout.offset, S)
    # The logits travel in their own dtype: exact, being conversions of that dtype.
    vz, vzr = vals[:, :k_i, 0].to(z.dtype), vals[:, :k_i, 1].to(z.dtype)
    if k_i < k:
        pad = k - k_i
        ids = torch.cat([ids, ids.new_full((N, pad), -1)], 1)
        vz = torch.cat([vz, vz.new_full((N, pad), -_INF)], 1)
        vzr = torch.cat([vzr, vzr.new_full((N, pad), -_INF)], 1)
    cols = [*_lse.local_pair(lse_p), *_lse.local_pair(lse_q)]
    if tok is not None:
        at = torch.where(owned, local_tok, torch.zeros_like(local_tok)).reshape(*lead, 1)
        zero = torch.zeros((), dtype=torch.float32, device=z.device)
        cols += [torch.where(owned, x.gather(-1, at).reshape(N).float(), zero) for x in (z, zr)]
    if bucket:
        cols += [tails[:, 0], tails[:, 1]]
    return (ids.contiguous(), vz.contiguous(), vzr.contiguous(), torch.stack(cols, 1)), lse_p


# ------------------------------------------------------------------ the combine

def _order_keys(values: Tensor, ids: Tensor) -> Tensor:
    """int64 keys whose descending order is topk_kl's order of S: value descending (NaN
    as −inf, −0 as +0), then the lower id; padding (id < 0) last."""
    v = torch.where(torch.isnan(values), torch.full_like(values, -_INF), values) + 0.0
    bits = v.view(torch.int32).long()
    ordered = torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)  # float order as integers
    keys = ordered * (1 << 32) + ((1 << 32) - 1 - ids.long())
    return torch.where(ids >= 0, keys, torch.full_like(keys, torch.iinfo(torch.int64).min))


def _combine(fields, k: int, tok: Optional[Tensor], old: Optional[Tensor],
             live: Optional[Tensor], tau: float, union: bool, bucket: bool, V: int):
    """Every rank's fields ([N, R, w]) → out [N], stats [N, 3], S~ ids [N, K1] (global),
    coef [N, K1], shift [N], the global pairs (M_p, ℓ_p) [N]: the single-device forward's
    outputs (docs/kernels.md), in float64 until the end."""
    ids, vz, vzr, st = fields
    N, R = st.shape[:2]
    s = float(torch.tensor(1.0 / tau, dtype=torch.float32))  # 1/τ as the kernels round it
    ids = ids.reshape(N, R * k)
    vz, vzr = vz.reshape(N, R * k).float(), vzr.reshape(N, R * k).float()
    Mp, lp_g, lw = _lse.combine(st[..., 0], st[..., 1], s)
    Mq, lq_g, lu = _lse.combine(st[..., 2], st[..., 3], s)

    def log_p(x):
        return (x.double() - Mp.unsqueeze(-1)) * s - lp_g.unsqueeze(-1)

    def log_q(x):
        return (x.double() - Mq.unsqueeze(-1)) * s - lq_g.unsqueeze(-1)

    pick = _order_keys(vz, ids).topk(k, dim=1).indices                  # S, best first
    S_ids, S_z, S_zr = ids.gather(1, pick), vz.gather(1, pick), vzr.gather(1, pick)
    bad = ~(torch.isfinite(Mp) & torch.isfinite(lp_g) & torch.isfinite(Mq) & torch.isfinite(lq_g))
    lp_o = torch.zeros(N, dtype=torch.float64, device=st.device)
    if tok is not None:
        # Only the owner wrote z_o, zr_o; the others wrote 0, so the sum is exact.
        z_o, zr_o = st[..., 4].sum(1), st[..., 5].sum(1)
        bad = bad | (((tok < 0) | (tok >= V)) & (live if live is not None else True))
        lp_o = log_p(z_o.unsqueeze(1)).squeeze(1)
        if union:
            extra = ~(S_ids == tok.unsqueeze(1)).any(1)
            S_ids = torch.cat([S_ids, torch.where(extra, tok, -1).to(torch.int32).unsqueeze(1)], 1)
            S_z = torch.cat([S_z, z_o.unsqueeze(1)], 1)
            S_zr = torch.cat([S_zr, zr_o.unsqueeze(1)], 1)
    valid = S_ids >= 0
    lp, lq = log_p(S_z), log_q(S_zr)
    p, q = lp.exp(), lq.exp()
    zero = torch.zeros((), dtype=torch.float64, device=st.device)
    counted = valid & (p != 0)  # 0 · log 0 counts as 0 (a NaN p stays NaN)
    L = lp - lq
    m_p = torch.where(valid, p, zero).sum(1)
    m_q = torch.where(valid, q, zero).sum(1)
    D = torch.where(counted, p * L, zero).sum(1)
    C = torch.where(counted, p * (L + 1), zero).sum(1)

    T = b = torch.zeros_like(D)
    if bucket:
        # Direct tail sums: the shards' own tails (outside their candidates, weighted by
        # their mass) plus the candidates that lost the global selection.
        lost = torch.ones_like(ids, dtype=torch.bool).scatter_(1, pick, False) & (ids >= 0)
        if tok is not None and union:
            lost = lost & (ids != tok.unsqueeze(1))
        st_p, st_q = st[..., -2].double(), st[..., -1].double()
        t_p = torch.where(lw == -_INF, zero, (st_p + lw).exp()).sum(1) \
            + torch.where(lost, log_p(vz).exp(), zero).sum(1)
        t_q = torch.where(lu == -_INF, zero, (st_q + lu).exp()).sum(1) \
            + torch.where(lost, log_q(vzr).exp(), zero).sum(1)
        ratio = t_p.log() - t_q.log()
        has_tail = t_p > 0
        T = torch.where(has_tail, t_p * ratio, zero)
        b = torch.where(has_tail, ratio + 1, zero)
        T = torch.where(torch.isnan(t_p), t_p, T)

    r = torch.ones_like(D) if old is None else torch.exp(lp_o - old.double())
    scale = r * s
    nan = torch.full((), float("nan"), dtype=torch.float64, device=st.device)
    out = torch.where(bad, nan, r * (D + T))
    shift = torch.where(bad, nan, scale * (C - m_p * b))
    coef = torch.where(counted, scale.unsqueeze(1) * (L + 1 - b.unsqueeze(1)), zero)
    coef = torch.where(valid & bad.unsqueeze(1), nan, coef)
    stats = torch.stack([m_p, lp_o, m_q], 1)
    # An undefined row's backward reads a NaN lse: its whole gradient is NaN on every rank.
    Mp, lp_g = torch.where(bad, nan, Mp), torch.where(bad, nan, lp_g)
    if live is not None:
        out, shift = torch.where(live, out, zero), torch.where(live, shift, zero)
        coef = torch.where(live.unsqueeze(1), coef, zero)
        stats = torch.where(live.unsqueeze(1), stats, zero)
        S_ids = torch.where(live.unsqueeze(1), S_ids, -1)
        Mp, lp_g = torch.where(live, Mp, zero), torch.where(live, lp_g, zero)
    return (out.float(), stats.float(), S_ids.to(torch.int32), coef.float(), shift.float(),
            Mp, lp_g)


# ------------------------------------------------------------------ autograd

def _forward(logits, ref_logits, k, tok, old, live, tau, union, bucket, layout):
    fields, lse_like = _local_pass(logits, ref_logits, k, tok, live, tau, union, bucket, layout)
    gathered = _pack.gather_fields(fields, layout)
    out, stats, S_ids, coef, shift, Mp, lp_g = _combine(gathered, k, tok, old, live, tau, union,
                                                        bucket, layout.V)
    s = float(torch.tensor(1.0 / tau, dtype=torch.float32))
    lse = _lse.saved_like(Mp, lp_g, s, lse_like)
    # S~ on this shard, in local ids; entries on other shards are −1 (skipped backward).
    here = layout.owned(S_ids)
    local_idx = torch.where(here, S_ids - layout.offset, -1).to(torch.int32)
    return out, stats, S_ids, local_idx, coef, shift, lse


def _setup_context(ctx, inputs, output):
    logits, _, _, _, _, live, tau, _, _, _ = inputs
    _, _, _, local_idx, coef, shift, lse = output
    ctx.save_for_backward(logits, lse, local_idx, coef, shift, live)
    ctx.tau = tau
    ctx.mark_non_differentiable(*output[1:])


def _backward(ctx, grad_out, *_):
    logits, lse, local_idx, coef, shift, live = ctx.saved_tensors
    grad = _op.topk_kl_backward(grad_out.reshape(-1).float(), logits, lse, local_idx, coef,
                                shift, live, ctx.tau)
    return (grad.reshape(logits.shape),) + (None,) * 9


_Function = _first_order.function(_NAME, _forward, _setup_context, _backward)
