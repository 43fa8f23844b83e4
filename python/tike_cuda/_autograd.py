"""What the three ops share to compose with every autograd mode.

* First-order reverse mode (``loss.backward()``): the fused backward kernel.
* Double backward (``create_graph=True``: Hessian- and Fisher-vector products), reverse
  mode over forward mode, ``torch.func.grad`` (which always differentiates with
  ``create_graph=True``): each op's backward then returns its gradient as a
  *differentiable PyTorch formula* (the same first derivative, with the same constants),
  so autograd can differentiate it again to any order. It costs a few ``[N, V]`` float32
  temporaries, like eager PyTorch would.
* Forward mode (``torch.func.jvp``, ``torch.autograd.forward_ad``): the JVP of a row-wise
  scalar is the row of its gradient dotted with the tangent, ``Σ_j (∂out/∂z_j) t_j``; the
  gradient row comes from the fused backward kernel with an upstream gradient of one.
* ``torch.vmap``: every op works on independent rows, so a vmapped call is one call on
  the batch's rows (:func:`register_row_vmap`), not a loop.

In eager mode the public functions go through a ``torch.autograd.Function`` carrying all
of this (:func:`op_function`; torch.func needs ``setup_context`` / ``jvp`` there); under
``torch.compile`` they call the registered op, whose ``register_autograd`` formula is the
same backward. A backward op differentiated directly raises
(:func:`register_not_differentiable`) instead of autograd's silent zero.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import Tensor
from torch.autograd import forward_ad


def has_tangent(t: Optional[Tensor]) -> bool:
    """Whether `t` carries a forward-mode tangent at the current dual level."""
    if t is None or forward_ad._current_level < 0:
        return False
    return forward_ad.unpack_dual(t).tangent is not None


def needs_differentiable_backward(*tensors: Optional[Tensor]) -> bool:
    """Whether a backward must itself be differentiable: it runs with create_graph=True
    (grad mode on) for inputs that require grad, or under forward-mode AD."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return True
    return any(has_tangent(t) for t in tensors)


def forward_ad_active(*tensors: Optional[Tensor]) -> bool:
    """Whether forward-mode AD (torch.func.jvp or forward_ad.dual_level) sees these inputs."""
    return any(has_tangent(t) for t in tensors)


def jvp_of_rows(grad_rows: Tensor, tangent: Optional[Tensor]) -> Optional[Tensor]:
    """Σ_j grad[n, j] · t[n, j] per row, float32 [N]: the JVP of a per-row scalar output."""
    if tangent is None:
        return None
    V = grad_rows.shape[-1]
    return (grad_rows.reshape(-1, V).float() * tangent.reshape(-1, V).float()).sum(-1)


def flat_rows(z: Tensor, mask: Optional[Tensor]) -> Tensor:
    """[N, V] float32 view of the logits with masked rows zeroed (so that whatever a masked
    row holds, NaN or inf, cannot reach a differentiable formula)."""
    x = z.reshape(-1, z.shape[-1]).float()
    if mask is None:
        return x
    return torch.where(mask.reshape(-1, 1), x, torch.zeros((), dtype=x.dtype, device=x.device))


def masked_rows(grad: Tensor, mask: Optional[Tensor]) -> Tensor:
    if mask is None:
        return grad
    return torch.where(mask.reshape(-1, 1), grad, torch.zeros((), dtype=grad.dtype, device=grad.device))


def register_not_differentiable(qualname: str) -> None:
    """A backward op has no derivative of its own (the forward op's backward switches to a
    differentiable formula instead): differentiating a direct call of it is an error, not
    autograd's silent zero."""
    def backward(ctx, *grads):
        raise RuntimeError(f"{qualname} is a backward kernel with no derivative of its own: "
                           f"to differentiate twice, call the forward op (tike_cuda's public "
                           f"function) and use create_graph=True")

    torch.library.register_autograd(qualname, backward, setup_context=lambda ctx, inputs, output: None)


def op_function(name: str, op, setup_context: Callable, backward: Callable, jvp: Callable,
                differentiable: Sequence[int] = (0,)) -> type:
    """The eager-mode autograd.Function of a registered op: the same setup_context (which
    returns what it saved) and backward as its register_autograd, plus a JVP and a vmap
    rule generated from the op's batching rule (register_row_vmap). Outputs not listed in
    `differentiable` are marked non-differentiable."""
    def setup(ctx, inputs, output):
        ctx.save_for_forward(*setup_context(ctx, inputs, output))
        ctx.mark_non_differentiable(*(o for i, o in enumerate(output) if i not in differentiable))

    return type(name, (torch.autograd.Function,), {
        "__doc__": f"{op} with every autograd mode (eager): see tike_cuda._autograd.",
        "generate_vmap_rule": True,
        "forward": staticmethod(lambda *args: op(*args)),
        "setup_context": staticmethod(setup),
        "backward": staticmethod(backward),
        "jvp": staticmethod(jvp),
    })


def eager_or_traced(function: type, op) -> Callable:
    """The autograd.Function in eager mode, the registered op under torch.compile: dynamo
    cannot trace a custom `jvp`, and the op carries the same backward for compiled graphs."""
    return op if torch.compiler.is_compiling() else function.apply


# ------------------------------------------------------------------------------- vmap

LOGITS, ROWS, ROWS_K = "logits", "rows", "rows_k"


def register_row_vmap(qualname: str, arg_kinds: Sequence[Optional[str]],
                      out_kinds: Sequence[str]) -> None:
    """A batching rule for a row-wise op: the vmapped dim joins the rows.

    arg_kinds, per schema argument: LOGITS (``[..., V]``: the batch dim is put first),
    ROWS (one entry per row, any shape of N elements), ROWS_K (``[N, K]`` per row) or None
    (not a tensor). out_kinds likewise for the outputs (LOGITS, ROWS or ROWS_K).
    """
    op = getattr(torch.ops.tike_cuda, qualname.split("::")[1]).default

    def rule(info, in_dims, *args):
        B = info.batch_size
        call = []
        for a, d, kind in zip(args, in_dims, arg_kinds):
            if kind is None or not isinstance(a, Tensor):
                call.append(a)
                continue
            a = a.movedim(d, 0) if d is not None else a.unsqueeze(0).expand(B, *a.shape)
            call.append(a.reshape(-1, a.shape[-1]) if kind == ROWS_K else a)
        outs = op(*call)
        single = isinstance(outs, Tensor)
        outs = (outs,) if single else outs
        shaped = []
        for o, kind in zip(outs, out_kinds):
            if kind == ROWS:
                o = o.view(B, o.numel() // B if B else 0)
            elif kind == ROWS_K:
                o = o.view(B, o.shape[0] // B if B else 0, o.shape[-1])
            shaped.append(o)
        if single:
            return shaped[0], 0
        return tuple(shaped), tuple(0 for _ in shaped)

    torch.library.register_vmap(qualname, rule)
