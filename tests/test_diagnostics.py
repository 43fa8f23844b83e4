"""Coverage audit (paper Table 2) and k sweep (Table 7) against float64 and by hand."""
import math

import numpy as np
import pytest
import torch

from tike_cuda.diagnostics import (TokenDiagnostics, audit_from_diagnostics, audit_table,
                                   k_sweep_table, markdown_table, token_diagnostics, write_csv)


def _logits(rows=12, vocab=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    scale = torch.linspace(0.5, 6.0, rows)[:, None]  # flat to peaked rows
    z = scale * torch.randn(rows, vocab, generator=g)
    zr = z + 0.3 * torch.randn(rows, vocab, generator=g)
    return z, zr


def _independent(z, zr, k):
    lp, lq = torch.log_softmax(z.double(), -1), torch.log_softmax(zr.double(), -1)
    p = lp.exp()
    idx = torch.argsort(z, -1, descending=True)[:, :k]
    terms = p * (lp - lq)
    return (p.gather(-1, idx).sum(-1), terms.gather(-1, idx).sum(-1), terms.sum(-1),
            -(p * lp).sum(-1))


def test_token_diagnostics_against_float64():
    z, zr = _logits()
    mask = torch.ones(12, dtype=torch.bool)
    mask[[2, 7]] = False
    d = token_diagnostics(z, zr, 8, mask=mask, chunk_rows=5)
    m, dk, full, ent = (t[mask].numpy() for t in _independent(z, zr, 8))
    assert len(d.topk_mass) == 10
    np.testing.assert_allclose(d.topk_mass, m, rtol=1e-5)
    np.testing.assert_allclose(d.kl_topk, dk, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(d.kl_full, full, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(d.entropy, ent, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(d.xi_tail, full - dk, atol=2e-6)


def test_chunking_does_not_change_results():
    z, zr = _logits(rows=9)
    z3, zr3 = z.view(3, 3, -1), zr.view(3, 3, -1)
    a = token_diagnostics(z3, zr3, 4, chunk_rows=2)
    b = token_diagnostics(z, zr, 4)
    for f in ("topk_mass", "kl_topk", "kl_full", "entropy"):
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f))


def test_audit_from_diagnostics_by_hand():
    m = np.array([0.995, 0.999, 0.95, 0.5, 0.8])
    xi = np.array([0.001, -0.003, 0.01, 0.2, -0.1])
    full = np.full(5, 0.5)
    diag = TokenDiagnostics(16, m, full - xi, full, np.array([0.1, 0.2, 1.0, 4.0, 3.0]))
    hi, mid, lo, every = audit_from_diagnostics(diag)
    assert hi["regime"] == "m_16 >= 0.99" and lo["regime"] == "m_16 < 0.9"
    assert (hi["count"], mid["count"], lo["count"], every["count"]) == (2, 1, 2, 5)
    assert hi["frac"] == pytest.approx(0.4) and lo["frac"] == pytest.approx(0.4)
    assert hi["mean_mk"] == pytest.approx(0.997)
    assert hi["mean_abs_xi"] == pytest.approx(0.002)
    assert hi["p95_abs_xi"] == pytest.approx(0.001 + 0.95 * 0.002)  # linear interpolation
    assert lo["mean_mk"] == pytest.approx(0.65) and lo["mean_entropy"] == pytest.approx(3.5)
    assert lo["mean_abs_xi"] == pytest.approx(0.15)
    assert lo["p95_abs_xi"] == pytest.approx(0.1 + 0.95 * 0.1)
    assert mid["p95_abs_xi"] == pytest.approx(0.01)


def test_empty_regime_is_nan_not_error():
    diag = TokenDiagnostics(4, np.array([0.999]), np.zeros(1), np.zeros(1), np.ones(1))
    rows = audit_from_diagnostics(diag)
    assert rows[2]["count"] == 0 and math.isnan(rows[2]["mean_mk"])
    assert "—" in markdown_table(rows)


def test_audit_table_end_to_end():
    z, zr = _logits(rows=20, vocab=200, seed=1)
    m, dk, full, ent = (t.numpy() for t in _independent(z, zr, 16))
    rows = audit_table(z, zr, 16, chunk_rows=7)
    want = audit_from_diagnostics(TokenDiagnostics(16, m, dk, full, ent))
    for got, exp in zip(rows, want):
        assert got["count"] == exp["count"]
        for key in ("mean_mk", "mean_entropy", "mean_abs_xi", "p95_abs_xi"):
            if exp["count"]:
                assert got[key] == pytest.approx(exp[key], rel=1e-3, abs=1e-6)


def test_k_sweep_table():
    z, zr = _logits(rows=10, vocab=64, seed=2)
    rows = k_sweep_table(z, zr, ks=(1, 8, 64))
    assert [r["k"] for r in rows] == [1, 8, 64]
    masses = [r["mean_mk"] for r in rows]
    assert masses == sorted(masses)
    assert rows[-1]["mean_mk"] == pytest.approx(1.0, abs=1e-5)
    assert rows[-1]["mean_abs_xi"] < 1e-5
    m, dk, full, _ = (t.numpy() for t in _independent(z, zr, 8))
    assert rows[1]["mean_abs_xi"] == pytest.approx(np.abs(full - dk).mean(), rel=1e-3)
    with pytest.raises(ValueError, match="k"):
        k_sweep_table(z, zr, ks=(65,))


def test_writers(tmp_path):
    rows = [{"k": 16, "mean_mk": 0.5}, {"k": 64, "mean_mk": 0.75}]
    text = write_csv(rows, tmp_path / "t.csv").read_text().splitlines()
    assert text == ["k,mean_mk", "16,0.5", "64,0.75"]
    assert markdown_table(rows).splitlines()[0] == "| k | mean_mk |"
