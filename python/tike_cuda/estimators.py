"""Per-token KL estimators for RL losses: sampled-token (Schulman / verl) and dense (exact, TIKE).

Notation for one token position with history h: policy p = pi_theta(.|h), reference
q = pi_ref(.|h), sampled token o ~ pi_old(.|h), and the log-ratio of the sampled token

    x = log q(o) - log p(o)

Sampled-token estimators of KL(p || q) (Schulman 2020; names as in verl):

    "k1" / "kl"    -x                       unbiased for o ~ p, high variance, can be < 0
    "abs"          |x|                      biased
    "k2" / "mse"   x^2 / 2                  biased (second-order approximation)
    "k3"           exp(x) - x - 1           unbiased for o ~ p, >= 0 (control variate k1 + (r - 1))
    "low_var_kl"   k3 with x clamped to [-20, 20] and the result to [-10, 10]

Note verl maps its name "k3" to the clamped form; here "k3" is the plain estimator and
"low_var_kl" is verl's clamped one.

Dense estimators (one full row of logits per position):

    "full"         sum_v p_v (log p_v - log q_v)              exact (Rao-Blackwellized) KL
    "tike"         r * sum_{v in S~} p_v (log p_v - log q_v)  paper Eq. 13
    "tike_bucket"  "tike" + t_p log(t_p / t_q)                 tail merged into one outcome

with S~ = top-k(p) U {o}, r = exp(log p(o) - old_logprob) detached (1 without old_logprobs),
t_p = 1 - sum_{S~} p, t_q = 1 - sum_{S~} q.
"""
from __future__ import annotations

import torch

import tike_cuda as _ops  # resolved at call time: the fused ops are defined by the package

from . import _checks

__all__ = ["kl_penalty", "per_token_kl", "canonical_estimator", "KL_KINDS", "ESTIMATORS",
           "SAMPLED_ESTIMATORS", "DENSE_ESTIMATORS", "ALIASES"]

# The one list of estimator names, shared by kl_penalty and per_token_kl (and the CLI).
SAMPLED_ESTIMATORS = ("k1", "abs", "k2", "k3", "low_var_kl")
DENSE_ESTIMATORS = ("full", "tike", "tike_bucket")
ESTIMATORS = SAMPLED_ESTIMATORS + DENSE_ESTIMATORS
ALIASES = {"kl": "k1", "mse": "k2"}  # verl's other names for the same estimators
KL_KINDS = SAMPLED_ESTIMATORS + tuple(ALIASES)  # what kl_penalty accepts


def canonical_estimator(name, *, sampled_only: bool = False, arg: str = "estimator") -> str:
    """The canonical name of an estimator (aliases resolved); ValueError listing the names
    for an unknown one. ``sampled_only``: only the sampled-token estimators (kl_penalty)."""
    allowed = SAMPLED_ESTIMATORS if sampled_only else ESTIMATORS
    if isinstance(name, str) and ALIASES.get(name, name) in allowed:
        return ALIASES.get(name, name)
    aliases = ", ".join(f"{a!r} = {c!r}" for a, c in ALIASES.items())
    raise ValueError(f"{arg} must be one of {', '.join(map(repr, allowed))} (aliases: {aliases}), "
                     f"got {name!r}")


