"""tike_cuda.distributed against the single-process ops on the same data.

The test starts its own process groups: 4 processes (gloo, CPU) once per session, in
which the default group (4 ranks) and subgroups of 3, 2 and 1 ranks (group ranks that
differ from the global ranks) each run every case; on a GPU machine one more NCCL
process (world size 1). Each case compares, on every rank: the per-token values with the
single-process op on the concatenated vocabulary (and bitwise across ranks), S~ with the
op's idx, the statistics, and this rank's gradient with its slice of the single-process
gradient. A hang cannot block: collectives time out after 60 s and the processes are
killed at DEADLINE_S, which fails every case.
"""
import contextlib
import json
import os
import time
import traceback
import zlib
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Optional

import pytest
import torch
import torch.distributed as dist

from conftest import GRAD_RTOL

WORLD = 4
GROUPS = {4: None, 3: [1, 2, 3], 2: [0, 2], 1: [3]}  # ranks of each group (None: default)
DEADLINE_S = 300
INF, NAN = float("inf"), float("nan")
BF16, F16, F32 = torch.bfloat16, torch.float16, torch.float32


@dataclass(frozen=True)
class Case:
    name: str
    op: str = "topk"                 # topk, logprobs, full, error
    dtype: torch.dtype = F32
    lead: tuple = (7,)
    V: int = 43
    k: int = 5
    split: str = "even"              # even, uneven, small (shards smaller than k)
    tokens: Optional[str] = "each"   # each (row n's token on shard n % R), None
    old: bool = True
    mask: bool = False
    tail: str = "none"
    union: bool = True
    tau: float = 1.0
    special: Optional[str] = None    # nan, ties, neginf, view, big (logits ~ 40)
    sizes_given: bool = False        # pass shard_sizes (no size all-gather)
    entropy: bool = False
    emu: bool = False                # the CUDA kernels, under the CPU emulation


CASES = [
    Case("fp32"),
    Case("fp32_bucket", tail="bucket", split="uneven", sizes_given=True),
    Case("bf16", dtype=BF16, split="uneven"),
    Case("bf16_bucket_mask", dtype=BF16, tail="bucket", mask=True),
    Case("fp16_bucket", dtype=F16, tail="bucket", sizes_given=True),
    Case("shard_below_k", split="small", k=7, tail="bucket"),
    Case("shard_below_k_bf16", dtype=BF16, split="small", k=7, mask=True),
    Case("k_is_V", V=11, k=11, split="uneven", tail="bucket"),
    Case("no_tokens", tokens=None, old=False, tail="bucket", split="uneven"),
    Case("no_union", union=False, tail="bucket", split="uneven"),
    Case("no_union_no_old", union=False, old=False, dtype=BF16),
    Case("ties_bf16", dtype=BF16, special="ties", k=6, tail="bucket"),
    Case("ties_fp32", special="ties", split="small", k=6),
    Case("nan_inf", special="nan", tail="bucket", split="uneven"),
    Case("nan_inf_none", special="nan", dtype=BF16),
    Case("neginf", special="neginf", tail="bucket", k=6, split="uneven"),
    Case("view_tau", special="view", lead=(2, 3), tau=0.7, tail="bucket", mask=True),
    Case("big_k", V=300, k=40, split="uneven", tail="bucket", dtype=BF16, sizes_given=True),
    Case("emu_bucket", emu=True, tail="bucket", split="uneven", mask=True, V=37, k=4),
    Case("emu_bf16_nan", emu=True, dtype=BF16, special="nan", lead=(6,), V=29, k=3),
    Case("lp", op="logprobs"),
    Case("lp_entropy_bf16", op="logprobs", dtype=BF16, entropy=True, split="uneven"),
    Case("lp_entropy_mask_big", op="logprobs", entropy=True, mask=True, split="small",
         sizes_given=True, special="big"),
    Case("lp_nan_inf", op="logprobs", entropy=True, special="nan", split="uneven"),
    Case("lp_view_tau", op="logprobs", entropy=True, special="view", lead=(2, 3), tau=0.7),
    Case("lp_emu", op="logprobs", entropy=True, emu=True, split="uneven", V=31, mask=True),
    Case("lp_emu_nan", op="logprobs", entropy=True, emu=True, special="nan", V=31),
    Case("full", op="full", tokens=None),
    Case("full_bf16_mask", op="full", tokens=None, dtype=BF16, mask=True, split="uneven"),
    Case("full_nan_inf", op="full", tokens=None, special="nan", split="small"),
    Case("full_neginf", op="full", tokens=None, special="neginf", sizes_given=True),
    Case("full_view_tau", op="full", tokens=None, special="view", lead=(2, 3), tau=0.7),
    Case("full_emu", op="full", tokens=None, emu=True, split="uneven", V=31, mask=True),
    Case("full_emu_nan", op="full", tokens=None, emu=True, special="nan", V=31),
    Case("big_mask", mask=True, special="big", tail="bucket", dtype=BF16),
    Case("full_big_mask", op="full", tokens=None, mask=True, special="big"),
]
ERRORS = ["k_above_V", "token_out_of_range", "k_differs", "rows_differ", "bad_shard_sizes",
          "second_derivative", "forward_mode", "group_rank"]


