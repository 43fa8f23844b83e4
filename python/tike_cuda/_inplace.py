"""``topk_kl(inplace_backward=True)``: the gradient written over the logits buffer.

That is only right when nothing else needs the logits' values once the backward has run,
which the call cannot fully know; what it can know is refused at the call with a
ValueError (:func:`check_target`):

* a leaf (an ``nn.Parameter``, a tensor made with ``requires_grad=True``): its values
  would become its own gradient;
* rows that overlap in memory (``expand``, stride-0 or overlapping ``as_strided`` views):
  each row's gradient would overwrite another row's logits;
* a layout the kernel cannot write in place (a last-dim stride other than 1, more than
  two leading dims that do not merge): the C++ check would refuse it only at backward;
* memory already handed to another in-place call whose backward has not run (two calls
  on the same logits, say k = 4 and k = 8): the second backward would read the first
  one's gradient as logits;
* torch.compile, torch.func transforms and forward-mode AD, which this buffer trick
  cannot serve.

The graph can then be backpropagated once: a second backward (``retain_graph=True``)
and ``create_graph=True`` raise a RuntimeError saying so.
"""
from __future__ import annotations

import weakref
from typing import Dict, List, Tuple

import torch
from torch import Tensor

from . import _autograd, _checks

_HOW = "use inplace_backward=False"


def _row_starts(x: Tensor) -> Tensor:
    """Byte offset in its storage of every row ([..., V] with a unit last stride), int64 [N]."""
    starts = torch.zeros((), dtype=torch.int64)
    for size, stride in zip(x.shape[:-1], x.stride()[:-1]):
        starts = (starts.unsqueeze(-1) + torch.arange(size, dtype=torch.int64) * stride)
    return (starts.reshape(-1) + x.storage_offset()) * x.element_size()


def _layout_ok(x: Tensor) -> bool:
    """The rows are addressable by the kernels without a copy (csrc/ops_common.h rows_view):
    unit last stride and at most two leading dims once size-1 dims are dropped and
    contiguous ones merged."""
    if x.shape[-1] > 1 and x.stride(-1) != 1:
        return False
    dims: List[Tuple[int, int]] = []
    for size, stride in zip(x.shape[:-1], x.stride()[:-1]):
        if size == 1:
            continue
        if dims and dims[-1][1] == stride * size:
            dims[-1] = (dims[-1][0] * size, stride)
        else:
            dims.append((size, stride))
    return len(dims) <= 2


def _rows_overlap(a: Tensor, row_a: int, b: Tensor, row_b: int) -> bool:
    """Whether byte intervals [a_i, a_i + row_a) and [b_j, b_j + row_b) meet (a sorted)."""
    if a.numel() == 0 or b.numel() == 0:
        return False
    pos = torch.searchsorted(a, b, right=True)  # a[pos - 1] <= b_j < a[pos]
    before = a[(pos - 1).clamp_min(0)]
    hit_before = (pos > 0) & (before + row_a > b)
    after = a[pos.clamp_max(a.numel() - 1)]
    hit_after = (pos < a.numel()) & (after < b + row_b)
    return bool((hit_before | hit_after).any())


class _Pending:
    """One in-place call whose backward has not run: held by its autograd graph, it
    leaves the registry at that backward, or when the graph is freed without one."""

    def __init__(self, logits: Tensor):
        self.key = logits.untyped_storage().data_ptr()
        self.starts = torch.sort(_row_starts(logits)).values
        self.row = logits.shape[-1] * logits.element_size()
        _pending.setdefault(self.key, weakref.WeakSet()).add(self)
        weakref.finalize(self, _prune, self.key)

    def release(self) -> None:
        uses = _pending.get(self.key)
        if uses is not None:
            uses.discard(self)
        _prune(self.key)


# storage address -> the in-place calls on that storage whose backward has not run yet
_pending: Dict[int, "weakref.WeakSet[_Pending]"] = {}


def _prune(key: int) -> None:
    # iterate rather than len(): a WeakSet may still count a reference that just died
    if key in _pending and not any(True for _ in _pending[key]):
        del _pending[key]


