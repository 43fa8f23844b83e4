"""The GRPO loss with a TIKE (or any) KL penalty straight from hidden states: the LM head is
fused into the loss, chunk by chunk, so the N×V logits of neither model are ever held.

    loss_fn = tike_cuda.FusedLinearGRPOLoss(beta=1e-3, kl_estimator="tike", k=16)
    loss, metrics = loss_fn(hidden, lm_head.weight, responses, old_logprobs, advantages,
                            response_mask, ref_hidden, ref_lm_head.weight)

equals, in value and gradients, :func:`unfused_linear_grpo_loss` (logits = hidden @ W^T,
then ``token_logprobs`` + ``per_token_kl`` + ``grpo.grpo_loss``). For any other loss,
:func:`fused_linear_logprobs_kl` gives the per-token log-probs and KL the same way. The
chunk machinery is in ``_fused_head``.
"""
from __future__ import annotations

import numbers
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _checks, grpo
from ._fused_head import GRADIENT_MODES, _Batch, _GradInForward, _Recompute, _Settings
from .estimators import ESTIMATORS, SAMPLED_ESTIMATORS, kl_penalty, per_token_kl
from .sparse import SparseReference
from .token_logprobs import token_logprobs

__all__ = ["FusedLinearGRPOLoss", "fused_linear_grpo_loss", "fused_linear_logprobs_kl",
           "FusedTokenOutputs", "unfused_linear_grpo_loss", "chunk_rows", "DEFAULT_MEMORY_BUDGET",
           "GRADIENT_MODES"]

# Bytes of logits-sized chunk buffers held at once when chunk_size is not given.
DEFAULT_MEMORY_BUDGET = 256 << 20
# Logits-sized buffers alive at once per chunk: TIKE needs both models' logits together
# (its backward then runs in place over the policy's); the sampled-token estimators read
# the reference chunk, drop it, then the policy's; "full"'s backward re-reads both and
# writes a fresh gradient.
_CHUNK_BUFFERS = {"tike": 2, "tike_bucket": 2, "full": 3, None: 1}


# ----------------------------------------------------------------------------- checks

def _tensor(x, name: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def _head(hidden, weight, bias, which: str):
    """One model's (hidden [B, T, H] or [N, H], weight [V, H], bias [V] or None)."""
    h, w = f"{which}hidden", f"{which}weight"
    _checks.logits(_tensor(hidden, h), h)
    if hidden.dim() not in (2, 3):
        raise ValueError(f"{h} must be [B, T, H] or [N, H], got {tuple(hidden.shape)}")
    _tensor(weight, w)
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"{w} must be [V, H] with H = {h}.shape[-1] = {hidden.shape[-1]}, "
                         f"got {tuple(weight.shape)}")
    if bias is not None:
        _tensor(bias, f"{which}bias")
    for name, t in ((w, weight), (f"{which}bias", bias)):
        if t is None:
            continue
        if t.dtype != hidden.dtype:
            raise TypeError(f"{name} must have {h}'s dtype {hidden.dtype}, got {t.dtype}")
        if t.device != hidden.device:
            raise ValueError(f"{name} must be on {h}'s device {hidden.device}, got {t.device}")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"{which}bias must be [V] = [{weight.shape[0]}], got {tuple(bias.shape)}")


def _per_token(x, shape, device, name: str, kind: str) -> Tensor:
    _tensor(x, name)
    ok = {"int": not x.dtype.is_floating_point and not x.dtype.is_complex and x.dtype != torch.bool,
          "float": x.dtype.is_floating_point, "mask": not x.dtype.is_complex}[kind]
    if not ok:
        want = {"int": "an integer", "float": "a floating", "mask": "a bool or 0/1"}[kind]
        raise TypeError(f"{name} must have {want} dtype, got {x.dtype}")
    if x.shape != shape:
        raise ValueError(f"{name} must have shape {tuple(shape)} (the response tokens' [B, T]), "
                         f"got {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{name} must be on the hidden states' device {device}, got {x.device}")
    return x


def _number(x, name: str, lo: float = 0.0) -> float:
    if isinstance(x, bool) or not isinstance(x, numbers.Real) or not x == x or not lo <= x < float("inf"):
        raise ValueError(f"{name} must be a finite number >= {lo}, got {x!r}")
    return float(x)


