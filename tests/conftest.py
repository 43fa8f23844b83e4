"""Shared fixtures: the devices to test on, dtype tolerances, and input makers."""
import contextlib
import hashlib
import importlib.util
import os
import tempfile
import zlib
from pathlib import Path

import pytest
import torch


def _inductor_cache_of_this_build():
    """torch.compile's (inductor) on-disk cache, keyed by this build of the extension and
    the package's Python sources (the fake kernels): its graph cache does not key on a
    custom op's fake kernel, so an entry written against another build — other saved-tensor
    shapes — would be reused and fail. A TORCHINDUCTOR_CACHE_DIR set by the caller wins.
    It runs before tike_cuda is imported: importing torch._dynamo fixes the default."""
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        return
    pkg = Path(importlib.util.find_spec("tike_cuda").origin).resolve().parent
    h = hashlib.sha256(torch.__version__.encode())
    for f in sorted(pkg.rglob("*.py")) + sorted(pkg.glob("_C*")):
        h.update(str(f.relative_to(pkg)).encode())
        h.update(f.read_bytes())
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(
        tempfile.gettempdir(), f"tike_cuda_inductor_{h.hexdigest()[:16]}")


_inductor_cache_of_this_build()

import tike_cuda  # noqa: E402  (after the cache directory is chosen)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# A real GPU that the extension was built for.
HAS_GPU = torch.cuda.is_available() and bool(getattr(tike_cuda._C, "WITH_CUDA", 0))


class EmulatedDevice(str):
    """The device of the "emu" test cases: tensors on the CPU (it is the string "cpu"),
    every torch.ops.tike_cuda.* call on the CPU emulation of the CUDA kernels and glue
    (tike_cuda.testing.emulated_cuda, entered around the test by `_emulated_device`)."""


EMU = EmulatedDevice("cpu")
# Where device-parametrized tests run: the CPU op, and the CUDA kernels — on a GPU when
# there is one, else on their emulation (docs/emulation.md), so that CI runs them too.
CUDA_PARAM = (pytest.param("cuda", id="cuda", marks=[pytest.mark.cuda]) if HAS_GPU
              else pytest.param(EMU, id="emu", marks=[pytest.mark.emu]))
DEVICES = [pytest.param("cpu", id="cpu"), CUDA_PARAM]


def on_emulation(device):
    """Whether a test's `device` is the emulated CUDA device (keep its shapes small: the
    emulation runs a __syncthreads of 256 threads in ~13 µs)."""
    return isinstance(device, EmulatedDevice)

# verl's tests (test_verl_*.py) need verl, whose pins clash with trl's: they run where verl is
# importable, and elsewhere test_verl.py runs them in verl's own environment (.venv-verl).
collect_ignore_glob = ["test_verl.py"] if importlib.util.find_spec("verl") else ["test_verl_*.py"]

# Relative size of one rounding of the gradient to the logits dtype (values are float32).
GRAD_RTOL = {torch.float32: 2e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3}


def make_logits(shape, dtype, device, *, scale=3.0, generator=None, requires_grad=False):
    """Random logits rounded to `dtype`; the reference sees exactly these values."""
    x = torch.randn(shape, generator=generator, dtype=torch.float64) * scale
    x = x.to(device=device, dtype=dtype)
    return x.requires_grad_(requires_grad)


def assert_values(actual, expected, atol=2e-5, rtol=1e-4):
    """Per-token float32 outputs against the float64 reference."""
    assert actual.dtype == torch.float32
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), atol=atol, rtol=rtol,
                               equal_nan=True)


def assert_lse_pairs(actual, expected, temperature, atol=1e-4, rtol=1e-4):
    """Saved [N, 2] lse pairs (M, ℓ), lse = M/τ + ℓ (docs/kernels.md): M is a reference
    point (the row max on the CPU, a running reference on CUDA), so compare the lse."""
    a, b = actual.double().cpu(), expected.double().cpu()
    assert a.shape == b.shape and a.shape[-1] == 2
    torch.testing.assert_close(a[..., 0] / temperature + a[..., 1],
                               b[..., 0] / temperature + b[..., 1], atol=atol, rtol=rtol,
                               equal_nan=True)


