"""Per-row fields of several dtypes packed into one byte buffer, so that a call exchanges
them in a single all-gather (one latency), each at its own width: int32 ids, logit values
in the logits' dtype (2 bytes for bfloat16: exact, and a third fewer bytes than float32),
float32 row statistics."""
from __future__ import annotations

from typing import List, Sequence

import torch
from torch import Tensor

from . import _group


def _bytes(t: Tensor) -> Tensor:
    """[N, w] of any dtype as its raw bytes, uint8 [N, w·itemsize]."""
    t = t.contiguous()
    return t.view(torch.uint8).reshape(t.shape[0], -1)


def gather_fields(fields: Sequence[Tensor], layout: "_group.ShardLayout") -> List[Tensor]:
    """All-gathers the ``[N, w_i]`` tensors `fields` (any dtypes, the same shapes and dtypes
    on every rank) in one collective; returns each as ``[N, R, w_i]`` (rank order)."""
    widths = [f.shape[1] * f.element_size() for f in fields]
    buf = torch.cat([_bytes(f) for f in fields], 1)
    got = _group.all_gather(buf, layout)  # [R, N, B]
    out, at = [], 0
    for f, w in zip(fields, widths):
        part = got[:, :, at:at + w].contiguous().view(f.dtype)  # [R, N, w_i]
        out.append(part.transpose(0, 1))
        at += w
    return out
