"""Plain PyTorch versions of the tike_cuda ops, in the input dtype: the benchmark baselines.

These are what an RL codebase writes without fused kernels (log_softmax over the whole
vocabulary, torch.topk, gather), so the benchmark's ``eager`` provider measures that,
and its ``compile`` provider measures ``torch.compile`` of the very same functions.
Unlike ``reference.py`` (float64, the executable specification) they keep the logits'
dtype for every [N, V] intermediate and only sum the small [N, k] head in float32.
They skip the edge-case rules of docs/kernels.md (NaN rows, -inf logits, tie order):
use ``reference.py`` to check values.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def _log_softmax(logits: Tensor, temperature: float) -> Tensor:
    # Dividing allocates an [N, V] copy; code that uses temperature 1 skips it, so do we.
    x = logits if temperature == 1.0 else logits / temperature
    return torch.log_softmax(x, dim=-1)


def topk_kl(logits: Tensor, ref_logits: Tensor, k: int = 16, *,
            sampled_tokens: Optional[Tensor] = None, old_logprobs: Optional[Tensor] = None,
            temperature: float = 1.0) -> Tensor:
    """r · Σ_{v ∈ S~} p_v (log p_v − log q_v), S = top-k of the logits, S~ = S ∪ {o}."""
    log_p = _log_softmax(logits, temperature)
    log_q = _log_softmax(ref_logits.detach(), temperature)
    idx = torch.topk(logits.detach(), k, dim=-1).indices  # S is a constant
    weight = torch.ones(idx.shape, dtype=torch.float32, device=idx.device)
    if sampled_tokens is not None:
        o = sampled_tokens.long().unsqueeze(-1)
        already = (idx == o).any(-1, keepdim=True)  # counted once when o ∈ S
        idx = torch.cat([idx, o], dim=-1)
        weight = torch.cat([weight, (~already).float()], dim=-1)
    lp = log_p.gather(-1, idx).float()
    lq = log_q.gather(-1, idx).float()
    out = (weight * lp.exp() * (lp - lq)).sum(-1)
    if old_logprobs is not None:
        lp_o = lp[..., -1]  # the sampled token's column
        out = out * torch.exp(lp_o - old_logprobs.float()).detach()
    return out


def full_kl(logits: Tensor, ref_logits: Tensor, *, temperature: float = 1.0) -> Tensor:
    """Σ_v p_v (log p_v − log q_v) over the whole vocabulary."""
    log_p = _log_softmax(logits, temperature)
    log_q = _log_softmax(ref_logits.detach(), temperature)
    return (log_p.exp() * (log_p - log_q)).sum(-1, dtype=torch.float32)


def token_logprobs(logits: Tensor, tokens: Tensor, *, temperature: float = 1.0,
                   return_entropy: bool = False):
    """log p(token); with ``return_entropy`` also −Σ_v p_v log p_v."""
    log_p = _log_softmax(logits, temperature)
    logp = log_p.gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1).float()
    if not return_entropy:
        return logp
    entropy = -(log_p.exp() * log_p).sum(-1, dtype=torch.float32)
    return logp, entropy


# ------------------------------------------------------------------ fixed support (sparse)

def topk_indices(logits: Tensor, k: int) -> Tensor:
    """torch.topk's indices (its own tie order), int32 like tike_cuda.topk_indices."""
    return torch.topk(logits, k, dim=-1).indices.int()


def sparse_reference(ref_logits: Tensor, support: Tensor,
                     sampled_tokens: Optional[Tensor] = None, *, temperature: float = 1.0):
    """(idx, log q at idx, log Σ_{v∉S~} q_v) as a plain log_softmax, gather and masked
    logsumexp compute them (two [N, V] temporaries)."""
    log_q = _log_softmax(ref_logits, temperature)
    idx = support.long()
    if sampled_tokens is not None:
        o = sampled_tokens.long().unsqueeze(-1)
        idx = torch.cat([idx, torch.where((idx == o).any(-1, keepdim=True), -1, o)], dim=-1)
    safe = torch.where(idx >= 0, idx, idx[..., :1])  # −1 slots point at a member
    lq = torch.where(idx >= 0, log_q.gather(-1, safe).float(), float("-inf"))
    tail = log_q.scatter(-1, safe, float("-inf")).float().logsumexp(-1)
    return idx.int(), lq, tail


def topk_kl_sparse(logits: Tensor, idx: Tensor, ref_logprobs: Tensor, *,
                   sampled_tokens: Optional[Tensor] = None,
                   old_logprobs: Optional[Tensor] = None, temperature: float = 1.0) -> Tensor:
    """r · Σ_{v ∈ S~} p_v (log p_v − log q_v) on a stored S~ (idx, −1 = empty slot)."""
    log_p = _log_softmax(logits, temperature)
    keep = idx >= 0
    lp = log_p.gather(-1, torch.where(keep, idx, 0).long()).float()
    out = torch.where(keep, lp.exp() * (lp - ref_logprobs), 0.0).sum(-1)
    if old_logprobs is not None:
        lp_o = log_p.gather(-1, sampled_tokens.long().unsqueeze(-1)).squeeze(-1).float()
        out = out * torch.exp(lp_o - old_logprobs.float()).detach()
    return out
