"""Masks and padding as trainers give them (verl / HF): bool or 0/1 integer or float masks
with one rule and one message, and token ids of masked rows (e.g. -100) never read."""
import pytest
import torch

import tike_cuda
from tike_cuda.reference import full_kl_reference, token_logprobs_reference, topk_kl_reference

from conftest import DEVICES, assert_grads, assert_values, make_logits

B, T, V = 3, 4, 60
MASKS = {"bool": torch.bool, "int64": torch.int64, "int32": torch.int32, "uint8": torch.uint8,
         "float32": torch.float32}


def _batch(device, gen):
    z = make_logits((B, T, V), torch.float32, device, generator=gen, requires_grad=True)
    zr = make_logits((B, T, V), torch.float32, device, generator=gen)
    keep = torch.rand(B, T, generator=gen) > 0.35
    keep[0, 0], keep[0, 1] = True, False
    tok = torch.where(keep, torch.randint(0, V, (B, T), generator=gen), -100)  # HF padding
    old = torch.randn(B, T, generator=gen) - 3
    return z, zr, keep.to(device), tok.to(device), old.to(device)


def _calls(zr, tok, old, mask):
    """Each public function with a mask, as a function of the logits (one output)."""
    return {
        "topk_kl": lambda x: tike_cuda.topk_kl(x, zr, 8, sampled_tokens=tok, old_logprobs=old,
                                               mask=mask),
        "full_kl": lambda x: tike_cuda.full_kl(x, zr, mask=mask),
        "token_logprobs": lambda x: sum(tike_cuda.token_logprobs(x, tok, mask=mask,
                                                                 return_entropy=True)),
        "per_token_kl_k3": lambda x: tike_cuda.per_token_kl(x, zr, "k3", sampled_tokens=tok,
                                                            mask=mask),
        "per_token_kl_tike": lambda x: tike_cuda.per_token_kl(x, zr, "tike", sampled_tokens=tok,
                                                              old_logprobs=old, mask=mask),
    }


def _references(zr, tok, old, keep):
    zr, tok, old, keep = zr.cpu(), tok.cpu(), old.cpu(), keep.cpu()
    return {
        "topk_kl": lambda x: topk_kl_reference(x, zr, 8, sampled_tokens=tok, old_logprobs=old,
                                               mask=keep),
        "full_kl": lambda x: full_kl_reference(x, zr, mask=keep),
        "token_logprobs": lambda x: sum(token_logprobs_reference(x, tok, mask=keep,
                                                                 return_entropy=True)),
    }


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mask_dtype", list(MASKS))
@pytest.mark.parametrize("op", ["topk_kl", "full_kl", "token_logprobs", "per_token_kl_k3",
                                "per_token_kl_tike"])
def test_every_mask_dtype_and_padding(device, mask_dtype, op, gen):
    z, zr, keep, tok, old = _batch(device, gen)
    mask = keep.to(MASKS[mask_dtype])
    fn = _calls(zr, tok, old, mask)[op]
    out = fn(z)
    assert out.shape == (B, T) and out[~keep].eq(0).all()
    (grad,) = torch.autograd.grad(out.sum(), z)
    assert grad[~keep].eq(0).all() and grad[keep].abs().sum() > 0
    same = _calls(zr, tok, old, keep)[op](z)  # the bool mask gives the very same values
    torch.testing.assert_close(out, same, rtol=0, atol=0)
    ref = _references(zr, tok, old, keep).get(op)
    if ref is not None:
        z64 = z.detach().double().cpu().requires_grad_()
        exp = ref(z64)
        assert_values(out, exp)
        (grad64,) = torch.autograd.grad(exp.sum(), z64)
        assert_grads(grad, grad64, torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_padding_is_still_refused_where_unmasked(device, gen):
    if device != "cpu":
        pytest.skip("tokens are range-checked on the CPU only (docs/kernels.md)")
    z, zr, keep, tok, _ = _batch(device, gen)
    bad = torch.where(keep, tok, -100)
    bad[0, 0] = -100  # an unmasked row with a padding id
    for call in (lambda: tike_cuda.topk_kl(z, zr, 8, sampled_tokens=bad, mask=keep),
                 lambda: tike_cuda.token_logprobs(z, bad, mask=keep)):
        with pytest.raises(ValueError, match=r"tokens must be in \[0, V=60\) at unmasked "
                                             r"positions, got values in \[-100,"):
            call()


def test_raw_op_ignores_masked_token_ids(gen):
    """The C++ glue's range check (the backstop for direct op calls) skips masked rows."""
    z, zr, keep, tok, _ = _batch("cpu", gen)
    op = torch.ops.tike_cuda.topk_kl
    rows = (z.detach(), zr, 8, tok.reshape(-1), None, keep.reshape(-1), 1.0, True, False)
    out = op(*rows)[0]
    assert out[~keep.reshape(-1)].eq(0).all()
    unmasked_bad = tok.reshape(-1).clone()
    unmasked_bad[0] = V
    with pytest.raises(RuntimeError, match="sampled_tokens must be in .* at unmasked rows"):
        op(z.detach(), zr, 8, unmasked_bad, None, keep.reshape(-1), 1.0, True, False)


@pytest.mark.parametrize("bad,err,msg", [
    (torch.tensor([[1, 0, 2, 1]] * 3), ValueError, "got the value 2"),
    (torch.tensor([[1.0, 0.0, 0.5, 1.0]] * 3), ValueError, "got the value 0.5"),
    (torch.ones(3, 4, dtype=torch.complex64), TypeError, "got torch.complex64"),
])
def test_one_rule_one_message(bad, err, msg, gen):
    z, zr, _, tok, old = _batch("cpu", gen)
    rule = r"mask must be a bool tensor, or an integer or floating tensor holding only 0 and 1"
    for fn in _calls(zr, tok.clamp_min(0), old, bad).values():
        with pytest.raises(err, match=rule + ".*" + msg):
            fn(z)
    with pytest.raises(err, match=rule):
        tike_cuda.grpo.aggregate(torch.zeros(3, 4), bad)
