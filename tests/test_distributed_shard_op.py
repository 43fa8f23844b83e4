"""topk_kl_shard, the local pass of tike_cuda.distributed.vocab_parallel_topk_kl (topk_kl's
passes over the shard's rows of z and zr without its combination, docs/kernels.md).

The CPU op against the float64 reference of the same quantities (S~, the logits there, both
log-sum-exps, the direct tail masses outside S~), then the CUDA kernels (each `kdev`: the
GPU, and the CPU emulation in CI) against the reference and the CPU op, on the paths only
the device has: rows split over several CTAs, k above the warp selection, ties."""
import pytest
import torch

from tike_cuda.reference import topk_indices

from conftest import make_logits

OPS = torch.ops.tike_cuda
NAN, INF = float("nan"), float("inf")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _lse_value(pair, tau):
    pair = pair.double().cpu()
    return pair[:, 0] / tau + pair[:, 1]


def _reference(z, zr, k, tok, mask, tau, bucket):
    """topk_kl_shard's outputs in float64: (idx, values, lse_p, lse_q, log_tails), the
    log-sum-exps as values (not pairs). Rows with a NaN or +inf in z or zr: NaN lse and
    tails; a row of z or zr without a finite logit: −inf for its lse and its tail."""
    N, V = z.shape
    live = torch.ones(N, dtype=torch.bool) if mask is None else mask
    S = topk_indices(z, k).to(torch.int32)
    idx = S
    if tok is not None:
        extra = (tok >= 0) & ~(S == tok[:, None]).any(1)
        idx = torch.cat([S, torch.where(extra, tok, -1).to(torch.int32)[:, None]], 1)
    idx = torch.where(live[:, None], idx, -1)
    at = idx.clamp_min(0).long()
    vals = torch.stack([x.gather(1, at).float() for x in (z, zr)], -1)
    vals = torch.where((idx >= 0)[..., None], vals, torch.full_like(vals, -INF))
    z64, zr64 = z.double() / tau, zr.double() / tau
    lse_p, lse_q = z64.logsumexp(1), zr64.logsumexp(1)
    # Outside S~: every column but idx's (a −1 slot marks the spare column V).
    spare = torch.where(idx >= 0, idx.long(), V)
    outside = torch.ones(N, V + 1, dtype=torch.bool).scatter_(1, spare, False)[:, :V]
    tails = torch.stack([
        torch.where(outside, x - l[:, None], torch.full_like(x, -INF)).logsumexp(1)
        for x, l in ((z64, lse_p), (zr64, lse_q))], 1)
    bad = (z.isnan() | zr.isnan() | (z == INF) | (zr == INF)).any(1)
    nan = torch.full((), NAN, dtype=torch.float64)
    lse_p, lse_q = torch.where(bad, nan, lse_p), torch.where(bad, nan, lse_q)
    tails = torch.where(bad[:, None], nan, tails)
    empty = torch.stack([lse_p, lse_q], 1) == -INF   # no mass: no tail either
    tails = torch.where(empty, -INF, tails)
    return idx, vals, lse_p, lse_q, tails if bucket else torch.zeros(N, 2, dtype=torch.float64)


def _check(got, want, tau, mask, atol=1e-5, rtol=1e-5):
    got = [g.cpu() for g in got]
    N = got[0].shape[0]
    live = torch.ones(N, dtype=torch.bool) if mask is None else mask.cpu()
    assert torch.equal(got[0], want[0]), "S~ differs from the reference"
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=0, equal_nan=True,
                               msg=lambda m: f"the logits at S~ differ: {m}")
    for g, w in ((got[2], want[2]), (got[3], want[3])):
        torch.testing.assert_close(_lse_value(g, tau)[live], w[live], atol=atol, rtol=rtol,
                                   equal_nan=True)
        assert not g[~live].any(), "a masked row's pairs must be 0"
    # The tails are logs of masses: an absolute tolerance in log space is a relative one.
    tails = got[4].double()
    torch.testing.assert_close(tails[live], want[4][live], atol=1e-4, rtol=1e-5, equal_nan=True)
    assert not tails[~live].any() and not got[1][~live].isfinite().any()


