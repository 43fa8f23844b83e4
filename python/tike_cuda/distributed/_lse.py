r"""A row's log-sum-exp as a (max, log-sum) pair: read from a single-device op, combined over
the shards, and written back in the layout the single-device backward ops read.

A pair ``(M, ℓ)`` stands for ``lse = M/τ + ℓ``, ``ℓ = log Σ_v exp((z_v − M)/τ)``, and
``log p_v = (z_v − M)/τ − ℓ``. The shards' pairs combine exactly:

.. math::
    M = \max_i M_i, \qquad ℓ = \log \sum_i \exp\big((M_i − M)/τ + ℓ_i\big),

and shard ``i`` holds the probability mass ``w_i = exp((M_i − M)/τ + ℓ_i − ℓ)``.

The ops save their ``lse`` either as one float per row (``[N]``: read here as the pair
``(0, lse)``) or as the pair itself (``[N, 2]``); this file is the only place that knows
which, so a change of that layout changes nothing else of the package.
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

__all__ = ["local_pair", "combine", "saved_like"]


def local_pair(lse: Tensor) -> Tuple[Tensor, Tensor]:
    """``(M, ℓ)`` float32 ``[N]`` from the ``lse`` a single-device forward op saved."""
    if lse.dim() == 2 and lse.shape[-1] == 2:
        return lse[:, 0].float(), lse[:, 1].float()
    return torch.zeros_like(lse, dtype=torch.float32), lse.float()


def combine(M: Tensor, ell: Tensor, s: float) -> Tuple[Tensor, Tensor, Tensor]:
    """Global ``(M, ℓ)`` ``[N]`` and the shards' log-masses ``log w_i`` ``[N, R]`` from the
    shards' pairs ``[N, R]`` (float64; ``s = 1/τ``). A NaN pair makes the row NaN; a shard
    with no mass (``M_i = −inf``) adds nothing."""
    M, ell = M.double(), ell.double()
    Mg = M.amax(1)
    # A row with no finite maximum anywhere has no defined distribution: NaN below.
    base = torch.where(torch.isfinite(Mg), Mg, torch.full_like(Mg, float("nan")))
    rel = (M - base.unsqueeze(1)) * s + ell            # −inf for empty shards
    top = rel.amax(1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    ell_g = top.squeeze(1) + torch.exp(rel - top).sum(1).log()
    return base, ell_g, rel - ell_g.unsqueeze(1)


def saved_like(M: Tensor, ell: Tensor, s: float, like: Tensor) -> Tensor:
    """The global pair in the layout of `like` (an ``lse`` a forward op saved), float32,
    ready for the single-device backward ops."""
    if like.dim() == 2 and like.shape[-1] == 2:
        return torch.stack([M, ell], 1).float()
    return (M.double() * s + ell.double()).float()
