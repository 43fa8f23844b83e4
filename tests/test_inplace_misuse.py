"""topk_kl(inplace_backward=True): every detectable misuse is refused at the call with a
ValueError naming the problem; what is only known at backward is a clear RuntimeError."""
import pytest
import torch

import tike_cuda
from tike_cuda import _inplace

from conftest import DEVICES, make_logits

V = 300


def _ref(x):
    return (x.detach().float() + 0.3).to(x.dtype)


def _activation(shape, device, gen):
    x = make_logits(shape, torch.float32, device, generator=gen, requires_grad=True)
    return x, x * 1.0  # a non-leaf, as an lm_head output would be


@pytest.mark.parametrize("device", DEVICES)
def test_leaf_and_parameter_refused(device, gen):
    x = make_logits((4, V), torch.float32, device, generator=gen, requires_grad=True)
    p = torch.nn.Parameter(x.detach().clone())
    for leaf in (x, p):
        with pytest.raises(ValueError, match="leaf tensor"):
            tike_cuda.topk_kl(leaf, _ref(leaf), 4, inplace_backward=True)
    assert torch.equal(p.detach(), x.detach())  # untouched


@pytest.mark.parametrize("device", DEVICES)
def test_overlapping_rows_refused(device, gen):
    w = make_logits((V,), torch.float32, device, generator=gen, requires_grad=True)
    shared = (w * 1.0).expand(5, V)  # stride 0: every row is the same memory
    with pytest.raises(ValueError, match="share memory"):
        tike_cuda.topk_kl(shared, _ref(shared), 4, inplace_backward=True)
    base = make_logits((2 * V,), torch.float32, device, generator=gen, requires_grad=True) * 1.0
    half = base.as_strided((3, V), (V // 2, 1))  # rows half a row apart
    with pytest.raises(ValueError, match="share memory"):
        tike_cuda.topk_kl(half, _ref(half), 4, inplace_backward=True)


@pytest.mark.parametrize("device", DEVICES)
def test_unsupported_layouts_refused_at_the_call(device, gen):
    _, z = _activation((V, 6), device, gen)
    with pytest.raises(ValueError, match="unit stride on the last dim"):
        tike_cuda.topk_kl(z.T, _ref(z.T), 4, inplace_backward=True)
    _, z = _activation((6, 2 * V), device, gen)
    with pytest.raises(ValueError, match="unit stride on the last dim"):
        tike_cuda.topk_kl(z[:, ::2], _ref(z[:, ::2]), 4, inplace_backward=True)
    _, z = _activation((2, 3, 4, 2 * V), device, gen)
    cut = z[:, :2, :3, :V]  # three leading dims that do not merge
    with pytest.raises(ValueError, match="at most two leading dims"):
        tike_cuda.topk_kl(cut, _ref(cut), 4, inplace_backward=True)


@pytest.mark.parametrize("device", DEVICES)
def test_second_inplace_use_refused(device, gen):
    x, z = _activation((4, V), device, gen)
    zr = _ref(z)
    a = tike_cuda.topk_kl(z, zr, 4, inplace_backward=True)
    with pytest.raises(ValueError, match="already given to an in-place topk_kl"):
        tike_cuda.topk_kl(z, zr, 8, inplace_backward=True)
    with pytest.raises(ValueError, match="already given to an in-place topk_kl"):
        tike_cuda.topk_kl(z[1:3], zr[1:3], 8, inplace_backward=True)  # a view of the same rows
    b = tike_cuda.topk_kl(z, zr, 8)  # the default path is fine
    key = z.untyped_storage().data_ptr()
    assert key in _inplace._pending
    (a.sum() + b.sum()).backward()
    assert key not in _inplace._pending  # released at backward: nothing accumulates
    # a graph dropped without backward frees the buffer too
    _, z2 = _activation((4, V), device, gen)
    tike_cuda.topk_kl(z2, _ref(z2), 4, inplace_backward=True)
    tike_cuda.topk_kl(z2, _ref(z2), 4, inplace_backward=True)  # the first graph is gone
    assert z2.untyped_storage().data_ptr() not in _inplace._pending


@pytest.mark.parametrize("device", DEVICES)
def test_disjoint_chunks_of_one_buffer_allowed(device, gen):
    """Chunking a loss over rows is legitimate: the chunks' memory does not overlap."""
    x, z = _activation((2, 6, V), device, gen)
    zr = _ref(z)
    (expected,) = torch.autograd.grad(tike_cuda.topk_kl(x * 1.0, zr, 4).sum(), x)
    parts = [tike_cuda.topk_kl(z[:, i:i + 2], zr[:, i:i + 2], 4, inplace_backward=True)
             for i in range(0, 6, 2)]
    (grad,) = torch.autograd.grad(sum(p.sum() for p in parts), x)
    torch.testing.assert_close(grad, expected)


@pytest.mark.parametrize("device", DEVICES)
def test_second_backward_is_a_clear_error(device, gen):
    _, z = _activation((3, V), device, gen)
    out = tike_cuda.topk_kl(z, _ref(z), 4, inplace_backward=True).sum()
    out.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="can be backpropagated once"):
        out.backward()


@pytest.mark.parametrize("device", DEVICES)
def test_create_graph_is_a_clear_error(device, gen):
    x, z = _activation((3, V), device, gen)
    out = tike_cuda.topk_kl(z, _ref(z), 4, inplace_backward=True).sum()
    with pytest.raises(RuntimeError, match="no second derivative"):
        torch.autograd.grad(out, x, create_graph=True)


def test_transforms_refused(gen):
    x = make_logits((3, V), torch.float32, "cpu", generator=gen)
    zr = _ref(x)
    fn = lambda z: tike_cuda.topk_kl(z * 1.0, zr, 4, inplace_backward=True).sum()  # noqa: E731
    with pytest.raises(ValueError, match="torch.func"):
        torch.func.grad(fn)(x)
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(x.clone().requires_grad_(), torch.ones_like(x))
        with pytest.raises(ValueError, match="forward-mode AD"):
            fn(dual)
    # fullgraph compile reports the ValueError raised while tracing as Unsupported
    with pytest.raises((ValueError, torch._dynamo.exc.Unsupported), match="eager-only"):
        torch.compile(fn, fullgraph=True, backend="eager")(x.clone().requires_grad_())


def test_without_grad_the_flag_is_moot(gen):
    x = make_logits((3, V), torch.float32, "cpu", generator=gen, requires_grad=True)
    with torch.no_grad():  # nothing will be backpropagated: no check, no overwrite
        out = tike_cuda.topk_kl(x, _ref(x), 4, inplace_backward=True)
    torch.testing.assert_close(out, tike_cuda.topk_kl(x.detach(), _ref(x), 4))
