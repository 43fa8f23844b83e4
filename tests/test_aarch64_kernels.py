"""The CPU kernels on CPUs this machine is not, run under an emulator: aarch64 (the NEON
path) and x86-64 CPU models without AVX-512.

There is no aarch64 torch to build the extension against, but its CPU kernels
(csrc/kernels/*_cpu.cpp) are torch-free: tests/cpu_kernels_driver.cpp runs them on inputs
read from files. It is cross-compiled with aarch64-linux-gnu-g++ and run under qemu-aarch64,
and compiled natively, where its outputs must equal the extension's bit for bit on the
extension's path (so the driver fills the kernels' arguments as the C++ glue does). The
aarch64 outputs are compared with the float64 reference and with the extension's ops at the
op tests' tolerances. Not covered on aarch64: the Python layer and the C++ glue (no torch
there), thread splitting (one call over all rows), speed (an emulator says nothing of it).

The native driver also runs under qemu-x86_64 as an AMD EPYC (Rome: AVX2 and FMA, no
AVX-512) and as qemu's baseline x86-64 CPU (SSE2), choosing its path itself: it must pick
avx2 and sse2 there and give the same bits as the native driver forced onto those paths.
QEMU does not implement AVX-512, so an AVX-512 instruction leaking into the AVX2 or the
baseline code (which a forced path on an AVX-512 machine would run without complaint)
fails here as it would on an AVX2-only machine.

Needs g++, aarch64-linux-gnu-g++, qemu-aarch64 and qemu-x86_64 (Debian: g++-aarch64-linux-gnu,
qemu-user): without them it skips, except under CI (CI set; .ci/run installs them), where
it fails.
"""
import hashlib
import os
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

import tike_cuda
from tike_cuda import reference as R

from conftest import assert_grads, assert_lse_pairs, assert_values, make_logits

ROOT = Path(__file__).resolve().parents[1]
DRIVER = ROOT / "tests" / "cpu_kernels_driver.cpp"
KERNELS = sorted((ROOT / "csrc" / "kernels").glob("*_cpu.cpp"))
HEADERS = sorted((ROOT / "csrc" / "kernels").glob("*.h"))
# The flags the extension's build gives the kernels (setup.py, plus torch's -std=c++20,
# which keeps GCC from contracting a·b + c into an FMA, -fwrapv and -DNDEBUG); not -fopenmp
# (the kernels have no OpenMP region) nor -g.
FLAGS = ["-std=c++20", "-O3", "-fwrapv", "-DNDEBUG", "-fno-math-errno", "-Wno-psabi"]
COMPILERS = {"aarch64": "aarch64-linux-gnu-g++", "native": "g++"}
QEMU = ["qemu-aarch64", "-L", "/usr/aarch64-linux-gnu"]
# x86-64 CPU models for qemu-x86_64 (its TCG has no AVX-512) -> the path the driver must pick.
X86_MODELS = {"EPYC-Rome": "avx2", "qemu64": "sse2"} if os.uname().machine == "x86_64" else {}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # tike::DType
op = torch.ops.tike_cuda


@pytest.fixture(scope="module")
def drivers():
    """The driver for aarch64 and for this machine, built once per source version."""
    needed = [*COMPILERS.values(), QEMU[0]] + (["qemu-x86_64"] if X86_MODELS else [])
    missing = [t for t in needed if shutil.which(t) is None]
    if missing:
        why = (f"{', '.join(missing)} not found (Debian packages g++-aarch64-linux-gnu and "
               "qemu-user)")
        if os.environ.get("CI"):
            pytest.fail(why)  # .ci/run installs them: their absence is a failure there
        pytest.skip(why)
    key = hashlib.sha256(" ".join(FLAGS).encode())
    for path in [DRIVER, *KERNELS, *HEADERS]:
        key.update(path.name.encode() + path.read_bytes())
    for cxx in COMPILERS.values():
        key.update(subprocess.run([cxx, "--version"], capture_output=True).stdout)
    cache = Path(tempfile.gettempdir()) / f"tike_cpu_kernels_driver_{key.hexdigest()[:16]}"
    cache.mkdir(exist_ok=True)

    def build(arch):
        exe = cache / arch
        if not exe.exists():
            tmp = cache / f"{arch}.{os.getpid()}"
            cmd = [COMPILERS[arch], *FLAGS, f"-I{ROOT / 'csrc'}", str(DRIVER), *map(str, KERNELS),
                   "-o", str(tmp)]
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
            assert r.returncode == 0, f"{arch} build failed:\n{r.stderr[-4000:]}"
            os.replace(tmp, exe)  # atomic: a concurrent run sees a whole binary or none
        return exe

    with ThreadPoolExecutor(len(COMPILERS)) as pool:
        return dict(zip(COMPILERS, pool.map(build, COMPILERS)))


