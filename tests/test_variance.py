"""Sequence-level estimates and the bootstrap of the variance study (paper Section 5.1)."""
import numpy as np
import pytest
import torch

from tike_cuda.variance import bootstrap, log_spaced, plot_bootstrap, sequence_estimates, \
    write_bootstrap_csv


def _seqs(S=5, T=4, V=30, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = 2.0 * torch.randn(S, T, V, generator=g)
    zr = z + 0.5 * torch.randn(S, T, V, generator=g)
    tok = torch.multinomial(torch.softmax(z.view(-1, V), -1), 1, generator=g).view(S, T)
    return z, zr, tok


def _independent(z, zr, tok, k, mask):
    lp, lq = torch.log_softmax(z.double(), -1), torch.log_softmax(zr.double(), -1)
    L = lp - lq
    Lo = L.gather(-1, tok[..., None]).squeeze(-1)
    terms = lp.exp() * L
    top = torch.zeros_like(z, dtype=torch.bool).scatter_(
        -1, torch.argsort(z, -1, descending=True)[..., :k], True)
    top.scatter_(-1, tok[..., None], True)
    m = mask.double()
    return {"k1": (Lo * m).sum(-1), "k3": ((torch.exp(-Lo) + Lo - 1) * m).sum(-1),
            "rb": (terms.sum(-1) * m).sum(-1), f"tike{k}": ((terms * top).sum(-1) * m).sum(-1)}


def test_sequence_estimates_against_float64():
    z, zr, tok = _seqs()
    mask = torch.ones(5, 4, dtype=torch.bool)
    mask[1, 2:] = False
    tok_padded = torch.where(mask, tok, torch.full_like(tok, -100))
    got = sequence_estimates(z, zr, tok_padded, mask=mask, k=4, chunk_rows=3)
    want = _independent(z, zr, tok, 4, mask)
    assert list(got) == ["k1", "k3", "rb", "tike4"]
    for name, w in want.items():
        np.testing.assert_allclose(got[name], w.numpy(), rtol=1e-4, atol=1e-6)


def test_sequence_estimates_with_seq_id():
    z, zr, tok = _seqs(S=2, T=3)
    # interleaved positions: sequence 0 has id 7, sequence 1 id 3; output in id order (3, 7)
    zf, zrf, tf = z.transpose(0, 1).reshape(6, -1), zr.transpose(0, 1).reshape(6, -1), \
        tok.t().reshape(6)
    sid = torch.tensor([7, 3, 7, 3, 7, 3])
    got = sequence_estimates(zf, zrf, tf, seq_id=sid, k=4)
    want = _independent(z, zr, tok, 4, torch.ones(2, 3, dtype=torch.bool))
    np.testing.assert_allclose(got["rb"], want["rb"].numpy()[::-1], rtol=1e-4)
    with pytest.raises(ValueError, match="seq_id"):
        sequence_estimates(zf, zrf, tf, k=4)


def test_bootstrap_by_hand():
    est = {"a": np.array([0.0, 2.0, 4.0]), "c": np.full(3, 1.5)}
    rows = bootstrap(est, ms=[1, 2], n_boot=50, seed=3)
    rng = np.random.default_rng(3)
    for M in (1, 2):
        idx = rng.integers(0, 3, size=(50, M))
        means = est["a"][idx].mean(1)
        got = {r["estimator"]: r for r in rows if r["M"] == M}
        assert got["a"]["mean"] == pytest.approx(means.mean())
        assert got["a"]["std"] == pytest.approx(means.std(ddof=1))
        assert got["c"]["mean"] == pytest.approx(1.5) and got["c"]["std"] == 0.0


def test_bootstrap_std_shrinks_like_one_over_sqrt_m():
    vals = np.random.default_rng(0).normal(size=400)
    rows = bootstrap({"x": vals}, ms=[4, 64], n_boot=2000, seed=0)
    ratio = rows[0]["std"] / rows[1]["std"]
    assert 3.4 < ratio < 4.6  # sqrt(64 / 4) = 4


def test_bootstrap_errors_and_log_spacing():
    with pytest.raises(ValueError, match="same"):
        bootstrap({"a": np.zeros(3), "b": np.zeros(4)})
    assert log_spaced(1000, 4) == [1, 10, 100, 1000]
    assert log_spaced(3, 12) == [1, 2, 3]


def test_figure_and_csv(tmp_path):
    rows = bootstrap({"k1": np.arange(6.0), "rb": np.ones(6), "tike16": np.ones(6)}, n_boot=10)
    png = plot_bootstrap({"prompt 1": rows, "prompt 2": rows}, tmp_path / "f.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = write_bootstrap_csv({"p": rows}, tmp_path / "b.csv").read_text().splitlines()
    assert lines[0] == "dataset,estimator,M,mean,std" and len(lines) == 1 + len(rows)
