"""Log-probability of given tokens (and the entropy), fused (``torch.ops.tike_cuda.token_logprobs``)."""
from __future__ import annotations

import torch
from torch import Tensor

from . import _checks

__all__ = ["token_logprobs"]


def token_logprobs(logits: Tensor, tokens: Tensor, *, temperature: float = 1.0,
                   return_entropy: bool = False):
    r"""``log p(tokens)`` under ``p = softmax(logits/τ)``, float32 of shape ``logits.shape[:-1]``.

    With ``return_entropy=True`` returns ``(logp, entropy)``, ``H = −Σ_v p_v log p_v``. One
    pass over the row each way, no ``N×V`` log-softmax kept:
    ``∂ log p_o/∂z_j = (1[j=o] − p_j)/τ`` and ``∂H/∂z_j = −p_j (log p_j + H)/τ``.
    This is what the sampled-token estimators (k1, k2, k3, low_var_kl) need.
    """
    _checks.logits(logits)
    if tokens is None:
        raise ValueError("tokens must be given (one token id per logits row)")
    _checks.tokens(tokens, logits, "tokens")
    temperature = _checks.temperature(temperature)
    _checks.flag(return_entropy, "return_entropy")
    logp, entropy, _ = torch.ops.tike_cuda.token_logprobs(
        logits, _checks.rows(tokens, torch.int64), temperature, return_entropy)
    shape = logits.shape[:-1]
    if not return_entropy:
        return logp.reshape(shape)
    return logp.reshape(shape), entropy.reshape(shape)


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
    ctx.save_for_backward(logits, tokens, lse, entropy)
    ctx.temperature = temperature
    ctx.with_entropy = with_entropy


def _backward(ctx, grad_logp, grad_entropy, _grad_lse):
    logits, tokens, lse, entropy = ctx.saved_tensors
    grad = torch.ops.tike_cuda.token_logprobs_backward(
        grad_logp, grad_entropy if ctx.with_entropy else None, logits, tokens, lse, entropy,
        ctx.temperature)
    return grad, None, None, None


torch.library.register_autograd("tike_cuda::token_logprobs", _backward,
                                setup_context=_setup_context)
