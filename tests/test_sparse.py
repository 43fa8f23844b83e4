"""Fixed support (design.md §6): topk_indices, sparse_reference, and topk_kl with a
SparseReference — against the dense op and the float64 reference, values and gradients."""
import pytest
import torch

import tike_cuda
from tike_cuda import SparseReference
from tike_cuda.reference import sparse_reference_reference, topk_indices as topk_ref, \
    topk_kl_reference

from conftest import DEVICES, DTYPES, assert_grads, assert_lse_pairs, assert_values, make_logits

K = 16
OPS = torch.ops.tike_cuda
NAN, INF = float("nan"), float("inf")


def _sampled(shape, V, gen, device, idx=None, inside=None):
    """Random sampled tokens; with `inside` (bool [...]) taken from / kept out of idx."""
    tok = torch.randint(0, V, shape, generator=gen)
    if inside is not None:
        pick = idx.cpu().long()[..., 0]
        tok = torch.where(inside.cpu(), pick, tok)
        members = (idx.cpu().long() == tok.unsqueeze(-1)).any(-1)
        assert torch.equal(members, inside.cpu()), "draw again: a random token hit S"
    return tok.to(device)


# ------------------------------------------------------------------------ topk_indices

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("V", [1, K - 1, K, 4099])
def test_topk_indices_is_topk_kl_s(device, dtype, V, gen):
    k = min(K, V)
    z = make_logits((7, V), dtype, device, generator=gen)
    idx = tike_cuda.topk_indices(z, k)
    assert idx.dtype == torch.int32 and idx.shape == (7, k)
    assert torch.equal(idx.cpu().long(), topk_ref(z.cpu(), k))
    _, _, dense_idx, _, _, _ = OPS.topk_kl(z, z, k, None, None, None, 1.0, True, False)
    assert torch.equal(idx, dense_idx)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k", [1, 5, 64, 256, 300])
def test_topk_indices_k_range(device, k, gen):
    z = make_logits((5, 1000), torch.bfloat16, device, generator=gen)  # bf16: many ties
    assert torch.equal(tike_cuda.topk_indices(z, k).cpu().long(), topk_ref(z.cpu(), k))


@pytest.mark.parametrize("device", DEVICES)
def test_topk_indices_ties_nan_and_signed_zero(device):
    V = 2000
    z = torch.zeros(4, V, dtype=torch.bfloat16, device=device)
    z[:, ::7] = 1.0                # 286 tied maxima per row: the first K of them
    z[1, 1500] = 2.0               # a unique maximum, then the tie
    z[2, :] = float("nan")         # NaN ranks as −inf: the first K finite ...
    z[2, 1990:] = -5.0             # ... are these, in index order
    z[3, :] = -1.0
    z[3, 100::3] = -0.0            # −0 ranks as +0: ties in index order
    z[3, 50] = 0.0
    idx = tike_cuda.topk_indices(z, K)
    assert idx[0].tolist() == list(range(0, 7 * K, 7))
    assert idx[1].tolist() == [1500] + list(range(0, 7 * (K - 1), 7))
    assert idx[2].tolist()[:10] == list(range(1990, 2000))
    assert idx[3].tolist() == [50] + list(range(100, 100 + 3 * (K - 1), 3))
    assert torch.equal(idx.cpu().long(), topk_ref(z.cpu(), K))


@pytest.mark.parametrize("device", DEVICES)
def test_topk_indices_layouts_and_mask(device, gen):
    B, T, V = 3, 5, 333
    full = make_logits((B, T + 1, 2 * V), torch.float16, device, generator=gen)
    mask = torch.rand(B, T, generator=gen).to(device) > 0.3
    for view in (full[:, :-1, :V], full[:, 1:, ::2], full[:, :-1, :V].transpose(0, 1)):
        m = mask if view.shape[:2] == mask.shape else mask.transpose(0, 1)
        idx = tike_cuda.topk_indices(view, K, mask=m, temperature=0.7)
        assert idx.shape == (*view.shape[:-1], K)
        expected = topk_ref(view.cpu(), K)
        assert torch.equal(idx[m].cpu().long(), expected[m.cpu()])
        assert idx[~m].eq(-1).all()


# -------------------------------------------------------------------- sparse_reference

