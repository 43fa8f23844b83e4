"""The exact (Rao-Blackwellized) full-vocabulary KL, fused (``torch.ops.tike_cuda.full_kl``)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _checks

__all__ = ["full_kl"]


def full_kl(logits: Tensor, ref_logits: Tensor, *, temperature: float = 1.0,
            mask: Optional[Tensor] = None) -> Tensor:
    r"""Per-token ``KL(p || q) = Σ_v p_v log(p_v / q_v)`` over the whole vocabulary.

    ``p = softmax(logits/τ)``, ``q = softmax(ref_logits/τ)``; float32 of shape
    ``logits.shape[:-1]``. One pass over both rows forward, one backward:
    ``∂KL/∂z_j = (1/τ) p_j (L_j − KL)`` with ``L_j = log p_j − log q_j``.
    ``ref_logits`` gets no gradient. Masked (False) rows are not read and give 0.
    """
    _checks.logits(logits)
    _checks.like_logits(ref_logits, logits, "ref_logits")
    temperature = _checks.temperature(temperature)
    mask = _checks.per_token(mask, logits, "mask", "bool")
    out, _, _ = torch.ops.tike_cuda.full_kl(logits, ref_logits.detach(),
                                            _checks.rows(mask, torch.bool), temperature)
    return out.reshape(logits.shape[:-1])


@torch.library.register_fake("tike_cuda::full_kl")
def _full_kl_fake(logits, ref_logits, mask, temperature):
    torch._check(ref_logits.shape == logits.shape)
    N = logits.numel() // logits.shape[-1]
    f = dict(dtype=torch.float32)
    # out [N]; lse_p, lse_q [N, 2] = (max, log Σ exp((x − max)/τ)) per row
    return logits.new_empty(N, **f), logits.new_empty(N, 2, **f), logits.new_empty(N, 2, **f)


@torch.library.register_fake("tike_cuda::full_kl_backward")
def _full_kl_backward_fake(grad_out, logits, ref_logits, out, lse_p, lse_q, mask, temperature):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    logits, ref_logits, mask, temperature = inputs
    out, lse_p, lse_q = output
    ctx.save_for_backward(logits, ref_logits, out, lse_p, lse_q, mask)
    ctx.temperature = temperature


def _backward(ctx, grad_out, *_unused):
    logits, ref_logits, out, lse_p, lse_q, mask = ctx.saved_tensors
    grad = torch.ops.tike_cuda.full_kl_backward(grad_out, logits, ref_logits, out, lse_p, lse_q,
                                                mask, ctx.temperature)
    return grad, None, None, None


torch.library.register_autograd("tike_cuda::full_kl", _backward, setup_context=_setup_context)
