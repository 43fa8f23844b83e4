r"""Fixed support: TIKE without dense reference logits at update time (design.md §6).

S~ is a constant for autograd (paper Eq. 17), so it may be chosen before the update — by
the rollout policy, when the tokens are sampled — and the reference then needs to be
known on S~ only. Three calls, one per stage of an RL step (docs/sparse_reference.md):

    support = tike_cuda.topk_indices(rollout_logits, k=16)                    # rollout
    sref = tike_cuda.sparse_reference(ref_logits, support,                     # reference
                                      sampled_tokens=responses, mask=response_mask)
    kl = tike_cuda.topk_kl(logits, sref, sampled_tokens=responses,             # update
                           old_logprobs=old_logprobs, mask=response_mask)

With S~ = support ∪ {o} fixed, the update is TIKE on that S~ with the current policy's p:

.. math::
    \mathrm{out} = r \sum_{v \in \tilde S} p_v (\log p_v - \log q_v)
    \;[+\; t_p \log(t_p / t_q)], \qquad t = \textstyle\sum_{v \notin \tilde S}

It equals ``topk_kl(logits, ref_logits, k)`` exactly when the support is the current
policy's top-k (the first, on-policy update); after the policy has moved it is the same
estimator on the rollout policy's S~ — still bounded, and smooth in the logits.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Dict, Optional, Sequence

import torch
from torch import Tensor

from . import _autograd, _checks, _inplace
from ._autograd import LOGITS, ROWS, ROWS_K
from .reference import TopkStats

__all__ = ["SparseReference", "topk_indices", "sparse_reference"]


@dataclass(frozen=True)
class SparseReference:
    """The reference policy on a fixed support, per token position: a plain container.

    ``idx`` (int32 ``[..., K1]``): S~. Columns ``0 .. k−1`` are the support as given;
    with sampled tokens, column ``k`` is the sampled token ``o`` — or −1 when ``o`` is
    already in the support (counted once: the slot is padding, like dense ``topk_kl``'s
    ``idx[:, k]``). Masked positions hold −1 everywhere.
    ``logprobs`` (float32 ``[..., K1]``): ``log q_v`` at ``idx`` (−inf at −1 slots).
    ``tail_logmass`` (float32 ``[...]``): ``log Σ_{v∉S~} q_v``, summed directly over the
    tail (0 on masked positions: an empty S~ leaves all the mass in the tail).
    ``k``: the support size (``K1 = k + 1`` when the sampled token was united).

    So ``logprobs.exp().sum(-1) + tail_logmass.exp() == 1`` on every row.

    Size: ``N·K1·8 + N·4`` bytes for N positions (:attr:`nbytes`) — 140 bytes per token at
    k = 16 with the sampled token, against ``2·V`` bytes of bfloat16 reference logits
    (303,872 at V = 151,936).

    It behaves like a batch of tensors over the leading dims: ``ref[i:j]`` slices a
    micro-batch, :meth:`cat` concatenates, :meth:`to` moves, ``torch.save`` / ``torch.load``
    store it (or :meth:`as_dict` / :meth:`from_dict` for a plain dict of tensors).
    """

    idx: Tensor
    logprobs: Tensor
    tail_logmass: Tensor
    k: int

    def __post_init__(self):
        for name, t, dtype in (("idx", self.idx, torch.int32),
                               ("logprobs", self.logprobs, torch.float32),
                               ("tail_logmass", self.tail_logmass, torch.float32)):
            if not isinstance(t, Tensor) or t.dtype != dtype:
                raise TypeError(f"SparseReference.{name} must be a {dtype} tensor, got "
                                f"{getattr(t, 'dtype', type(t).__name__)}")
        if self.idx.dim() < 1 or self.logprobs.shape != self.idx.shape \
                or tuple(self.tail_logmass.shape) != tuple(self.idx.shape[:-1]):
            raise ValueError("SparseReference: idx and logprobs must be [..., K1] and "
                             "tail_logmass [...], got " + ", ".join(
                                 str(tuple(t.shape)) for t in (self.idx, self.logprobs,
                                                               self.tail_logmass)))
        if not (self.idx.device == self.logprobs.device == self.tail_logmass.device):
            raise ValueError("SparseReference: idx, logprobs and tail_logmass must be on one device")
        if isinstance(self.k, bool) or not isinstance(self.k, int) \
                or self.idx.shape[-1] - self.k not in (0, 1) or self.k < 1:
            raise ValueError(f"SparseReference.k must be K1 or K1 − 1 (>= 1), got k={self.k} "
                             f"with K1={self.idx.shape[-1]}")

    # ------------------------------------------------------------------ description
    @property
    def K1(self) -> int:
        return self.idx.shape[-1]

    @property
    def united(self) -> bool:
        """Whether column k holds the sampled token (S~ = support ∪ {o})."""
        return self.K1 == self.k + 1

    @property
    def shape(self) -> torch.Size:
        """The leading dims: one entry per token position."""
        return self.tail_logmass.shape

    @property
    def device(self) -> torch.device:
        return self.idx.device

    @property
    def nbytes(self) -> int:
        """Bytes held: N·K1·8 + N·4."""
        return sum(t.numel() * t.element_size() for t in (self.idx, self.logprobs,
                                                          self.tail_logmass))

    def __len__(self) -> int:
        if not self.shape:
            raise TypeError("len() of a SparseReference of a single position")
        return self.shape[0]

    # ------------------------------------------------------------------ as a batch
    def _map(self, fn) -> "SparseReference":
        return SparseReference(fn(self.idx, True), fn(self.logprobs, True),
                               fn(self.tail_logmass, False), self.k)

    def __getitem__(self, key) -> "SparseReference":
        """Index the leading dims (``ref[2:4]``, ``ref[mask]``); the K1 column stays whole."""
        keys = key if isinstance(key, tuple) else (key,)
        if any(k is Ellipsis for k in keys):
            raise IndexError("SparseReference: index the leading dims only (no Ellipsis)")
        out = self._map(lambda t, _: t[key])
        if out.K1 != self.K1:
            raise IndexError("SparseReference: index the leading dims only")
        return out

    def reshape(self, *shape) -> "SparseReference":
        """A new leading shape (``ref.reshape(-1)``: one row per token)."""
        shape = tuple(shape[0]) if len(shape) == 1 and not isinstance(shape[0], int) else shape
        return self._map(lambda t, has_k: t.reshape(*shape, self.K1) if has_k else t.reshape(shape))

    def to(self, device, non_blocking: bool = False) -> "SparseReference":
        """On another device (dtypes never change)."""
        return self._map(lambda t, _: t.to(device, non_blocking=non_blocking))

    def cpu(self) -> "SparseReference":
        return self.to("cpu")

    def cuda(self, device=None, non_blocking: bool = False) -> "SparseReference":
        return self._map(lambda t, _: t.cuda(device, non_blocking=non_blocking))

    def pin_memory(self) -> "SparseReference":
        return self._map(lambda t, _: t.pin_memory())

    @staticmethod
    def cat(refs: Sequence["SparseReference"], dim: int = 0) -> "SparseReference":
        """Concatenate along a leading dim (e.g. the micro-batches of a rollout buffer)."""
        refs = list(refs)
        if not refs or not all(isinstance(r, SparseReference) for r in refs):
            raise TypeError("SparseReference.cat needs a non-empty sequence of SparseReference")
        if len({(r.k, r.K1) for r in refs}) != 1:
            raise ValueError("SparseReference.cat: every part must have the same k and K1, got "
                             f"{sorted({(r.k, r.K1) for r in refs})}")
        nd = len(refs[0].shape)
        if not -nd <= dim < nd:
            raise IndexError(f"SparseReference.cat: dim must index the {nd} leading dims, got {dim}")
        dim %= nd
        return SparseReference(torch.cat([r.idx for r in refs], dim),
                               torch.cat([r.logprobs for r in refs], dim),
                               torch.cat([r.tail_logmass for r in refs], dim), refs[0].k)

    def token_logprobs(self, sampled_tokens: Tensor) -> Tensor:
        """``log q(o)`` per position, read from the store: all a sampled-token estimator
        (k1, k3, ...) needs of the reference. float32 ``[...]``.

        ``sampled_tokens`` (int ``[...]``): the tokens the store was built with — S~ holds
        each exactly once (column k, or its support column). Rows masked at build time
        (an empty S~) give 0. On the CPU a token missing from its row's S~ is an error.
        """
        if not self.united:
            raise ValueError("this SparseReference was built without sampled_tokens: it holds "
                             "no log q(o)")
        if _checks.per_token(sampled_tokens, self.idx, "sampled_tokens", "int") is None:
            raise TypeError("sampled_tokens must be a torch.Tensor, got None")
        hit = (self.idx == sampled_tokens.unsqueeze(-1)) & (self.idx >= 0)
        if _checks.data_checks_possible(self.idx, sampled_tokens):
            missing = (self.idx >= 0).any(-1) & ~hit.any(-1)
            if missing.any():
                raise ValueError("sampled_tokens differ from those the SparseReference was "
                                 f"built with (row {tuple(missing.nonzero()[0].tolist())})")
        # One hit per row (or none on masked rows): the sum is that entry, exactly.
        return torch.where(hit, self.logprobs, torch.zeros((), device=self.device)).sum(-1)

    def as_dict(self) -> Dict[str, object]:
        """A plain dict (tensors and the int k), e.g. to store beside other rollout data."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @staticmethod
    def from_dict(d: Dict[str, object]) -> "SparseReference":
        return SparseReference(**{f.name: d[f.name] for f in dataclasses.fields(SparseReference)})