def _data(N, V, dtype, gen, special=True):
    z = make_logits((N, V), dtype, "cpu", generator=gen)
    zr = make_logits((N, V), dtype, "cpu", generator=gen)
    if special and N >= 8:
        z[1] = -INF                        # no finite logit: no mass on this shard
        z[2, V // 3] = NAN                 # NaN in z: the whole row NaN
        zr[3, :] = -INF                    # no reference mass on this shard
        zr[4, : V // 2] = -INF             # zr −inf at first: the p tail still counts
        z[5, 1] = INF                      # +inf: undefined
        zr[6, V - 1] = NAN                 # NaN in zr only
    return z, zr


def _tokens(z, k, gen):
    N, V = z.shape
    tok = torch.randint(0, V, (N,), generator=gen)
    tok[0] = -1                            # on another shard: no slot, no error
    tok[-1] = topk_indices(z, k)[-1, min(2, k - 1)]   # in S: no extra slot
    return tok


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bucket", [False, True])
@pytest.mark.parametrize("tokens", [False, True])
def test_cpu_op_against_the_reference(dtype, bucket, tokens, gen):
    N, V, k, tau = 11, 301, 7, 0.8
    z, zr = _data(N, V, dtype, gen)
    tok = _tokens(z, k, gen) if tokens else None
    mask = torch.ones(N, dtype=torch.bool)
    mask[7] = False
    if tokens:
        tok[7] = -5                        # a masked row's token is never read
    got = OPS.topk_kl_shard(z, zr, k, tok, mask, tau, bucket)
    _check(got, _reference(z, zr, k, tok, mask, tau, bucket), tau, mask)


@pytest.mark.parametrize("V,k", [(3, 3), (5, 2), (1, 1)])
def test_small_shards_and_strided_rows(V, k, gen):
    """A shard smaller than the global k is called with k = V_i; [B, T, V] views."""
    base = make_logits((2, 4, V + 3), torch.bfloat16, "cpu", generator=gen)
    z, zr = base[..., :V], base.flip(-1)[..., 1:V + 1]
    tok = torch.randint(-1, V, (2, 4), generator=gen)
    got = OPS.topk_kl_shard(z, zr, k, tok, None, 1.3, True)
    want = _reference(z.reshape(8, V), zr.reshape(8, V), k, tok.reshape(8), None, 1.3, True)
    _check(got, want, 1.3, None)


def test_matches_the_composition_it_replaces(gen):
    """The ops the local pass used before: topk_indices, token_logprobs' lse and
    sparse_reference's tails (outside S_i and the sampled token)."""
    N, V, k, tau = 6, 257, 5, 0.7
    z, zr = _data(N, V, torch.float32, gen, special=False)
    tok = _tokens(z, k, gen)
    idx, vals, lse_p, lse_q, tails = OPS.topk_kl_shard(z, zr, k, tok, None, tau, True)
    S = OPS.topk_indices(z, k, None)
    assert torch.equal(idx[:, :k], S)
    zero = torch.zeros(N, dtype=torch.int64)
    for got, x in ((lse_p, z), (lse_q, zr)):
        torch.testing.assert_close(_lse_value(got, tau),
                                   _lse_value(OPS.token_logprobs(x, zero, tau, False)[2], tau))
    extra = torch.where(tok >= 0, tok, S[:, 0].long())
    for col, x in enumerate((z, zr)):
        torch.testing.assert_close(tails[:, col], OPS.sparse_reference(x, S, extra, None, tau)[2],
                                   atol=1e-5, rtol=1e-5)


def test_rejects_a_token_out_of_range():
    z = torch.randn(3, 20)
    with pytest.raises(RuntimeError, match="sampled_tokens other than -1"):
        OPS.topk_kl_shard(z, z, 4, torch.tensor([1, -2, 3]), None, 1.0, False)
    with pytest.raises(RuntimeError, match="k must be in"):
        OPS.topk_kl_shard(z, z, 21, None, None, 1.0, False)


def test_opcheck_and_no_derivative(gen):
    z = make_logits((2, 3, 50), torch.float32, "cpu", generator=gen)
    zr = make_logits((2, 3, 50), torch.float32, "cpu", generator=gen)
    tok = torch.tensor([-1, 3, 49, -1, 0, 7])
    mask = torch.tensor([True, True, False, True, True, True])
    for args in ((z, zr, 5, tok, mask, 0.9, True), (z, zr, 50, None, None, 1.0, False)):
        torch.library.opcheck(OPS.topk_kl_shard, args,
                              test_utils=("test_schema", "test_faketensor",
                                          "test_aot_dispatch_static"))
    x = z.clone().requires_grad_()
    vals = OPS.topk_kl_shard(x, zr, 5, tok, mask, 1.0, True)[1]
    with pytest.raises(RuntimeError, match="vocab_parallel_topk_kl"):
        vals.sum().backward()


# ------------------------------------------------------------------ the CUDA kernels

@pytest.mark.parametrize("N,V,k,dtype", [
    (3, 3001, 16, torch.float32),      # few rows: each row split over several CTAs
    (9, 301, 7, torch.bfloat16),       # one CTA per row, the special rows of _data
    (2, 600, 300, torch.float32),      # k above the warp selection: S preselected
    (8, 40, 40, torch.float16),        # k = V, the special rows
])
@pytest.mark.parametrize("bucket", [False, True])
def test_cuda_kernels(kdev, N, V, k, dtype, bucket, gen):
    z, zr = _data(N, V, dtype, gen)
    tok = _tokens(z, k, gen)
    mask = torch.ones(N, dtype=torch.bool)
    mask[N // 2] = N < 3
    tau = 0.9
    got = kdev.ops.topk_kl_shard(kdev.put(z), kdev.put(zr), k, kdev.put(tok), kdev.put(mask),
                                 tau, bucket)
    _check(got, _reference(z, zr, k, tok, mask, tau, bucket), tau, mask, atol=1e-4, rtol=1e-4)
    cpu = OPS.topk_kl_shard(z, zr, k, tok, mask, tau, bucket)
    assert torch.equal(got[0].cpu(), cpu[0])
    torch.testing.assert_close(got[1].cpu(), cpu[1], rtol=0, atol=0, equal_nan=True)


def test_cuda_kernels_ties(kdev, gen):
    z = torch.randint(0, 3, (6, 500), generator=gen).to(torch.bfloat16)
    zr = torch.randint(0, 3, (6, 500), generator=gen).to(torch.bfloat16)
    got = kdev.ops.topk_kl_shard(kdev.put(z), kdev.put(zr), 9, None, None, 1.0, True)
    _check(got, _reference(z, zr, 9, None, None, 1.0, True), 1.0, None, atol=1e-4, rtol=1e-4)


def test_cuda_kernels_token_out_of_range_is_a_nan_row(kdev, gen):
    """No host sync on the device: a token outside [−1, V) gives a NaN row, not an error."""
    z, zr = _data(3, 64, torch.float32, gen, special=False)
    tok = torch.tensor([-1, 64, -2])
    got = kdev.ops.topk_kl_shard(kdev.put(z), kdev.put(zr), 4, kdev.put(tok), None, 1.0, True)
    lse_p = got[2].cpu()
    assert lse_p[0].isfinite().all() and lse_p[1:].isnan().all()
    assert got[4].cpu()[1:].isnan().all() and (got[0].cpu()[0, 4] == -1)
