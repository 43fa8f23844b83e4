"""Readable pure-PyTorch implementations of every tike_cuda op: the executable specification.

Everything is computed in float64 (inputs are upcast), with autograd, so the tests can
compare the fused kernels' values *and* gradients against these. They take the same
arguments as the public API but do not validate them (the public API does).

Conventions (docs/kernels.md):
  * S = the k largest raw logits, ties to the lower index, NaN counted as -inf;
  * S~ = S ∪ {sampled token} (no double counting) when ``union_sampled``;
  * a term p_v · L_v with p_v = 0 counts as 0 (also when L_v is ±inf or NaN);
  * masked rows give 0 and a zero gradient, whatever they hold.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor


class TopkStats(NamedTuple):
    """Per-token numbers of the paper's coverage audit (Appendix A.1)."""

    topk_mass: Tensor        # m_p = Σ_{S~} p_v
    sampled_logprob: Tensor  # log p(o), 0 without sampled tokens
    ref_topk_mass: Tensor    # m_q = Σ_{S~} q_v


# A TopkStats saved with torch.save loads back with torch.load(weights_only=True).
torch.serialization.add_safe_globals([TopkStats])


def _masked_rows(x: Tensor, mask: Optional[Tensor]) -> Tensor:
    """Zero the masked rows so that whatever they hold (NaN, inf) cannot leak a gradient."""
    if mask is None:
        return x
    return torch.where(mask.unsqueeze(-1), x, torch.zeros((), dtype=x.dtype, device=x.device))


def _apply_mask(y: Tensor, mask: Optional[Tensor]) -> Tensor:
    return y if mask is None else torch.where(mask, y, torch.zeros((), dtype=y.dtype, device=y.device))


def _unpad(tokens: Optional[Tensor], mask: Optional[Tensor]) -> Optional[Tensor]:
    """Token ids of masked rows (padding such as -100) are never read: any valid id will do."""
    if tokens is None or mask is None:
        return tokens
    return torch.where(mask, tokens, torch.zeros((), dtype=tokens.dtype, device=tokens.device))


def _safe_plogr(p: Tensor, log_ratio: Tensor, keep: Tensor) -> Tensor:
    """p · log_ratio where `keep` and p != 0, else 0, with no NaN leaking into the gradient."""
    keep = keep & (p != 0)  # NaN stays NaN
    zero = torch.zeros((), dtype=p.dtype, device=p.device)
    return torch.where(keep, p * torch.where(keep, log_ratio, zero), zero)


def topk_indices(logits: Tensor, k: int) -> Tensor:
    """Indices of the k largest logits per row, ties to the lower index, NaN as -inf."""
    key = torch.nan_to_num(logits.detach().double(), nan=float("-inf"),
                           posinf=float("inf"), neginf=float("-inf"))
    # A stable descending sort keeps equal values in index order: the lower index wins.
    return torch.sort(key, dim=-1, descending=True, stable=True).indices[..., :k]


def support_mask(logits: Tensor, k: int, sampled_tokens: Optional[Tensor] = None,
                 union_sampled: bool = True) -> Tensor:
    """Boolean [..., V] membership of S~ (a set, so the sampled token counts once)."""
    inside = torch.zeros(logits.shape, dtype=torch.bool, device=logits.device)
    inside.scatter_(-1, topk_indices(logits, k), True)
    if sampled_tokens is not None and union_sampled:
        inside.scatter_(-1, sampled_tokens.long().unsqueeze(-1), True)
    return inside


def topk_kl_reference(logits: Tensor, ref_logits: Tensor, k: int = 16, *,
                      sampled_tokens: Optional[Tensor] = None,
                      old_logprobs: Optional[Tensor] = None, temperature: float = 1.0,
                      mask: Optional[Tensor] = None, union_sampled: bool = True,
                      tail: str = "none", return_stats: bool = False):
    """TIKE: r · Σ_{v∈S~} p_v log(p_v / q_v)  (+ the tail bucket when tail="bucket").

    r = exp(log p(o) − old_logprob) is detached (paper Eq. 17); S~ is a constant.
    """
    sampled_tokens = _unpad(sampled_tokens, mask)
    z = _masked_rows(logits.double(), mask)
    zr = _masked_rows(ref_logits.double(), mask).detach()  # the reference is frozen
    log_p = torch.log_softmax(z / temperature, dim=-1)
    log_q = torch.log_softmax(zr / temperature, dim=-1)
    p, q = log_p.exp(), log_q.exp()

    inside = support_mask(z, k, sampled_tokens, union_sampled)
    value = _safe_plogr(p, log_p - log_q, inside).sum(-1)
    topk_mass = torch.where(inside, p, 0.0).sum(-1)
    ref_mass = torch.where(inside, q, 0.0).sum(-1)

    if tail == "bucket":
        # Tail sums taken directly (not 1 − head) so a tiny tail keeps its digits.
        t_p = torch.where(inside, 0.0, p).sum(-1)
        t_q = torch.where(inside, 0.0, q).sum(-1)
        keep = t_p > 0
        value = value + _safe_plogr(t_p, t_p.clamp_min(1e-300).log() - t_q.log(), keep)

    if sampled_tokens is not None:
        sampled_lp = log_p.gather(-1, sampled_tokens.long().unsqueeze(-1)).squeeze(-1)
    else:
        sampled_lp = torch.zeros_like(value)
    if old_logprobs is not None:
        value = value * torch.exp(sampled_lp - old_logprobs.double()).detach()

    value = _apply_mask(value, mask)
    if not return_stats:
        return value
    stats = TopkStats(*(_apply_mask(s.detach(), mask) for s in (topk_mass, sampled_lp, ref_mass)))
    return value, stats


def full_kl_reference(logits: Tensor, ref_logits: Tensor, *, temperature: float = 1.0,
                      mask: Optional[Tensor] = None) -> Tensor:
    """Exact (Rao-Blackwellized) KL(p || q) = Σ_v p_v log(p_v / q_v) over the whole vocabulary."""
    z = _masked_rows(logits.double(), mask)
    zr = _masked_rows(ref_logits.double(), mask).detach()
    log_p = torch.log_softmax(z / temperature, dim=-1)
    log_q = torch.log_softmax(zr / temperature, dim=-1)
    keep = torch.ones(log_p.shape, dtype=torch.bool, device=log_p.device)
    return _apply_mask(_safe_plogr(log_p.exp(), log_p - log_q, keep).sum(-1), mask)


def token_logprobs_reference(logits: Tensor, tokens: Tensor, *, temperature: float = 1.0,
                             return_entropy: bool = False, mask: Optional[Tensor] = None):
    """log p(token) under softmax(logits / τ), and optionally the entropy −Σ p log p."""
    log_p = torch.log_softmax(_masked_rows(logits.double(), mask) / temperature, dim=-1)
    logp = _apply_mask(log_p.gather(-1, _unpad(tokens, mask).long().unsqueeze(-1)).squeeze(-1), mask)
    if not return_entropy:
        return logp
    keep = torch.ones(log_p.shape, dtype=torch.bool, device=log_p.device)
    entropy = _apply_mask(-_safe_plogr(log_p.exp(), log_p, keep).sum(-1), mask)
    return logp, entropy
