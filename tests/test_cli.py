"""The tike-cuda command line and the logits-file loader."""
import sys
import types

import numpy as np
import pytest
import torch

import tike_cuda
from tike_cuda.__main__ import main
from tike_cuda.io import load_logits, save_logits
from tike_cuda.synthetic import synthetic_batch, synthetic_sequences


def test_demo_tiny_preset(capsys):
    assert main(["demo", "--rows", "16", "--vocab", "500", "--repeats", "1",
                 "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    for text in ("Top-16 coverage", "k3", "low_var_kl", "tike_bucket (k=16)", "full",
                 "Forward + backward", "tike_cuda", "eager", "peak extra MiB"):
        assert text in out
    # the exact estimator has no bias and no spread against itself
    full = next(line for line in out.splitlines() if line.strip().startswith("full "))
    assert "+0.00e+00" in full


def test_demo_without_perf(capsys):
    assert main(["demo", "--rows", "8", "--vocab", "64", "--k", "4", "--no-perf"]) == 0
    out = capsys.readouterr().out
    assert "tike (k=4)" in out and "Forward + backward" not in out


def test_synth_audit_variance(tmp_path, capsys):
    f = tmp_path / "seqs.pt"
    assert main(["synth", str(f), "--seqs", "12", "--seq-len", "4", "--vocab", "300"]) == 0
    out = tmp_path / "audit"
    assert main(["audit", str(f), "--out", str(out), "--ks", "4,16", "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "m_16 >= 0.99" in text and "| k |" in text
    for name in ("audit.md", "seqs_audit.csv", "seqs_ksweep.csv", "seqs_audit.png"):
        assert (out / name).is_file()
    out = tmp_path / "var"
    assert main(["variance", str(f), str(f), "--out", str(out), "--boot", "20", "--num-m", "3",
                 "--k", "4", "--quiet"]) == 0
    assert "tike4" in capsys.readouterr().out
    lines = (out / "bootstrap.csv").read_text().splitlines()
    assert lines[0] == "dataset,estimator,M,mean,std" and len(lines) == 1 + 2 * 3 * 4
    assert (out / "variance.png").read_bytes()[:4] == b"\x89PNG"
    assert len((out / "seqs_sequences.csv").read_text().splitlines()) == 13


@pytest.mark.parametrize("suffix", [".pt", ".safetensors", ".npz"])
def test_io_round_trip(tmp_path, suffix):
    d = synthetic_sequences(2, 3, 50, seed=1)
    d["mask"] = torch.ones(2, 3, dtype=torch.bool)
    path = save_logits(tmp_path / f"x{suffix}", **d)
    back = load_logits(path, required=("logits", "ref_logits", "tokens"))
    assert set(back) == set(d)
    for key in d:
        torch.testing.assert_close(back[key], d[key])


def _bad(tmp_path, name, **tensors):
    path = tmp_path / name
    if name.endswith(".npz"):
        np.savez(path, **{k: v.numpy() for k, v in tensors.items()})
    else:
        torch.save(tensors, path)
    return path


def test_bad_files_give_clear_errors(tmp_path, capsys):
    z = torch.randn(4, 10)
    cases = [
        (_bad(tmp_path, "noref.pt", logits=z), "missing key 'ref_logits'"),
        (_bad(tmp_path, "shape.pt", logits=z, ref_logits=torch.randn(4, 11)), "'ref_logits'"),
        (_bad(tmp_path, "tok.npz", logits=z, ref_logits=z,
              tokens=torch.zeros(5, dtype=torch.long)), "key 'tokens' has shape"),
        (_bad(tmp_path, "range.pt", logits=z, ref_logits=z,
              tokens=torch.tensor([0, 1, 2, 10])), "outside [0, 10)"),
        (_bad(tmp_path, "ftok.pt", logits=z, ref_logits=z, tokens=torch.zeros(4)), "integers"),
        (_bad(tmp_path, "rank.pt", logits=torch.randn(10), ref_logits=torch.randn(10)),
         "key 'logits'"),
    ]
    for path, msg in cases:
        with pytest.raises(ValueError) as err:
            load_logits(path, required=("logits", "ref_logits", "tokens")
                        if "tok" in path.name or "range" in path.name else ("logits", "ref_logits"))
        assert str(path) in str(err.value) and msg in str(err.value), str(err.value)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="cannot read"):
        load_logits(junk)
    with pytest.raises(ValueError, match="unsupported file type"):
        load_logits(_bad(tmp_path, "x.bin", logits=z))
    with pytest.raises(ValueError, match="no such file"):
        load_logits(tmp_path / "missing.pt")
    # through the CLI: exit status 2 and the message on stderr, no traceback
    assert main(["variance", str(cases[0][0]), "--out", str(tmp_path / "v"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "noref.pt" in err and "ref_logits" in err and "Traceback" not in err


def test_variance_needs_tokens(tmp_path, capsys):
    d = synthetic_batch(4, 20, seed=0)
    path = save_logits(tmp_path / "notok.pt", logits=d["logits"], ref_logits=d["ref_logits"])
    assert main(["variance", str(path), "--quiet", "--out", str(tmp_path / "v")]) == 2
    assert "missing key 'tokens'" in capsys.readouterr().err


def test_bench_forwards_argv(monkeypatch):
    seen = []
    fake = types.ModuleType("tike_cuda.bench")
    fake.main = lambda argv: seen.append(list(argv)) or 0
    monkeypatch.setitem(sys.modules, "tike_cuda.bench", fake)
    monkeypatch.setattr(tike_cuda, "bench", fake, raising=False)
    assert main(["bench", "--sizes", "1024", "--help"]) == 0
    assert seen == [["--sizes", "1024", "--help"]]


def test_synthetic_is_seeded_and_lm_like():
    a = synthetic_batch(24, 4000, seed=3)
    b = synthetic_batch(24, 4000, seed=3)
    for key in a:
        assert torch.equal(a[key], b[key])
    p = torch.softmax(a["logits"].double(), -1)
    m16 = p.topk(16, -1).values.sum(-1)
    assert m16.min() < 0.9 and m16.max() > 0.99
    lp, lq = torch.log_softmax(a["logits"].double(), -1), torch.log_softmax(
        a["ref_logits"].double(), -1)
    kl = (p * (lp - lq)).sum(-1)
    assert 1e-4 < kl.median() < 1e-1
    lp_o = lp.gather(-1, a["tokens"][:, None]).squeeze(-1)
    assert (lp_o - a["old_logprobs"]).abs().max() < 0.2


def _one_error_line(err: str, *needles):
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if ": error: " in line]
    assert len(errors) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def test_float64_logits_file_is_read_as_float32(tmp_path, capsys):
    d = synthetic_batch(12, 80, seed=2)
    path = tmp_path / "f64.pt"
    torch.save({"logits": d["logits"].double(), "ref_logits": d["ref_logits"].double()}, path)
    assert load_logits(path)["logits"].dtype == torch.float32
    assert main(["audit", str(path), "--out", str(tmp_path / "a"), "--ks", "4,16",
                 "--quiet"]) == 0
    assert "error" not in capsys.readouterr().err


def test_default_ks_above_the_vocabulary_are_skipped(tmp_path, capsys):
    d = synthetic_batch(12, 100, seed=2)
    path = save_logits(tmp_path / "v100.pt", logits=d["logits"], ref_logits=d["ref_logits"])
    assert main(["audit", str(path), "--out", str(tmp_path / "a"), "--quiet"]) == 0
    cap = capsys.readouterr()
    assert "the default --ks sweep skips k = 256" in cap.err and "v100.pt" in cap.err
    assert "| 64 |" in cap.out and "| 256 |" not in cap.out
    # a k the user asked for is not silently changed
    assert main(["audit", str(path), "--out", str(tmp_path / "a"), "--ks", "16,256",
                 "--quiet"]) == 2
    _one_error_line(capsys.readouterr().err, "v100.pt", "--ks 16,256", "between 1 and 100")
    assert main(["audit", str(path), "--out", str(tmp_path / "a"), "--k", "101",
                 "--quiet"]) == 2
    _one_error_line(capsys.readouterr().err, "v100.pt", "--k 101")


def test_small_vocabulary_clips_the_default_k(tmp_path, capsys):
    d = synthetic_sequences(6, 3, 10, seed=1)
    path = save_logits(tmp_path / "v10.pt", **d)
    assert main(["variance", str(path), "--out", str(tmp_path / "v"), "--boot", "5",
                 "--num-m", "2", "--quiet"]) == 0
    cap = capsys.readouterr()
    assert "using k = 10" in cap.err and "tike10" in cap.out


@pytest.mark.parametrize("content,needle", [
    (b"", "the file is empty (0 bytes)"),
    (b"\x00garbage, not a torch.save archive" * 10, "cannot read as a .pt file"),
])
@pytest.mark.parametrize("command", ["audit", "variance"])
def test_empty_or_corrupt_file_is_one_error_line(tmp_path, capsys, content, needle, command):
    path = tmp_path / "broken.pt"
    path.write_bytes(content)
    assert main([command, str(path), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    line = _one_error_line(capsys.readouterr().err, str(path), needle, "save_logits")
    assert "mmap" not in line


def test_truncated_archive_is_one_error_line(tmp_path, capsys):
    d = synthetic_batch(8, 50, seed=0)
    path = save_logits(tmp_path / "cut.pt", logits=d["logits"], ref_logits=d["ref_logits"])
    path.write_bytes(path.read_bytes()[:300])
    assert main(["audit", str(path), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    _one_error_line(capsys.readouterr().err, str(path), "cannot read")


def test_bad_mask_in_a_file(tmp_path, capsys):
    d = synthetic_batch(4, 50, seed=0)
    path = tmp_path / "mask.pt"
    torch.save({"logits": d["logits"], "ref_logits": d["ref_logits"],
                "mask": torch.tensor([1, 0, 2, 1])}, path)
    assert main(["audit", str(path), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    _one_error_line(capsys.readouterr().err, str(path), "key 'mask' must be a bool tensor")


def test_without_matplotlib_or_tqdm(tmp_path, capsys, monkeypatch):
    """A plain `pip install .` has neither: the figure is skipped with a warning naming the
    extra to install, progress bars are silent, the CSVs are written, exit status 0."""
    for name in ("matplotlib", "matplotlib.pyplot", "tqdm", "tqdm.auto"):
        monkeypatch.setitem(sys.modules, name, None)  # import raises ModuleNotFoundError
    f = save_logits(tmp_path / "s.pt", **synthetic_sequences(8, 4, 200, seed=0))
    assert main(["audit", str(f), "--out", str(tmp_path / "a"), "--ks", "4"]) == 0
    err = capsys.readouterr().err
    assert "warning: matplotlib is not installed" in err and "tike_cuda[analysis]" in err
    assert "Traceback" not in err
    assert (tmp_path / "a" / "s_audit.csv").is_file()
    assert not (tmp_path / "a" / "s_audit.png").exists()
    assert main(["variance", str(f), "--out", str(tmp_path / "v"), "--boot", "5",
                 "--num-m", "2", "--k", "4"]) == 0
    err = capsys.readouterr().err
    assert "variance.png not written" in err and "tike_cuda[analysis]" in err
    assert (tmp_path / "v" / "bootstrap.csv").is_file()