def _driver(drivers, arch, *args, env=None, isa=None):
    """Runs a driver: "aarch64" under qemu-aarch64, "native" on the extension's path (or on
    `isa`), an X86_MODELS name: the native driver under qemu-x86_64 as that CPU."""
    if arch == "aarch64":
        cmd = [*QEMU, str(drivers[arch])]
    elif arch in X86_MODELS:
        cmd = ["qemu-x86_64", "-cpu", arch, str(drivers["native"])]
    else:
        cmd = [str(drivers[arch])]
    env = dict(os.environ if env is None else env)
    if arch == "native":  # the extension's path, for a bitwise comparison
        env["TIKE_CPU_ISA"] = isa or tike_cuda.cpu_isa()
    else:  # the emulated CPU picks its own
        env.pop("TIKE_CPU_ISA", None)
    return subprocess.run(cmd + list(args), capture_output=True, text=True, timeout=300,
                          env=env)


def _raw(t):
    """The bytes the kernels read for t, and its row layout (T, stride_b, stride_t) when t is
    a [B, T, V] view with a unit last stride that is not contiguous."""
    if t.dtype == torch.bool:
        t = t.to(torch.uint8)
    if t.is_contiguous():
        return t.reshape(-1).view(torch.uint8).numpy().tobytes(), None
    assert t.dim() == 3 and t.stride(-1) == 1
    span = sum((s - 1) * st for s, st in zip(t.shape, t.stride())) + 1
    flat = torch.as_strided(t, (span,), (1,), t.storage_offset())
    return flat.view(torch.uint8).numpy().tobytes(), (t.shape[1], t.stride(0), t.stride(1))


class Case:
    """One op call: its parameters, its inputs, and the extension's outputs (which say the
    dtype and shape of the driver's)."""

    def __init__(self, name, N, V, dtype, temperature, inputs, expected, **params):
        self.name, self.N, self.V, self.dtype = name, N, V, dtype
        self.params = dict(op=name, N=N, V=V, dtype=DTYPE_CODE[dtype],
                           temperature=repr(float(temperature)), **params)
        self.inputs = {k: v for k, v in inputs.items() if v is not None}
        self.expected = expected  # name -> the extension's output

    def write(self, d):
        d.mkdir()
        lines = [f"{k} {int(v) if isinstance(v, bool) else v}" for k, v in self.params.items()]
        for name, t in self.inputs.items():
            data, layout = _raw(t)
            (d / f"{name}.bin").write_bytes(data)
            if layout is not None:
                lines.append(f"{name}_layout {' '.join(map(str, layout))}")
        (d / "params.txt").write_text("\n".join(lines) + "\n")

    def read(self, d):
        out = {}
        for name, like in self.expected.items():
            data = bytearray((d / f"{name}.out").read_bytes())
            out[name] = torch.frombuffer(data, dtype=like.dtype).reshape(like.shape)
            (d / f"{name}.out").unlink()
        return out


def run_cases(drivers, cases, tmp_path):
    """Each case's outputs from the aarch64 driver; the native driver's must equal the
    extension's bit for bit, and on each X86_MODELS CPU the native driver's forced onto the
    path that CPU picks."""
    dirs = [tmp_path / f"{i}_{c.name}" for i, c in enumerate(cases)]
    for c, d in zip(cases, dirs):
        c.write(d)

    def run(arch, isa=None):
        r = _driver(drivers, arch, "run", *map(str, dirs), isa=isa)
        assert r.returncode == 0, f"{arch} driver failed: {r.stderr[-2000:]}"
        return [c.read(d) for c, d in zip(cases, dirs)]

    for model, isa in X86_MODELS.items():
        for c, want, got in zip(cases, run("native", isa), run(model)):
            for name in c.expected:
                torch.testing.assert_close(
                    got[name], want[name], rtol=0, atol=0, equal_nan=True,
                    msg=lambda m: f"{model} (auto) against native {isa}, {c.name}.{name}: {m}")
    for c, got in zip(cases, run("native")):
        for name, want in c.expected.items():
            torch.testing.assert_close(got[name], want, rtol=0, atol=0, equal_nan=True,
                                       msg=lambda m: f"native driver, {c.name}.{name}: {m}")
    return run("aarch64")


