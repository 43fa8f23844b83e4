"""The exact (Rao-Blackwellized) full-vocabulary KL, fused (``torch.ops.tike_cuda.full_kl``)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _autograd, _checks
from ._autograd import LOGITS, ROWS, ROWS_K

__all__ = ["full_kl"]

_op = torch.ops.tike_cuda


def full_kl(logits: Tensor, ref_logits: Tensor, *, temperature: float = 1.0,
            mask: Optional[Tensor] = None) -> Tensor:
    r"""Per-token ``KL(p || q) = Σ_v p_v log(p_v / q_v)`` over the whole vocabulary.

    ``p = softmax(logits/τ)``, ``q = softmax(ref_logits/τ)``; float32 of shape
    ``logits.shape[:-1]``. One pass over both rows forward, one backward:
    ``∂KL/∂z_j = (1/τ) p_j (L_j − KL)`` with ``L_j = log p_j − log q_j``; the second
    derivative (``create_graph=True``), forward mode (``torch.func.jvp``) and ``vmap`` work
    too. ``ref_logits`` gets no gradient. ``mask`` (bool, or 0/1 integer/float, shape
    ``logits.shape[:-1]``): masked rows are not read and give 0.
    """
    _checks.logits(logits)
    _checks.like_logits(ref_logits, logits, "ref_logits")
    temperature = _checks.temperature(temperature)
    mask = _checks.mask(mask, logits)
    out = _autograd.eager_or_traced(_FullKl, _op.full_kl)(
        logits, ref_logits.detach(), _checks.rows(mask, torch.bool), temperature)[0]
    return out.reshape(logits.shape[:-1])


def _grad_formula(g: Tensor, logits: Tensor, ref_logits: Tensor, mask: Optional[Tensor],
                  temperature: float) -> Tensor:
    """∂(Σ_n g_n KL_n)/∂z as differentiable PyTorch (see _autograd): (g/τ) p (L − KL)."""
    x = _autograd.flat_rows(logits, mask) / temperature
    xr = _autograd.flat_rows(ref_logits.detach(), mask) / temperature
    log_p, log_q = torch.log_softmax(x, -1), torch.log_softmax(xr, -1)
    p = log_p.exp()
    L = torch.where(p > 0, log_p - log_q, torch.zeros((), device=p.device))  # 0 log 0 = 0
    kl = (p * L).sum(-1, keepdim=True)
    grad = (g.reshape(-1, 1).float() / temperature) * p * (L - kl)
    return _autograd.masked_rows(grad, mask).reshape(logits.shape).to(logits.dtype)


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
    saved = (logits, ref_logits, out, lse_p, lse_q, mask)
    ctx.save_for_backward(*saved)
    ctx.temperature = temperature
    return saved  # for the Function's save_for_forward


def _backward(ctx, grad_out, *_unused):
    logits, ref_logits, out, lse_p, lse_q, mask = ctx.saved_tensors
    if _autograd.needs_differentiable_backward(logits, grad_out):
        grad = _grad_formula(grad_out, logits, ref_logits, mask, ctx.temperature)
    else:
        grad = _op.full_kl_backward(grad_out, logits, ref_logits, out, lse_p, lse_q, mask,
                                    ctx.temperature)
    return grad, None, None, None


def _jvp(ctx, t_logits, *_unused):
    logits, ref_logits, out, lse_p, lse_q, mask = ctx.saved_tensors
    rows = _op.full_kl_backward(torch.ones_like(out), logits, ref_logits, out, lse_p, lse_q,
                                mask, ctx.temperature)
    return _autograd.jvp_of_rows(rows, t_logits), None, None


# The op's autograd (what torch.compile sees), its eager Function, its batching rules.
torch.library.register_autograd("tike_cuda::full_kl", _backward, setup_context=_setup_context)
_FullKl = _autograd.op_function("_FullKl", _op.full_kl, _setup_context, _backward, _jvp,
                                differentiable=(0,))
_autograd.register_row_vmap("tike_cuda::full_kl", (LOGITS, LOGITS, ROWS, None),
                            (ROWS, ROWS_K, ROWS_K))  # lse_p, lse_q: [N, 2]
_autograd.register_row_vmap("tike_cuda::full_kl_backward",
                            (ROWS, LOGITS, LOGITS, ROWS, ROWS_K, ROWS_K, ROWS, None), (LOGITS,))
_autograd.register_not_differentiable("tike_cuda::full_kl_backward")
