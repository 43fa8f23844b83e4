"""GRPO loss pieces (paper Eqs. 7-9) with verl's aggregation semantics.

Shapes: ``B`` responses (``B = n_groups * G``, the G responses of a prompt contiguous),
``T`` response positions. ``response_mask`` is ``[B, T]``: bool, or integer / floating
0/1 (the one mask rule of every tike_cuda function).
"""
from __future__ import annotations

import numbers

import torch

from . import _checks

__all__ = ["group_advantages", "clipped_surrogate", "aggregate", "grpo_loss", "AGG_MODES"]

# verl's loss_agg_mode names (verl/trainer/ppo/core_algos.py, agg_loss).
AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum",
             "seq-mean-token-sum-norm")


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-6, *,
                     norm_by_std: bool = True) -> torch.Tensor:
    """Group-normalised outcome advantages, paper Eq. 7.

        A_i = (R_i - mean_g R) / (std_g R + eps)        over the G = group_size responses
                                                          of the same prompt

    ``rewards``: ``[B]`` with ``B % group_size == 0``; consecutive blocks of ``group_size``
    are one group. Returns ``[B]`` in the rewards' (floating) dtype; broadcast it over
    positions with ``A[:, None]``.

    std is the unbiased (Bessel, ``G - 1``) sample std, as ``torch.std`` computes it in
    verl's GRPO advantage, so advantages match the paper's verl runs. With
    ``norm_by_std=False`` only the mean is removed (Dr. GRPO).

    A group whose rewards are all equal carries no learning signal: its advantages are
    exactly 0 (also for ``group_size == 1``, where the unbiased std is undefined), never
    NaN and never ``rounding / eps``.
    """
    if not isinstance(rewards, torch.Tensor) or rewards.dim() != 1:
        raise ValueError("rewards must be a 1-D tensor [B]")
    if isinstance(group_size, bool) or not isinstance(group_size, numbers.Integral) \
            or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    group_size = int(group_size)  # numpy integers too
    if rewards.numel() % group_size:
        raise ValueError(f"rewards has {rewards.numel()} entries, not a multiple of "
                         f"group_size={group_size}")
    r = rewards.to(torch.promote_types(rewards.dtype, torch.float32))
    g = r.view(-1, group_size)
    centred = g - g.mean(dim=1, keepdim=True)
    if norm_by_std:
        std = g.std(dim=1, keepdim=True) if group_size > 1 else torch.ones_like(g[:, :1])
        centred = centred / (std + eps)
    flat = (g.amax(dim=1, keepdim=True) == g.amin(dim=1, keepdim=True))
    return torch.where(flat, torch.zeros_like(centred), centred).view(-1)


def clipped_surrogate(logprobs: torch.Tensor, old_logprobs: torch.Tensor,
                      advantages: torch.Tensor, clip_eps: float = 0.2,
                      clip_eps_high: float | None = None) -> torch.Tensor:
    """Per-token clipped surrogate objective (to be maximised), paper Eq. 8.

        rho   = exp(logprobs - old_logprobs)
        A_min = min(rho * A, clip(rho, 1 - clip_eps, 1 + clip_eps_high) * A)

    ``clip_eps_high`` defaults to ``clip_eps`` (DAPO's clip-higher sets it larger).
    ``advantages`` broadcasts against ``logprobs`` (``[B, 1]`` or ``[B, T]``). The log-ratio
    is clamped to [-20, 20] before ``exp`` (as verl does) so one stale token cannot
    overflow; ``old_logprobs`` is treated as a constant.
    """
    if logprobs.shape != old_logprobs.shape:
        raise ValueError(f"old_logprobs has shape {tuple(old_logprobs.shape)}, expected "
                         f"{tuple(logprobs.shape)}")
    hi = clip_eps if clip_eps_high is None else clip_eps_high
    ratio = torch.exp((logprobs - old_logprobs.detach()).clamp(-20.0, 20.0))
    adv = advantages.detach()
    return torch.minimum(ratio * adv, ratio.clamp(1.0 - clip_eps, 1.0 + hi) * adv)