if hasattr(torch.serialization, "add_safe_globals"):
    # torch.load(weights_only=True), the default, may then rebuild it.
    torch.serialization.add_safe_globals([SparseReference])


# ---------------------------------------------------------------------- the three calls

def topk_indices(logits: Tensor, k: int, *, temperature: float = 1.0,
                 mask: Optional[Tensor] = None) -> Tensor:
    """The indices of the ``k`` largest logits per row, best first: int32 ``[..., k]``.

    The same S as :func:`topk_kl` takes (ties to the lower index; NaN ranks as −inf, −0 as
    +0), found by the same fused single pass, without the KL. ``temperature`` (> 0) does
    not change the order; it is accepted so that a rollout can pass the one it sampled
    with. ``mask`` (bool or 0/1, ``logits.shape[:-1]``): masked rows are not read and
    give −1.
    No gradient (indices).
    """
    _checks.logits(logits)
    k = _checks.k_value(k, logits.shape[-1])
    _checks.temperature(temperature)
    mask = _checks.mask(mask, logits)
    idx = torch.ops.tike_cuda.topk_indices(logits.detach(), k, _checks.rows(mask, torch.bool))
    return idx.reshape(*logits.shape[:-1], k)


def sparse_reference(ref_logits: Tensor, support: Tensor, *,
                     sampled_tokens: Optional[Tensor] = None, temperature: float = 1.0,
                     mask: Optional[Tensor] = None) -> SparseReference:
    r"""The reference policy ``q = softmax(ref_logits/τ)`` on the fixed support
    ``S~ = support ∪ {o}``, in one pass over each reference row.

    ``support``: integer ``[..., k]`` (leading dims of ``ref_logits``), distinct ids in
    ``[0, V)`` per row — typically :func:`topk_indices` of the rollout policy's logits.
    ``sampled_tokens`` (optional, ``[...]``): ``o`` joins S~ (once: when it is already in
    the support its slot holds −1). Returns a :class:`SparseReference` with
    ``log q_v`` on S~ and ``log t_q = log Σ_{v∉S~} q_v`` taken from a direct sum over the
    tail (so a tail of 1e-12 keeps its digits; never ``1 − Σ_{S~} q``).
    ``temperature``: the τ of the loss. ``mask`` (bool or 0/1 ``[...]``): masked rows
    are not read (nor checked: their support and sampled token may be padding) and hold
    an empty S~.
    The reference is frozen: no gradient flows into ``ref_logits``.
    """
    _checks.logits(ref_logits, "ref_logits")
    mask = _checks.mask(mask, ref_logits)
    support = _checks.support(support, ref_logits, mask)
    sampled_tokens = _checks.tokens(sampled_tokens, ref_logits, "sampled_tokens", mask)
    temperature = _checks.temperature(temperature)
    k = support.shape[-1]
    idx, logprobs, tail = torch.ops.tike_cuda.sparse_reference(
        ref_logits.detach(), support.detach().reshape(-1, k),
        _checks.rows(sampled_tokens, torch.int64), _checks.rows(mask, torch.bool), temperature)
    lead = ref_logits.shape[:-1]
    K1 = idx.shape[-1]
    return SparseReference(idx.reshape(*lead, K1), logprobs.reshape(*lead, K1),
                           tail.reshape(lead), k)


