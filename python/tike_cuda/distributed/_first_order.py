"""Autograd of the vocabulary-parallel ops: first order only, and a clear error otherwise.

The first-order backward of each op is the single-device backward kernel run on this
rank's shard with the row constants of the whole vocabulary: no communication. A second
derivative (``create_graph=True`` differentiated again), forward mode
(``torch.func.jvp``, ``forward_ad``) and ``torch.vmap`` would need collectives inside
autograd's own machinery; they raise a ``RuntimeError`` naming the op instead (never a
silent zero). Under ``torch.compile`` the ops run eagerly (``torch.compiler.disable``).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor


def _unsupported(name: str, what: str) -> RuntimeError:
    return RuntimeError(f"tike_cuda.distributed.{name}: {what} is not supported (only the "
                        f"first-order backward: loss.backward() / torch.autograd.grad)")


class _NoSecondDerivative(torch.autograd.Function):
    """Identity on a computed gradient that raises if that gradient is differentiated."""

    @staticmethod
    def forward(ctx, grad: Tensor, anchor: Tensor, name: str) -> Tensor:
        ctx.name = name
        return grad.view_as(grad)

    @staticmethod
    def backward(ctx, *_):
        raise _unsupported(ctx.name, "a second derivative (differentiating the backward)")


def guard_second_order(grad: Tensor, anchor: Tensor, name: str) -> Tensor:
    """`grad` as the backward's result: under create_graph=True it carries a node that
    raises when differentiated (it was computed by a kernel, without history)."""
    if torch.is_grad_enabled() and anchor.requires_grad:
        return _NoSecondDerivative.apply(grad, anchor, name)
    return grad


def function(name: str, forward: Callable, setup_context: Callable,
             backward: Callable) -> type:
    """A torch.autograd.Function: `forward(*inputs)` computes (no grad), `setup_context`
    saves (the logits first), `backward(ctx, *grads)` runs the local kernel (without grad
    recording) and returns the logits' gradient first."""
    def guarded_backward(ctx, *grads):
        with torch.no_grad():
            out = backward(ctx, *grads)
        anchor = ctx.saved_tensors[0]  # the logits, by convention of every setup_context
        return (guard_second_order(out[0], anchor, name),) + tuple(out[1:])

    def jvp(ctx, *_):
        raise _unsupported(name, "forward-mode AD (torch.func.jvp, forward_ad)")

    def vmap(info, in_dims, *_):
        raise _unsupported(name, "torch.vmap")

    return type(f"_{name}", (torch.autograd.Function,), {
        "__doc__": f"tike_cuda.distributed.{name}: first-order autograd (see _first_order).",
        "forward": staticmethod(forward),
        "setup_context": staticmethod(setup_context),
        "backward": staticmethod(guarded_backward),
        "jvp": staticmethod(jvp),
        "vmap": staticmethod(vmap),
    })