def _check_all(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, tokens, old_logprobs,
               advantages, response_mask, grpo_inputs: bool):
    _head(hidden, weight, bias, "")
    _tensor(tokens, "sampled_tokens")
    if tokens.dim() != 2:
        raise ValueError(f"sampled_tokens must be [B, T], got {tuple(tokens.shape)}")
    B, T = tokens.shape
    rows = hidden.shape[:-1]
    if rows != (B, T) and rows != (B * T,):
        raise ValueError(f"hidden must be [B, T, H] = [{B}, {T}, H] or [B·T, H] = [{B * T}, H] "
                         f"(sampled_tokens is [B, T]), got {tuple(hidden.shape)}")
    dev = hidden.device
    _per_token(tokens, (B, T), dev, "sampled_tokens", "int")
    _per_token(response_mask, (B, T), dev, "response_mask", "mask")
    if grpo_inputs or old_logprobs is not None:
        _per_token(old_logprobs, (B, T), dev, "old_logprobs", "float")
    if grpo_inputs:
        _tensor(advantages, "advantages")
        if advantages.shape not in ((B,), (B, T)) or not advantages.dtype.is_floating_point:
            raise ValueError(f"advantages must be a floating [B] = [{B}] or [B, T] tensor, got "
                             f"{advantages.dtype} {tuple(advantages.shape)}")
    if ref_hidden is None and ref_weight is None:
        return
    if ref_hidden is None or ref_weight is None:
        raise ValueError("ref_hidden and ref_weight go together (both, or neither with beta=0)")
    for name, t in (("ref_weight", ref_weight), ("ref_bias", ref_bias)):
        if isinstance(t, Tensor) and t.requires_grad:
            raise ValueError(f"{name} requires grad, but the reference model is frozen: pass "
                             f"{name}.detach() (is it the policy's own parameter by mistake?)")
    _head(ref_hidden, ref_weight, ref_bias, "ref_")
    if ref_hidden.shape[:-1] != rows:
        raise ValueError(f"ref_hidden must have hidden's leading dims {tuple(rows)}, got "
                         f"{tuple(ref_hidden.shape)}")
    if ref_weight.shape[0] != weight.shape[0]:
        raise ValueError(f"ref_weight has V = {ref_weight.shape[0]} rows, the policy's weight "
                         f"{weight.shape[0]}: the two models must share the vocabulary")
    if ref_hidden.dtype != hidden.dtype or ref_hidden.device != dev:
        raise ValueError(f"ref_hidden must have hidden's dtype and device ({hidden.dtype}, {dev}), "
                         f"got ({ref_hidden.dtype}, {ref_hidden.device})")


def _check_sparse_ref(sparse_ref, ref_hidden, kl_estimator, k, tokens, mask, V):
    """A SparseReference standing in for the reference head: it must describe the response
    tokens' [B, T] and hold S~ ∪ {o}. Returns the k to use (the store's)."""
    if not isinstance(sparse_ref, SparseReference):
        raise TypeError(f"sparse_ref must be a tike_cuda.SparseReference or None, got "
                        f"{type(sparse_ref).__name__}")
    if ref_hidden is not None:  # (_check_all: ref_weight comes with it)
        raise ValueError("pass the reference either as ref_hidden/ref_weight or as sparse_ref, "
                         "not both")
    if kl_estimator == "full":
        raise ValueError("kl_estimator='full' needs the reference's whole distribution; a "
                         "sparse_ref holds it on S~ only (use 'tike', 'tike_bucket' or a "
                         "sampled-token estimator)")
    if tuple(sparse_ref.shape) != tuple(tokens.shape) or sparse_ref.device != tokens.device:
        raise ValueError(f"sparse_ref must describe the response tokens: shape "
                         f"{tuple(tokens.shape)} on {tokens.device}, got "
                         f"{tuple(sparse_ref.shape)} on {sparse_ref.device}")
    if not sparse_ref.united:
        raise ValueError("sparse_ref must be built with sampled_tokens (S~ = support ∪ {o})")
    # k, the ids and the tokens, as topk_kl checks a store (a zero-size view stands in for
    # the [B, T, V] logits this path never holds)
    _checks.sparse_ref(sparse_ref, torch.empty((), device=tokens.device).expand(*tokens.shape, V),
                       k, tokens, True, _checks.as_bool_mask(mask, "response_mask"))
    return sparse_ref.k


