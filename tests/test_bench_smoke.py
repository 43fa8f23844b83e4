"""The benchmark harness runs end to end on tiny CPU shapes. No timing assertions: only
that it writes the CSV it promises (columns, one row per case and provider) and a plot,
and that its eager baselines compute the same numbers as the reference."""
import csv

import pytest
import torch

import tike_cuda
from tike_cuda import bench, eager
from tike_cuda.reference import full_kl_reference, token_logprobs_reference, topk_kl_reference


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_smoke_run_writes_csv_and_plot(tmp_path):
    pytest.importorskip("matplotlib")
    rc = bench.main(["--preset", "smoke", "--device", "cpu", "--providers", "eager,tike_cuda",
                     "--N", "4", "--V", "96", "--k", "1,4", "--repeats", "2", "--warmup", "0",
                     "--out", str(tmp_path), "--no-progress"])
    assert rc == 0
    with open(tmp_path / "results.csv", newline="") as f:
        assert csv.DictReader(f).fieldnames == bench.COLUMNS
    rows = _rows(tmp_path / "results.csv")
    # topk_kl: 2 k values x 2 modes; full_kl and token_logprobs: 2 modes each; 2 providers.
    assert len(rows) == (4 + 2 + 2) * 2
    for r in rows:
        assert r["device"] == "cpu" and r["dtype"] == "fp32"
        assert float(r["p20_ms"]) <= float(r["p50_ms"]) <= float(r["p80_ms"])
        assert float(r["GBps"]) > 0 and float(r["floor_frac"]) > 0
        assert r["cpu_isa"] == tike_cuda.cpu_isa()  # which CPU kernels path was timed
    assert {r["provider"] for r in rows} == {"eager", "tike_cuda"}
    assert list(tmp_path.glob("topk_kl_fwd_*_vs_k.png"))


def test_unavailable_provider_is_skipped_with_a_note(tmp_path):
    # Liger is CUDA-only (Triton): on CPU it must be skipped, not crash the run.
    rc = bench.main(["--preset", "smoke", "--providers", "liger", "--ops", "token_logprobs",
                     "--modes", "fwd", "--out", str(tmp_path), "--no-plot", "--no-progress"])
    assert rc == 0
    assert _rows(tmp_path / "results.csv") == []
    assert "liger" in (tmp_path / "notes.txt").read_text()


def test_unknown_names_are_rejected(tmp_path):
    assert bench.main(["--providers", "nope", "--out", str(tmp_path)]) == 2
    assert bench.main(["--ops", "nope", "--out", str(tmp_path)]) == 2
    assert bench.main(["--dtype", "fp8", "--out", str(tmp_path)]) == 2


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_eager_baselines_match_reference(dtype):
    g = torch.Generator().manual_seed(0)
    z = (2 * torch.randn(5, 64, generator=g)).to(dtype)
    zr = z + 0.5 * torch.randn(5, 64, generator=g).to(dtype)
    tokens = torch.randint(0, 64, (5,), generator=g)
    tokens[0] = z[0].argmax()  # a sampled token inside S: counted once
    old = -1 - torch.rand(5, generator=g)
    tol = dict(rtol=1e-4, atol=1e-5)
    kw = dict(sampled_tokens=tokens, old_logprobs=old, temperature=0.7)
    torch.testing.assert_close(eager.topk_kl(z, zr, 4, **kw).double(),
                               topk_kl_reference(z, zr, 4, **kw), **tol)
    torch.testing.assert_close(eager.full_kl(z, zr).double(), full_kl_reference(z, zr), **tol)
    lp, ent = eager.token_logprobs(z, tokens, return_entropy=True)
    ref_lp, ref_ent = token_logprobs_reference(z, tokens, return_entropy=True)
    torch.testing.assert_close(lp.double(), ref_lp, **tol)
    torch.testing.assert_close(ent.double(), ref_ent, **tol)
