"""The vocabulary shards of a process group, and the one collective the ops use.

Rank ``i`` of the group holds the contiguous slice ``[offset_i, offset_i + V_i)`` of the
vocabulary, shards in rank order (``offset_i = V_0 + … + V_{i−1}``); the sizes may
differ. Every byte the vocabulary-parallel ops exchange goes through :func:`all_gather`,
which also counts it (:func:`count_bytes`).
"""
from __future__ import annotations

import contextlib
import math
import struct
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["ShardLayout", "shard_layout", "all_gather", "count_bytes", "CommBytes"]


def _dist():
    import torch.distributed as dist
    if not dist.is_available():
        raise RuntimeError("tike_cuda.distributed needs a torch built with torch.distributed")
    if not dist.is_initialized():
        raise RuntimeError("tike_cuda.distributed: torch.distributed is not initialized "
                           "(call torch.distributed.init_process_group first)")
    return dist


@dataclass(frozen=True)
class ShardLayout:
    """Where this rank's shard lies in the vocabulary of its group."""

    group: object            # the ProcessGroup (None: the default group)
    rank: int                # this process's rank in the group
    sizes: Tuple[int, ...]   # V_i of every rank, in rank order

    @property
    def world(self) -> int:
        return len(self.sizes)

    @property
    def offset(self) -> int:
        """Global id of this shard's first entry."""
        return sum(self.sizes[:self.rank])

    @property
    def local_size(self) -> int:
        return self.sizes[self.rank]

    @property
    def V(self) -> int:
        """The whole vocabulary."""
        return sum(self.sizes)

    def owned(self, tokens: Tensor) -> Tensor:
        """Which of the global ids `tokens` lie on this shard."""
        return (tokens >= self.offset) & (tokens < self.offset + self.local_size)


def _fingerprint(options: Sequence) -> int:
    """One int64 that differs when the call's options differ (k, flags, temperature)."""
    h = 1469598103934665603
    for o in options:
        data = struct.pack("<d", float(o)) if isinstance(o, float) else repr(o).encode()
        for b in data:
            h = ((h ^ b) * 1099511628211) & ((1 << 63) - 1)
    return h


def shard_layout(logits: Tensor, group, shard_sizes: Optional[Sequence[int]],
                 options: Sequence) -> ShardLayout:
    """This rank's place in `group`. Without `shard_sizes`, one small all-gather of
    (V_i, N, options) learns every shard's size and checks that all ranks called with the
    same number of rows and options — a mismatch would otherwise make the next collective
    fail or wait until the group's timeout. On a GPU reading the sizes back is a host
    sync; passing `shard_sizes` (the V_i of every rank, in rank order) skips all of this."""
    dist = _dist()
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("group: this process is not a member of the given process group")
    world = dist.get_world_size(group)
    V_local = logits.shape[-1]
    if shard_sizes is not None:
        sizes = tuple(shard_sizes)
        if len(sizes) != world or any(isinstance(v, bool) or not isinstance(v, int) or v < 1
                                      for v in sizes):
            raise ValueError(f"shard_sizes must list {world} ints >= 1 (one per rank of the "
                             f"group, in rank order), got {list(shard_sizes)}")
        if sizes[rank] != V_local:
            raise ValueError(f"shard_sizes[{rank}] = {sizes[rank]} but this rank's logits have "
                             f"{V_local} vocabulary entries")
    else:
        N = math.prod(logits.shape[:-1])
        meta = torch.tensor([V_local, N, _fingerprint(options)], dtype=torch.int64,
                            device=logits.device)
        rows = all_gather(meta.unsqueeze(0), ShardLayout(group, rank, (0,) * world))
        rows = rows.reshape(world, 3).tolist()
        if len({r[1] for r in rows}) != 1:
            raise ValueError("logits: every rank of the group must pass the same number of "
                             f"rows (token positions), got {[r[1] for r in rows]}")
        if len({r[2] for r in rows}) != 1:
            raise ValueError("every rank of the group must call with the same k, temperature, "
                             "mask, sampled_tokens, old_logprobs and options")
        sizes = tuple(r[0] for r in rows)
    return ShardLayout(group, rank, sizes)


# ------------------------------------------------------------------ the collective

@dataclass
class CommBytes:
    """What this process exchanged inside a :func:`count_bytes` block."""

    calls: int = 0       # all-gathers
    sent: int = 0        # bytes this rank contributed (its inputs)
    gathered: int = 0    # bytes of the gathered outputs (what every rank ends up holding)


_counters: List[CommBytes] = []


@contextlib.contextmanager
def count_bytes() -> Iterator[CommBytes]:
    """Counts the collectives of the vocabulary-parallel ops run inside the block:

        with tike_cuda.distributed.count_bytes() as c:
            kl = vocab_parallel_topk_kl(...)
            kl.sum().backward()
        c.sent, c.gathered   # bytes; the backward adds nothing
    """
    c = CommBytes()
    _counters.append(c)
    try:
        yield c
    finally:
        _counters.remove(c)


def all_gather(x: Tensor, layout: ShardLayout) -> Tensor:
    """Every rank's `x` (same shape and dtype on all ranks), stacked in rank order:
    ``[world, *x.shape]``."""
    dist = _dist()
    x = x.contiguous()
    out = x.new_empty((layout.world * x.shape[0],) + tuple(x.shape[1:]))
    # Called at world size 1 too, so that a single-process group runs the backend's path.
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, x, group=layout.group)
    out = out.view((layout.world,) + tuple(x.shape))
    nbytes = x.numel() * x.element_size()
    for c in _counters:
        c.calls += 1
        c.sent += nbytes
        c.gathered += nbytes * layout.world
    return out