def topk_kl_sparse(logits: Tensor, ref: SparseReference, k, *, sampled_tokens, old_logprobs,
                   temperature, mask, union_sampled, tail, return_stats, inplace_backward):
    """:func:`tike_cuda.topk_kl` with a :class:`SparseReference` as the reference (it
    dispatches here): the same value, statistics and gradient formula with S~ = ``ref.idx``,
    from one pass over each policy row (log-sum-exp, and the policy's tail mass for
    ``tail="bucket"``) and K1 gathers."""
    _checks.logits(logits)
    mask, sampled_tokens, old_logprobs, temperature = _checks.topk_options(
        logits, mask, sampled_tokens, old_logprobs, temperature, union_sampled, tail, return_stats)
    _checks.flag(inplace_backward, "inplace_backward")
    _checks.sparse_ref(ref, logits, k, sampled_tokens, union_sampled, mask)

    K1 = ref.K1
    args = (logits, ref.idx.reshape(-1, K1), ref.logprobs.reshape(-1, K1),
            ref.tail_logmass.reshape(-1), _checks.rows(sampled_tokens, torch.int64),
            _checks.rows(old_logprobs, torch.float32), _checks.rows(mask, torch.bool),
            temperature, tail == "bucket")
    if inplace_backward and logits.requires_grad and torch.is_grad_enabled():
        _inplace.check_target(logits)
        out, stats = _SparseInplaceBackward.apply(*args)
    else:
        outs = _autograd.eager_or_traced(_TopkKlSparse, torch.ops.tike_cuda.topk_kl_sparse)(*args)
        out, stats = outs[0], outs[4]
    shape = logits.shape[:-1]
    out = out.reshape(shape)
    if not return_stats:
        return out
    return out, TopkStats(*(stats[:, i].reshape(shape) for i in range(3)))


