"""Log-probability of given tokens (and the entropy), fused (``torch.ops.tike_cuda.token_logprobs``)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _autograd, _checks
from ._autograd import LOGITS, ROWS, ROWS_K

__all__ = ["token_logprobs"]

_op = torch.ops.tike_cuda


def token_logprobs(logits: Tensor, tokens: Tensor, *, temperature: float = 1.0,
                   return_entropy: bool = False, mask: Optional[Tensor] = None):
    r"""``log p(tokens)`` under ``p = softmax(logits/τ)``, float32 of shape ``logits.shape[:-1]``.

    With ``return_entropy=True`` returns ``(logp, entropy)``, ``H = −Σ_v p_v log p_v``. One
    pass over the row each way, no ``N×V`` log-softmax kept:
    ``∂ log p_o/∂z_j = (1[j=o] − p_j)/τ`` and ``∂H/∂z_j = −p_j (log p_j + H)/τ``; second
    derivatives, forward mode and ``vmap`` work too. This is what the sampled-token
    estimators (k1, k2, k3, low_var_kl) need.

    ``mask`` (bool, or 0/1 integer/float, shape ``logits.shape[:-1]``): masked positions
    give 0 (log-prob and entropy) and a zero gradient, and their token ids are not looked
    up, so padding such as −100 is fine there.
    """
    _checks.logits(logits)
    if tokens is None:
        raise ValueError("tokens must be given (one token id per logits row)")
    mask = _checks.mask(mask, logits)
    _checks.tokens(tokens, logits, "tokens", mask)
    temperature = _checks.temperature(temperature)
    _checks.flag(return_entropy, "return_entropy")
    if mask is not None:  # padding ids are never looked up: any valid id will do
        tokens = torch.where(mask, tokens, torch.zeros((), dtype=tokens.dtype, device=tokens.device))
    logp, entropy, _ = _autograd.eager_or_traced(_TokenLogprobs, _op.token_logprobs)(
        logits, _checks.rows(tokens, torch.int64), temperature, return_entropy)
    shape = logits.shape[:-1]
    outs = (logp, entropy) if return_entropy else (logp,)
    outs = tuple(_zero_masked(o.reshape(shape), mask) for o in outs)
    return outs if return_entropy else outs[0]


def _zero_masked(x: Tensor, mask: Optional[Tensor]) -> Tensor:
    return x if mask is None else torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))


def _grad_formula(g_logp: Tensor, g_entropy: Optional[Tensor], logits: Tensor, tokens: Tensor,
                  temperature: float) -> Tensor:
    """∂(Σ g_lp log p_o + g_H H)/∂z as differentiable PyTorch (see _autograd):
    (1/τ) [g_lp (1[j=o] − p_j) − g_H p_j (log p_j + H)]."""
    log_p = torch.log_softmax(_autograd.flat_rows(logits, None) / temperature, -1)
    p = log_p.exp()
    onehot = torch.arange(p.shape[-1], device=p.device) == tokens.reshape(-1, 1)
    grad = g_logp.reshape(-1, 1).float() * (onehot.float() - p)
    if g_entropy is not None:
        lp = torch.where(p > 0, log_p, torch.zeros((), device=p.device))  # p log p = 0 at p = 0
        H = -(p * lp).sum(-1, keepdim=True)
        grad = grad - g_entropy.reshape(-1, 1).float() * p * (lp + H)
    return (grad / temperature).reshape(logits.shape).to(logits.dtype)


@torch.library.register_fake("tike_cuda::token_logprobs")
def _token_logprobs_fake(logits, tokens, temperature, with_entropy):
    N = logits.numel() // logits.shape[-1]
    f = dict(dtype=torch.float32)
    return (logits.new_empty(N, **f), logits.new_empty(N if with_entropy else 0, **f),
            logits.new_empty(N, 2, **f))  # lse: (max z, log Σ exp((z − max)/τ)) per row


@torch.library.register_fake("tike_cuda::token_logprobs_backward")
def _token_logprobs_backward_fake(grad_logp, grad_entropy, logits, tokens, lse, entropy,
                                  temperature):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    logits, tokens, temperature, with_entropy = inputs
    _, entropy, lse = output
    saved = (logits, tokens, lse, entropy)
    ctx.save_for_backward(*saved)
    ctx.temperature = temperature
    ctx.with_entropy = with_entropy
    return saved  # for the Function's save_for_forward


def _backward(ctx, grad_logp, grad_entropy, _grad_lse):
    logits, tokens, lse, entropy = ctx.saved_tensors
    g_h = grad_entropy if ctx.with_entropy else None
    if _autograd.needs_differentiable_backward(logits, grad_logp, g_h):
        grad = _grad_formula(grad_logp, g_h, logits, tokens, ctx.temperature)
    else:
        grad = _op.token_logprobs_backward(grad_logp, g_h, logits, tokens, lse, entropy,
                                           ctx.temperature)
    return grad, None, None, None


def _jvp(ctx, t_logits, *_unused):
    logits, tokens, lse, entropy = ctx.saved_tensors
    ones = torch.ones_like(lse[:, 0])  # one per row (lse is [N, 2]: max, log-sum)
    rows = _op.token_logprobs_backward(ones, None, logits, tokens, lse, entropy,
                                       ctx.temperature)
    t_logp = _autograd.jvp_of_rows(rows, t_logits)
    t_entropy = None
    if ctx.with_entropy and t_logits is not None:
        rows = _op.token_logprobs_backward(torch.zeros_like(ones), ones, logits, tokens, lse,
                                           entropy, ctx.temperature)
        t_entropy = _autograd.jvp_of_rows(rows, t_logits)
    elif t_logits is not None:
        t_entropy = torch.zeros_like(entropy)
    return t_logp, t_entropy, None


# The op's autograd (what torch.compile sees), its eager Function, its batching rules.
torch.library.register_autograd("tike_cuda::token_logprobs", _backward,
                                setup_context=_setup_context)
_TokenLogprobs = _autograd.op_function("_TokenLogprobs", _op.token_logprobs, _setup_context,
                                       _backward, _jvp, differentiable=(0, 1))
_autograd.register_row_vmap("tike_cuda::token_logprobs", (LOGITS, ROWS, None, None),
                            (ROWS, ROWS, ROWS_K))  # lse: [N, 2]
_autograd.register_row_vmap("tike_cuda::token_logprobs_backward",
                            (ROWS, ROWS, LOGITS, ROWS, ROWS_K, ROWS, None), (LOGITS,))
_autograd.register_not_differentiable("tike_cuda::token_logprobs_backward")