def _check_logprob_pair(logprob, ref_logprob):
    for name, t in (("logprob", logprob), ("ref_logprob", ref_logprob)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if ref_logprob.shape != logprob.shape:
        raise ValueError(f"ref_logprob has shape {tuple(ref_logprob.shape)}, "
                         f"expected logprob's shape {tuple(logprob.shape)}")
    if ref_logprob.dtype != logprob.dtype:
        raise ValueError(f"ref_logprob has dtype {ref_logprob.dtype}, expected logprob's "
                         f"dtype {logprob.dtype}")
    if ref_logprob.device != logprob.device:
        raise ValueError(f"ref_logprob is on {ref_logprob.device}, expected {logprob.device}")


def kl_penalty(logprob: torch.Tensor, ref_logprob: torch.Tensor, kind: str) -> torch.Tensor:
    """Sampled-token KL estimate from the two models' log-probs of the sampled token.

    With ``x = ref_logprob - logprob`` (= log q(o) - log p(o)):

    ============== ====================================================
    kind           value
    ============== ====================================================
    "k1", "kl"     ``-x``
    "abs"          ``|x|``
    "k2", "mse"    ``x**2 / 2``
    "k3"           ``exp(x) - x - 1``
    "low_var_kl"   ``clamp(exp(x_c) - x_c - 1, -10, 10)``, ``x_c = clamp(x, -20, 20)``
    ============== ====================================================

    For ``o ~ p``, E[k1] = E[k3] = KL(p || q); k2 and abs are biased. Gradients flow into
    both arguments as written (detach ``ref_logprob`` for a frozen reference).

    Computed in at least float32 (a bfloat16 ``exp(x) - x - 1`` would cancel to zero for
    small x) and returned in that dtype, same shape as the inputs.

    Raises ValueError for an unknown ``kind`` or mismatched shape/dtype/device.
    """
    kind = canonical_estimator(kind, sampled_only=True, arg="kind")
    _check_logprob_pair(logprob, ref_logprob)
    dtype = torch.promote_types(logprob.dtype, torch.float32)
    lp, lq = logprob.to(dtype), ref_logprob.to(dtype)
    if kind == "k1":
        return lp - lq
    if kind == "abs":
        return (lp - lq).abs()
    if kind == "k2":
        return 0.5 * (lp - lq).square()
    x = lq - lp
    if kind == "k3":
        # expm1 keeps exp(x) - 1 accurate for the small |x| typical of a near-reference policy
        return torch.expm1(x) - x
    x = x.clamp(-20.0, 20.0)
    return (torch.expm1(x) - x).clamp(-10.0, 10.0)


def per_token_kl(logits: torch.Tensor, ref_logits: torch.Tensor, estimator: str, *,
                 sampled_tokens: torch.Tensor | None = None,
                 old_logprobs: torch.Tensor | None = None, k: int = 16,
                 temperature: float = 1.0, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token KL(pi_theta || pi_ref) estimate from logits, one value per position.

    ``logits``, ``ref_logits``: ``[..., V]``; the result is float32 of shape
    ``logits.shape[:-1]`` and differentiable with respect to ``logits`` only (the
    reference is frozen: ``ref_logits`` never receives a gradient).

    estimator:
      * "k1", "abs", "k2", "k3", "low_var_kl": :func:`kl_penalty` of
        ``log p(o)`` and ``log q(o)``, both from the fused ``token_logprobs`` op (no
        ``[..., V]`` log-softmax is materialised). Need ``sampled_tokens``. These follow
        verl and carry no importance weight, so ``old_logprobs`` is not used.
      * "full": exact ``sum_v p_v (log p_v - log q_v)`` (``full_kl``).
      * "tike": ``topk_kl(tail="none")``, paper Eq. 13: ``r * sum_{S~} p_v L_v``.
      * "tike_bucket": ``topk_kl(tail="bucket")``: adds ``t_p log(t_p / t_q)`` so the
        value is the KL of the (S~, tail) coarse-graining and the gradient vanishes at p = q.
      ``sampled_tokens`` (optional for the dense estimators) joins S~; ``old_logprobs``
      (rollout log-probs of the sampled tokens) gives TIKE its importance weight r.

    ``estimator`` also accepts verl's aliases "kl" (= "k1") and "mse" (= "k2"), as
    :func:`kl_penalty` does.

    ``mask`` (bool, or 0/1 integer/float, ``logits.shape[:-1]``): masked positions give 0
    and a zero gradient; their ``sampled_tokens`` may be padding (e.g. -100) and are not
    looked up.
    """
    estimator = canonical_estimator(estimator)
    if estimator == "full":
        return _ops.full_kl(logits, ref_logits, temperature=temperature, mask=mask)
    if estimator in ("tike", "tike_bucket"):
        return _ops.topk_kl(logits, ref_logits, k, sampled_tokens=sampled_tokens,
                            old_logprobs=old_logprobs, temperature=temperature, mask=mask,
                            tail="bucket" if estimator == "tike_bucket" else "none")
    if sampled_tokens is None:
        raise ValueError(f"sampled_tokens is required for estimator {estimator!r}")
    _checks.logits(logits)
    _checks.logits(ref_logits, "ref_logits")  # its own dtype is fine: only log q(o) is read
    if ref_logits.shape != logits.shape:
        raise ValueError(f"ref_logits must have the logits' shape {tuple(logits.shape)}, got "
                         f"{tuple(ref_logits.shape)}")
    logp = _ops.token_logprobs(logits, sampled_tokens, temperature=temperature, mask=mask)
    ref_logp = _ops.token_logprobs(ref_logits.detach(), sampled_tokens, temperature=temperature,
                                   mask=mask)
    # Masked positions: both log-probs are 0 there, and every estimator is 0 at x = 0.
    return kl_penalty(logp.float(), ref_logp.float(), estimator)
