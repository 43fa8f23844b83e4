"""Seeded LM-like policy/reference logits for demos, tests and the variance study.

Each row (token position) is a Zipf law over the vocabulary with its own exponent,
placed on the vocabulary by a row-dependent permutation, plus log-normal jitter
(Gaussian in logit space):

    z_v = -a * log(rank_v) + b * [rank_v = 1] + s * eps_v,      eps_v ~ N(0, 1), s = 0.5

Rows mix three regimes so the top-16 mass spans the paper's audit (Table 2):
peaked (a in [2.6, 4], a boosted top-1: m_16 > 0.99, low entropy), medium (a in [1.7, 2.6])
and flat (a in [1.15, 1.7]: m_16 well below 0.9, entropy of several nats). The jitter
eps is read from a shared N(0, 1) vector through a random per-row window (a copy
instead of a fresh Box-Muller per entry).

The reference is the policy perturbed as a fine-tuned model would be, in logit space:

    zr_v = z_v + sigma * eps'_v + delta * [rank_v <= 4]

(sigma log-uniform in [0.05, 0.35] per row, delta ~ N(0, 0.25^2) per row). With the
regime mix 38 % peaked / 32 % medium / 30 % flat this gives, at V = 151,936, a per-token
KL(p || q) with median ~3e-3 and 95th percentile ~4e-2 (confident positions far lower),
mean m_16 ~0.91, and tail residuals of the paper's size: mean |xi_tail| ~3e-4 where
m_16 >= 0.99 and ~3e-2 where m_16 < 0.9 (mean entropy ~4 nats there).

Sampled tokens are drawn from the policy (inverse CDF in float64), and the rollout
log-probs are the policy's plus N(0, 0.02^2) noise, the size of a rollout
engine's numerical mismatch, so the TIKE importance weight is close to but not 1.

Everything is generated on the CPU from one ``torch.Generator`` in chunks of rows
(bounded temporaries), so a seed gives the same tensors on every machine.
"""
from __future__ import annotations

import math

import torch

__all__ = ["QWEN_VOCAB", "synthetic_batch", "synthetic_sequences"]

QWEN_VOCAB = 151_936  # Qwen2.5's padded lm_head width


def _row_params(n, gen):
    u = torch.rand(n, generator=gen, dtype=torch.float64)
    v = torch.rand(n, generator=gen, dtype=torch.float64)
    peaked, flat = u < 0.38, u >= 0.70
    a = torch.where(peaked, 2.6 + 1.4 * v, torch.where(flat, 1.15 + 0.55 * v, 1.7 + 0.9 * v))
    boost = torch.where(peaked, 1.0 + 4.0 * torch.rand(n, generator=gen, dtype=torch.float64),
                        torch.zeros(n, dtype=torch.float64))
    sigma = torch.exp(math.log(0.05) + math.log(7.0) * torch.rand(n, generator=gen,
                                                                   dtype=torch.float64))
    delta = 0.25 * torch.randn(n, generator=gen, dtype=torch.float64)
    shift = torch.randint(0, 1 << 30, (n,), generator=gen)
    return a, boost, sigma, delta, shift


def _rolled_rows(src, shifts, out):
    """out[i] = roll(src[i], shifts[i]) (src may be a single broadcast row)."""
    V = out.shape[1]
    for i, sh in enumerate(shifts.tolist()):
        row = src[i if src.shape[0] > 1 else 0]
        out[i, sh:] = row[:V - sh]
        out[i, :sh] = row[V - sh:]
    return out