# ------------------------------------------------------------ fake kernels and autograd

@torch.library.register_fake("tike_cuda::topk_indices")
def _topk_indices_fake(logits, k, mask):
    return logits.new_empty(logits.numel() // logits.shape[-1], k, dtype=torch.int32)


@torch.library.register_fake("tike_cuda::sparse_reference")
def _sparse_reference_fake(ref_logits, support, sampled_tokens, mask, temperature):
    N = ref_logits.numel() // ref_logits.shape[-1]
    K1 = support.shape[-1] + (1 if sampled_tokens is not None else 0)
    f32 = dict(dtype=torch.float32)
    return (ref_logits.new_empty(N, K1, dtype=torch.int32), ref_logits.new_empty(N, K1, **f32),
            ref_logits.new_empty(N, **f32))


@torch.library.register_fake("tike_cuda::topk_kl_sparse")
def _topk_kl_sparse_fake(logits, idx, ref_logprobs, ref_tail_logmass, sampled_tokens,
                         old_logprobs, mask, temperature, tail_bucket):
    N, K1 = idx.shape
    torch._check(N == logits.numel() // logits.shape[-1])
    f32 = dict(dtype=torch.float32)
    # out [N], lse [N, 2] = (M, ℓ) per row as topk_kl's, coef [N, K1], shift [N], stats [N, 3]
    return (logits.new_empty(N, **f32), logits.new_empty(N, 2, **f32),
            logits.new_empty(N, K1, **f32), logits.new_empty(N, **f32),
            logits.new_empty(N, 3, **f32))


def _setup_context(ctx, inputs, output):
    # Saved as topk_kl saves them, so that its backward serves both: the fused
    # topk_kl_backward with this idx (the gradient formula does not care how S~ was
    # chosen), or its differentiable formula for higher derivatives, which needs only idx,
    # coef, the stats' log p_o and old_logprobs (log q and t_q enter through coef).
    logits, idx, _, _, _, old, mask, temperature, tail_bucket = inputs
    _, lse, coef, shift, stats = output
    saved = (logits, lse, idx, coef, shift, mask, stats, old)
    ctx.save_for_backward(*saved)
    ctx.temperature = temperature
    ctx.tail_bucket = tail_bucket
    return saved


def _backward(ctx, *grads):
    # topk_kl.py imports this module (its dispatch), so its backward is looked up late.
    from .topk_kl import _backward as dense_backward
    return dense_backward(ctx, *grads)


def _jvp(ctx, t_logits, *_unused):
    logits, lse, idx, coef, shift, mask, _, _ = ctx.saved_tensors
    rows = torch.ops.tike_cuda.topk_kl_backward(torch.ones_like(shift), logits, lse, idx, coef,
                                                shift, mask, ctx.temperature)
    return (_autograd.jvp_of_rows(rows, t_logits),) + (None,) * 4


# The op's autograd (what torch.compile sees), its eager Function, the batching rules.
torch.library.register_autograd("tike_cuda::topk_kl_sparse", _backward,
                                setup_context=_setup_context)
_TopkKlSparse = _autograd.op_function("_TopkKlSparse", torch.ops.tike_cuda.topk_kl_sparse,
                                      _setup_context, _backward, _jvp, differentiable=(0,))
_autograd.register_row_vmap("tike_cuda::topk_kl_sparse",
                            (LOGITS, ROWS_K, ROWS_K, ROWS, ROWS, ROWS, ROWS, None, None),
                            (ROWS, ROWS_K, ROWS_K, ROWS, ROWS_K))  # lse: [N, 2]
_autograd.register_row_vmap("tike_cuda::sparse_reference", (LOGITS, ROWS_K, ROWS, ROWS, None),
                            (ROWS_K, ROWS_K, ROWS))
_autograd.register_row_vmap("tike_cuda::topk_indices", (LOGITS, None, ROWS), (ROWS_K,))


class _SparseInplaceBackward(_inplace.TopkKlInplaceBackward):
    """topk_kl_sparse whose backward overwrites the logits buffer with the gradient: the
    forward keeps what topk_kl's in-place variant keeps, whose backward it inherits."""

    @staticmethod
    def forward(ctx, logits, idx, ref_logprobs, ref_tail, tokens, old, mask, temperature,
                tail_bucket):
        out, lse, coef, shift, stats = torch.ops.tike_cuda.topk_kl_sparse(
            logits, idx, ref_logprobs, ref_tail, tokens, old, mask, temperature, tail_bucket)
        ctx.save_for_backward(lse, idx, coef, shift)
        ctx.logits, ctx.mask, ctx.temperature = logits, mask, temperature
        ctx.pending = _inplace._Pending(logits)  # released at backward, or with the graph
        ctx.mark_non_differentiable(stats)
        return out, stats