def aggregate(loss_mat: torch.Tensor, mask: torch.Tensor, mode: str = "token-mean", *,
              loss_scale_factor: float | None = None) -> torch.Tensor:
    """Reduce a ``[B, T]`` per-token loss to a scalar with verl's ``loss_agg_mode``
    (verl's ``agg_loss`` on one data-parallel rank).

    * "token-mean":              sum_{b,t} m l / sum_{b,t} m    (every token weighs the same)
    * "token-sum":               sum_{b,t} m l
    * "seq-mean-token-mean":     mean_b [ sum_t m l / sum_t m ]  (paper Eq. 9)
    * "seq-mean-token-sum":      mean_b [ sum_t m l ]
    * "seq-mean-token-sum-norm": mean_b [ sum_t m l ] / loss_scale_factor  (Dr. GRPO;
      ``loss_scale_factor`` defaults to T = ``mask.shape[-1]``, as in verl; give a constant
      to keep the normaliser fixed through training)

    Sequence means run over responses with at least one unmasked token, so a fully masked
    response neither divides by zero nor dilutes the mean; an all-masked batch gives 0.
    ``mask`` follows the one mask rule (bool, or 0/1 integer/float).
    """
    _checks.choice(mode, "mode", AGG_MODES)
    m = _checks.as_bool_mask(mask, "mask").to(loss_mat.dtype)
    if m.shape != loss_mat.shape:
        raise ValueError(f"mask has shape {tuple(m.shape)}, expected {tuple(loss_mat.shape)}")
    masked = loss_mat * m
    if mode == "token-mean":
        return masked.sum() / m.sum().clamp_min(1.0)
    if mode == "token-sum":
        return masked.sum()
    tokens = m.sum(dim=-1)
    seq = masked.sum(dim=-1)
    if mode == "seq-mean-token-mean":
        seq = seq / tokens.clamp_min(1.0)
    valid = (tokens > 0).to(loss_mat.dtype)
    loss = (seq * valid).sum() / valid.sum().clamp_min(1.0)
    if mode == "seq-mean-token-sum-norm":
        loss = loss / (mask.shape[-1] if loss_scale_factor is None else loss_scale_factor)
    return loss


def grpo_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
              kl: torch.Tensor | None, response_mask: torch.Tensor, beta: float = 1e-3,
              clip_eps: float = 0.2, loss_agg_mode: str = "token-mean", *,
              clip_eps_high: float | None = None, loss_scale_factor: float | None = None):
    """GRPO loss with a per-token KL penalty, paper Eq. 9 (negated for minimisation):

        loss = agg( -(A_min - beta * kl) )

    ``logprobs``, ``old_logprobs``, ``kl``: ``[B, T]``; ``advantages``: ``[B]`` or ``[B, T]``;
    ``kl`` from any estimator (e.g. :func:`tike_cuda.per_token_kl`), or None with beta 0.
    beta defaults to verl's 0.001 (the paper's setting). The paper's Eq. 9 is
    "seq-mean-token-mean"; verl's default (used here) is "token-mean"; every mode of
    :func:`aggregate` (with its ``loss_scale_factor``) is accepted.

    Returns ``(loss, metrics)``; metrics are detached 0-dim tensors (no host sync):
    ``pg_loss``, ``kl`` (aggregated), ``clipfrac`` (fraction of tokens whose ratio lies
    outside [1 - clip_eps, 1 + clip_eps_high]), ``ratio_mean`` and ``approx_kl`` (token mean of old_logprobs - logprobs).
    """
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1)
    surr = clipped_surrogate(logprobs, old_logprobs, advantages, clip_eps, clip_eps_high)
    agg = dict(mode=loss_agg_mode, loss_scale_factor=loss_scale_factor)
    pg_loss = aggregate(-surr, response_mask, **agg)
    if kl is None:
        if beta != 0:
            raise ValueError("kl is None but beta != 0")
        kl_agg = torch.zeros((), dtype=pg_loss.dtype, device=pg_loss.device)
    else:
        if kl.shape != logprobs.shape:
            raise ValueError(f"kl has shape {tuple(kl.shape)}, expected {tuple(logprobs.shape)}")
        kl_agg = aggregate(kl.to(pg_loss.dtype), response_mask, **agg)
    # aggregation is linear, so agg(-(s - beta kl)) == agg(-s) + beta agg(kl)
    loss = pg_loss + beta * kl_agg
    with torch.no_grad():
        log_ratio = (logprobs - old_logprobs).clamp(-20.0, 20.0)
        ratio = log_ratio.exp()
        hi = clip_eps if clip_eps_high is None else clip_eps_high
        clipped = ((ratio < 1 - clip_eps) | (ratio > 1 + hi)).to(ratio.dtype)
        metrics = {
            "loss": loss.detach(),
            "pg_loss": pg_loss.detach(),
            "kl": kl_agg.detach(),
            "clipfrac": aggregate(clipped, response_mask, "token-mean"),
            "ratio_mean": aggregate(ratio, response_mask, "token-mean"),
            "approx_kl": aggregate(-log_ratio, response_mask, "token-mean"),
        }
    return loss, metrics