def assert_grad_rows(actual, expected, dtype):
    """assert_grads on the rows where the expected gradient is finite; elsewhere the same
    NaN pattern (rows the contract makes NaN)."""
    finite = expected.isfinite().all(-1)
    assert_grads(actual[finite], expected[finite], dtype)
    assert torch.equal(actual[~finite].isnan(), expected[~finite].isnan())


def assert_reference_grads(actual, expected, value, dtype):
    """assert_grads on the rows whose float64 value is finite (the others are undefined
    rows, NaN by the contract, checked against the extension)."""
    good = value.isfinite()
    assert_grads(actual[good], expected[good], dtype)


def assert_like_extension(case, got):
    """The aarch64 outputs against the x86 extension's: indices exactly, the rest at the op
    tests' tolerances (relative to the largest value, as tests/test_extreme_inputs.py)."""
    for name, want in case.expected.items():
        a = got[name]
        if name == "grad":
            assert_grad_rows(a.reshape(case.N, -1), want.reshape(case.N, -1), case.dtype)
        elif not want.is_floating_point():
            assert torch.equal(a, want), f"{case.name}.{name}"
        elif name.startswith("lse"):
            assert_lse_pairs(a, want, float(case.params["temperature"]))
        else:
            assert_scaled(a, want)


def assert_scaled(actual, expected, rtol=1e-4):
    """assert_values, with the absolute tolerance scaled to the largest finite value (values
    of O(1/τ) at a low temperature)."""
    finite = expected[expected.isfinite()].abs()
    scale = finite.max().item() if finite.numel() else 1.0
    assert_values(actual, expected, atol=max(2e-5, rtol * scale), rtol=rtol)


def _grad64(value, z64, g):
    """d(Σ g·value)/dz in float64 (rows with an undefined value give NaN: not compared)."""
    (grad,) = torch.autograd.grad((value * g.double()).sum(), z64)
    return grad


def _rows(N, V, dtype, gen, *, specials=False, ties=False, scale=3.0):
    z = make_logits((N, V), torch.float32, "cpu", generator=gen, scale=scale)
    if ties:
        z = (z * 2).round() / 2
    if specials:
        z[1, V // 2] = float("nan")
        z[2] = float("-inf")
    return z.to(dtype)


def _mask(N, gen):
    m = torch.rand(N, generator=gen) > 0.25
    m[0] = True
    m[-1] = False
    return m


# -------------------------------------------------------------------------------- the path

def test_the_aarch64_build_runs_the_neon_path(drivers):
    r = _driver(drivers, "aarch64", "isa")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["isa", "neon", "neon", "yes", "supported", "neon"]
    r = _driver(drivers, "aarch64", "isa", env=dict(os.environ, TIKE_CPU_ISA="NEON"))
    assert r.returncode == 0 and "isa neon" in r.stdout
    r = subprocess.run([*QEMU, str(drivers["aarch64"]), "isa"], capture_output=True, text=True,
                       env=dict(os.environ, TIKE_CPU_ISA="avx2"), timeout=60)
    assert r.returncode != 0 and "cannot run the avx2 path" in r.stderr
    objdump = shutil.which("aarch64-linux-gnu-objdump")
    if objdump:  # binutils comes with the cross compiler: the kernels use 4-lane vectors
        asm = subprocess.run([objdump, "-d", str(drivers["aarch64"])], capture_output=True,
                             text=True).stdout
        assert asm.count(".4s") > 100, "no NEON float32x4 instructions in the aarch64 build"


@pytest.mark.skipif(not X86_MODELS, reason="an x86-64 host runs the x86 CPU models")
@pytest.mark.parametrize("model", list(X86_MODELS))
def test_x86_cpu_models_pick_their_path(drivers, model):
    r = _driver(drivers, model, "isa")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[:2] == ["isa", X86_MODELS[model]]
    assert "avx512" not in r.stdout
    r = subprocess.run(["qemu-x86_64", "-cpu", model, str(drivers["native"]), "isa"],
                       capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, TIKE_CPU_ISA="avx512"))
    assert r.returncode != 0 and "cannot run the avx512 path" in r.stderr


