"""torch.compile(fullgraph=True) of every op, also with dynamic=True and with temperature
and k changing between calls (recompiles are fine; failures are not)."""
import pytest
import torch

import tike_cuda

from conftest import DEVICES, make_logits

N, V = 6, 50


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    # every test starts with an empty compile cache (the recompile limit counts per function)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _inputs(device, gen):
    z = make_logits((2, 3, V), torch.float32, device, generator=gen, requires_grad=True)
    zr = make_logits((2, 3, V), torch.float32, device, generator=gen)
    tok = torch.randint(0, V, (2, 3), generator=gen).to(device)
    old = (torch.randn(2, 3, generator=gen) - 3).to(device)
    mask = torch.tensor([[1, 1, 0], [1, 0, 1]], device=device)  # integer, as verl gives it
    return z, zr, tok, old, mask


def _loss(z, zr, tok, old, mask, temperature, k):
    logp, ent = tike_cuda.token_logprobs(z, tok, temperature=temperature, return_entropy=True,
                                         mask=mask)
    kl = tike_cuda.topk_kl(z, zr, k, sampled_tokens=tok, old_logprobs=old, mask=mask,
                           temperature=temperature)
    full = tike_cuda.full_kl(z, zr, temperature=temperature, mask=mask)
    k3 = tike_cuda.per_token_kl(z, zr, "k3", sampled_tokens=tok, mask=mask,
                                temperature=temperature)
    return (logp + 0.1 * kl + 0.01 * full - 0.001 * ent + k3).sum()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dynamic", [True, None])
def test_new_temperature_and_k(device, dynamic, gen):
    z, zr, tok, old, mask = _inputs(device, gen)
    compiled = torch.compile(_loss, fullgraph=True, dynamic=dynamic, backend="aot_eager")
    for temperature, k in [(1.0, 4), (0.7, 4), (0.7, 9), (1.3, 2)]:
        got = compiled(z, zr, tok, old, mask, temperature, k)
        exp = _loss(z, zr, tok, old, mask, temperature, k)
        (g_got,) = torch.autograd.grad(got, z)
        (g_exp,) = torch.autograd.grad(exp, z)
        torch.testing.assert_close(got, exp, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(g_got, g_exp, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_dynamic_shapes_inductor(device, gen):
    compiled = torch.compile(_loss, fullgraph=True, dynamic=True)
    for rows in (3, 5):
        z = make_logits((2, rows, V), torch.float32, device, generator=gen, requires_grad=True)
        zr = make_logits((2, rows, V), torch.float32, device, generator=gen)
        tok = torch.randint(0, V, (2, rows), generator=gen).to(device)
        old = torch.zeros(2, rows, device=device) - 3
        mask = torch.ones(2, rows, dtype=torch.bool, device=device)
        got = compiled(z, zr, tok, old, mask, 0.9, 4)
        torch.testing.assert_close(got, _loss(z, zr, tok, old, mask, 0.9, 4), rtol=1e-5, atol=1e-5)


def test_bad_temperature_still_refused_when_traced(gen):
    z, zr, tok, old, mask = _inputs("cpu", gen)
    compiled = torch.compile(lambda x, t: tike_cuda.full_kl(x, zr, temperature=t),
                             fullgraph=True, dynamic=True, backend="aot_eager")
    compiled(z, 0.5)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(Exception, match="temperature must be a finite number > 0"):
            compiled(z, bad)
