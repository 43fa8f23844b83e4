"""The CPU gradient cache (csrc/cpu/grad_cache.h): a backward's [N, V] gradient may be a
buffer an earlier gradient left behind. Every op must write every element of it (stale
NaN in a reused buffer must not show), a buffer in use is never handed out again, and
the cap, the off switch and the release work."""
import os
import subprocess
import sys
import threading

import pytest
import torch

import tike_cuda
from tike_cuda.reference import full_kl_reference, token_logprobs_reference, topk_kl_reference

from conftest import DEVICES, DTYPES, assert_grads, make_logits

# 130 x 4099 two-byte logits are just over the cache's 1 MiB minimum.
N, V, K = 130, 4099, 16
MIB = 1 << 20


def _mask(device):
    m = torch.ones(N, dtype=torch.bool)
    m[::3] = False
    return m.to(device)


def _ops(z, zr, tok, mask):
    """(name, the op's output, its float64 reference, the reference's input) for every op
    with an [N, V] gradient; the dense topk_kl is the reference of topk_kl on a
    SparseReference built on the policy's own top-k."""
    z64, zr64 = z.detach().double().requires_grad_(), zr.double()
    m, t = (None if mask is None else mask.cpu()), tok.cpu()  # the reference's, on the CPU
    sref = tike_cuda.sparse_reference(zr, tike_cuda.topk_indices(z, K), sampled_tokens=tok,
                                      mask=mask)
    return [
        ("token_logprobs", lambda: tike_cuda.token_logprobs(z, tok, mask=mask),
         lambda: token_logprobs_reference(z64, t, mask=m), z64),
        ("entropy", lambda: tike_cuda.token_logprobs(z, tok, mask=mask, return_entropy=True)[1],
         lambda: token_logprobs_reference(z64, t, return_entropy=True, mask=m)[1], z64),
        ("full_kl", lambda: tike_cuda.full_kl(z, zr, mask=mask),
         lambda: full_kl_reference(z64, zr64, mask=m), z64),
        ("topk_kl", lambda: tike_cuda.topk_kl(z, zr, K, sampled_tokens=tok, mask=mask),
         lambda: topk_kl_reference(z64, zr64, K, sampled_tokens=t, mask=m), z64),
        ("topk_kl_bucket", lambda: tike_cuda.topk_kl(z, zr, K, sampled_tokens=tok, mask=mask,
                                                     tail="bucket"),
         lambda: topk_kl_reference(z64, zr64, K, sampled_tokens=t, tail="bucket", mask=m),
         z64),
        ("topk_kl_sparse", lambda: tike_cuda.topk_kl(z, sref, K, sampled_tokens=tok, mask=mask),
         lambda: topk_kl_reference(z64, zr64, K, sampled_tokens=t, mask=m), z64),
    ]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("masked", [False, True])
def test_reused_buffer_is_overwritten(device, dtype, masked, gen):
    z = make_logits((N, V), dtype, device, generator=gen, requires_grad=True)
    zr = make_logits((N, V), dtype, device, generator=gen)
    tok = torch.randint(0, V, (N,), generator=gen).to(device)
    mask = _mask(device) if masked else None
    w = torch.randn(N, generator=gen)
    for name, op, ref, z64 in _ops(z, zr, tok, mask):
        (first,) = torch.autograd.grad((op() * w.to(device)).sum(), z)
        ptr = first.data_ptr()
        first.fill_(float("nan"))  # what a stale buffer may hold
        del first
        (grad,) = torch.autograd.grad((op() * w.to(device)).sum(), z)
        # The test means something only if the NaN buffer came back.
        assert grad.data_ptr() == ptr, f"{name}: the freed gradient buffer was not reused"
        (grad64,) = torch.autograd.grad((ref() * w.double()).sum(), z64)
        assert_grads(grad, grad64, dtype)
        del grad


def test_buffer_in_use_is_not_handed_out(gen):
    z = make_logits((N, V), torch.float32, "cpu", generator=gen, requires_grad=True)
    tok = torch.randint(0, V, (N,), generator=gen)
    (g1,) = torch.autograd.grad(tike_cuda.token_logprobs(z, tok).sum(), z)
    keep = g1.clone()
    (g2,) = torch.autograd.grad((2 * tike_cuda.token_logprobs(z, tok)).sum(), z)
    assert g1.data_ptr() != g2.data_ptr()
    assert torch.equal(g1, keep)
    torch.testing.assert_close(g2, 2 * keep)


