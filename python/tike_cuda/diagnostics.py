"""Top-k coverage and truncation-residual audit (paper Appendix A.1, Tables 2 and 7).

Per token position h, with policy p, reference q and S_k = the k largest policy logits:

    m_k(h)     = sum_{v in S_k} p_v                          top-k mass (coverage)
    D_k(h)     = sum_{v in S_k} p_v log(p_v / q_v)           truncated KL (paper Eq. 10)
    D(h)       = sum_v p_v log(p_v / q_v)                    exact KL (Eq. 1)
    xi_tail(h) = D(h) - D_k(h)                               tail residual (Eq. 11-12)
    H(h)       = -sum_v p_v log p_v                          policy entropy

Everything is computed with the fused ops (``topk_kl(return_stats=True)``, ``full_kl``,
``token_logprobs(return_entropy=True)``) over chunks of rows, so memory stays at one
chunk of logits plus O(rows) results. The audit uses plain S_k (no sampled token), as
the paper's table does.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

import tike_cuda as _ops

from . import _checks
from .report import markdown_table, progress, pyplot, write_csv

__all__ = ["TokenDiagnostics", "token_diagnostics", "audit_table", "audit_from_diagnostics",
           "k_sweep_table", "plot_audit", "markdown_table", "write_csv"]

_CHUNK_BYTES = 256 << 20  # logits + ref_logits read per chunk


@dataclass
class TokenDiagnostics:
    """Per-position numbers (float64 numpy, unmasked positions only, in row order)."""

    k: int
    topk_mass: np.ndarray
    kl_topk: np.ndarray
    kl_full: np.ndarray
    entropy: np.ndarray

    @property
    def xi_tail(self) -> np.ndarray:
        return self.kl_full - self.kl_topk


def _flat_rows(logits, ref_logits, mask):
    if not isinstance(logits, torch.Tensor) or logits.dim() < 1:
        raise ValueError("logits must be a tensor [..., V]")
    if not isinstance(ref_logits, torch.Tensor) or ref_logits.shape != logits.shape:
        raise ValueError(f"ref_logits must have logits' shape {tuple(logits.shape)}")
    V = logits.shape[-1]
    z, zr = logits.reshape(-1, V), ref_logits.reshape(-1, V)
    if mask is None:
        return z, zr, None
    mask = _checks.as_bool_mask(mask)
    if mask.shape != logits.shape[:-1]:
        raise ValueError(f"mask must have shape {tuple(logits.shape[:-1])}, got {tuple(mask.shape)}")
    return z, zr, mask.reshape(-1)


def chunk_bounds(n_rows: int, row_bytes: int, chunk_rows: int | None = None):
    """(start, stop) pairs covering n_rows, ``chunk_rows`` (default ~256 MiB of input) each."""
    if chunk_rows is None:
        chunk_rows = max(1, _CHUNK_BYTES // max(1, row_bytes))
    return [(s, min(n_rows, s + chunk_rows)) for s in range(0, n_rows, chunk_rows)]


def _scan(logits, ref_logits, ks, *, mask=None, temperature=1.0, chunk_rows=None,
          device=None, show_progress=False):
    """Entropy, full KL and, per k, (m_k, D_k) for every unmasked position."""
    z, zr, m = _flat_rows(logits, ref_logits, mask)
    N, V = z.shape
    for k in ks:
        if not 1 <= int(k) <= V:
            raise ValueError(f"k must be in [1, {V}], got {k}")
    device = torch.device(device) if device is not None else z.device
    acc = {"entropy": [], "kl_full": []}
    acc.update({("mass", k): [] for k in ks})
    acc.update({("kl", k): [] for k in ks})
    bounds = chunk_bounds(N, 2 * V * z.element_size(), chunk_rows)
    with torch.no_grad():
        for s, e in progress(bounds, enabled=show_progress, desc="audit", unit="chunk"):
            zc, zrc = z[s:e].to(device), zr[s:e].to(device)
            mc = None if m is None else m[s:e].to(device)
            keep = slice(None) if mc is None else mc.cpu()
            tok = torch.zeros(e - s, dtype=torch.long, device=device)
            _, ent = _ops.token_logprobs(zc, tok, temperature=temperature, return_entropy=True)
            acc["entropy"].append(ent.double().cpu()[keep])
            full = _ops.full_kl(zc, zrc, temperature=temperature, mask=mc)
            acc["kl_full"].append(full.double().cpu()[keep])
            for k in ks:
                d, st = _ops.topk_kl(zc, zrc, int(k), temperature=temperature, mask=mc,
                                     return_stats=True)
                acc[("kl", k)].append(d.double().cpu()[keep])
                acc[("mass", k)].append(st.topk_mass.double().cpu()[keep])
    cat = {key: (torch.cat(v) if v else torch.zeros(0, dtype=torch.float64)).numpy()
           for key, v in acc.items()}
    return cat


def token_diagnostics(logits, ref_logits, k: int = 16, *, mask=None, temperature: float = 1.0,
                      chunk_rows: int | None = None, device=None,
                      progress: bool = False) -> TokenDiagnostics:
    """m_k, D_k, D, xi_tail and H for every unmasked position of ``[..., V]`` logits."""
    c = _scan(logits, ref_logits, (k,), mask=mask, temperature=temperature,
              chunk_rows=chunk_rows, device=device, show_progress=progress)
    return TokenDiagnostics(k, c[("mass", k)], c[("kl", k)], c["kl_full"], c["entropy"])


def _mean(x):
    return float(np.mean(x)) if len(x) else math.nan


def _p95(x):
    # linear interpolation between order statistics (numpy's default, "type 7")
    return float(np.percentile(x, 95)) if len(x) else math.nan


def audit_from_diagnostics(diag: TokenDiagnostics, hi: float = 0.99, lo: float = 0.90) -> list:
    """Table 2: positions stratified by coverage, one dict per regime.

    Regimes: ``m_k >= hi``, ``lo <= m_k < hi``, ``m_k < lo`` and ``all``; columns
    ``count``, ``frac`` (share of all positions), ``mean_mk``, ``mean_entropy``,
    ``mean_abs_xi`` and ``p95_abs_xi`` (95th percentile of |xi_tail|, linear interpolation).
    Empty regimes give NaN statistics.
    """
    m, xi = diag.topk_mass, np.abs(diag.xi_tail)
    n = len(m)
    name = f"m_{diag.k}"
    regimes = [(f"{name} >= {hi:g}", m >= hi), (f"{lo:g} <= {name} < {hi:g}", (m >= lo) & (m < hi)),
               (f"{name} < {lo:g}", m < lo), ("all", np.ones(n, dtype=bool))]
    rows = []
    for label, sel in regimes:
        rows.append({"regime": label, "count": int(sel.sum()),
                     "frac": float(sel.sum() / n) if n else math.nan,
                     "mean_mk": _mean(m[sel]), "mean_entropy": _mean(diag.entropy[sel]),
                     "mean_abs_xi": _mean(xi[sel]), "p95_abs_xi": _p95(xi[sel])})
    return rows


def audit_table(logits, ref_logits, k: int = 16, *, mask=None, temperature: float = 1.0,
                hi: float = 0.99, lo: float = 0.90, chunk_rows: int | None = None, device=None,
                progress: bool = False) -> list:
    """Paper Table 2 for ``[..., V]`` logits: see :func:`audit_from_diagnostics`."""
    diag = token_diagnostics(logits, ref_logits, k, mask=mask, temperature=temperature,
                             chunk_rows=chunk_rows, device=device, progress=progress)
    return audit_from_diagnostics(diag, hi, lo)


def k_sweep_table(logits, ref_logits, ks=(16, 64, 256), *, mask=None, temperature: float = 1.0,
                  chunk_rows: int | None = None, device=None, progress: bool = False) -> list:
    """Paper Table 7: per k, ``mean_mk``, ``mean_abs_xi``, ``p95_abs_xi`` (and the mean
    truncated and exact KL), from one pass over the rows for all k."""
    ks = tuple(int(k) for k in ks)
    c = _scan(logits, ref_logits, ks, mask=mask, temperature=temperature,
              chunk_rows=chunk_rows, device=device, show_progress=progress)
    rows = []
    for k in ks:
        xi = np.abs(c["kl_full"] - c[("kl", k)])
        rows.append({"k": k, "mean_mk": _mean(c[("mass", k)]), "mean_abs_xi": _mean(xi),
                     "p95_abs_xi": _p95(xi), "mean_kl_topk": _mean(c[("kl", k)]),
                     "mean_kl_full": _mean(c["kl_full"])})
    return rows


def plot_audit(diag: TokenDiagnostics, path, title: str = ""):
    """Coverage histogram and |xi_tail| against m_k (coloured by entropy) as a PNG; without
    matplotlib, a warning and None (report.pyplot)."""
    plt = pyplot(path)
    if plt is None:
        return None
    fig, (a0, a1) = plt.subplots(1, 2, figsize=(9, 3.6))
    a0.hist(diag.topk_mass, bins=50, color="tab:red", alpha=0.8)
    a0.set_xlabel(f"top-{diag.k} mass m_{diag.k}")
    a0.set_ylabel("positions")
    pts = a1.scatter(diag.topk_mass, np.abs(diag.xi_tail) + 1e-12, s=4, alpha=0.4,
                     c=diag.entropy, cmap="viridis")
    fig.colorbar(pts, ax=a1, label="policy entropy (nats)")
    a1.set_yscale("log")
    a1.set_xlabel(f"m_{diag.k}")
    a1.set_ylabel("|xi_tail| = |KL - KL_k|")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
