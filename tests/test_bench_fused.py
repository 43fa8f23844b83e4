"""The fused-loss benchmark runs end to end on tiny CPU shapes and its memory reading is
right: a case that allocates one known buffer must read as that buffer's size. No timing
assertions."""
import csv

from tike_cuda import bench_fused


def test_smoke_run_and_memory_calibration(tmp_path):
    rc = bench_fused.main(["--preset", "smoke", "--providers", "calibrate,fused,unfused",
                           "--repeats", "1", "--out", str(tmp_path)])
    assert rc == 0
    with open(tmp_path / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["provider"] for r in rows] == ["calibrate", "unfused", "fused", "calibrate"]
    assert all(r["note"] == "" for r in rows), [r["note"] for r in rows]
    big = rows[-1]  # one [4096, 4096] float32 buffer: 64 MiB
    assert float(big["logits_MiB"]) == 64
    assert 60 <= float(big["peak_extra_MiB"]) <= 72
    for r in rows[1:3]:
        assert float(r["peak_extra_MiB"]) > 0 and float(r["p50_ms"]) > 0
    assert "| fused |" in (tmp_path / "results.md").read_text()


def test_unknown_provider_is_rejected(tmp_path):
    assert bench_fused.main(["--providers", "nope", "--out", str(tmp_path)]) == 2


def test_liger_without_cuda_is_a_noted_row():
    case = bench_fused.Case("liger", B=1, T=4, H=8, V=16, estimator="k3")
    row = bench_fused.measure(case, repeats=1, timeout=300)
    assert "CUDA only" in row["note"]
