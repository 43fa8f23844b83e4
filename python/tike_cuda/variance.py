"""Bias/variance of sequence-level KL estimators by bootstrap (paper Section 5.1, Figure 4).

For a pool of sampled responses y (one prompt), each estimator gives a sequence-level
estimate of KL(pi_theta(y) || pi_ref(y)) = E_y sum_t KL_t by summing per-position terms
over the response (o_t the sampled token, L_v = log p_v - log q_v at position t):

    k1   = sum_t L_{o_t}                                  unbiased, noisy
    k3   = sum_t exp(-L_{o_t}) + L_{o_t} - 1              unbiased for o ~ p, >= 0
    rb   = sum_t sum_v p_v L_v                             exact per position (RB)
    tike = sum_t r_t sum_{v in S~_t} p_v L_v               paper Eq. 13, S~ = top-k U {o_t}

For M log-spaced from 1 to the pool size, ``bootstrap`` draws M sequences with replacement
B times and reports the mean and the standard deviation (ddof = 1) across the B
resample means. All estimators share the same resamples, so their curves differ only by
the estimator. rb's spread is the history-sampling variance alone; k1 and k3 add the
token-sampling variance on top; tike's gap to rb is its truncation bias.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

import tike_cuda as _ops
from .diagnostics import chunk_bounds
from . import _checks
from .estimators import kl_penalty
from .report import progress as _progress, pyplot, write_csv

__all__ = ["sequence_estimates", "log_spaced", "bootstrap", "plot_bootstrap", "COLORS"]

# the paper's Figure 4 palette: RB purple, TIKE red
COLORS = {"k1": "tab:blue", "k3": "tab:green", "rb": "tab:purple", "tike": "tab:red"}


def _seq_index(shape, seq_id):
    pos = shape[:-1]
    if seq_id is None:
        if len(pos) != 2:
            raise ValueError("seq_id is required unless logits is [S, T, V] (S sequences of "
                             f"T positions); got logits of shape {tuple(shape)}")
        return torch.arange(pos[0]).repeat_interleave(pos[1]), pos[0]
    if not isinstance(seq_id, torch.Tensor) or seq_id.shape != pos:
        raise ValueError(f"seq_id must be an int tensor of shape {tuple(pos)}")
    uniq, inv = torch.unique(seq_id.reshape(-1), return_inverse=True)
    return inv, len(uniq)


def sequence_estimates(logits, ref_logits, tokens, *, seq_id=None, old_logprobs=None, mask=None,
                       k: int = 16, temperature: float = 1.0, chunk_rows: int | None = None,
                       device=None, progress: bool = False) -> dict:
    """Per-sequence sums of k1, k3, rb and tike{k}: a dict of float64 arrays ``[S]``.

    ``logits``/``ref_logits`` ``[..., V]``, ``tokens`` ``[...]`` (sampled from the policy),
    sequences given by ``seq_id`` (any ints; output in sorted id order) or by the leading
    dim of ``[S, T, V]`` logits. ``old_logprobs`` (optional) gives TIKE its importance
    weight; ``mask`` drops positions. Computed with the fused ops, chunk by chunk.
    """
    V = logits.shape[-1]
    if ref_logits.shape != logits.shape:
        raise ValueError(f"ref_logits must have logits' shape {tuple(logits.shape)}")
    if not isinstance(tokens, torch.Tensor) or tokens.shape != logits.shape[:-1]:
        raise ValueError(f"tokens must be an int tensor of shape {tuple(logits.shape[:-1])}")
    sid, n_seq = _seq_index(logits.shape, seq_id)
    z, zr, tok = logits.reshape(-1, V), ref_logits.reshape(-1, V), tokens.reshape(-1).long()
    old = None if old_logprobs is None else old_logprobs.reshape(-1).float()
    m = None if mask is None else _checks.as_bool_mask(mask).reshape(-1)
    names = ("k1", "k3", "rb", f"tike{k}")
    sums = {name: torch.zeros(n_seq, dtype=torch.float64) for name in names}
    device = torch.device(device) if device is not None else z.device
    bounds = chunk_bounds(z.shape[0], 2 * V * z.element_size(), chunk_rows)
    with torch.no_grad():
        for s, e in _progress(bounds, enabled=progress, desc="sequences", unit="chunk"):
            zc, zrc, tc = z[s:e].to(device), zr[s:e].to(device), tok[s:e].to(device)
            mc = None if m is None else m[s:e].to(device)
            lp = _ops.token_logprobs(zc, tc, temperature=temperature, mask=mc).float()
            lq = _ops.token_logprobs(zrc, tc, temperature=temperature, mask=mc).float()
            per = {"k1": kl_penalty(lp, lq, "k1"), "k3": kl_penalty(lp, lq, "k3"),
                   "rb": _ops.full_kl(zc, zrc, temperature=temperature, mask=mc),
                   names[3]: _ops.topk_kl(zc, zrc, k, sampled_tokens=tc, temperature=temperature,
                                          old_logprobs=None if old is None else old[s:e].to(device),
                                          mask=mc)}
            for name, v in per.items():
                v = v.double().cpu()
                if mc is not None:
                    v = torch.where(mc.cpu(), v, torch.zeros_like(v))
                sums[name].index_add_(0, sid[s:e], v)
    return {name: t.numpy() for name, t in sums.items()}


def log_spaced(n_max: int, num: int = 12) -> list:
    """Distinct integers from 1 to n_max, spaced logarithmically."""
    return sorted({int(round(x)) for x in np.geomspace(1, max(1, n_max), num)})


def bootstrap(estimates: dict, ms=None, n_boot: int = 1000, seed: int = 0) -> list:
    """Resample M sequences with replacement ``n_boot`` times for each M.

    Returns one dict per (estimator, M): ``estimator``, ``M``, ``mean`` (average of the
    ``n_boot`` resample means) and ``std`` (their standard deviation, ddof = 1).
    Resample indices come from ``numpy.random.default_rng(seed)``: for each M in order,
    one ``integers(0, S, size=(n_boot, M))`` draw shared by all estimators.
    """
    vals = {name: np.asarray(v, dtype=np.float64) for name, v in estimates.items()}
    sizes = {len(v) for v in vals.values()}
    if len(sizes) != 1 or 0 in sizes:
        raise ValueError("every estimator needs the same, non-zero number of sequences")
    if n_boot < 2:
        raise ValueError(f"n_boot must be >= 2, got {n_boot}")
    S = sizes.pop()
    ms = log_spaced(S) if ms is None else [int(m) for m in ms]
    rng = np.random.default_rng(seed)
    rows = []
    for M in ms:
        if M < 1:
            raise ValueError(f"sample sizes must be >= 1, got {M}")
        idx = rng.integers(0, S, size=(n_boot, M))
        for name, v in vals.items():
            means = v[idx].mean(axis=1)
            rows.append({"estimator": name, "M": M, "mean": float(means.mean()),
                         "std": float(means.std(ddof=1))})
    return rows


def plot_bootstrap(panels: dict, path, *, title: str | None = None) -> Path | None:
    """Figure-4-style plot: one panel per dataset (``{panel title: bootstrap rows}``),
    mean vs M (log x) with a +-1 std band per estimator. Writes a PNG (Agg backend);
    without matplotlib, warns and returns None."""
    plt = pyplot(path)
    if plt is None:
        return None

    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.8), squeeze=False)
    for ax, (name, rows) in zip(axes[0], panels.items()):
        for est in dict.fromkeys(r["estimator"] for r in rows):
            rs = [r for r in rows if r["estimator"] == est]
            M = np.array([r["M"] for r in rs])
            mu = np.array([r["mean"] for r in rs])
            sd = np.array([r["std"] for r in rs])
            color = COLORS.get("tike" if est.startswith("tike") else est)
            ax.plot(M, mu, marker="o", ms=3, label=est.upper() if len(est) < 4 else est,
                    color=color)
            ax.fill_between(M, mu - sd, mu + sd, alpha=0.18, color=color)
        ax.set_xscale("log")
        ax.set_xlabel("sample size M (sequences)")
        ax.set_ylabel("sequence-level KL estimate")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_bootstrap_csv(panels: dict, path) -> Path:
    """All panels' bootstrap rows in one CSV, with a ``dataset`` column."""
    rows = [{"dataset": name, **r} for name, rs in panels.items() for r in rs]
    return write_csv(rows, path)