def _fill_rows(logits, ref_logits, tokens, old_lp, gen, ctx):
    perm, log_rank, jitter, noise, top4 = ctx
    n, V = logits.shape
    a, boost, sigma, delta, shift = _row_params(n, gen)
    shift = shift % V
    off = torch.randint(0, V, (2, n), generator=gen)
    # rows of a shared noise vector seen through per-row random windows: as good as fresh
    # N(0, 1) draws for these statistics, at the cost of a copy instead of a Box-Muller
    prof = torch.stack([noise[o:o + V] for o in off[0].tolist()])
    prof.mul_(jitter).sub_(a[:, None].float() * log_rank)
    prof[:, 0] += boost.float()
    # z[i, v] = prof[i, rank of v], ranks placed by a shared permutation rolled per row
    z = _rolled_rows(prof.index_select(1, perm), shift, logits)
    zr = torch.stack([noise[o:o + V] for o in off[1].tolist()]).mul_(sigma[:, None].float())
    zr.add_(z)
    zr.add_(_rolled_rows(top4, shift, prof).mul_(delta[:, None].float()))
    ref_logits.copy_(zr)
    # inverse-CDF draw o ~ softmax(z), cumulated in float64 so the tail keeps its mass
    lse = torch.logsumexp(z, dim=1, keepdim=True)
    cdf = torch.cumsum(torch.exp(z - lse).double(), dim=1)
    u = torch.rand(n, 1, generator=gen, dtype=torch.float64) * cdf[:, -1:]
    o = torch.searchsorted(cdf, u).squeeze(1).clamp_max(V - 1)
    lp_o = z.gather(1, o[:, None]).squeeze(1) - lse.squeeze(1)
    tokens.copy_(o)
    old_lp.copy_(lp_o + 0.02 * torch.randn(n, generator=gen))


def synthetic_batch(rows: int, vocab: int = QWEN_VOCAB, *, seed: int = 0,
                    dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                    jitter: float = 0.5, chunk_rows: int = 32) -> dict:
    """``rows`` independent positions: a dict of

    * ``logits``, ``ref_logits``: ``[rows, vocab]`` in ``dtype``
    * ``tokens``: ``[rows]`` int64, drawn from softmax(logits)
    * ``old_logprobs``: ``[rows]`` float32, log pi_old of ``tokens``

    Generated in float32 ``chunk_rows`` rows at a time (temporaries of a few chunk-sized
    tensors), written into preallocated outputs, then moved to ``device``.
    """
    if rows < 1 or vocab < 2:
        raise ValueError(f"need rows >= 1 and vocab >= 2, got rows={rows}, vocab={vocab}")
    gen = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(vocab, generator=gen)
    log_rank = torch.log(torch.arange(1, vocab + 1, dtype=torch.float32))
    noise = torch.randn(2 * vocab, generator=gen)
    top4 = (perm < 4).float()[None]
    ctx = (perm, log_rank, jitter, noise, top4)
    out = {
        "logits": torch.empty(rows, vocab, dtype=dtype),
        "ref_logits": torch.empty(rows, vocab, dtype=dtype),
        "tokens": torch.empty(rows, dtype=torch.int64),
        "old_logprobs": torch.empty(rows, dtype=torch.float32),
    }
    for s in range(0, rows, chunk_rows):
        e = min(rows, s + chunk_rows)
        zc = torch.empty(e - s, vocab)
        zrc = torch.empty(e - s, vocab)
        _fill_rows(zc, zrc, out["tokens"][s:e], out["old_logprobs"][s:e], gen, ctx)
        out["logits"][s:e] = zc.to(dtype)
        out["ref_logits"][s:e] = zrc.to(dtype)
        del zc, zrc
    if torch.device(device) != torch.device("cpu"):
        out = {key: t.to(device) for key, t in out.items()}
    return out


def synthetic_sequences(n_seqs: int, seq_len: int, vocab: int = QWEN_VOCAB, *, seed: int = 0,
                        dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                        **kwargs) -> dict:
    """``n_seqs`` sampled responses of ``seq_len`` positions each, for the variance study.

    Same keys as :func:`synthetic_batch` with ``logits``/``ref_logits`` shaped
    ``[n_seqs, seq_len, vocab]`` and ``tokens``/``old_logprobs`` ``[n_seqs, seq_len]``.
    Positions are drawn independently, so the sequences differ both in their histories
    (which rows they contain: the RB estimator's variance) and in the sampled tokens
    (the extra variance of k1 and k3).
    """
    flat = synthetic_batch(n_seqs * seq_len, vocab, seed=seed, dtype=dtype, device=device,
                           **kwargs)
    return {key: t.view(n_seqs, seq_len, *t.shape[1:]) for key, t in flat.items()}