def _check_sparse_reference(sref, zr, support, tokens, temperature, mask):
    idx, lq, tail = sparse_reference_reference(zr.cpu(), support.cpu(),
                                               sampled_tokens=None if tokens is None else tokens.cpu(),
                                               temperature=temperature,
                                               mask=None if mask is None else mask.cpu())
    assert torch.equal(sref.idx.cpu().long(), idx)
    assert_values(sref.logprobs, lq, atol=2e-5, rtol=1e-5)
    assert_values(sref.tail_logmass, tail, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("V", [1, K, 4099])
@pytest.mark.parametrize("sampled", [False, True])
def test_sparse_reference_values(device, dtype, V, sampled, gen):
    k = min(K, V)
    N = 9
    zr = make_logits((N, V), dtype, device, generator=gen)
    # a support that is NOT the reference's top-k: a random permutation's first k
    support = torch.stack([torch.randperm(V, generator=gen)[:k] for _ in range(N)]).to(device)
    tokens = None
    if sampled:
        inside = torch.arange(N) % 3 == 0
        tokens = _sampled((N,), V, gen, device, support, inside) if V > k else support[:, 0]
    mask = torch.arange(N, device=device) != 4
    sref = tike_cuda.sparse_reference(zr, support, sampled_tokens=tokens, temperature=0.8,
                                      mask=mask)
    assert sref.k == k and sref.K1 == k + sampled and sref.shape == (N,)
    _check_sparse_reference(sref, zr, support, tokens, 0.8, mask)
    if sampled and V > k:  # o in the support: its slot is padding; else o itself
        assert sref.idx[0, k] == -1 and torch.equal(sref.idx[1:3, k], tokens[1:3].int())
    # log q on S~ and the tail hold all the mass (masked rows: an empty S~, tail log 1)
    total = sref.logprobs.double().exp().sum(-1) + sref.tail_logmass.double().exp()
    torch.testing.assert_close(total.cpu(), torch.ones(N, dtype=torch.float64), atol=1e-5, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_sparse_reference_layouts(device, gen):
    B, T, V = 2, 6, 501
    full = make_logits((B, T + 1, V), torch.bfloat16, device, generator=gen)
    zr = full[:, :-1]  # read in place
    support = tike_cuda.topk_indices(make_logits((B, T, V), torch.float32, device, generator=gen), K)
    tokens = torch.randint(0, V, (B, T), generator=gen).to(device)
    sref = tike_cuda.sparse_reference(zr, support.long(), sampled_tokens=tokens)
    assert sref.idx.shape == (B, T, K + 1) and sref.tail_logmass.shape == (B, T)
    _check_sparse_reference(sref, zr, support, tokens, 1.0, None)
    # a transposed view of the support (non-contiguous), int32 or int64
    sref_t = tike_cuda.sparse_reference(zr.transpose(0, 1), support.transpose(0, 1),
                                        sampled_tokens=tokens.t())
    assert torch.equal(sref_t.idx.transpose(0, 1), sref.idx)


@pytest.mark.parametrize("device", DEVICES)
def test_sparse_reference_tiny_tail_keeps_its_digits(device):
    """Head ~ all the mass: 1 − Σ_head q would round to 0; the direct tail sum does not."""
    V = 1000
    zr = torch.zeros(2, V, device=device)
    zr[:, :K] = 30.0
    support = torch.arange(K, device=device).expand(2, K)
    sref = tike_cuda.sparse_reference(zr, support)
    expected = (torch.tensor(V - K, dtype=torch.float64).log() - 30.0
                - torch.logaddexp(torch.tensor(K * 1.0, dtype=torch.float64).log(),
                                  torch.tensor(V - K, dtype=torch.float64).log() - 30.0))
    assert expected < -25  # a tail of ~6e-12
    torch.testing.assert_close(sref.tail_logmass.double().cpu(), expected.expand(2), atol=1e-5, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_sparse_reference_nan_row_and_masked_rows(device, gen):
    V = 300
    zr = make_logits((4, V), torch.float32, device, generator=gen)
    zr[1, 7] = float("nan")
    zr[2] = float("nan")  # masked: never read
    zr[3, :50] = float("-inf")  # a masked vocabulary is legal
    support = tike_cuda.topk_indices(make_logits((4, V), torch.float32, device, generator=gen), K)
    support[2] = -1  # a masked row's support is not checked
    mask = torch.tensor([True, True, False, True], device=device)
    sref = tike_cuda.sparse_reference(zr, support, mask=mask)
    assert torch.isnan(sref.logprobs[1]).all() and torch.isnan(sref.tail_logmass[1])
    assert sref.idx[2].eq(-1).all() and sref.logprobs[2].eq(float("-inf")).all()
    assert sref.tail_logmass[2] == 0
    keep = torch.tensor([0, 3])
    _check_sparse_reference(sref[keep.to(device)], zr[keep.to(device)], support[keep.to(device)],
                            None, 1.0, None)


# ------------------------------------------------------------- topk_kl with the store

def _dense_and_sparse(z, zr, k, gen, tail, **kw):
    """Value and gradient of dense topk_kl and of topk_kl on a SparseReference of the
    policy's own top-k (the on-policy case), for the same upstream gradient."""
    support = tike_cuda.topk_indices(z.detach(), k, mask=kw.get("mask"))
    sref = tike_cuda.sparse_reference(zr, support, sampled_tokens=kw.get("sampled_tokens"),
                                      temperature=kw.get("temperature", 1.0), mask=kw.get("mask"))
    dense = tike_cuda.topk_kl(z, zr, k, tail=tail, return_stats=True, **kw)
    sparse = tike_cuda.topk_kl(z, sref, tail=tail, return_stats=True, **kw)
    g = torch.randn(dense[0].shape, generator=gen).to(z.device)
    (gd,) = torch.autograd.grad(dense[0], z, g)
    (gs,) = torch.autograd.grad(sparse[0], z, g)
    return dense, sparse, gd, gs


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tail", ["none", "bucket"])
@pytest.mark.parametrize("o_in_s", [None, "all", "none", "mixed"])
def test_on_policy_support_equals_dense(device, dtype, tail, o_in_s, gen):
    """Support = the current policy's top-k: the sparse path IS dense topk_kl."""
    B, T, V = 2, 5, 3001
    z = make_logits((B, T, V), dtype, device, generator=gen, requires_grad=True)
    zr = make_logits((B, T, V), dtype, device, generator=gen)
    kw = dict(temperature=0.9, mask=torch.rand(B, T, generator=gen).to(device) > 0.2)
    if o_in_s is not None:
        inside = {"all": torch.ones(B, T, dtype=torch.bool), "none": torch.zeros(B, T, dtype=torch.bool),
                  "mixed": torch.rand(B, T, generator=gen) > 0.5}[o_in_s]
        kw["sampled_tokens"] = _sampled((B, T), V, gen, device, topk_ref(z.detach().cpu(), K), inside)
        kw["old_logprobs"] = (torch.randn(B, T, generator=gen) * 0.3 - 7).to(device)
    dense, sparse, gd, gs = _dense_and_sparse(z, zr, K, gen, tail, **kw)
    scale = dense[0].abs().max().item()
    torch.testing.assert_close(sparse[0], dense[0], rtol=1e-6, atol=1e-6 * scale)
    for a, b in zip(sparse[1], dense[1]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert_grads(gs, gd.double(), dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k", [1, 64, 300])
def test_on_policy_support_equals_dense_k_range(device, k, gen):
    z = make_logits((3, 1000), torch.float32, device, generator=gen, requires_grad=True)
    zr = make_logits((3, 1000), torch.float32, device, generator=gen)
    tok = torch.randint(0, 1000, (3,), generator=gen).to(device)
    dense, sparse, gd, gs = _dense_and_sparse(z, zr, k, gen, "bucket", sampled_tokens=tok)
    torch.testing.assert_close(sparse[0], dense[0], rtol=1e-6, atol=1e-6)
    assert_grads(gs, gd.double(), torch.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tail", ["none", "bucket"])
@pytest.mark.parametrize("V", [K, 4099])
def test_moved_policy_equals_fixed_support_reference(device, dtype, tail, V, gen):
    """The support was taken from the rollout policy; the policy has moved since: TIKE on
    that fixed S~, against float64 autograd."""
    B, T = 3, 4
    old = make_logits((B, T, V), dtype, device, generator=gen)
    z = (old.float() + torch.randn(B, T, V, generator=gen).to(device)).to(dtype).requires_grad_()
    zr = make_logits((B, T, V), dtype, device, generator=gen)
    support = tike_cuda.topk_indices(old, K)
    tok = torch.randint(0, V, (B, T), generator=gen).to(device)
    old_lp = (torch.randn(B, T, generator=gen) * 0.3 - 7).to(device)
    mask = torch.rand(B, T, generator=gen).to(device) > 0.2
    sref = tike_cuda.sparse_reference(zr, support, sampled_tokens=tok, temperature=0.8, mask=mask)
    out, stats = tike_cuda.topk_kl(z, sref, sampled_tokens=tok, old_logprobs=old_lp, temperature=0.8,
                                   mask=mask, tail=tail, return_stats=True)
    z64 = z.detach().double().cpu().requires_grad_()
    exp, exp_stats = topk_kl_reference(z64, zr.cpu(), K, sampled_tokens=tok.cpu(),
                                       old_logprobs=old_lp.cpu(), temperature=0.8, mask=mask.cpu(),
                                       tail=tail, return_stats=True, support=support.cpu())
    assert_values(out, exp)
    for a, b in zip(stats, exp_stats):
        assert_values(a, b, atol=1e-5)
    g = torch.randn(B, T, generator=gen, dtype=torch.float64)
    (grad,) = torch.autograd.grad(out, z, g.to(device, torch.float32))
    (grad64,) = torch.autograd.grad(exp, z64, g)
    assert_grads(grad, grad64, dtype)
    if V > K:  # it is not dense topk_kl any more: the policy's own top-k has changed
        assert not torch.equal(tike_cuda.topk_indices(z.detach(), K), support)


@pytest.mark.parametrize("device", DEVICES)
def test_moved_policy_strided_views_and_no_sampled_token(device, gen):
    B, T, V = 2, 6, 700
    full = make_logits((B, T + 1, V), torch.bfloat16, device, generator=gen)
    zr = make_logits((B, T, V), torch.bfloat16, device, generator=gen)
    support = tike_cuda.topk_indices(make_logits((B, T, V), torch.bfloat16, device, generator=gen), 8)
    sref = tike_cuda.sparse_reference(zr, support)
    z = full[:, :-1].detach().requires_grad_()  # a strided view, read in place
    for tail in ("none", "bucket"):
        out = tike_cuda.topk_kl(z, sref, tail=tail)
        z64 = z.detach().double().cpu().requires_grad_()
        exp = topk_kl_reference(z64, zr.cpu(), 8, tail=tail, support=support.cpu())
        assert_values(out, exp)
        (grad,) = torch.autograd.grad(out.sum(), z)
        (grad64,) = torch.autograd.grad(exp.sum(), z64)
        assert_grads(grad, grad64, torch.bfloat16)


@pytest.mark.parametrize("device", DEVICES)
def test_nan_policy_row_and_masked_rows(device, gen):
    V = 200
    z = make_logits((4, V), torch.float32, device, generator=gen)
    zr = make_logits((4, V), torch.float32, device, generator=gen)
    sref = tike_cuda.sparse_reference(zr, tike_cuda.topk_indices(z, 8))
    z[0, 3] = float("nan")
    z[2] = float("nan")  # masked
    z.requires_grad_()
    mask = torch.tensor([True, True, False, True], device=device)
    out = tike_cuda.topk_kl(z, sref, mask=mask, tail="bucket")
    assert torch.isnan(out[0]) and torch.isfinite(out[1:]).all() and out[2] == 0
    out[1:].sum().backward()
    assert z.grad[2].eq(0).all() and torch.isfinite(z.grad[1:]).all()


@pytest.mark.parametrize("device", DEVICES)
def test_undefined_rows_give_nan(device, gen):
    """A NaN, a +inf logit or no finite logit leave p (or q) undefined: NaN, as the
    float64 reference and log_softmax say, for every output of that row."""
    N, V = 5, 300
    zr = make_logits((N, V), torch.float32, device, generator=gen)
    z = make_logits((N, V), torch.float32, device, generator=gen)
    support = tike_cuda.topk_indices(z, 8)
    zr[1, 7], zr[2, 9], zr[3] = NAN, INF, -INF
    sref = tike_cuda.sparse_reference(zr, support)
    assert sref.logprobs[1:4].isnan().all() and sref.tail_logmass[1:4].isnan().all()
    assert sref.logprobs[[0, 4]].isfinite().all()
    exp = sparse_reference_reference(zr.cpu(), support.cpu())
    assert exp[1][1:4].isnan().all()
    store = tike_cuda.sparse_reference(zr[[0, 4]], support[[0, 4]])[torch.tensor([0, 0, 0, 1, 1])]
    z[0, 3], z[4, 11], z[2] = NAN, INF, -INF
    for tail in (False, True):
        out, _, coef, shift, stats = OPS.topk_kl_sparse(z, store.idx, store.logprobs,
                                                        store.tail_logmass, None, None, None, 1.0,
                                                        tail)
        for o in (out, coef, shift, stats):
            assert o[[0, 2, 4]].isnan().all() and o[[1, 3]].isfinite().all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("N", [0, 1])
def test_zero_and_one_rows(device, N, gen):
    z = make_logits((N, 50), torch.float32, device, generator=gen, requires_grad=True)
    zr = make_logits((N, 50), torch.float32, device, generator=gen)
    sref = tike_cuda.sparse_reference(zr, tike_cuda.topk_indices(z, 8))
    out = tike_cuda.topk_kl(z, sref)
    assert out.shape == (N,) and sref.nbytes == N * 8 * 8 + N * 4
    out.sum().backward()
    assert z.grad.shape == (N, 50)


@pytest.mark.parametrize("device", DEVICES)
def test_per_token_kl_and_inplace_backward(device, gen):
    B, T, V = 3, 4, 900
    z = make_logits((B, T, V), torch.float32, device, generator=gen, requires_grad=True)
    zr = make_logits((B, T, V), torch.float32, device, generator=gen)
    tok = torch.randint(0, V, (B, T), generator=gen).to(device)
    old = (torch.randn(B, T, generator=gen) - 6).to(device)
    mask = torch.rand(B, T, generator=gen).to(device) > 0.3
    sref = tike_cuda.sparse_reference(zr, tike_cuda.topk_indices(z, K), sampled_tokens=tok, mask=mask)
    for est, tail in (("tike", "none"), ("tike_bucket", "bucket")):
        kw = dict(sampled_tokens=tok, old_logprobs=old, mask=mask)
        a = tike_cuda.per_token_kl(z, sref, est, **kw)
        b = tike_cuda.topk_kl(z, sref, tail=tail, **kw)
        assert torch.equal(a, b)
        (expected,) = torch.autograd.grad(b.sum(), z)
        logits = z * 1
        c = tike_cuda.topk_kl(logits, sref, tail=tail, inplace_backward=True, **kw)
        (grad,) = torch.autograd.grad(c.sum(), z)
        assert torch.equal(c, b) and torch.equal(grad, expected)
        assert torch.equal(logits.detach(), expected)  # the buffer now holds the gradient
    with pytest.raises(TypeError, match="ref_logits"):
        tike_cuda.per_token_kl(z, sref, "k3", sampled_tokens=tok)


@pytest.mark.parametrize("device", DEVICES)
def test_bitwise_reproducible(device, gen):
    z = make_logits((9, 5000), torch.bfloat16, device, generator=gen, requires_grad=True)
    zr = make_logits((9, 5000), torch.bfloat16, device, generator=gen)
    runs = []
    for _ in range(2):
        sref = tike_cuda.sparse_reference(zr, tike_cuda.topk_indices(z, 32))
        out = tike_cuda.topk_kl(z, sref, tail="bucket")
        (grad,) = torch.autograd.grad(out.sum(), z)
        runs.append((sref.logprobs, sref.tail_logmass, out, grad))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


# ------------------------------------------------------------------------ the container

def _store(device, gen, B=4, T=3, V=400, sampled=True):
    zr = make_logits((B, T, V), torch.float32, device, generator=gen)
    support = tike_cuda.topk_indices(make_logits((B, T, V), torch.float32, device, generator=gen), K)
    tok = torch.randint(0, V, (B, T), generator=gen).to(device) if sampled else None
    return tike_cuda.sparse_reference(zr, support, sampled_tokens=tok), tok


@pytest.mark.parametrize("device", DEVICES)
def test_container_size_slicing_and_concatenation(device, gen):
    sref, tok = _store(device, gen)
    N = 12
    assert sref.nbytes == N * (K + 1) * 8 + N * 4 and len(sref) == 4
    z = make_logits((4, 3, 400), torch.float32, device, generator=gen)
    whole = tike_cuda.topk_kl(z, sref, sampled_tokens=tok, tail="bucket")
    # per micro-batch, then back together
    parts = [sref[i:i + 2] for i in (0, 2)]
    for i, part in zip((0, 2), parts):
        assert torch.equal(tike_cuda.topk_kl(z[i:i + 2], part, sampled_tokens=tok[i:i + 2],
                                             tail="bucket"), whole[i:i + 2])
    cat = SparseReference.cat(parts)
    assert all(torch.equal(getattr(cat, f), getattr(sref, f)) for f in ("idx", "logprobs", "tail_logmass"))
    flat = sref.reshape(-1)
    assert flat.shape == (N,) and torch.equal(flat.idx, sref.idx.reshape(N, K + 1))
    picked = sref[torch.tensor([True, False, True, False], device=device)]
    assert picked.shape == (2, 3) and torch.equal(picked.idx, sref.idx[::2])
    assert torch.equal(sref[:, 1].tail_logmass, sref.tail_logmass[:, 1])
    with pytest.raises(IndexError):
        sref[..., 0]
    with pytest.raises(ValueError, match="same k"):
        SparseReference.cat([sref, _store(device, gen, sampled=False)[0]])


@pytest.mark.parametrize("device", DEVICES)
def test_container_save_load_and_move(device, gen, tmp_path):
    sref, _ = _store(device, gen)
    torch.save({"ref": sref}, tmp_path / "buffer.pt")
    back = torch.load(tmp_path / "buffer.pt")["ref"]  # weights_only=True by default
    assert isinstance(back, SparseReference) and back.k == sref.k
    assert all(torch.equal(getattr(back, f), getattr(sref, f)) for f in ("idx", "logprobs", "tail_logmass"))
    moved = sref.to("cpu")
    assert moved.device.type == "cpu" and moved.idx.dtype == torch.int32
    again = SparseReference.from_dict(moved.as_dict())
    assert torch.equal(again.logprobs, moved.logprobs)


def test_container_rejects_malformed_fields():
    idx = torch.zeros(3, 5, dtype=torch.int32)
    lp = torch.zeros(3, 5)
    with pytest.raises(TypeError, match="idx"):
        SparseReference(idx.long(), lp, torch.zeros(3), 4)
    with pytest.raises(TypeError, match="logprobs"):
        SparseReference(idx, lp.double(), torch.zeros(3), 4)
    with pytest.raises(ValueError, match="tail_logmass"):
        SparseReference(idx, lp, torch.zeros(4), 4)
    with pytest.raises(ValueError, match="k"):
        SparseReference(idx, lp, torch.zeros(3), 3)


# ------------------------------------------------------------------------- bad input

V_BAD = 50


@pytest.fixture
def bad_case():
    g = torch.Generator().manual_seed(3)
    zr = torch.randn(3, V_BAD, generator=g)
    support = torch.stack([torch.randperm(V_BAD, generator=g)[:4] for _ in range(3)])
    return zr, support


@pytest.mark.parametrize("value", [-1, V_BAD])
def test_support_out_of_range(bad_case, value):
    zr, support = bad_case
    support[1, 2] = value
    with pytest.raises(ValueError, match=r"support must hold ids in \[0, V=50\)"):
        tike_cuda.sparse_reference(zr, support)
    with pytest.raises(RuntimeError, match="support must hold indices"):  # the C++ backstop
        OPS.sparse_reference(zr, support, None, None, 1.0)
    # a masked row is not read, so its support is not checked
    tike_cuda.sparse_reference(zr, support, mask=torch.tensor([True, False, True]))


def test_support_duplicate_ids(bad_case):
    zr, support = bad_case
    support[2, 3] = support[2, 0]
    with pytest.raises(ValueError, match=r"support must not repeat an id within a row \(row \(2,\)\)"):
        tike_cuda.sparse_reference(zr, support)
    with pytest.raises(RuntimeError, match="must not repeat"):
        OPS.sparse_reference(zr, support, None, None, 1.0)


@pytest.mark.parametrize("shape", [(2, 4), (3,), (3, 0), (3, V_BAD + 1), (1, 3, 4)])
def test_support_shape_mismatch(bad_case, shape):
    zr, _ = bad_case
    with pytest.raises(ValueError, match="support must have"):
        tike_cuda.sparse_reference(zr, torch.zeros(shape, dtype=torch.long))


def test_support_wrong_type(bad_case):
    zr, support = bad_case
    with pytest.raises(TypeError, match="support"):
        tike_cuda.sparse_reference(zr, support.float())
    with pytest.raises(TypeError, match="support"):
        tike_cuda.sparse_reference(zr, support.tolist())
    with pytest.raises(ValueError, match="support must be on"):
        tike_cuda.sparse_reference(zr, support.to("meta"))
    with pytest.raises(ValueError, match="sampled_tokens"):
        tike_cuda.sparse_reference(zr, support, sampled_tokens=torch.tensor([0, 1, V_BAD]))
    with pytest.raises(ValueError, match="k must"):
        tike_cuda.topk_indices(zr, V_BAD + 1)
    with pytest.raises(ValueError, match="temperature"):
        tike_cuda.topk_indices(zr, 4, temperature=0.0)


def test_store_does_not_match_the_update(bad_case):
    zr, support = bad_case
    tok = torch.tensor([1, 2, 3])
    united = tike_cuda.sparse_reference(zr, support, sampled_tokens=tok)
    plain = tike_cuda.sparse_reference(zr, support)
    z = torch.randn(3, V_BAD)
    with pytest.raises(ValueError, match="leading shape"):
        tike_cuda.topk_kl(z[:2], united[:3])
    with pytest.raises(ValueError, match="leading shape"):
        tike_cuda.topk_kl(z.view(3, 1, V_BAD), united)
    with pytest.raises(ValueError, match="support size 4"):
        tike_cuda.topk_kl(z, united, 8)
    tike_cuda.topk_kl(z, united, 4)  # its own k (or the default) is fine
    with pytest.raises(ValueError, match="union_sampled=False"):
        tike_cuda.topk_kl(z, united, sampled_tokens=tok, union_sampled=False)
    with pytest.raises(ValueError, match="built without"):
        tike_cuda.topk_kl(z, plain, sampled_tokens=tok)
    # without union the sampled tokens give the IS weight only
    tike_cuda.topk_kl(z, plain, sampled_tokens=tok, old_logprobs=torch.zeros(3), union_sampled=False)
    with pytest.raises(ValueError, match=r"sampled_tokens differ .* \(row \(1,\)\)"):
        other = tok.clone()
        other[1] = [v for v in range(V_BAD) if v not in support[1].tolist() and v != 2][0]
        tike_cuda.topk_kl(z, united, sampled_tokens=other)
    with pytest.raises(ValueError, match="old_logprobs needs"):
        tike_cuda.topk_kl(z, united, old_logprobs=torch.zeros(3))
    masked = tike_cuda.sparse_reference(zr, support, mask=torch.tensor([True, False, True]))
    with pytest.raises(ValueError, match=r"mask: row \(1,\) was masked"):
        tike_cuda.topk_kl(z, masked)
    tike_cuda.topk_kl(z, masked, mask=torch.tensor([True, False, True]))


def test_hand_built_store_is_checked(bad_case):
    zr, support = bad_case
    sref = tike_cuda.sparse_reference(zr, support)
    z = torch.randn(3, V_BAD)
    bad = SparseReference(sref.idx.clone(), sref.logprobs, sref.tail_logmass, sref.k)
    bad.idx[0, 1] = V_BAD
    with pytest.raises(ValueError, match="ref_logits.idx must hold ids"):
        tike_cuda.topk_kl(z, bad)
    bad.idx[0, 1] = bad.idx[0, 0]
    with pytest.raises(ValueError, match="ref_logits.idx must not repeat"):
        tike_cuda.topk_kl(z, bad)
    with pytest.raises(RuntimeError, match="idx must not repeat"):
        OPS.topk_kl_sparse(z, bad.idx, bad.logprobs, bad.tail_logmass, None, None, None, 1.0, False)
    with pytest.raises(ValueError, match="on the logits' device"):
        tike_cuda.topk_kl(z.to("meta"), sref)


# ---------------------------------------------------------------- registration, compile

def _samples(device, gen):
    z = make_logits((2, 3, 40), torch.float32, device, generator=gen, requires_grad=True)
    zr = make_logits((2, 3, 40), torch.float32, device, generator=gen)
    tokens = torch.randint(0, 40, (2, 3), generator=gen).to(device)
    old = torch.randn(2, 3, generator=gen).to(device) - 4
    mask = torch.tensor([[True, False, True], [True, True, False]], device=device)
    return z, zr, tokens, old, mask


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device, gen):
    z, zr, tokens, old, mask = _samples(device, gen)
    rows = z.detach().reshape(6, 40)
    support = tike_cuda.topk_indices(rows, 8)
    torch.library.opcheck(OPS.topk_indices, (z.detach(), 8, mask.reshape(6)))
    torch.library.opcheck(OPS.topk_indices, (z.detach(), 40, None))
    for t in (None, tokens.reshape(6)):
        torch.library.opcheck(OPS.sparse_reference, (zr, support, t, mask.reshape(6), 0.9))
    sref = tike_cuda.sparse_reference(zr, support.view(2, 3, 8), sampled_tokens=tokens)
    for tail in (False, True):
        torch.library.opcheck(OPS.topk_kl_sparse, (z, sref.idx.reshape(6, 9), sref.logprobs.reshape(6, 9),
                                                   sref.tail_logmass.reshape(6), tokens.reshape(6),
                                                   old.reshape(6), mask.reshape(6), 0.9, tail))


def _update_loss(logits, sref, tokens, old, mask):
    """The update step of a GRPO-style loss with the stored reference."""
    logp = tike_cuda.token_logprobs(logits, tokens)
    kl = tike_cuda.topk_kl(logits, sref, sampled_tokens=tokens, old_logprobs=old, mask=mask,
                           tail="bucket")
    per_token = -torch.exp(logp - old) * 0.5 + 0.1 * kl
    return (per_token * mask).sum() / mask.sum()


def _rollout_and_reference(logits, ref_logits, tokens, mask):
    support = tike_cuda.topk_indices(logits, 8, mask=mask)
    return tike_cuda.sparse_reference(ref_logits, support, sampled_tokens=tokens, mask=mask)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(device, backend, gen):
    z, zr, tokens, old, mask = _samples(device, gen)
    sref = _rollout_and_reference(z.detach(), zr, tokens, mask)
    sref_c = torch.compile(_rollout_and_reference, fullgraph=True, backend=backend)(
        z.detach(), zr, tokens, mask)
    assert all(torch.equal(getattr(sref_c, f), getattr(sref, f)) for f in ("idx", "logprobs", "tail_logmass"))
    eager = _update_loss(z, sref, tokens, old, mask)
    (g_eager,) = torch.autograd.grad(eager, z)
    compiled = torch.compile(_update_loss, fullgraph=True, backend=backend)(z, sref, tokens, old, mask)
    (g_comp,) = torch.autograd.grad(compiled, z)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_comp, g_eager, rtol=1e-5, atol=1e-6)


def test_torch_compile_dynamic_shapes_and_temperature(gen):
    """One dynamic graph per stage serves new N and τ (no fallback to eager)."""
    def update(logits, sref, tok, old, mask, tau):
        return tike_cuda.topk_kl(logits, sref, sampled_tokens=tok, old_logprobs=old, mask=mask,
                                 temperature=tau, tail="bucket").sum()

    def store(z, zr, tok, mask, tau):
        return tike_cuda.sparse_reference(zr, tike_cuda.topk_indices(z, 8, mask=mask),
                                          sampled_tokens=tok, mask=mask, temperature=tau)

    c_update = torch.compile(update, fullgraph=True, dynamic=True)
    c_store = torch.compile(store, fullgraph=True, dynamic=True)
    for N, tau in ((6, 1.0), (10, 0.7)):
        z = make_logits((N, 50), torch.float32, "cpu", generator=gen, requires_grad=True)
        zr = make_logits((N, 50), torch.float32, "cpu", generator=gen)
        tok = torch.randint(0, 50, (N,), generator=gen)
        mask = torch.arange(N) != 2
        old = torch.randn(N, generator=gen) - 3
        sref = c_store(z.detach(), zr, tok, mask, tau)
        eager = store(z.detach(), zr, tok, mask, tau)
        assert all(torch.equal(getattr(sref, f), getattr(eager, f)) for f in ("idx", "logprobs", "tail_logmass"))
        a, b = c_update(z, sref, tok, old, mask, tau), update(z, sref, tok, old, mask, tau)
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(torch.autograd.grad(a, z)[0], torch.autograd.grad(b, z)[0])


def test_registered_once():
    for name in ("topk_indices", "sparse_reference", "topk_kl_sparse"):
        packet = getattr(OPS, name)
        assert torch._C._dispatch_has_kernel_for_dispatch_key(packet.default.name(), "CPU")


# ---------------------------------------------------------------------- benchmark mode

def test_bench_sparse_mode_runs(tmp_path):
    from tike_cuda import bench
    rc = bench.main(["--preset", "sparse-cpu", "--providers", "tike_cuda,eager", "--N", "4",
                     "--V", "96", "--k", "4", "--repeats", "2", "--warmup", "0",
                     "--out", str(tmp_path), "--no-progress", "--no-plot"])
    assert rc == 0
    import csv
    with open(tmp_path / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    got = {(r["op"], r["mode"], r["provider"]) for r in rows}
    for provider in ("tike_cuda", "eager"):
        for op, modes in (("topk_kl", ("fwd", "fwdbwd")), ("topk_kl_sparse", ("fwd", "fwdbwd")),
                          ("sparse_reference", ("fwd",)), ("topk_indices", ("fwd",))):
            assert all((op, m, provider) in got for m in modes)
    assert len(rows) == 2 * 6
    case = bench.Case("topk_kl_sparse", "fwd", 4, 96, 4, "fp32")
    assert case.nbytes() == 4 * 96 * 4 + 4 * 5 * 8 + 4 * 4
    assert "time ratio" in bench.sparse_summary(
        [dict(r, N=int(r["N"]), V=int(r["V"]), k=int(r["k"]), p50_ms=float(r["p50_ms"])) for r in rows])


def test_eager_baselines_compute_the_same(gen):
    from tike_cuda import eager
    z = make_logits((5, 300), torch.float32, "cpu", generator=gen)
    zr = make_logits((5, 300), torch.float32, "cpu", generator=gen)
    support = topk_ref(z, K)
    tok = torch.randint(0, 300, (5,), generator=gen)
    tok[0] = support[0, 2]
    idx, lq, tail = eager.sparse_reference(zr, support, tok)
    sref = tike_cuda.sparse_reference(zr, support, sampled_tokens=tok)
    assert torch.equal(idx, sref.idx)
    torch.testing.assert_close(lq, sref.logprobs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tail, sref.tail_logmass, rtol=1e-4, atol=1e-4)
    old = torch.randn(5, generator=gen) - 6
    out = eager.topk_kl_sparse(z, idx, lq, sampled_tokens=tok, old_logprobs=old)
    assert_values(out, topk_kl_reference(z, zr, K, sampled_tokens=tok, old_logprobs=old), atol=1e-4)
    assert torch.equal(eager.topk_indices(z, K), tike_cuda.topk_indices(z, K))


def test_readme_three_calls_run():
    """The README's rollout / reference / update snippet runs as written."""
    import re
    from pathlib import Path
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text[text.index("### Without the reference's logits at update time"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    B, T, V = 4, 5, 300
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(B, T, V, generator=g).requires_grad_()
    env = {"tike_cuda": tike_cuda, "old_logits": logits.detach() + 0.1 * torch.randn(B, T, V, generator=g),
           "logits": logits, "ref_logits": torch.randn(B, T, V, generator=g),
           "responses": torch.randint(0, V, (B, T), generator=g),
           "old_logprobs": torch.randn(B, T, generator=g) - 5,
           "response_mask": torch.rand(B, T, generator=g) > 0.2}
    exec(compile(code, "README.md", "exec"), env)
    assert env["kl"].shape == (B, T) and env["sref"].nbytes == B * T * (17 * 8 + 4)
    env["kl"].sum().backward()
    assert torch.isfinite(logits.grad).all()


# ------------------------------------------------- every autograd mode, as dense topk_kl

def _moved(device, gen, dtype=torch.float32):
    """Logits that moved since the support was taken, the store, and the float64
    reference of TIKE on that fixed support — as functions of the logits."""
    N, V = 6, 37
    old = make_logits((N, V), dtype, device, scale=1.5, generator=gen)
    z = (old.float() + 0.5 * torch.randn(N, V, generator=gen).to(device)).to(dtype)
    zr = make_logits((N, V), dtype, device, scale=1.5, generator=gen)
    tok = torch.randint(0, V, (N,), generator=gen).to(device)
    old_lp = (0.3 * torch.randn(N, generator=gen) - 3.6).to(device)
    mask = torch.tensor([1, 1, 0, 1, 1, 1], device=device)  # verl-style integer mask
    tok = torch.where(mask.bool(), tok, -100)  # padding where masked
    support = tike_cuda.topk_indices(old, 5, mask=mask)
    sref = tike_cuda.sparse_reference(zr, support, sampled_tokens=tok, temperature=0.7, mask=mask)
    kw = dict(sampled_tokens=tok, old_logprobs=old_lp, temperature=0.7, mask=mask, tail="bucket")
    kw64 = {n: (v.cpu() if isinstance(v, torch.Tensor) else v) for n, v in kw.items()}
    kw64["mask"] = kw64["mask"].bool()
    kw64["sampled_tokens"] = torch.where(kw64["mask"], kw64["sampled_tokens"], 0)
    sup64 = torch.where(kw64["mask"].unsqueeze(-1), support.cpu(), torch.arange(5))
    fused = lambda x: tike_cuda.topk_kl(x, sref, **kw)  # noqa: E731
    ref = lambda x: topk_kl_reference(x, zr.cpu(), 5, support=sup64, **kw64)  # noqa: E731
    return z, fused, ref


def _close64(actual, expected, rtol):
    exp = expected.double().cpu()
    scale = max(exp.abs().max().item(), 1.0)
    torch.testing.assert_close(actual.double().cpu(), exp, rtol=rtol, atol=rtol * scale)


@pytest.mark.parametrize("device", DEVICES)
def test_double_backward_jvp_and_func_grad(device, gen):
    z, fused, ref = _moved(device, gen)
    N, V = z.shape
    w = torch.randn(N, generator=gen, dtype=torch.float64)
    v = torch.randn(N, V, generator=gen, dtype=torch.float64)

    def hvp(fn, x, w, v):
        x = x.detach().clone().requires_grad_()
        (g,) = torch.autograd.grad((fn(x) * w).sum(), x, create_graph=True)
        (h,) = torch.autograd.grad((g * v).sum(), x)
        return g.detach(), h

    g, h = hvp(fused, z, w.float().to(device), v.float().to(device))
    g64, h64 = hvp(ref, z.double().cpu(), w, v)
    assert h64.abs().max() > 0.05
    _close64(g, g64, 2e-5)
    _close64(h, h64, 1e-4)
    t = torch.randn(N, V, generator=gen)
    _, got = torch.func.jvp(fused, (z,), (t.to(device),))
    _, exp = torch.func.jvp(ref, (z.double().cpu(),), (t.double(),))
    _close64(got, exp, 1e-5)
    got = torch.func.grad(lambda x: (fused(x) * w.float().to(device)).sum())(z)
    _close64(got, g64, 2e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_vmap_matches_a_loop(device, gen):
    B, N, V = 3, 6, 37
    zs = make_logits((B, N, V), torch.float32, device, generator=gen)
    zr = make_logits((B, N, V), torch.float32, device, generator=gen)
    tok = torch.randint(0, V, (B, N), generator=gen).to(device)

    def store(z, r, t):
        return tike_cuda.sparse_reference(r, tike_cuda.topk_indices(z, 4), sampled_tokens=t)

    def kl(z, r, t):
        return tike_cuda.topk_kl(z + 0.1, store(z, r, t), sampled_tokens=t, tail="bucket")

    import warnings
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # e.g. a missing batching rule
        got = torch.func.vmap(kl)(zs, zr, tok)
        exp = torch.stack([kl(zs[b], zr[b], tok[b]) for b in range(B)])
        torch.testing.assert_close(got, exp)
        got = torch.func.vmap(kl, in_dims=(0, None, None))(zs, zr[0], tok[0])
        exp = torch.stack([kl(zs[b], zr[0], tok[0]) for b in range(B)])
        torch.testing.assert_close(got, exp)


# ------------------------------------------- the CUDA kernels (GPU, or their emulation)
# On every `kdev` (tests/conftest.py): a real GPU, and the CPU emulation of the CUDA
# execution model running the very kernel sources and CUDA glue.

BIG_V = 151936


def _put(kdev, *xs):
    return [kdev.put(x) for x in xs]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("V,k", [(1, 1), (16, 16), (37, 5), (4099, 16), (4099, 256), (4099, 300),
                                 (BIG_V, 16)])
def test_kernels_match_the_cpu_ops(kdev, V, k, dtype, gen):
    N = 2 if V == BIG_V else 7
    z = make_logits((N, V), dtype, "cpu", generator=gen)
    if dtype == torch.bfloat16 and V > 1:
        z[1] = z[1].round()  # many ties: the lower index must win
    zr = make_logits((N, V), dtype, "cpu", generator=gen)
    mask = torch.arange(N) != 1 if N > 2 else None
    idx = OPS.topk_indices(z, k, mask)
    assert torch.equal(kdev.ops.topk_indices(*_put(kdev, z), k, kdev.put(mask)).cpu(), idx)
    support = topk_ref(z, k).int()
    tok = torch.randint(0, V, (N,), generator=gen)
    tok[0] = support[0, -1]  # in the support: its slot is padding
    old = torch.randn(N, generator=gen) - 3
    for t in (None, tok):
        exp = OPS.sparse_reference(zr, support, t, mask, 0.8)
        got = kdev.ops.sparse_reference(*_put(kdev, zr, support, t, mask), 0.8)
        assert torch.equal(got[0].cpu(), exp[0])
        for a, b in zip(got[1:], exp[1:]):
            torch.testing.assert_close(a.cpu(), b, atol=1e-4, rtol=1e-4, equal_nan=True)
        for tail in (False, True):
            args = (exp[0], exp[1], exp[2], t, None if t is None else old, mask, 0.8, tail)
            want = OPS.topk_kl_sparse(z, *args)
            have = kdev.ops.topk_kl_sparse(kdev.put(z), *_put(kdev, *args[:6]), 0.8, tail)
            for i, (a, b) in enumerate(zip(have, want)):  # out, lse, coef, shift, stats
                if i == 1:  # the [N, 2] pair (M, ℓ): M is a reference point, compare M/τ + ℓ
                    assert_lse_pairs(a, b, 0.8)
                else:
                    torch.testing.assert_close(a.cpu(), b, atol=1e-4, rtol=1e-4, equal_nan=True)


def test_kernels_on_policy_equal_dense_and_moved_equals_float64(kdev, gen):
    B, T, V = 2, 3, 3001
    old = make_logits((B, T, V), torch.bfloat16, "cpu", generator=gen)
    zr = make_logits((B, T, V), torch.bfloat16, "cpu", generator=gen)
    tok = torch.randint(0, V, (B, T), generator=gen)
    old_lp = torch.randn(B, T, generator=gen) * 0.3 - 7
    old, zr, tok, old_lp = _put(kdev, old, zr, tok, old_lp)
    kw = dict(sampled_tokens=tok, old_logprobs=old_lp, temperature=0.9, tail="bucket")
    with kdev.api():
        support = tike_cuda.topk_indices(old, K)
        sref = tike_cuda.sparse_reference(zr, support, sampled_tokens=tok, temperature=0.9)
        assert torch.equal(tike_cuda.topk_kl(old, sref, **kw), tike_cuda.topk_kl(old, sref, **kw))
        dense = tike_cuda.topk_kl(old, zr, K, **kw)
        sparse = tike_cuda.topk_kl(old, sref, **kw)
        torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-5)
        z = (old.float() + kdev.put(torch.randn(B, T, V, generator=gen))).to(old.dtype)
        zg = z.clone().requires_grad_()
        out = tike_cuda.topk_kl(zg, sref, **kw)
        g = torch.randn(B, T, generator=gen, dtype=torch.float64)
        (grad,) = torch.autograd.grad(out, zg, kdev.put(g.float()))
    z64 = z.double().cpu().requires_grad_()
    kw64 = {n: (v.cpu() if isinstance(v, torch.Tensor) else v) for n, v in kw.items()}
    exp = topk_kl_reference(z64, zr.cpu(), K, support=support.cpu(), **kw64)
    assert_values(out, exp, atol=5e-5)
    (grad64,) = torch.autograd.grad(exp, z64, g)
    assert_grads(grad, grad64, torch.bfloat16)


def test_kernels_invalid_and_undefined_rows_give_nan(kdev, gen):
    """No host sync on a device: a bad support id, a repeated one, a sampled token out of
    range, a NaN / +inf / no finite logit make their row NaN (an error on the CPU)."""
    N, V = 7, 300
    zr = make_logits((N, V), torch.float32, "cpu", generator=gen)
    z = make_logits((N, V), torch.float32, "cpu", generator=gen)
    support = torch.stack([torch.randperm(V, generator=gen)[:8] for _ in range(N)]).int()
    tok = torch.randint(0, V, (N,), generator=gen)
    support[1, 3] = V
    support[2, 5] = support[2, 0]
    tok[3] = V + 5
    zr[4, 7], zr[5, 9], zr[6] = NAN, INF, -INF
    idx, lq, tail = kdev.ops.sparse_reference(*_put(kdev, zr, support, tok), None, 1.0)
    bad = torch.arange(N) > 0
    assert lq.cpu()[bad].isnan().all() and tail.cpu()[bad].isnan().all()
    good = OPS.sparse_reference(zr[:1], support[:1], tok[:1], None, 1.0)
    torch.testing.assert_close(lq[:1].cpu(), good[1], atol=1e-4, rtol=1e-4)
    # the update: an invalid idx row, and undefined policy rows
    idx, lq, tail = OPS.sparse_reference(make_logits((N, V), torch.float32, "cpu", generator=gen),
                                         support.clamp(0, V - 1)[:, :1], None, None, 1.0)
    idx = torch.cat([idx, (idx + 1) % V], 1)
    idx[1, 1] = idx[1, 0]  # repeated
    z[2, 3], z[3, 4], z[4] = NAN, INF, -INF
    for tail_bucket in (False, True):
        out = kdev.ops.topk_kl_sparse(*_put(kdev, z, idx, torch.zeros(N, 2) - 2, tail),
                                      None, None, None, 1.0, tail_bucket)
        for o in (out[0], out[2], out[3]):  # out, coef, shift
            assert o.cpu()[1:5].isnan().all() and o.cpu()[[0, 5, 6]].isfinite().all()


@pytest.mark.parametrize("tau", [1e-3, 1e-6])
def test_kernels_low_temperature_agree_with_float64(kdev, tau, gen):
    """log p relative to the row max: at τ → 0 the values grow like 1/τ, still exact."""
    N, V = 4, 3000
    z, zr = (make_logits((N, V), torch.float32, "cpu", generator=gen) for _ in range(2))
    tok = torch.randint(0, V, (N,), generator=gen)
    support = topk_ref(z + 0.5 * torch.randn(N, V, generator=gen), K)
    z, zr, tok, support = _put(kdev, z, zr, tok, support)
    with kdev.api():
        sref = tike_cuda.sparse_reference(zr, support, sampled_tokens=tok, temperature=tau)
        got = tike_cuda.topk_kl(z, sref, sampled_tokens=tok, temperature=tau, tail="bucket")
    ref = topk_kl_reference(z.cpu(), zr.cpu(), K, sampled_tokens=tok.cpu(), temperature=tau,
                            tail="bucket", support=support.cpu())
    torch.testing.assert_close(got.double().cpu(), ref, rtol=1e-4, atol=1e-6)


def test_kernels_layouts_masks_and_reproducibility(kdev, gen):
    B, T, V = 2, 5, 333
    full = make_logits((B, T + 1, V), torch.float16, "cpu", generator=gen)
    zr_full = make_logits((B, T + 2, V), torch.float16, "cpu", generator=gen)
    mask = torch.rand(B, T, generator=gen) > 0.3
    tok = torch.where(mask, torch.randint(0, V, (B, T), generator=gen), -100)
    full, zr_full, mask, tok = _put(kdev, full, zr_full, mask, tok)
    z, zr = full[:, :-1], zr_full[:, 2:]  # strided views, rows aligned differently
    runs = []
    for _ in range(2):
        with kdev.api():
            support = tike_cuda.topk_indices(z, K, mask=mask)
            sref = tike_cuda.sparse_reference(zr, support, sampled_tokens=tok, mask=mask)
            out = tike_cuda.topk_kl(z, sref, sampled_tokens=tok, mask=mask, tail="bucket")
        runs.append((support, sref.logprobs, sref.tail_logmass, out))
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    cpu = tike_cuda.sparse_reference(zr.cpu(), support.cpu(), sampled_tokens=tok.cpu(),
                                     mask=mask.cpu())
    torch.testing.assert_close(sref.logprobs.cpu(), cpu.logprobs, atol=1e-4, rtol=1e-4)
    exp = tike_cuda.topk_kl(z.cpu(), cpu, sampled_tokens=tok.cpu(), mask=mask.cpu(), tail="bucket")
    torch.testing.assert_close(out.cpu(), exp, atol=1e-4, rtol=1e-4)
    assert support.cpu()[~mask.cpu()].eq(-1).all() and out.cpu()[~mask.cpu()].eq(0).all()


def test_kernels_tail_far_below_a_float(kdev, gen):
    """S~ holding ~all the mass at a low τ: log t ≈ −125 (t ~ 1e-55, below the float
    range relative to the row max). The stored log t_q and the update's b = log(t_p/t_q)
    + 1 keep their digits (a float tail sum relative to the max gave −inf, then b = +inf)."""
    N, V, k, tau = 3, 3001, 300, 0.05
    zr = make_logits((N, V), torch.float32, "cpu", generator=gen)
    z = zr + 0.3 * torch.randn(N, V, generator=gen)
    support = topk_ref(zr, k).int()
    got = kdev.ops.sparse_reference(*_put(kdev, zr, support), None, None, tau)
    exp = OPS.sparse_reference(zr, support, None, None, tau)
    lq64 = torch.log_softmax(zr.double() / tau, -1)
    inside = torch.zeros_like(lq64, dtype=torch.bool).scatter_(1, support.long(), True)
    log_tq = torch.logsumexp(torch.where(inside, -INF, lq64), -1)
    assert (log_tq < -90).all()
    for tail in (got[2], exp[2]):
        torch.testing.assert_close(tail.double().cpu(), log_tq, rtol=1e-5, atol=1e-3)
    args = (exp[0], exp[1], exp[2], None, None, None, tau, True)
    have = kdev.ops.topk_kl_sparse(kdev.put(z), *_put(kdev, *args[:3]), None, None, None, tau,
                                   True)
    want = OPS.topk_kl_sparse(z, *args)
    assert torch.isfinite(want[0]).all()
    for i in (0, 2, 3):  # out, coef, shift
        torch.testing.assert_close(have[i].cpu(), want[i], rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("device", DEVICES)
def test_token_logprobs_reads_log_q_of_the_sampled_token(device, gen):
    # what a sampled-token estimator (k3, ...) needs of the reference, from the store
    B, T, V = 4, 5, 300
    zr = make_logits((B, T, V), torch.float32, device, generator=gen)
    support = tike_cuda.topk_indices(make_logits((B, T, V), torch.float32, device, generator=gen), K)
    tok = torch.randint(0, V, (B, T), generator=gen).to(device)
    tok[0, :3] = support[0, :3, 4].long()  # o in the support: no slot of its own
    mask = torch.rand(B, T, generator=gen).to(device) > 0.3
    mask[0, :3] = True
    sref = tike_cuda.sparse_reference(zr, support, sampled_tokens=tok, mask=mask)
    want = torch.log_softmax(zr.double(), -1).gather(-1, tok[..., None].long())[..., 0]
    got = sref.token_logprobs(torch.where(mask, tok, -100))
    assert got.dtype == torch.float32 and got.shape == (B, T)
    torch.testing.assert_close(got[mask].double(), want[mask], rtol=1e-6, atol=1e-6)
    assert got[~mask].eq(0).all()
    assert torch.equal(sref[1:3].token_logprobs(tok[1:3]), got[1:3])


def test_token_logprobs_bad_input(gen):
    sref, tok = _store("cpu", gen)
    with pytest.raises(ValueError, match="without sampled_tokens"):
        _store("cpu", gen, sampled=False)[0].token_logprobs(tok)
    with pytest.raises(ValueError, match="sampled_tokens must have shape"):
        sref.token_logprobs(tok[:2])
    with pytest.raises(TypeError, match="sampled_tokens"):
        sref.token_logprobs(tok.float())
    other = tok.clone()
    other[1, 2] = next(v for v in range(400) if v not in sref.idx[1, 2])  # out of its S~
    with pytest.raises(ValueError, match=r"differ.*row \(1, 2\)"):
        sref.token_logprobs(other)