# ------------------------------------------------------------- the calls of each op family
# Each returns the driver cases (forward, then backward, from the extension's forward
# outputs) and a check of their aarch64 outputs against the float64 reference.

def topk_kl_calls(z, zr, k, tau, gen, *, tokens=None, old=None, mask=None, union=True,
                  tail=False):
    N, V = z.shape[:-1].numel(), z.shape[-1]
    fwd = op.topk_kl(z, zr, k, tokens, old, mask, tau, union, tail)
    out, lse, idx, coef, shift, stats = fwd
    K1 = idx.shape[1]
    inputs = dict(logits=z, ref_logits=zr, sampled_tokens=tokens, old_logprobs=old, mask=mask)
    names = ["out", "lse", "idx", "coef", "shift", "stats"]
    g = torch.randn(N, generator=gen)
    grad = op.topk_kl_backward(g, z, lse, idx, coef, shift, mask, tau)
    cases = [Case("topk_kl", N, V, z.dtype, tau, inputs, dict(zip(names, fwd)), k=k, K1=K1,
                  tail_bucket=tail),
             Case("topk_kl_backward", N, V, z.dtype, tau,
                  dict(grad_out=g, logits=z, lse=lse, idx=idx, coef=coef, shift=shift,
                       mask=mask), dict(grad=grad), K1=K1)]
    z64 = z.reshape(N, V).double().requires_grad_()
    value, ref_stats = R.topk_kl_reference(
        z64, zr.reshape(N, V).double(), k, sampled_tokens=tokens, old_logprobs=old,
        temperature=tau, mask=mask, union_sampled=union, tail="bucket" if tail else "none",
        return_stats=True)
    grad64 = _grad64(value, z64, g)
    topk = R.topk_indices(z.reshape(N, V), k)
    live = torch.ones(N, dtype=torch.bool) if mask is None else mask

    def check(f, b):
        assert_scaled(f["out"], value.detach())
        assert_values(f["stats"], torch.stack(ref_stats, -1))
        assert torch.equal(f["idx"][live, :k].long(), topk[live])
        assert_reference_grads(b["grad"].reshape(N, V), grad64, value, z.dtype)
    return cases, check


def full_kl_calls(z, zr, tau, gen, *, mask=None):
    N, V = z.shape
    out, lse_p, lse_q = op.full_kl(z, zr, mask, tau)
    g = torch.randn(N, generator=gen)
    grad = op.full_kl_backward(g, z, zr, out, lse_p, lse_q, mask, tau)
    cases = [Case("full_kl", N, V, z.dtype, tau, dict(logits=z, ref_logits=zr, mask=mask),
                  dict(out=out, lse_p=lse_p, lse_q=lse_q)),
             Case("full_kl_backward", N, V, z.dtype, tau,
                  dict(grad_out=g, logits=z, ref_logits=zr, out=out, lse_p=lse_p, lse_q=lse_q,
                       mask=mask), dict(grad=grad))]
    z64 = z.double().requires_grad_()
    value = R.full_kl_reference(z64, zr.double(), temperature=tau, mask=mask)
    grad64 = _grad64(value, z64, g)

    def check(f, b):
        assert_scaled(f["out"], value.detach())
        assert_reference_grads(b["grad"], grad64, value, z.dtype)
    return cases, check