def assert_grads(actual, expected, dtype):
    """Gradients (in the logits dtype) against float64 autograd, relative to the largest entry."""
    assert actual.dtype == dtype
    exp = expected.double().cpu()
    scale = exp.abs().max().item() if exp.numel() else 0.0
    rtol = GRAD_RTOL[dtype]
    # A floor on the scale: a gradient that is exactly 0 in float64 (V = 1) is a few float32
    # roundings of O(r/τ) terms in the kernel.
    torch.testing.assert_close(actual.double().cpu(), exp, rtol=rtol, atol=rtol * max(scale, 1.0))


@pytest.fixture
def gen(request):
    """A generator seeded from the test's id: every test draws different inputs, and a
    failure reproduces exactly when the test is rerun."""
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


# ------------------------------------------------------------------ where CUDA kernels run
# The CUDA kernel tests (test_cuda_kernels.py) run on every `kdev`: a real GPU ("cuda",
# skipped without one) and the CPU emulation of the CUDA execution model ("emu", always;
# tike_cuda.testing). Under the emulation each test case gets one thread order, picked from
# its node id (so all three orders are spread over the matrix and a failure reproduces when
# the same test is rerun); TIKE_EMU_ORDER=forward|reversed|shuffled forces one for all.

class KernelDevice:
    """Tensors (`put`), raw ops (`ops`) and public-API calls (`with dev.api():`) of one device."""

    def __init__(self, kind, order=None):
        self.kind, self.order = kind, order

    def __repr__(self):
        return self.kind if self.order is None else f"{self.kind}[{self.order}]"

    @property
    def ops(self):
        return torch.ops.tike_cuda_emu if self.kind == "emu" else torch.ops.tike_cuda

    def put(self, x):
        if x is None or self.kind == "emu":
            return x
        return x.cuda()

    def api(self):
        """Context for calls of the public API (and their backward) on this device."""
        if self.kind == "emu":
            from tike_cuda.testing import emulated_cuda
            return emulated_cuda(self.order, seed=self.seed)
        return contextlib.nullcontext()


def _emu_order(nodeid):
    from tike_cuda.testing import ORDERS
    forced = os.environ.get("TIKE_EMU_ORDER")
    if forced:
        if forced not in ORDERS:
            raise ValueError(f"TIKE_EMU_ORDER must be one of {ORDERS}, got {forced!r}")
        return forced
    return ORDERS[zlib.crc32(nodeid.encode()) % len(ORDERS)]


def _load_emulation():
    """The emulated ops; a missing CUDA toolkit skips the emulated tests, except in CI."""
    from tike_cuda import testing
    if testing.cuda_include_dir() is None and not os.environ.get("CI"):
        pytest.skip("the CUDA emulation needs the CUDA toolkit's headers (set CUDA_HOME)")
    testing.load_emulated()
    return testing


# The real GPU only where there is one (the emulated twin always runs).
KERNEL_DEVICES = ([pytest.param("cuda", id="cuda", marks=[pytest.mark.cuda])] if HAS_GPU else []) \
    + [pytest.param("emu", id="emu", marks=[pytest.mark.emu])]


@pytest.fixture(params=KERNEL_DEVICES)
def kdev(request):
    if request.param == "cuda":
        yield KernelDevice("cuda")
        return
    testing = _load_emulation()
    dev = KernelDevice("emu", _emu_order(request.node.nodeid))
    dev.seed = zlib.crc32(request.node.nodeid.encode())
    request.node.user_properties.append(("thread order", dev.order))
    testing.set_thread_order(dev.order, dev.seed)
    yield dev
    testing.set_thread_order("forward", 0)


@pytest.fixture(autouse=True)
def _emulated_device(request):
    """Runs a test whose `device` parameter is EMU inside emulated_cuda(), in the thread
    order picked from its node id (as `kdev`)."""
    callspec = getattr(request.node, "callspec", None)
    if callspec is None or not on_emulation(callspec.params.get("device")):
        yield
        return
    testing = _load_emulation()
    order = _emu_order(request.node.nodeid)
    request.node.user_properties.append(("thread order", order))
    with testing.emulated_cuda(order, seed=zlib.crc32(request.node.nodeid.encode())):
        yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    if report.failed:
        for name, value in item.user_properties:
            if name == "thread order":
                report.sections.append(("emulation", f"thread order: {value} (TIKE_EMU_ORDER)"))
