"""TIKE: the top-k importance-weighted partial KL, fused (``torch.ops.tike_cuda.topk_kl``)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _checks
from .reference import TopkStats

__all__ = ["topk_kl", "TopkStats"]

_TAILS = ("none", "bucket")


def topk_kl(logits: Tensor, ref_logits: Tensor, k: int = 16, *,
            sampled_tokens: Optional[Tensor] = None, old_logprobs: Optional[Tensor] = None,
            temperature: float = 1.0, mask: Optional[Tensor] = None,
            union_sampled: bool = True, tail: str = "none", return_stats: bool = False,
            inplace_backward: bool = False):
    r"""Per-token TIKE penalty (paper Eq. 6/13), float32 of shape ``logits.shape[:-1]``.

    With ``p = softmax(logits/τ)``, ``q = softmax(ref_logits/τ)``, ``S`` the ``k`` largest
    policy logits (ties to the lower index) and ``S~ = S ∪ {o}`` for the sampled token
    ``o`` (counted once):

    .. math::
        \mathrm{out} = r \sum_{v \in \tilde S} p_v \log\frac{p_v}{q_v}, \qquad
        r = \mathrm{sg}\!\left(\exp(\log p_o - \log\pi_{old}(o))\right)

    (``r = 1`` without ``old_logprobs``). ``S~`` and ``r`` carry no gradient (paper
    Eq. 17); ``ref_logits`` gets none (the reference is frozen). The gradient is dense over
    the vocabulary: ``∂out/∂z_j = r/τ · p_j (1[j∈S~](L_j+1) − Σ_{S~} p_v(L_v+1))``.

    ``tail="bucket"`` adds the tail as one merged outcome, ``t_p log(t_p/t_q)`` with
    ``t = 1 − Σ_{S~}``: the result is then the KL of the distributions coarse-grained to
    ``(S~, tail)`` — ≥ 0, ≤ the full KL, with zero gradient at ``p = q`` (plain truncation
    pushes mass into the tail there).

    ``mask`` (bool, ``logits.shape[:-1]``): False rows are not read and give 0 with a zero
    gradient. ``return_stats=True`` also returns :class:`TopkStats` (top-k mass
    ``Σ_{S~} p_v``, ``log p_o``, reference mass ``Σ_{S~} q_v``), detached.

    Memory: saves ``O(N·k)`` floats, not the ``N×V`` probabilities; the backward writes one
    gradient the size of ``logits``. With ``inplace_backward=True`` it writes that gradient
    over the ``logits`` buffer instead and allocates nothing of size ``N×V``. Only safe
    when nothing else needs the logits' values afterwards (like Liger's in-place
    cross-entropy): another op that saved them for its own backward then fails autograd's
    in-place check rather than read a gradient, and ``logits`` must not be a leaf you keep.
    Eager mode only (under ``torch.compile`` use the default).
    """
    _checks.logits(logits)
    _checks.like_logits(ref_logits, logits, "ref_logits")
    k = _checks.k_value(k, logits.shape[-1])
    sampled_tokens = _checks.tokens(sampled_tokens, logits, "sampled_tokens")
    old_logprobs = _checks.per_token(old_logprobs, logits, "old_logprobs", "float")
    if old_logprobs is not None and sampled_tokens is None:
        raise ValueError("old_logprobs needs sampled_tokens (the IS weight is taken at the sampled token)")
    temperature = _checks.temperature(temperature)
    mask = _checks.per_token(mask, logits, "mask", "bool")
    _checks.flag(union_sampled, "union_sampled")
    _checks.choice(tail, "tail", _TAILS)
    _checks.flag(return_stats, "return_stats")
    _checks.flag(inplace_backward, "inplace_backward")

    args = (logits, ref_logits.detach(), k, _checks.rows(sampled_tokens, torch.int64),
            _checks.rows(old_logprobs, torch.float32), _checks.rows(mask, torch.bool),
            temperature, union_sampled, tail == "bucket")
    if inplace_backward and logits.requires_grad:
        out, stats = _TopkKlInplaceBackward.apply(*args)
    else:
        out, _, _, _, _, stats = torch.ops.tike_cuda.topk_kl(*args)
    shape = logits.shape[:-1]
    out = out.reshape(shape)
    if not return_stats:
        return out
    return out, TopkStats(*(stats[:, i].reshape(shape) for i in range(3)))


class _TopkKlInplaceBackward(torch.autograd.Function):
    """topk_kl whose backward overwrites the logits buffer with the gradient (opt-in)."""

    @staticmethod
    def forward(ctx, logits, ref_logits, k, tokens, old, mask, temperature, union, tail_bucket):
        out, lse, idx, coef, shift, stats = torch.ops.tike_cuda.topk_kl(
            logits, ref_logits, k, tokens, old, mask, temperature, union, tail_bucket)
        ctx.save_for_backward(lse, idx, coef, shift)
        # Held, not saved: its buffer is about to become the gradient, which autograd's
        # saved-tensor version check would (rightly) refuse.
        ctx.logits, ctx.mask, ctx.temperature = logits, mask, temperature
        ctx.mark_non_differentiable(stats)
        return out, stats

    @staticmethod
    def backward(ctx, grad_out, _grad_stats):
        lse, idx, coef, shift = ctx.saved_tensors
        buf = ctx.logits.detach()
        ctx.logits = None
        torch.ops.tike_cuda.topk_kl_backward_(grad_out.contiguous(), buf, lse, idx, coef, shift,
                                              ctx.mask, ctx.temperature)
        # The schema declares the mutation, but a C++ custom op does not bump the version
        # counter by itself: do it, so that any other saved copy of these logits fails
        # autograd's check loudly instead of being read as if it still held logits.
        torch.autograd.graph.increment_version(buf)
        return buf, None, None, None, None, None, None, None, None


def _n_rows(logits: Tensor):
    n = 1
    for s in logits.shape[:-1]:
        n = n * s
    return n


@torch.library.register_fake("tike_cuda::topk_kl")
def _topk_kl_fake(logits, ref_logits, k, sampled_tokens, old_logprobs, mask, temperature,
                  union_sampled, tail_bucket):
    torch._check(ref_logits.shape == logits.shape)
    N = _n_rows(logits)
    K1 = k + (1 if sampled_tokens is not None and union_sampled else 0)
    f = dict(dtype=torch.float32, device=logits.device)
    return (logits.new_empty(N, **f), logits.new_empty(N, 2, **f),
            logits.new_empty(N, K1, dtype=torch.int32, device=logits.device),
            logits.new_empty(N, K1, **f), logits.new_empty(N, **f), logits.new_empty(N, 3, **f))


@torch.library.register_fake("tike_cuda::topk_kl_backward")
def _topk_kl_backward_fake(grad_out, logits, lse, idx, coef, shift, mask, temperature):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    logits, _, _, _, _, mask, temperature, _, _ = inputs
    _, lse, idx, coef, shift, _ = output
    ctx.save_for_backward(logits, lse, idx, coef, shift, mask)
    ctx.temperature = temperature


def _backward(ctx, grad_out, *_unused):
    logits, lse, idx, coef, shift, mask = ctx.saved_tensors
    grad = torch.ops.tike_cuda.topk_kl_backward(grad_out, logits, lse, idx, coef, shift, mask,
                                                ctx.temperature)
    # Only the policy logits get a gradient: ref_logits is frozen, S~ and r are constants.
    return grad, None, None, None, None, None, None, None, None


torch.library.register_autograd("tike_cuda::topk_kl", _backward, setup_context=_setup_context)