def chunk_rows(V: int, dtype: torch.dtype, kl_estimator: Optional[str],
               memory_budget: int = DEFAULT_MEMORY_BUDGET) -> int:
    """Rows per chunk so that the chunk's logits-sized buffers fit in ``memory_budget`` bytes
    (at least 1; a multiple of 64 from 128 rows up, for the matmuls)."""
    per_row = _CHUNK_BUFFERS.get(kl_estimator, 1) * V * torch.empty((), dtype=dtype).element_size()
    rows = max(1, memory_budget // per_row)
    return rows - rows % 64 if rows >= 128 else rows


# ----------------------------------------------------------------------------- API

class FusedTokenOutputs(NamedTuple):
    """Per-token ``[B, T]`` float32 outputs of :func:`fused_linear_logprobs_kl` (None where not
    computed); 0 at masked positions."""
    logprobs: Tensor
    kl: Optional[Tensor]
    entropy: Optional[Tensor]
    topk_mass: Optional[Tensor]


def _setup(hidden, weight, sampled_tokens, response_mask, old_logprobs, advantages, agg_weight,
           ref_hidden, kl_estimator, k, temperature, return_entropy, chunk_size, memory_budget,
           beta=0.0, clip_eps=0.2, clip_eps_high=None, sparse_ref=None):
    """The checked settings and the response rows' per-token inputs (the one host sync)."""
    est = _checks.choice(kl_estimator, "kl_estimator", ESTIMATORS) \
        if ref_hidden is not None or sparse_ref is not None else None
    temperature = _checks.temperature(temperature)
    V = weight.shape[0]
    k = _checks.k_value(k, V) if sparse_ref is None else \
        _check_sparse_ref(sparse_ref, ref_hidden, est, k, sampled_tokens, response_mask, V)
    _checks.flag(return_entropy, "return_entropy")
    if chunk_size is None:
        if isinstance(memory_budget, bool) or not isinstance(memory_budget, numbers.Integral) \
                or memory_budget < 1:
            raise ValueError(f"memory_budget must be a positive int (bytes), got {memory_budget!r}")
        # with a store, no reference chunk is ever formed: the policy's alone
        chunk_size = chunk_rows(V, hidden.dtype, None if sparse_ref is not None else est,
                                int(memory_budget))
    elif isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int (rows) or None, got {chunk_size!r}")
    B, T = sampled_tokens.shape
    flat = (response_mask if response_mask.dtype == torch.bool else response_mask != 0).reshape(-1)
    where = flat.nonzero()[:, 0]  # the one host sync: how many rows to compute
    if where.numel() == flat.numel():
        where = None
    take = (lambda x: x.reshape(-1)) if where is None else (lambda x: x.reshape(-1)[where])
    tok = take(sampled_tokens).long()
    if tok.numel() and tok.device.type == "cpu":
        lo, hi = int(tok.min()), int(tok.max())
        if lo < 0 or hi >= V:
            raise ValueError(f"sampled_tokens must be in [0, V={V}) at response positions, got "
                             f"values in [{lo}, {hi}]")
    zeros = torch.zeros(B, T, device=hidden.device)
    adv = zeros if advantages is None else \
        (advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages).expand(B, T)
    cfg = _Settings(beta, clip_eps, clip_eps_high, temperature, est, k, return_entropy,
                    int(chunk_size))
    sref = None if sparse_ref is None else sparse_ref.reshape(-1)
    return _Batch(cfg, tok, None if old_logprobs is None else take(old_logprobs.detach()),
                  take(adv.detach()), take(zeros if agg_weight is None else agg_weight),
                  where, B * T, (), sref if where is None or sref is None else sref[where]), flat


def _needs(*tensors) -> tuple:
    grad_on = torch.is_grad_enabled()
    return tuple(bool(grad_on and t is not None and t.requires_grad) for t in tensors)


def _recomputed(bt: _Batch, flat: Tensor, heads, shape):
    """Per-token (log p(o), KL, entropy, top-k mass) through _Recompute, the sampled-token
    estimators' penalty formed as per_token_kl forms it."""
    lp, kl, ent, mass = _Recompute.apply(*heads, bt)
    est = bt.cfg.kl_estimator
    if est in SAMPLED_ESTIMATORS:  # kl holds log q(o)
        kl = torch.where(flat, kl_penalty(lp, kl, est), torch.zeros_like(lp))
    view = lambda x: x.view(shape) if x.numel() else None
    return FusedTokenOutputs(lp.view(shape), view(kl), view(ent), view(mass))


def fused_linear_logprobs_kl(hidden: Tensor, weight: Tensor, sampled_tokens: Tensor,
                             response_mask: Tensor, ref_hidden: Optional[Tensor] = None,
                             ref_weight: Optional[Tensor] = None, *, bias: Optional[Tensor] = None,
                             ref_bias: Optional[Tensor] = None, kl_estimator: str = "tike",
                             k: int = 16, temperature: float = 1.0,
                             old_logprobs: Optional[Tensor] = None, return_entropy: bool = False,
                             chunk_size: Optional[int] = None,
                             memory_budget: int = DEFAULT_MEMORY_BUDGET,
                             sparse_ref: Optional[SparseReference] = None) -> FusedTokenOutputs:
    """Per-token ``log p(o)`` and KL from the hidden states, for any loss built on them.

    The same values and gradients as ``token_logprobs(logits, tokens)`` and
    ``per_token_kl(logits, ref_logits, kl_estimator, ..., mask=response_mask)`` on the full
    logits, never holding more than a chunk of rows of them: the forward keeps O(N·k)
    kernel outputs, the backward recomputes each chunk's policy logits (and, for "full",
    the reference's). Arguments as :func:`fused_linear_grpo_loss`; ``old_logprobs``
    (optional) gives TIKE its importance weight, as in ``per_token_kl``. Without a
    reference, ``kl`` is None. ``entropy`` (with ``return_entropy``) and ``topk_mass``
    (Σ_{S~} p_v, for "tike"/"tike_bucket") are detached. Returns :class:`FusedTokenOutputs`.

    ``sparse_ref`` (a :class:`tike_cuda.SparseReference` ``[B, T]`` built with the sampled
    tokens, instead of ``ref_hidden``/``ref_weight``): the reference as stored on a fixed
    S~ — "tike"/"tike_bucket" then equal ``topk_kl(logits, sparse_ref, ...)`` (S~ and k
    the store's), a sampled-token estimator reads ``log q(o)`` from it; "full" is refused.
    No reference head is read, and only the policy's chunk of logits is ever formed.
    """
    _check_all(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, sampled_tokens,
               old_logprobs, None, response_mask, grpo_inputs=False)
    bt, flat = _setup(hidden, weight, sampled_tokens, response_mask, old_logprobs, None, None,
                      ref_hidden, kl_estimator, k, temperature, return_entropy, chunk_size,
                      memory_budget, sparse_ref=sparse_ref)
    bt.need = _needs(hidden, weight, bias)
    return _recomputed(bt, flat, (hidden, weight, bias, ref_hidden, ref_weight, ref_bias),
                       sampled_tokens.shape)


def fused_linear_grpo_loss(hidden: Tensor, weight: Tensor, sampled_tokens: Tensor,
                           old_logprobs: Tensor, advantages: Tensor, response_mask: Tensor,
                           ref_hidden: Optional[Tensor] = None, ref_weight: Optional[Tensor] = None,
                           *, bias: Optional[Tensor] = None, ref_bias: Optional[Tensor] = None,
                           beta: float = 1e-3, clip_eps: float = 0.2,
                           clip_eps_high: Optional[float] = None,
                           loss_agg_mode: str = "token-mean",
                           loss_scale_factor: Optional[float] = None, temperature: float = 1.0,
                           kl_estimator: str = "tike", k: int = 16, return_entropy: bool = False,
                           chunk_size: Optional[int] = None,
                           memory_budget: int = DEFAULT_MEMORY_BUDGET,
                           gradient: str = "in_forward"):
    r"""GRPO loss with a per-token KL penalty from the two models' last hidden states.

    The same ``(loss, metrics)`` — values and gradients to ``hidden``, ``weight`` and
    ``bias`` — as :func:`unfused_linear_grpo_loss`, i.e. ``grpo.grpo_loss`` fed by
    ``token_logprobs`` and ``per_token_kl`` on the full logits ``hidden @ weight^T + bias``
    (and ``ref_hidden @ ref_weight^T + ref_bias``), but computed over chunks of
    ``chunk_size`` response rows: at most one chunk of logits per model is alive at a
    time. Per chunk the policy logits are read once by the fused kernels for log p(o) and
    the KL (``topk_kl`` gives both; ``return_entropy`` adds one ``token_logprobs`` read
    for the dense estimators), the reference chunk once; the gradient over the policy chunk
    is written in place over it (``topk_kl_backward_``, with log p(o)'s gradient folded
    into its per-row coefficients), except for ``"full"`` whose backward re-reads both.

    Shapes: ``sampled_tokens``, ``old_logprobs``, ``response_mask`` are ``[B, T]``;
    ``advantages`` ``[B]`` or ``[B, T]``; ``hidden`` ``[B, T, H]`` or ``[B·T, H]``;
    ``weight`` ``[V, H]``, ``bias`` ``[V]``; the reference's likewise (its H may differ,
    V may not). ``response_mask`` is bool or 0/1; masked rows are skipped entirely (their
    ``sampled_tokens`` may be padding such as -100) — finding them is one host sync.
    ``ref_hidden``/``ref_weight`` may be omitted when ``beta == 0``. The reference is
    frozen: ``ref_hidden`` is detached, and a ``ref_weight``/``ref_bias`` that requires
    grad is refused (a reference sharing the policy's parameter is a bug).

    Settings: as ``grpo.grpo_loss`` (``beta``, ``clip_eps``, ``clip_eps_high``,
    ``loss_agg_mode`` — any of ``grpo.AGG_MODES``, all linear in the per-token loss,
    which the fused gradient relies on —, and ``loss_scale_factor``, passed on only when
    given, for the modes that take it) and ``per_token_kl`` (``kl_estimator`` — any of
    ``estimators.ESTIMATORS`` —, ``k``, ``temperature``). ``return_entropy`` adds
    ``metrics["entropy"]``, the entropy aggregated with ``loss_agg_mode``.

    ``chunk_size`` (rows) defaults to :func:`chunk_rows` of ``memory_budget`` bytes of
    logits-sized buffers. Peak extra memory: those buffers, O(N·k) per-token values, and
    the gradients themselves (``hidden``'s and ``weight``'s, accumulated in their dtype).

    ``gradient="in_forward"`` (default) forms the gradient inside the forward, chunk by
    chunk, and the backward scales it by the upstream gradient: 3 policy-head matmuls per
    chunk. ``"recompute"`` recomputes each chunk's logits in the backward (4 matmuls, and
    "full" recomputes the reference's too) but holds no gradient between forward and
    backward and supports a second backward with ``retain_graph=True``. Eager only.
    """
    _check_all(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, sampled_tokens,
               old_logprobs, advantages, response_mask, grpo_inputs=True)
    _checks.choice(kl_estimator, "kl_estimator", ESTIMATORS)
    beta = _number(beta, "beta")
    if ref_hidden is None and beta != 0:
        raise ValueError("ref_hidden and ref_weight are required when beta != 0")
    _number(clip_eps, "clip_eps")
    if clip_eps_high is not None:
        _number(clip_eps_high, "clip_eps_high")
    _checks.choice(loss_agg_mode, "loss_agg_mode", grpo.AGG_MODES)
    agg = _agg_kwargs(loss_agg_mode, loss_scale_factor)
    _checks.choice(gradient, "gradient", GRADIENT_MODES)
    B, T = sampled_tokens.shape
    with torch.enable_grad():  # the aggregation's per-token weights d agg / d loss_bt
        probe = torch.zeros(B, T, dtype=torch.float32, device=hidden.device, requires_grad=True)
        agg_w, = torch.autograd.grad(grpo.aggregate(probe, response_mask, **agg), probe)
    bt, flat = _setup(hidden, weight, sampled_tokens, response_mask, old_logprobs, advantages,
                      agg_w, ref_hidden, kl_estimator, k, temperature, return_entropy,
                      chunk_size, memory_budget, beta, clip_eps, clip_eps_high)
    bt.need = _needs(hidden, weight, bias)
    heads = (hidden, weight, bias, ref_hidden, ref_weight, ref_bias)
    kl_of = lambda kl: None if ref_hidden is None else kl.view(B, T)

    def finish(lp, kl):
        return grpo.grpo_loss(lp.view(B, T), old_logprobs, advantages, kl_of(kl), response_mask,
                              beta, clip_eps, clip_eps_high=clip_eps_high, **_loss_kwargs(agg))

    if gradient == "in_forward":
        loss, lp, kl, ent, _ = _GradInForward.apply(*heads, bt, lambda lp, kl: finish(lp, kl)[0])
        with torch.no_grad():
            metrics = finish(lp, kl)[1]
        metrics["loss"] = loss.detach()
    else:
        lp, kl, ent, _ = _recomputed(bt, flat, heads, (B, T))
        loss, metrics = finish(lp, kl)
    if return_entropy:
        metrics["entropy"] = grpo.aggregate(ent.view(B, T), response_mask, **agg).detach()
    return loss, metrics



def _agg_kwargs(mode: str, loss_scale_factor) -> dict:
    """grpo.aggregate's keywords; loss_scale_factor only when given."""
    if loss_scale_factor is None:
        return dict(mode=mode)
    return dict(mode=mode, loss_scale_factor=_number(loss_scale_factor, "loss_scale_factor", 1e-30))


def _loss_kwargs(agg: dict) -> dict:
    """The same for grpo.grpo_loss, which names the mode loss_agg_mode."""
    out = dict(agg, loss_agg_mode=agg["mode"])
    del out["mode"]
    return out


def unfused_linear_grpo_loss(hidden: Tensor, weight: Tensor, sampled_tokens: Tensor,
                             old_logprobs: Tensor, advantages: Tensor, response_mask: Tensor,
                             ref_hidden: Optional[Tensor] = None,
                             ref_weight: Optional[Tensor] = None, *, bias=None, ref_bias=None,
                             beta: float = 1e-3, clip_eps: float = 0.2, clip_eps_high=None,
                             loss_agg_mode: str = "token-mean", loss_scale_factor=None,
                             temperature: float = 1.0, kl_estimator: str = "tike", k: int = 16,
                             return_entropy: bool = False):
    """What :func:`fused_linear_grpo_loss` computes, written the plain way: full ``[B, T, V]``
    logits of both models, then ``token_logprobs`` + ``per_token_kl`` + ``grpo.grpo_loss``.
    The specification the fused form is tested against, and the benchmark's baseline."""
    B, T = sampled_tokens.shape
    mask = response_mask if response_mask.dtype == torch.bool else response_mask != 0
    tokens = torch.where(mask, sampled_tokens, torch.zeros_like(sampled_tokens))
    logits = F.linear(hidden.reshape(B, T, -1), weight, bias)
    out = token_logprobs(logits, tokens, temperature=temperature, return_entropy=return_entropy)
    logprobs, entropy = out if return_entropy else (out, None)
    kl = None
    if ref_hidden is not None:
        ref_logits = F.linear(ref_hidden.reshape(B, T, -1).detach(), ref_weight, ref_bias)
        kl = per_token_kl(logits, ref_logits, kl_estimator, sampled_tokens=tokens,
                          old_logprobs=old_logprobs, k=k, temperature=temperature, mask=mask)
    agg = _agg_kwargs(loss_agg_mode, loss_scale_factor)
    loss, metrics = grpo.grpo_loss(logprobs, old_logprobs, advantages, kl, response_mask, beta,
                                   clip_eps, clip_eps_high=clip_eps_high, **_loss_kwargs(agg))
    if return_entropy:
        metrics["entropy"] = grpo.aggregate(entropy.detach(), response_mask, **agg)
    return loss, metrics


class FusedLinearGRPOLoss(torch.nn.Module):
    """:func:`fused_linear_grpo_loss` with its settings held:

        loss_fn = FusedLinearGRPOLoss(beta=1e-3, kl_estimator="tike", k=16)
        loss, metrics = loss_fn(hidden, lm_head.weight, tokens, old_logprobs, advantages,
                                response_mask, ref_hidden, ref_lm_head.weight)
    """

    def __init__(self, *, beta: float = 1e-3, clip_eps: float = 0.2,
                 clip_eps_high: Optional[float] = None, loss_agg_mode: str = "token-mean",
                 loss_scale_factor: Optional[float] = None, temperature: float = 1.0, kl_estimator: str = "tike", k: int = 16,
                 return_entropy: bool = False, chunk_size: Optional[int] = None,
                 memory_budget: int = DEFAULT_MEMORY_BUDGET, gradient: str = "in_forward"):
        super().__init__()
        self.settings = dict(beta=beta, clip_eps=clip_eps, clip_eps_high=clip_eps_high,
                             loss_agg_mode=loss_agg_mode,
                             loss_scale_factor=loss_scale_factor, temperature=temperature,
                             kl_estimator=kl_estimator, k=k, return_entropy=return_entropy,
                             chunk_size=chunk_size, memory_budget=memory_budget,
                             gradient=gradient)

    def forward(self, hidden, weight, sampled_tokens, old_logprobs, advantages, response_mask,
                ref_hidden=None, ref_weight=None, bias=None, ref_bias=None):
        return fused_linear_grpo_loss(hidden, weight, sampled_tokens, old_logprobs, advantages,
                                      response_mask, ref_hidden, ref_weight, bias=bias,
                                      ref_bias=ref_bias, **self.settings)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.settings.items())
