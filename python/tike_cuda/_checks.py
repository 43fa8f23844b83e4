"""Validation of user input, written once: every public op calls these, so a bad argument
gives a ValueError / TypeError that names it instead of a crash inside a kernel.

The checks are trace-friendly: under ``torch.compile`` (also with ``dynamic=True``, where
``temperature`` and ``k`` arrive as symbolic numbers) they go through ``torch._check_value``
/ ``torch._check_type`` instead of Python ``if``s on values, and checks that read tensor
data (token range, 0/1 masks) run only where that is free: eagerly, on the CPU, outside
``vmap``. Elsewhere the C++ glue still range-checks tokens (CPU) or the kernels turn an
out-of-range row into NaN (CUDA), as documented in docs/kernels.md.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional

import torch
from torch import Tensor

LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# The one rule for masks, everywhere (ops, estimators, GRPO helpers, logits files).
MASK_RULE = ("a bool tensor, or an integer or floating tensor holding only 0 and 1 "
             "(True / 1 = use the position)")

_SYM_INT = (numbers.Integral, torch.SymInt)
_SYM_REAL = (numbers.Real, torch.SymInt, torch.SymFloat)


def _tracing() -> bool:
    return torch.compiler.is_compiling()


def functorch_wrapped(x: Tensor) -> bool:
    """Whether `x` is a torch.func transform's wrapper (vmap's BatchedTensor, grad's ...)."""
    return torch._C._functorch.is_functorch_wrapped_tensor(x)


def data_checks_possible(*tensors: Optional[Tensor]) -> bool:
    """Whether a check that reads tensor values may run here without a cost or a failure:
    eager (not traced), every tensor on the CPU (no device sync) and none batched by vmap."""
    if _tracing():
        return False
    return all(t is None or (t.device.type == "cpu" and not functorch_wrapped(t)) for t in tensors)


def _tensor(x, name: str, optional: bool = False) -> None:
    if not isinstance(x, Tensor):
        what = "a torch.Tensor or None" if optional else "a torch.Tensor"
        raise TypeError(f"{name} must be {what}, got {type(x).__name__}")


def logits(x, name: str = "logits") -> Tensor:
    _tensor(x, name)
    if x.dtype not in LOGIT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16 or float16, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"{name} must have shape [..., V] with V >= 1, got {tuple(x.shape)}")
    return x


def like_logits(x, ref: Tensor, name: str) -> Tensor:
    logits(x, name)
    if x.shape != ref.shape:
        raise ValueError(f"{name} must have the logits' shape {tuple(ref.shape)}, got {tuple(x.shape)}")
    if x.dtype != ref.dtype:
        raise TypeError(f"{name} must have the logits' dtype {ref.dtype}, got {x.dtype}")
    if x.device != ref.device:
        raise ValueError(f"{name} must be on the logits' device {ref.device}, got {x.device}")
    return x


def _same_rows(x: Tensor, ref: Tensor, name: str) -> None:
    if x.shape != ref.shape[:-1]:
        raise ValueError(f"{name} must have shape {tuple(ref.shape[:-1])} (the logits' leading "
                         f"dims), got {tuple(x.shape)}")
    if x.device != ref.device:
        raise ValueError(f"{name} must be on the logits' device {ref.device}, got {x.device}")


def per_token(x, ref: Tensor, name: str, kind: str) -> Optional[Tensor]:
    """An optional [...] tensor with one entry per logits row; kind: 'int' or 'float'."""
    if x is None:
        return None
    _tensor(x, name, optional=True)
    ok = {"int": not x.dtype.is_floating_point and not x.dtype.is_complex and x.dtype != torch.bool,
          "float": x.dtype.is_floating_point}[kind]
    if not ok:
        want = {"int": "an integer", "float": "a floating"}[kind]
        raise TypeError(f"{name} must have {want} dtype, got {x.dtype}")
    _same_rows(x, ref, name)
    return x


def as_bool_mask(x, name: str = "mask") -> Tensor:
    """A mask following MASK_RULE, as bool. Values are checked to be 0/1 where that is free
    (data_checks_possible); elsewhere any nonzero value counts as 1."""
    _tensor(x, name)
    if x.dtype == torch.bool:
        return x
    if x.dtype.is_complex:
        raise TypeError(f"{name} must be {MASK_RULE}; got {x.dtype}")
    if x.numel() and data_checks_possible(x):
        bad = (x != 0) & (x != 1)
        if bool(bad.any()):
            raise ValueError(f"{name} must be {MASK_RULE}; got the value {x[bad][0].item()!r}")
    return x != 0


def mask(x, ref: Tensor, name: str = "mask") -> Optional[Tensor]:
    """An optional per-row mask (MASK_RULE) of the logits' leading shape, as bool."""
    if x is None:
        return None
    _tensor(x, name, optional=True)
    x = as_bool_mask(x, name)
    _same_rows(x, ref, name)
    return x


def tokens(x, ref: Tensor, name: str, mask: Optional[Tensor] = None) -> Optional[Tensor]:
    """Token ids in [0, V) at the rows `mask` keeps (a bool mask from :func:`mask`); the ids
    of masked rows (padding such as -100) are never read, so they are not checked."""
    x = per_token(x, ref, name, "int")
    # Range check where it is free (see data_checks_possible): on a GPU it would be a hidden
    # host sync per call, and the CUDA kernels give NaN for a row whose token is out of range.
    if x is not None and x.numel() and data_checks_possible(x, mask):
        live = x if mask is None else x[mask]
        if live.numel():
            V = ref.shape[-1]
            lo, hi = int(live.min()), int(live.max())
            if lo < 0 or hi >= V:
                where = "" if mask is None else " at unmasked positions"
                raise ValueError(f"{name} must be in [0, V={V}){where}, got values in [{lo}, {hi}]")
    return x


def _require(cond, message: str) -> None:
    """ValueError(message) unless cond. While tracing (torch.compile; with dynamic=True the
    value may be symbolic) through torch._check_value, which guards or asserts at run time;
    the message must then not format the value (dynamo cannot trace such a closure)."""
    if _tracing():
        torch._check_value(cond, lambda: message)
    elif not cond:
        raise ValueError(message)


def k_value(k, V):
    """k in [1, V] (trace-friendly, see _require)."""
    if isinstance(k, bool) or not isinstance(k, _SYM_INT):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    message = "k must be in [1, V]" if _tracing() else f"k must be in [1, V={V}], got {k}"
    _require(k >= 1, message)
    _require(k <= V, message)
    return k if _tracing() else int(k)


def temperature(t):
    """A finite temperature > 0 (trace-friendly, see _require): a float, or the traced value."""
    if isinstance(t, bool) or not isinstance(t, _SYM_REAL):
        raise TypeError(f"temperature must be a number, got {type(t).__name__}")
    message = "temperature must be a finite number > 0" + ("" if _tracing() else f", got {t}")
    # Comparisons rather than math.isfinite, so that a symbolic float traces: NaN fails both.
    _require(t > 0, message)
    _require(t < math.inf, message)
    return t if _tracing() else float(t)


def flag(x, name: str) -> bool:
    if not isinstance(x, bool):
        raise TypeError(f"{name} must be a bool, got {type(x).__name__}")
    return x


def choice(x, name: str, options) -> str:
    if not isinstance(x, str) or x not in options:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, options))}, got {x!r}")
    return x


def rows(x: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    """Flatten a per-token tensor to the [N] the ops take (detached: no gradient flows)."""
    return None if x is None else x.detach().reshape(-1).to(dtype)