def token_logprobs_calls(z, tau, gen, tokens=None):
    N, V = z.shape
    if tokens is None:
        tokens = torch.randint(0, V, (N,), generator=gen)
    logp, entropy, lse = op.token_logprobs(z, tokens, tau, True)
    g_lp, g_h = torch.randn(N, generator=gen), torch.randn(N, generator=gen)
    grad = op.token_logprobs_backward(g_lp, g_h, z, tokens, lse, entropy, tau)
    cases = [Case("token_logprobs", N, V, z.dtype, tau, dict(logits=z, tokens=tokens),
                  dict(logp=logp, entropy=entropy, lse=lse), with_entropy=1),
             Case("token_logprobs_backward", N, V, z.dtype, tau,
                  dict(grad_logp=g_lp, grad_entropy=g_h, logits=z, tokens=tokens, lse=lse,
                       entropy=entropy), dict(grad=grad))]
    z64 = z.double().requires_grad_()
    lp64, h64 = R.token_logprobs_reference(z64, tokens, temperature=tau, return_entropy=True)
    grad64 = _grad64(lp64 * g_lp.double() + h64 * g_h.double(), z64, torch.ones(N))

    def check(f, b):
        assert_scaled(f["logp"], lp64.detach())
        assert_scaled(f["entropy"], h64.detach())
        assert_reference_grads(b["grad"], grad64, lp64 + h64, z.dtype)
    return cases, check


def fixed_support_calls(z, zr, k, tau, gen, *, sampled, tail):
    """topk_indices, sparse_reference and topk_kl_sparse (whose backward is topk_kl's)."""
    N, V = z.shape
    mask = _mask(N, gen)
    tokens = torch.randint(0, V, (N,), generator=gen) if sampled else None
    old = -torch.rand(N, generator=gen) * 3 if sampled else None
    idx = op.topk_indices(z, k, mask)
    support = torch.stack([torch.randperm(V, generator=gen)[:k] for _ in range(N)]).int()
    sidx, slp, stail = op.sparse_reference(zr, support, tokens, mask, tau)
    K1 = sidx.shape[1]
    fwd = op.topk_kl_sparse(z, sidx, slp, stail, tokens, old, mask, tau, tail)
    cases = [Case("topk_indices", N, V, z.dtype, 1.0, dict(logits=z, mask=mask), dict(idx=idx),
                  k=k),
             Case("sparse_reference", N, V, z.dtype, tau,
                  dict(ref_logits=zr, support=support, sampled_tokens=tokens, mask=mask),
                  dict(idx=sidx, logprobs=slp, tail_logmass=stail), k=k, K1=K1),
             Case("topk_kl_sparse", N, V, z.dtype, tau,
                  dict(logits=z, idx=sidx, ref_logprobs=slp, ref_tail_logmass=stail,
                       sampled_tokens=tokens, old_logprobs=old, mask=mask),
                  dict(zip(["out", "lse", "coef", "shift", "stats"], fwd)), K1=K1,
                  tail_bucket=tail)]
    topk = torch.where(mask.unsqueeze(-1), R.topk_indices(z, k), -1)
    ridx, rlp, rtail = R.sparse_reference_reference(zr, support, sampled_tokens=tokens,
                                                    temperature=tau, mask=mask)
    value, stats = R.topk_kl_reference(
        z.double(), zr.double(), k, sampled_tokens=tokens, old_logprobs=old, temperature=tau,
        mask=mask, tail="bucket" if tail else "none", return_stats=True, support=support)

    def check(a, b, s):
        assert torch.equal(a["idx"].long(), topk)
        assert torch.equal(b["idx"].long(), ridx)
        assert_values(b["logprobs"], rlp)
        assert_values(b["tail_logmass"], rtail)
        assert_scaled(s["out"], value)
        assert_values(s["stats"], torch.stack(stats, -1))
    return cases, check


def run_and_check(drivers, calls, tmp_path):
    """Runs every call's cases in one driver run per architecture, then checks each."""
    cases = [c for cs, _ in calls for c in cs]
    got = run_cases(drivers, cases, tmp_path)
    for c, a in zip(cases, got):
        assert_like_extension(c, a)
    got = iter(got)
    for cs, check in calls:
        check(*[next(got) for _ in cs])


# ---------------------------------------------------------------------------------- the ops

