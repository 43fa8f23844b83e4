"""Shared fixtures: the devices to test on, dtype tolerances, and input makers."""
import importlib.util
import zlib

import pytest
import torch

DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# verl's tests (test_verl_*.py) need verl, whose pins clash with trl's: they run where verl is
# importable, and elsewhere test_verl.py runs them in verl's own environment (.venv-verl).
collect_ignore_glob = ["test_verl.py"] if importlib.util.find_spec("verl") else ["test_verl_*.py"]

_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=[_cuda, pytest.mark.cuda])]

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
