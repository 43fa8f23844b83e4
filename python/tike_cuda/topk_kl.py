"""TIKE: the top-k importance-weighted partial KL, fused (``torch.ops.tike_cuda.topk_kl``)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _autograd, _checks, _inplace
from ._autograd import LOGITS, ROWS, ROWS_K
from .reference import TopkStats
from .sparse import SparseReference, topk_kl_sparse

__all__ = ["topk_kl", "TopkStats"]

_op = torch.ops.tike_cuda


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
    the vocabulary: ``∂out/∂z_j = r/τ · p_j (1[j∈S~](L_j+1) − Σ_{S~} p_v(L_v+1))``. Second
    derivatives (``create_graph=True``) hold ``S~`` and ``r`` constant the same way;
    forward mode (``torch.func.jvp``) and ``vmap`` work too.

    ``tail="bucket"`` adds the tail as one merged outcome, ``t_p log(t_p/t_q)`` with
    ``t = 1 − Σ_{S~}``: the result is then the KL of the distributions coarse-grained to
    ``(S~, tail)`` — ≥ 0, ≤ the full KL, with zero gradient at ``p = q`` (plain truncation
    pushes mass into the tail there).

    ``mask`` (bool, or 0/1 integer/float, ``logits.shape[:-1]``): masked rows are not read
    (nor their ``sampled_tokens``, which may be padding such as −100) and give 0 with a
    zero gradient. ``return_stats=True`` also returns :class:`TopkStats` (top-k mass
    ``Σ_{S~} p_v``, ``log p_o``, reference mass ``Σ_{S~} q_v``), detached.

    Memory: saves ``O(N·k)`` floats, not the ``N×V`` probabilities; the backward writes one
    gradient the size of ``logits``. With ``inplace_backward=True`` it writes that gradient
    over the ``logits`` buffer instead and allocates nothing of size ``N×V`` (like Liger's
    in-place cross-entropy). Only when nothing else needs the logits' values afterwards:
    refused at the call (ValueError) for a leaf tensor (an ``nn.Parameter``), rows that
    overlap in memory (``expand``), a layout the kernel cannot write in place (``.T``,
    a stride on the last dim), logits already handed to another in-place call whose
    backward has not run, and under ``torch.compile`` / ``torch.func`` / forward-mode AD.
    Its graph can be backpropagated once (``retain_graph=True`` then ``create_graph=True``
    are errors); another op that saved the same logits fails autograd's in-place check
    rather than read a gradient.

    ``ref_logits`` may instead be a :class:`~tike_cuda.SparseReference` (the reference
    stored on a fixed S~, :func:`tike_cuda.sparse_reference`): S~ is then its ``idx``
    (``k`` is its support size) and nothing of the reference's ``N×V`` is read.
    """
    if isinstance(ref_logits, SparseReference):
        return topk_kl_sparse(logits, ref_logits, k, sampled_tokens=sampled_tokens,
                              old_logprobs=old_logprobs, temperature=temperature, mask=mask,
                              union_sampled=union_sampled, tail=tail,
                              return_stats=return_stats, inplace_backward=inplace_backward)
    _checks.logits(logits)
    _checks.like_logits(ref_logits, logits, "ref_logits")
    k = _checks.k_value(k, logits.shape[-1])
    mask, sampled_tokens, old_logprobs, temperature = _checks.topk_options(
        logits, mask, sampled_tokens, old_logprobs, temperature, union_sampled, tail, return_stats)
    _checks.flag(inplace_backward, "inplace_backward")

    args = (logits, ref_logits.detach(), k, _checks.rows(sampled_tokens, torch.int64),
            _checks.rows(old_logprobs, torch.float32), _checks.rows(mask, torch.bool),
            temperature, union_sampled, tail == "bucket")
    if inplace_backward and logits.requires_grad and torch.is_grad_enabled():
        _inplace.check_target(logits)
        out, stats = _inplace.TopkKlInplaceBackward.apply(*args)
    else:
        outs = _autograd.eager_or_traced(_TopkKl, _op.topk_kl)(*args)
        out, stats = outs[0], outs[5]
    shape = logits.shape[:-1]
    out = out.reshape(shape)
    if not return_stats:
        return out
    return out, TopkStats(*(stats[:, i].reshape(shape) for i in range(3)))


