"""Validation of user input, written once: every public op calls these, so a bad argument
gives a ValueError / TypeError that names it instead of a crash inside a kernel."""
from __future__ import annotations

import math
import numbers
from typing import Optional

import torch
from torch import Tensor

LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _tracing() -> bool:
    # Value checks (token range) read data; under torch.compile they would break the graph.
    return torch.compiler.is_compiling()


def logits(x, name: str = "logits") -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
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


def per_token(x, ref: Tensor, name: str, kind: str) -> Optional[Tensor]:
    """An optional [...] tensor with one entry per logits row; kind: 'int', 'float', 'bool'."""
    if x is None:
        return None
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(x).__name__}")
    ok = {"int": not x.dtype.is_floating_point and not x.dtype.is_complex and x.dtype != torch.bool,
          "float": x.dtype.is_floating_point,
          "bool": x.dtype == torch.bool}[kind]
    if not ok:
        want = {"int": "an integer", "float": "a floating", "bool": "a bool"}[kind]
        raise TypeError(f"{name} must have {want} dtype, got {x.dtype}")
    if x.shape != ref.shape[:-1]:
        raise ValueError(f"{name} must have shape {tuple(ref.shape[:-1])} (the logits' leading "
                         f"dims), got {tuple(x.shape)}")
    if x.device != ref.device:
        raise ValueError(f"{name} must be on the logits' device {ref.device}, got {x.device}")
    return x


def tokens(x, ref: Tensor, name: str) -> Optional[Tensor]:
    x = per_token(x, ref, name, "int")
    # Range check on the CPU only: on a GPU it would be a hidden host sync per call
    # (the CUDA kernels give NaN for a row whose token is out of range instead).
    if x is not None and x.numel() and x.device.type == "cpu" and not _tracing():
        V = ref.shape[-1]
        lo, hi = int(x.min()), int(x.max())
        if lo < 0 or hi >= V:
            raise ValueError(f"{name} must be in [0, V={V}), got values in [{lo}, {hi}]")
    return x


def k_value(k, V: int) -> int:
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if not 1 <= int(k) <= V:
        raise ValueError(f"k must be in [1, V={V}], got {k}")
    return int(k)


def temperature(t) -> float:
    if isinstance(t, bool) or not isinstance(t, numbers.Real):
        raise TypeError(f"temperature must be a number, got {type(t).__name__}")
    if not (math.isfinite(t) and t > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {t}")
    return float(t)


def flag(x, name: str) -> bool:
    if not isinstance(x, bool):
        raise TypeError(f"{name} must be a bool, got {type(x).__name__}")
    return x


def choice(x, name: str, options) -> str:
    if x not in options:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, options))}, got {x!r}")
    return x


def rows(x: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    """Flatten a per-token tensor to the [N] the ops take (detached: no gradient flows)."""
    return None if x is None else x.detach().reshape(-1).to(dtype)


# ----------------------------------------------------------------------- fixed support

def _first_row(bad: Tensor) -> tuple:
    return tuple(bad.nonzero()[0].tolist())


def index_rows(x: Tensor, V: int, name: str, mask: Optional[Tensor], allow_empty: bool) -> None:
    """Value check (CPU only, outside tracing) of rows of vocabulary ids [..., K]: every
    row that ``mask`` keeps holds distinct ids in [0, V) (or −1, an empty slot, when
    ``allow_empty``)."""
    if x.device.type != "cpu" or _tracing() or x.numel() == 0:
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
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
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
    if ref.idx.device.type != "cpu" or _tracing():
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