def test_threads_get_distinct_buffers(gen):
    z = make_logits((N, V), torch.float32, "cpu", generator=gen, requires_grad=True)
    tok = torch.randint(0, V, (N,), generator=gen)
    (expected,) = torch.autograd.grad(tike_cuda.token_logprobs(z, tok).sum(), z)
    grads, errors = [], []

    def work(scale):
        try:
            for _ in range(5):
                (g,) = torch.autograd.grad((scale * tike_cuda.token_logprobs(z, tok)).sum(), z)
                grads.append((scale, g))
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=work, args=(s,)) for s in (1.0, 2.0, 3.0)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and len(grads) == 15
    assert len({g.data_ptr() for _, g in grads}) == 15  # all alive: none shared
    for scale, g in grads:
        torch.testing.assert_close(g, scale * expected)


def test_info_hits_and_clear(gen):
    z = make_logits((N, V), torch.float32, "cpu", generator=gen, requires_grad=True)
    tok = torch.randint(0, V, (N,), generator=gen)
    tike_cuda.empty_cpu_grad_cache()
    before = tike_cuda.cpu_grad_cache_info()
    assert before["idle_blocks"] == 0 and before["idle_bytes"] == 0
    assert before["cap_bytes"] == int(os.environ.get("TIKE_CPU_GRAD_CACHE_MB", "2048")) * MIB
    for _ in range(3):
        torch.autograd.grad(tike_cuda.token_logprobs(z, tok).sum(), z)
    after = tike_cuda.cpu_grad_cache_info()
    assert after["misses"] - before["misses"] == 1 and after["hits"] - before["hits"] == 2
    assert after["idle_blocks"] == 1 and after["idle_bytes"] >= N * V * 4
    tike_cuda.empty_cpu_grad_cache()
    assert tike_cuda.cpu_grad_cache_info()["idle_bytes"] == 0


def test_smaller_request_leaves_a_much_larger_buffer(gen):
    """A request takes an idle buffer of at most 1.5x its size."""
    z = make_logits((N, V), torch.float32, "cpu", generator=gen, requires_grad=True)
    tok = torch.randint(0, V, (N,), generator=gen)
    (big,) = torch.autograd.grad(tike_cuda.token_logprobs(z, tok).sum(), z)
    big_ptr = big.data_ptr()
    del big
    half = z[: N // 2 - 1].detach().clone().requires_grad_()
    (small,) = torch.autograd.grad(tike_cuda.token_logprobs(half, tok[: N // 2 - 1]).sum(), half)
    assert small.data_ptr() != big_ptr
    most = z[: N - 20].detach().clone().requires_grad_()
    (g,) = torch.autograd.grad(tike_cuda.token_logprobs(most, tok[: N - 20]).sum(), most)
    assert g.data_ptr() == big_ptr


def test_cached_gradient_is_an_ordinary_tensor(gen):
    z = make_logits((N, V), torch.float32, "cpu", generator=gen, requires_grad=True)
    tok = torch.randint(0, V, (N,), generator=gen)
    tike_cuda.token_logprobs(z, tok).sum().backward()
    g = z.grad
    expected = g.clone()
    g.resize_(2 * N, V)  # resizable storage
    assert torch.equal(g[:N], expected)
    g[N:] = 1.0
    assert g.sum().isfinite()
    del g
    z.grad = None
    torch.save(expected, os.devnull)


def _run(code, **env):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, **env))


_LOOP = """
import torch, tike_cuda
z = torch.randn(130, 4099, requires_grad=True)
tok = torch.randint(0, 4099, (130,))
ref = torch.autograd.grad(torch.log_softmax(z, -1).gather(1, tok[:, None]).sum(), z)[0]
for _ in range(3):
    g = torch.autograd.grad(tike_cuda.token_logprobs(z, tok).sum(), z)[0]
    torch.testing.assert_close(g, ref)
    del g
i = tike_cuda.cpu_grad_cache_info()
print(i["hits"], i["misses"], i["idle_blocks"], i["idle_bytes"], i["cap_bytes"])
"""


def test_cache_off_and_cap():
    r = _run(_LOOP, TIKE_CPU_GRAD_CACHE_MB="0")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["0", "3", "0", "0", "0"]
    r = _run(_LOOP, TIKE_CPU_GRAD_CACHE_MB="1")  # a 2.1 MB gradient exceeds a 1 MiB cap
    assert r.returncode == 0, r.stderr
    hits, misses, blocks, idle, cap = map(int, r.stdout.split())
    assert (hits, misses, blocks, idle, cap) == (0, 3, 0, 0, MIB)
    r = _run(_LOOP, TIKE_CPU_GRAD_CACHE_MB="3")
    hits, misses, blocks, idle, cap = map(int, r.stdout.split())
    assert (hits, misses, blocks, cap) == (2, 1, 1, 3 * MIB) and 0 < idle <= cap


def test_malformed_cap_fails_the_import():
    r = _run("import tike_cuda", TIKE_CPU_GRAD_CACHE_MB="lots")
    assert r.returncode != 0
    assert "TIKE_CPU_GRAD_CACHE_MB" in r.stderr and "ImportError" in r.stderr