# ------------------------------------------------------------------ data

def _sizes(V, R, split, k):
    if split == "even":
        return [V // R + (1 if i < V % R else 0) for i in range(R)]
    if split == "small" and R > 1:
        head = [max(1, k // 2), 1, k - 1][:R - 1]
        return head + [V - sum(head)]
    w = [1, 4, 2, 3][:R]
    sizes = [max(1, V * x // sum(w)) for x in w]
    sizes[-1] = V - sum(sizes[:-1])
    return sizes


def _data(c: Case, R: int, device):
    gen = torch.Generator().manual_seed(zlib.crc32(f"{c.name}/{R}".encode()))
    shape = tuple(c.lead) + (c.V,)
    sizes = _sizes(c.V, R, c.split, c.k)
    offs = [sum(sizes[:i]) for i in range(R)]

    def logits():
        if c.special == "ties":
            return torch.randint(0, 3, shape, generator=gen).double()
        if c.special == "view":  # a [:, 1:] slice: rows of arbitrary stride
            return (torch.randn(shape[0], shape[1] + 1, c.V, generator=gen) * 3)[:, 1:]
        scale = 40.0 if c.special == "big" else 3.0  # big: exp(z/τ) overflows float32
        return torch.randn(shape, generator=gen, dtype=torch.float64) * scale

    z, zr = logits(), logits()
    if c.special == "nan":
        last, first = slice(offs[-1], None), slice(0, sizes[0])
        z[0, offs[-1]] = NAN                 # a NaN on one shard
        z[1, sizes[0] - 1] = INF             # +inf: undefined row
        z[2, first] = -INF                   # a shard without policy mass (legal when R > 1)
        zr[3, last] = -INF                   # a shard without reference mass
        zr[4, offs[R // 2]] = NAN            # a NaN in the reference
    if c.special == "neginf":
        z[torch.rand(shape, generator=gen) < 0.7] = -INF
        z[0, :] = -INF
        z[0, c.V // 2] = 1.0                 # fewer finite logits than k
        zr[torch.rand(shape, generator=gen) < 0.3] = -INF
    z, zr = z.to(device=device, dtype=c.dtype), zr.to(device=device, dtype=c.dtype)
    flat = z.reshape(-1, c.V)
    n_rows = flat.shape[0]
    tok = old = mask = None
    if c.tokens == "each":
        t = []
        for n in range(n_rows):
            j = n % R
            lo, hi = offs[j], offs[j] + sizes[j]
            if (n // R) % 2 == 0:  # the shard's largest logit (often in S), else any
                t.append(lo + int(flat[n, lo:hi].float().nan_to_num(-INF).argmax()))
            else:
                t.append(lo + int(torch.randint(0, hi - lo, (), generator=gen)))
        tok = torch.tensor(t).reshape(c.lead).to(device)
    if c.old:
        old = (torch.randn(c.lead, generator=gen) - 2).to(device)
    if c.mask:
        mask = torch.rand(c.lead, generator=gen) > 0.3
        mask.reshape(-1)[0] = True
        mask = mask.to(device)
        if tok is not None:
            tok = torch.where(mask, tok, torch.full_like(tok, -100))  # padding where masked
    g = torch.randn(c.lead, generator=gen).to(device)
    return z, zr, tok, old, mask, g, sizes, offs


# ------------------------------------------------------------------ checks

def _close(name, got, want, atol=2e-5, rtol=2e-5):
    torch.testing.assert_close(got.double().cpu(), want.double().cpu(), atol=atol, rtol=rtol,
                               equal_nan=True, msg=lambda m: f"{name}: {m}")


def _close_grad(got, want, dtype):
    w = want.double().cpu()
    finite = w[torch.isfinite(w)]
    scale = finite.abs().max().item() if finite.numel() else 0.0
    rtol = GRAD_RTOL[dtype]
    torch.testing.assert_close(got.double().cpu(), w, rtol=rtol, atol=rtol * max(scale, 1.0),
                               equal_nan=True, msg=lambda m: f"gradient: {m}")


def _same_on_all_ranks(x, group, R):
    """x (float32) is bitwise the same on every rank of the group (a collective)."""
    bits = x.detach().float().contiguous().view(torch.int32).reshape(-1)
    every = torch.empty(R * bits.numel(), dtype=torch.int32, device=bits.device)
    dist.all_gather_into_tensor(every, bits, group=group)
    return bool((every.view(R, -1) == bits).all())


def _run_case(c: Case, group, R, device):
    import tike_cuda
    from tike_cuda import distributed as D
    from tike_cuda.distributed import _group, topk_kl as dtopk

    z, zr, tok, old, mask, g, sizes, offs = _data(c, R, device)
    me = dist.get_rank(group)
    sl = slice(offs[me], offs[me] + sizes[me])
    zl = z[..., sl].detach().requires_grad_()      # a view: rows strided by V
    zrl = zr[..., sl]
    zf = z.detach().clone().requires_grad_()
    shard_sizes = sizes if c.sizes_given else None
    emu = contextlib.nullcontext()
    if c.emu:
        from tike_cuda.testing import emulated_cuda
        emu = emulated_cuda(order="shuffled", seed=R)

    if c.op == "topk":
        kw = dict(sampled_tokens=tok, old_logprobs=old, temperature=c.tau, mask=mask,
                  union_sampled=c.union, tail=c.tail)
        want, wst = tike_cuda.topk_kl(zf, zr, c.k, return_stats=True, **kw)
        (want * g).sum().backward()
        w_idx = torch.ops.tike_cuda.topk_kl(
            z, zr, c.k, None if tok is None else torch.where(tok < 0, 0, tok).reshape(-1),
            None if old is None else old.reshape(-1).float(),
            None if mask is None else mask.reshape(-1), c.tau, c.union, c.tail == "bucket")[2]
        with emu:
            got, gst = D.vocab_parallel_topk_kl(zl, zrl, c.k, group=group, return_stats=True,
                                                shard_sizes=shard_sizes, **kw)
            (got * g).sum().backward()
            layout = _group.shard_layout(zl, group, sizes, ())
            rows = lambda x, dt: None if x is None else x.reshape(-1).to(dt)  # noqa: E731
            got_idx = dtopk._forward(zl.detach(), zrl, c.k, rows(tok, torch.int64),
                                     rows(old, F32), rows(mask, torch.bool), c.tau, c.union,
                                     c.tail == "bucket", layout)[2]
        same = _same_on_all_ranks(got, group, R)
        _close("value", got, want)
        defined = torch.isfinite(want) if mask is None else torch.isfinite(want) & mask
        for i, name in enumerate(("topk_mass", "sampled_logprob", "ref_topk_mass")):
            _close(name, gst[i][defined], wst[i][defined])
        assert torch.equal(got_idx.cpu(), w_idx.cpu().reshape(got_idx.shape)), \
            f"S~ differs:\n{got_idx}\n{w_idx}"
    elif c.op == "logprobs":
        kw = dict(temperature=c.tau, return_entropy=c.entropy, mask=mask)
        want = tike_cuda.token_logprobs(zf, tok, **kw)
        want = want if c.entropy else (want,)
        sum(((w * (g + i)).sum() for i, w in enumerate(want))).backward()
        with emu:
            got = D.vocab_parallel_token_logprobs(zl, tok, group=group, shard_sizes=shard_sizes,
                                                  **kw)
            got = got if c.entropy else (got,)
            sum(((w * (g + i)).sum() for i, w in enumerate(got))).backward()
        same = all([_same_on_all_ranks(x, group, R) for x in got])
        for name, a, b in zip(("log p", "entropy"), got, want):
            _close(name, a, b)
    else:
        kw = dict(temperature=c.tau, mask=mask)
        want = tike_cuda.full_kl(zf, zr, **kw)
        (want * g).sum().backward()
        with emu:
            got = D.vocab_parallel_full_kl(zl, zrl, group=group, shard_sizes=shard_sizes, **kw)
            (got * g).sum().backward()
        same = _same_on_all_ranks(got, group, R)
        _close("value", got, want, atol=1e-5, rtol=1e-5)
    assert same, "the ranks' results differ"
    _close_grad(zl.grad, zf.grad[..., sl], c.dtype)


def _expect(exc_type, words, fn):
    try:
        fn()
    except exc_type as e:
        missing = [w for w in words if w not in str(e)]
        assert not missing, f"{exc_type.__name__} without {missing}: {e}"
        return
    raise AssertionError(f"no {exc_type.__name__} raised")


def _run_error(name, group, R, device):
    from torch.autograd import forward_ad

    from tike_cuda.distributed import vocab_parallel_topk_kl as vtk

    c = Case(name, V=20, k=3)
    z, zr, tok, old, mask, g, sizes, offs = _data(c, R, device)
    me = dist.get_rank(group)
    sl = slice(offs[me], offs[me] + sizes[me])
    zl, zrl = z[..., sl].detach().requires_grad_(), zr[..., sl]
    if name == "k_above_V":
        _expect(ValueError, ["k must be in [1, V=20]"], lambda: vtk(zl, zrl, 21, group=group))
    elif name == "token_out_of_range":
        bad = tok.clone()
        bad[1] = 20
        _expect(ValueError, ["sampled_tokens", "V=20"],
                lambda: vtk(zl, zrl, 3, group=group, sampled_tokens=bad))
    elif name == "k_differs":
        _expect(ValueError, ["same k"], lambda: vtk(zl, zrl, 2 + me, group=group))
    elif name == "rows_differ":
        n = 7 - (me == 0)
        _expect(ValueError, ["same number of rows"], lambda: vtk(zl[:n], zrl[:n], 3, group=group))
    elif name == "bad_shard_sizes":
        _expect(ValueError, ["shard_sizes"],
                lambda: vtk(zl, zrl, 3, group=group, shard_sizes=sizes + [1]))
    elif name == "second_derivative":
        out = vtk(zl, zrl, 3, group=group, sampled_tokens=tok)
        (gz,) = torch.autograd.grad((out * g).sum(), zl, create_graph=True)
        _expect(RuntimeError, ["vocab_parallel_topk_kl", "second derivative"],
                lambda: gz.sum().backward())
    elif name == "forward_mode":
        def dual():
            with forward_ad.dual_level():
                vtk(forward_ad.make_dual(zl.detach(), torch.ones_like(zl)), zrl, 3, group=group)
        _expect(RuntimeError, ["vocab_parallel_topk_kl", "forward-mode"], dual)
        _expect(RuntimeError, ["vocab_parallel_topk_kl", "forward-mode"],
                lambda: torch.func.jvp(lambda x: vtk(x, zrl, 3, group=group),
                                       (zl.detach(),), (torch.ones_like(zl),)))
    elif name == "group_rank":  # the group's rank (not the global one) picks the shard
        from tike_cuda.distributed import _group
        layout = _group.shard_layout(zl, group, None, ())
        assert (layout.rank, layout.sizes, layout.offset) == (me, tuple(sizes), offs[me])


# ------------------------------------------------------------------ processes

def _worker(rank, world, init_file, out_dir, backend, device, group_ranks, names, emu_state):
    """Runs the cases in every group this rank belongs to; writes {case-R: None (passed),
    "skip: why" or the traceback}. emu_state: None when the emulation is loaded, else the
    "skip: ..." or "error: ..." result of the emulated cases."""
    torch.set_num_threads(1)
    results = {}
    try:
        if device == "cuda":
            torch.cuda.set_device(0)
        dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank,
                                world_size=world, timeout=timedelta(seconds=60))
        groups = {R: (None if ranks is None else dist.new_group(ranks))
                  for R, ranks in group_ranks.items()}  # every process creates every group
        for R, ranks in group_ranks.items():
            if ranks is not None and rank not in ranks:
                continue
            for name in names:
                if not _applies(name, R):
                    continue
                key = f"{name}-R{R}"
                case = next((c for c in CASES if c.name == name), None)
                if case is not None and case.emu and emu_state is not None:
                    results[key] = emu_state
                    continue
                try:
                    if case is None:
                        _run_error(name, groups[R], R, device)
                    else:
                        _run_case(case, groups[R], R, device)
                    results[key] = None
                except Exception:  # recorded, and reported by the test of this case
                    results[key] = traceback.format_exc()
        dist.barrier()
        dist.destroy_process_group()
    except Exception:
        results["__process__"] = traceback.format_exc()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)


def _launch(tmp, world, backend, device, group_ranks, names, emu_state=None):
    """Runs _worker in `world` fresh processes; returns {rank: results} (or raises)."""
    from tike_cuda.distributed._spawn import run_processes
    run_processes(_worker, world, (world, os.path.join(tmp, "pg_init"), tmp, backend, device,
                                   group_ranks, names, emu_state), DEADLINE_S)
    out = {}
    for r in range(world):
        with open(os.path.join(tmp, f"rank{r}.json")) as f:
            out[r] = json.load(f)
    return out


ALL_NAMES = [c.name for c in CASES] + ERRORS
# Errors about ranks that disagree need two ranks to disagree.
_TWO_RANK_ERRORS = ("k_differs", "rows_differ")


def _applies(name, R):
    return R > 1 or name not in _TWO_RANK_ERRORS


@pytest.fixture(scope="module")
def gloo_results(tmp_path_factory):
    from tike_cuda import testing
    emu_state = None  # as conftest's kdev: no CUDA headers skips, except in CI
    if testing.cuda_include_dir() is None and not os.environ.get("CI"):
        emu_state = "skip: the CUDA emulation needs the CUDA toolkit's headers (set CUDA_HOME)"
    else:
        try:
            testing.load_emulated()  # built once here; the workers load the cached library
        except Exception as e:
            emu_state = f"error: the CUDA emulation did not build: {e}"
    t0 = time.monotonic()
    try:
        res = _launch(str(tmp_path_factory.mktemp("gloo")), WORLD, "gloo", "cpu", GROUPS,
                      ALL_NAMES, emu_state)
    except Exception as e:  # a hang or a crash fails every case, with the reason
        res = {"__launch__": f"{type(e).__name__}: {e}"}
    res["__seconds__"] = time.monotonic() - t0
    return res


def _outcome(results, key, ranks):
    """(errors, skip reason) of one case over the ranks that ran it."""
    if "__launch__" in results:
        return [results["__launch__"]], None
    errors, skip = [], None
    for r in ranks:
        got = results[r]
        if "__process__" in got:
            return [f"rank {r}: {got['__process__']}"], None
        msg = got.get(key, "missing: the case did not run")
        if msg is not None and msg.startswith("skip:"):
            skip = msg[len("skip:"):].strip()
        elif msg is not None:
            errors.append(f"--- {key}, rank {r}:\n{msg}")
    return errors, skip


@pytest.mark.parametrize("name,R", [(n, R) for R in sorted(GROUPS) for n in ALL_NAMES
                                     if _applies(n, R)])
def test_gloo(gloo_results, name, R):
    errors, skip = _outcome(gloo_results, f"{name}-R{R}", range(WORLD) if GROUPS[R] is None
                            else GROUPS[R])
    if errors:
        pytest.fail("\n".join(errors), pytrace=False)
    if skip:
        pytest.skip(skip)


def test_gloo_time(gloo_results):
    """The whole multi-process run (start-up included) stays well inside its deadline."""
    assert gloo_results["__seconds__"] < DEADLINE_S / 2, gloo_results["__seconds__"]


_nccl = pytest.mark.skipif(not (torch.cuda.is_available() and dist.is_nccl_available()),
                           reason="needs a CUDA device and NCCL")


@_nccl
@pytest.mark.cuda
def test_nccl_world_size_1(tmp_path):
    """The CUDA kernels and NCCL collectives: one process, world size 1 (every case but
    the emulated ones)."""
    names = [n for n in [c.name for c in CASES if not c.emu] + ERRORS if _applies(n, 1)]
    res = _launch(str(tmp_path), 1, "nccl", "cuda", {1: None}, names)
    errors = [e for name in names for e in _outcome(res, f"{name}-R1", [0])[0]]
    assert not errors, "\n".join(errors)