def check_target(logits: Tensor) -> None:
    """Refuse, with a ValueError, what can be detected of a misuse (module docstring)."""
    if torch.compiler.is_compiling():
        raise ValueError("topk_kl(inplace_backward=True) is eager-only: under torch.compile "
                         f"{_HOW} (the compiler plans the gradient buffer itself)")
    if _checks.functorch_wrapped(logits) or _autograd.forward_ad_active(logits):
        raise ValueError("topk_kl(inplace_backward=True) does not work under torch.func "
                         f"transforms (grad, vmap, jvp, ...) or forward-mode AD: {_HOW}")
    if logits.is_leaf:
        raise ValueError("topk_kl(inplace_backward=True) would overwrite logits, a leaf tensor "
                         "(an nn.Parameter or a tensor created with requires_grad=True), with "
                         "its own gradient: pass the logits an op computed (e.g. lm_head's "
                         f"output), or {_HOW}")
    if not _layout_ok(logits):
        raise ValueError(f"topk_kl(inplace_backward=True) needs logits whose rows the kernel can "
                         f"overwrite in place (unit stride on the last dim, at most two leading "
                         f"dims after merging); got shape {tuple(logits.shape)} with strides "
                         f"{logits.stride()}: pass logits.contiguous() or {_HOW}")
    starts, row = torch.sort(_row_starts(logits)).values, logits.shape[-1] * logits.element_size()
    if starts.numel() > 1 and bool((starts.diff() < row).any()):
        raise ValueError("topk_kl(inplace_backward=True): rows of logits share memory (an "
                         "expand()ed or stride-0 view), so one row's gradient would overwrite "
                         f"another row's logits: pass logits.contiguous() or {_HOW}")
    for use in list(_pending.get(logits.untyped_storage().data_ptr(), ())):
        if _rows_overlap(use.starts, use.row, starts, row):
            raise ValueError("topk_kl(inplace_backward=True): these logits were already given to "
                             "an in-place topk_kl whose backward has not run; its backward would "
                             "overwrite them before this one reads them. Run that backward first, "
                             f"or {_HOW} for all but one of the calls")


class TopkKlInplaceBackward(torch.autograd.Function):
    """topk_kl whose backward overwrites the logits buffer with the gradient (opt-in)."""

    @staticmethod
    def forward(ctx, logits, ref_logits, k, tokens, old, mask, temperature, union, tail_bucket):
        out, lse, idx, coef, shift, stats = torch.ops.tike_cuda.topk_kl(
            logits, ref_logits, k, tokens, old, mask, temperature, union, tail_bucket)
        ctx.save_for_backward(lse, idx, coef, shift)
        # Held, not saved: its buffer is about to become the gradient, which autograd's
        # saved-tensor version check would (rightly) refuse.
        ctx.logits, ctx.mask, ctx.temperature = logits, mask, temperature
        ctx.pending = _Pending(logits)  # released at backward, or freed with the graph
        ctx.mark_non_differentiable(stats)
        return out, stats

    @staticmethod
    def backward(ctx, grad_out, _grad_stats):
        if ctx.logits is None:
            raise RuntimeError("topk_kl(inplace_backward=True) can be backpropagated once: its "
                               "first backward overwrote the logits with their gradient. For a "
                               f"second backward (retain_graph=True), {_HOW}")
        if torch.is_grad_enabled():
            raise RuntimeError("topk_kl(inplace_backward=True) has no second derivative "
                               f"(create_graph=True): {_HOW}")
        lse, idx, coef, shift = ctx.saved_tensors
        buf = ctx.logits.detach()
        ctx.logits = None
        ctx.pending.release()
        torch.ops.tike_cuda.topk_kl_backward_(grad_out.contiguous(), buf, lse, idx, coef, shift,
                                              ctx.mask, ctx.temperature)
        # The schema declares the mutation, but a C++ custom op does not bump the version
        # counter by itself: do it, so that any other saved copy of these logits fails
        # autograd's check loudly instead of being read as if it still held logits.
        torch.autograd.graph.increment_version(buf)
        return buf, None, None, None, None, None, None, None, None