@pytest.mark.parametrize("dtype", DTYPES)
def test_topk_kl(drivers, dtype, gen, tmp_path):
    calls = []
    for cfg in [  # V, k, sampled tokens (united), old logprobs, mask, tail bucket, τ, ...
        dict(V=1, k=1, tau=1.0),
        dict(V=15, k=4, tau=0.7, sampled=True, old=True, mask=True, tail=True, ties=True),
        dict(V=4099, k=16, tau=1.0, sampled=True, mask=True, tail=True, view=True,
             specials=True),
        dict(V=4099, k=300, tau=1.3, sampled=True, old=True, union=False),
    ]:
        V, N = cfg["V"], 6
        z = _rows(N, V, dtype, gen, specials=cfg.get("specials", False),
                  ties=cfg.get("ties", False))
        zr = _rows(N, V, dtype, gen, ties=cfg.get("ties", False))
        if cfg.get("view"):  # a [B, T, V] slice such as logits[:, :-1, :], read in place
            z = torch.cat([z.reshape(2, 3, V), z[:2].reshape(2, 1, V)], 1)[:, :-1, :]
            zr = zr.reshape(2, 3, V)
        calls.append(topk_kl_calls(
            z, zr, cfg["k"], cfg["tau"], gen,
            tokens=torch.randint(0, V, (N,), generator=gen) if cfg.get("sampled") else None,
            old=-torch.rand(N, generator=gen) * 3 if cfg.get("old") else None,
            mask=_mask(N, gen) if cfg.get("mask") else None, union=cfg.get("union", True),
            tail=cfg.get("tail", False)))
    run_and_check(drivers, calls, tmp_path)


@pytest.mark.parametrize("dtype", DTYPES)
def test_full_kl_and_token_logprobs(drivers, dtype, gen, tmp_path):
    calls = []
    for V, tau, masked, specials in [(1, 1.0, False, False), (15, 0.7, True, False),
                                     (4099, 1.0, True, True)]:
        z = _rows(6, V, dtype, gen, specials=specials)
        zr = _rows(6, V, dtype, gen)
        if specials:
            zr[3, 7] = float("-inf")  # q_v = 0 < p_v: the KL is +inf
        calls.append(full_kl_calls(z, zr, tau, gen, mask=_mask(6, gen) if masked else None))
        calls.append(token_logprobs_calls(z, tau, gen))
    run_and_check(drivers, calls, tmp_path)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fixed_support_ops(drivers, dtype, gen, tmp_path):
    calls = []
    for V, k, tau, sampled, tail in [(1, 1, 1.0, False, False), (15, 4, 0.7, True, True),
                                     (4099, 16, 1.0, True, True)]:
        z = _rows(6, V, dtype, gen, ties=V == 15)
        zr = _rows(6, V, dtype, gen)
        calls.append(fixed_support_calls(z, zr, k, tau, gen, sampled=sampled, tail=tail))
    run_and_check(drivers, calls, tmp_path)


@pytest.mark.parametrize("case", ["tau=1e-3", "tau=1e-6", "near FLT_MAX, tau=1",
                                  "near FLT_MAX, tau=0.5, bf16"])
def test_extreme_inputs(drivers, case, gen, tmp_path):
    """Low temperatures and logits near the float limit (docs/kernels.md, Precision), as
    tests/test_extreme_inputs.py checks the extension."""
    dtype = torch.bfloat16 if "bf16" in case else torch.float32
    tau = float(case.split("tau=")[1].split(",")[0])
    N, V = 4, 515
    if "FLT_MAX" in case:  # logits spread over ±FLT_MAX: exp((z − M)/τ) is all that is finite
        z = (torch.rand(N, V, generator=gen) * 2 - 1) * 3.0e38
        zr = (torch.rand(N, V, generator=gen) * 2 - 1) * 3.0e38
        z[:, :8] = 3.3e38 + torch.arange(8) * 1e36  # a head within reach of the max
        zr[:, :8] = 3.3e38 - torch.arange(8) * 1e36
    else:  # logits τ apart: p spread over a few entries
        z = make_logits((N, V), torch.float32, "cpu", generator=gen, scale=3 * tau)
        zr = make_logits((N, V), torch.float32, "cpu", generator=gen, scale=3 * tau)
    z, zr = z.to(dtype), zr.to(dtype)
    # Sampled tokens whose log p a float holds (in the head near the float limit).
    tokens = torch.randint(0, 8 if "FLT_MAX" in case else V, (N,), generator=gen)
    calls = [topk_kl_calls(z, zr, 8, tau, gen, tokens=tokens),
             topk_kl_calls(z, zr, 8, tau, gen, tail=True),
             full_kl_calls(z, zr, tau, gen),
             token_logprobs_calls(z, tau, gen, tokens)]
    run_and_check(drivers, calls, tmp_path)
