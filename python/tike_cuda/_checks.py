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


def tokens(x, ref: Tensor, name: str, mask: Optional[Tensor] = None,
           vocab: Optional[int] = None) -> Optional[Tensor]:
    """Token ids in [0, V) at the rows `mask` keeps (a bool mask from :func:`mask`); the ids
    of masked rows (padding such as -100) are never read, so they are not checked.
    ``vocab``: V when it is not ``ref``'s last dim (a vocabulary shard's global V)."""
    x = per_token(x, ref, name, "int")
    # Range check where it is free (see data_checks_possible): on a GPU it would be a hidden
    # host sync per call, and the CUDA kernels give NaN for a row whose token is out of range.
    if x is not None and x.numel() and data_checks_possible(x, mask):
        live = x if mask is None else x[mask]
        if live.numel():
            V = ref.shape[-1] if vocab is None else vocab
            lo, hi = int(live.min()), int(live.max())
            if lo < 0 or hi >= V:
                where = "" if mask is None else " at unmasked positions"
                raise ValueError(f"{name} must be in [0, V={V}){where}, got values in [{lo}, {hi}]")
    return x


def topk_options(logits: Tensor, row_mask, sampled, old, tau, union_sampled, tail,
                 return_stats, vocab: Optional[int] = None):
    """The per-token arguments and options of topk_kl-like ops (``mask``, ``sampled_tokens``,
    ``old_logprobs``, ``temperature``, ``union_sampled``, ``tail``, ``return_stats``),
    checked: returns (mask as bool, sampled_tokens, old_logprobs, temperature).
    ``vocab``: see :func:`tokens`."""
    row_mask = mask(row_mask, logits)
    sampled = tokens(sampled, logits, "sampled_tokens", row_mask, vocab)
    old = per_token(old, logits, "old_logprobs", "float")
    if old is not None and sampled is None:
        raise ValueError("old_logprobs needs sampled_tokens (the IS weight is taken at the sampled token)")
    tau = temperature(tau)
    flag(union_sampled, "union_sampled")
    choice(tail, "tail", ("none", "bucket"))
    flag(return_stats, "return_stats")
    return row_mask, sampled, old, tau


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


# ----------------------------------------------------------------------- fixed support

def _first_row(bad: Tensor) -> tuple:
    return tuple(bad.nonzero()[0].tolist())


def index_rows(x: Tensor, V: int, name: str, mask: Optional[Tensor], allow_empty: bool) -> None:
    """Value check (where data_checks_possible) of rows of vocabulary ids [..., K]: every
    row that ``mask`` keeps holds distinct ids in [0, V) (or −1, an empty slot, when
    ``allow_empty``)."""
    if x.numel() == 0 or not data_checks_possible(x, mask):
        return
    live = torch.ones((), dtype=torch.bool) if mask is None else mask.unsqueeze(-1)
    lo = -1 if allow_empty else 0
    bad = ((x < lo) | (x >= V)) & live
    if bad.any():
        where = " or -1" if allow_empty else ""
        raise ValueError(f"{name} must hold ids in [0, V={V}){where}, got {int(x[bad][0])} "
                         f"(row {_first_row(bad.any(-1))})")
    s = x.sort(dim=-1).values
    dup = ((s[..., 1:] == s[..., :-1]) & (s[..., 1:] >= 0) & live).any(-1)
    if dup.any():
        raise ValueError(f"{name} must not repeat an id within a row (row {_first_row(dup)})")


def support(x, ref: Tensor, mask: Optional[Tensor]) -> Tensor:
    """The support of a sparse reference: integer ids [..., k] per row of ``ref`` [..., V]."""
    if not isinstance(x, Tensor):
        raise TypeError(f"support must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
        raise TypeError(f"support must have an integer dtype, got {x.dtype}")
    lead = tuple(ref.shape[:-1])
    if x.dim() != ref.dim() or tuple(x.shape[:-1]) != lead:
        raise ValueError(f"support must have shape {lead} + (k,) (the ref_logits' leading dims), "
                         f"got {tuple(x.shape)}")
    V = ref.shape[-1]
    if not 1 <= x.shape[-1] <= V:
        raise ValueError(f"support must have k in [1, V={V}] columns, got {x.shape[-1]}")
    if x.device != ref.device:
        raise ValueError(f"support must be on the ref_logits' device {ref.device}, got {x.device}")
    index_rows(x, V, "support", mask, allow_empty=False)
    return x


def sparse_ref(ref, logits: Tensor, k, sampled_tokens: Optional[Tensor], union_sampled: bool,
               mask: Optional[Tensor]) -> None:
    """A SparseReference passed as topk_kl's reference: it must describe these rows, and
    S~ is fixed by it (its k; its sampled-token slot)."""
    lead = tuple(logits.shape[:-1])
    if tuple(ref.shape) != lead:
        raise ValueError(f"ref_logits (a SparseReference) must have the logits' leading shape "
                         f"{lead}, got {tuple(ref.shape)}")
    if ref.device != logits.device:
        raise ValueError(f"ref_logits (a SparseReference) must be on the logits' device "
                         f"{logits.device}, got {ref.device}")
    if isinstance(k, bool) or not isinstance(k, _SYM_INT):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if k != 16 and k != ref.k:  # 16: topk_kl's default, i.e. k not given
        raise ValueError(f"k must be the SparseReference's support size {ref.k} (S~ is fixed "
                         f"by it), got {k}")
    if ref.united and not union_sampled:
        raise ValueError("union_sampled=False, but this SparseReference's S~ holds the sampled "
                         "token (it was built with sampled_tokens)")
    if not ref.united and sampled_tokens is not None and union_sampled:
        raise ValueError("sampled_tokens cannot join S~: this SparseReference was built without "
                         "them. Build it with sampled_tokens=..., or pass union_sampled=False "
                         "to use them only for the importance weight")
    index_rows(ref.idx, logits.shape[-1], "ref_logits.idx", mask, allow_empty=True)
    if not data_checks_possible(ref.idx, sampled_tokens, mask):
        return
    live = torch.ones(lead, dtype=torch.bool) if mask is None else mask
    empty = (ref.idx < 0).all(-1) & live  # only a row masked when the store was built
    if empty.any():
        raise ValueError(f"mask: row {_first_row(empty)} was masked when the SparseReference was "
                         "built (its S~ is empty); pass the same mask")
    if ref.united and sampled_tokens is not None:
        missing = ~(ref.idx == sampled_tokens.unsqueeze(-1)).any(-1) & live
        if missing.any():
            raise ValueError("sampled_tokens differ from those the SparseReference was built "
                             f"with (row {_first_row(missing)})")