def _grad_formula(g: Tensor, logits: Tensor, idx: Tensor, coef: Tensor, stats: Tensor,
                  old: Optional[Tensor], mask: Optional[Tensor], temperature: float,
                  tail_bucket: bool) -> Tensor:
    """∂(Σ_n g_n out_n)/∂z as differentiable PyTorch (see _autograd), S~ and r constant.

    The kernel's gradient is ``g p_j (1[j∈S~] c_j − Σ_{S~} p_v c_v)`` with the saved
    ``c_v = coef_v = (r/τ)(L_v + 1 − b)``, ``b = log(t_p/t_q) + 1`` (0 without the tail
    bucket). As functions of z, ``dc_v = (r/τ)(d log p_v − d log t_p)`` (log q and t_q are
    constants), so ``c_v(z) = coef_v + (r/τ)[(log p_v − sg(log p_v)) − (log t_p − sg(log t_p))]``
    has the saved value and the right derivative: no reference logits are needed.
    """
    log_p = torch.log_softmax(_autograd.flat_rows(logits, mask) / temperature, -1)
    p = log_p.exp()
    zero = torch.zeros((), device=p.device)
    valid = idx >= 0  # -1: the sampled token already in S, or a masked row
    slots = idx.clamp_min(0).long()
    lp_s, p_s = log_p.gather(1, slots), p.gather(1, slots)
    delta = torch.where(valid & (p_s > 0), lp_s - lp_s.detach(), zero)
    if tail_bucket:
        inside = torch.zeros_like(p, dtype=torch.int32).scatter_add_(1, slots, valid.int()) > 0
        t_p = torch.where(inside, zero, p).sum(-1, keepdim=True)  # direct tail sum
        log_t = t_p.clamp_min(torch.finfo(torch.float32).tiny).log()
        delta = delta - torch.where(t_p > 0, log_t - log_t.detach(), zero)
    r = torch.ones_like(stats[:, 1]) if old is None else torch.exp(stats[:, 1] - old)
    c = torch.where(valid, coef + (r / temperature).unsqueeze(1) * delta, zero)
    pc = p_s * c
    grad = (-p * pc.sum(-1, keepdim=True)).scatter_add(1, slots, pc)
    grad = g.reshape(-1, 1).float() * grad
    return _autograd.masked_rows(grad, mask).reshape(logits.shape).to(logits.dtype)


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
    logits, _, _, _, old, mask, temperature, _, tail_bucket = inputs
    _, lse, idx, coef, shift, stats = output
    # stats and old (O(N)) only feed the differentiable path (r = exp(log p_o − old)).
    saved = (logits, lse, idx, coef, shift, mask, stats, old)
    ctx.save_for_backward(*saved)
    ctx.temperature = temperature
    ctx.tail_bucket = tail_bucket
    return saved  # for the Function's save_for_forward


def _backward(ctx, grad_out, *_unused):
    logits, lse, idx, coef, shift, mask, stats, old = ctx.saved_tensors
    if _autograd.needs_differentiable_backward(logits, grad_out):
        grad = _grad_formula(grad_out, logits, idx, coef, stats, old, mask, ctx.temperature,
                             ctx.tail_bucket)
    else:
        grad = _op.topk_kl_backward(grad_out, logits, lse, idx, coef, shift, mask,
                                    ctx.temperature)
    # Only the policy logits get a gradient: ref_logits is frozen, S~ and r are constants.
    return grad, None, None, None, None, None, None, None, None


def _jvp(ctx, t_logits, *_unused):
    logits, lse, idx, coef, shift, mask, _, _ = ctx.saved_tensors
    rows = _op.topk_kl_backward(torch.ones_like(shift), logits, lse, idx, coef, shift, mask,
                                ctx.temperature)
    return (_autograd.jvp_of_rows(rows, t_logits),) + (None,) * 5


# The op's autograd (what torch.compile sees), its eager Function, its batching rules.
torch.library.register_autograd("tike_cuda::topk_kl", _backward, setup_context=_setup_context)
_TopkKl = _autograd.op_function("_TopkKl", _op.topk_kl, _setup_context, _backward, _jvp,
                                differentiable=(0,))
_autograd.register_row_vmap("tike_cuda::topk_kl",
                            (LOGITS, LOGITS, None, ROWS, ROWS, ROWS, None, None, None),
                            (ROWS, ROWS_K, ROWS_K, ROWS_K, ROWS, ROWS_K))  # lse: [N, 2]
_autograd.register_row_vmap("tike_cuda::topk_kl_backward",
                            (ROWS, LOGITS, ROWS_K, ROWS_K, ROWS_K, ROWS, ROWS, None), (LOGITS,))
_autograd.register_not_differentiable("tike_cuda::topk_kl_backward")
