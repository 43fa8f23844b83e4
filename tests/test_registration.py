"""The ops are registered once and behave under torch.library.opcheck and torch.compile."""
import pytest
import torch

import tike_cuda

from conftest import DEVICES, make_logits


def _samples(device, gen):
    z = make_logits((2, 3, 40), torch.float32, device, generator=gen, requires_grad=True)
    zr = make_logits((2, 3, 40), torch.float32, device, generator=gen)
    tokens = torch.randint(0, 40, (6,), generator=gen).to(device)
    old = torch.randn(6, generator=gen).to(device) - 4
    mask = torch.tensor([True, False, True, True, True, False], device=device)
    return z, zr, tokens, old, mask


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_forward_ops(device, gen):
    z, zr, tokens, old, mask = _samples(device, gen)
    op = torch.ops.tike_cuda
    for tail in (False, True):
        torch.library.opcheck(op.topk_kl, (z, zr, 8, tokens, old, mask, 0.9, True, tail))
    torch.library.opcheck(op.topk_kl, (z, zr, 40, None, None, None, 1.0, True, False))
    torch.library.opcheck(op.full_kl, (z, zr, mask, 1.1))
    for ent in (False, True):
        torch.library.opcheck(op.token_logprobs, (z, tokens.view(2, 3), 1.0, ent))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_backward_ops(device, gen):
    z, zr, tokens, old, mask = _samples(device, gen)
    z = z.detach()
    op = torch.ops.tike_cuda
    g = torch.randn(6, generator=gen).to(device)
    _, lse, idx, coef, shift, _ = op.topk_kl(z, zr, 8, tokens, old, mask, 1.0, True, True)
    torch.library.opcheck(op.topk_kl_backward, (g, z, lse, idx, coef, shift, mask, 1.0))
    torch.library.opcheck(op.topk_kl_backward_, (g, z.clone(), lse, idx, coef, shift, mask, 1.0))
    out, lp, lq = op.full_kl(z, zr, mask, 1.0)
    torch.library.opcheck(op.full_kl_backward, (g, z, zr, out, lp, lq, mask, 1.0))
    logp, ent, lse = op.token_logprobs(z, tokens, 1.0, True)
    torch.library.opcheck(op.token_logprobs_backward, (g, g, z, tokens, lse, ent, 1.0))
    torch.library.opcheck(op.token_logprobs_backward, (g, None, z, tokens, lse, ent, 1.0))


def _grpo_like_loss(logits, ref_logits, tokens, old, mask):
    """A GRPO-style loss using every fused op, as a user would write it."""
    logp, ent = tike_cuda.token_logprobs(logits, tokens, return_entropy=True)
    ratio = torch.exp(logp - old)
    kl = tike_cuda.topk_kl(logits, ref_logits, 8, sampled_tokens=tokens, old_logprobs=old,
                           mask=mask)
    full = tike_cuda.full_kl(logits, ref_logits, mask=mask)
    per_token = -ratio * 0.5 + 0.1 * kl + 0.01 * full - 0.001 * ent
    return (per_token * mask).sum() / mask.sum()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(device, backend, gen):
    z, zr, tokens, old, mask = _samples(device, gen)
    tokens, old, mask = tokens.view(2, 3), old.view(2, 3), mask.view(2, 3)
    eager = _grpo_like_loss(z, zr, tokens, old, mask)
    (g_eager,) = torch.autograd.grad(eager, z)
    compiled_fn = torch.compile(_grpo_like_loss, fullgraph=True, backend=backend)
    compiled = compiled_fn(z, zr, tokens, old, mask)
    (g_comp,) = torch.autograd.grad(compiled, z)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_comp, g_eager, rtol=1e-5, atol=1e-6)


def test_registered_once():
    """One TORCH_LIBRARY block: every op has a schema and a CPU kernel."""
    names = ["topk_kl", "topk_kl_backward", "topk_kl_backward_", "full_kl", "full_kl_backward",
             "token_logprobs", "token_logprobs_backward"]
    for name in names:
        packet = getattr(torch.ops.tike_cuda, name)
        assert torch._C._dispatch_has_kernel_for_dispatch_key(packet.default.name(), "CPU")
    assert "a!" in str(torch.ops.tike_cuda.topk_kl_backward_.default._schema)


@pytest.mark.skipif(not torch.cuda.is_available() or tike_cuda.built_with_cuda(),
                    reason="only meaningful on a GPU with a CPU-only build")
def test_missing_cuda_kernel_is_a_clear_error():
    z = torch.randn(2, 10, device="cuda")
    with pytest.raises(NotImplementedError, match="tike_cuda::topk_kl"):
        tike_cuda.topk_kl(z, z, 2)


def test_topk_stats_load_with_weights_only(tmp_path, gen):
    """TopkStats is allowlisted: torch.load(weights_only=True) gives it back."""
    z = make_logits((3, 40), torch.float32, "cpu", generator=gen)
    _, stats = tike_cuda.topk_kl(z, z + 0.1, 4, return_stats=True)
    torch.save({"stats": stats}, tmp_path / "s.pt")
    back = torch.load(tmp_path / "s.pt", weights_only=True)["stats"]
    assert isinstance(back, tike_cuda.TopkStats)
    for a, b in zip(back, stats):
        assert torch.equal(a, b)
