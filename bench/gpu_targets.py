"""Time the design targets (design.md §5) at the target shape on one GPU.

    python bench/gpu_targets.py --out targets.csv

N = 16,384 rows, V = 151,936, bf16, k = 16 and 64: tike_cuda's topk_kl forward, forward +
backward, forward + in-place backward, full_kl and token_logprobs forward + backward,
against eager PyTorch (tike_cuda.eager) and torch.compile of it. CUDA events around each
call, L2 flushed before each, median of the repeats; achieved GB/s over the byte floor
(passes over one N×V bf16 array: fwd 2, fwd+bwd 4, full_kl 5, token_logprobs 3) and its
fraction of the copy bandwidth measured in the same run; peak extra memory from
torch.cuda.max_memory_allocated. With the sparse reference: topk_indices against
torch.topk, sparse_reference, topk_kl on the stored S~ forward + backward (3 passes). The
table is printed last.
"""
import argparse
import csv
import statistics
import sys
import time

import torch

import tike_cuda
from tike_cuda import eager

OPS = torch.ops.tike_cuda


def make_inputs(N, V, dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    z = torch.empty(N, V, dtype=dtype, device="cuda")
    zr = torch.empty_like(z)
    step = max(1, (1 << 26) // V)
    for i in range(0, N, step):  # float32 temporaries of at most 256 MiB
        a = torch.randn(min(step, N - i), V, generator=g, device="cuda") * 2
        z[i:i + step] = a
        zr[i:i + step] = a + 0.5 * torch.randn(a.shape, generator=g, device="cuda")
    tok = torch.randint(0, V, (N,), generator=g, device="cuda")
    old = -2 - torch.rand(N, generator=g, device="cuda")
    return z, zr, tok, old


class Timer:
    def __init__(self):
        self.flush = torch.empty(2 * torch.cuda.get_device_properties(0).L2_cache_size,
                                 dtype=torch.uint8, device="cuda")
        self.a = torch.cuda.Event(enable_timing=True)
        self.b = torch.cuda.Event(enable_timing=True)

    def median_ms(self, fn, repeats, warmup=2, prep=None):
        for _ in range(warmup):
            if prep:
                prep()
            fn()
        torch.cuda.synchronize()
        ts = []
        for _ in range(repeats):
            if prep:
                prep()  # untimed: before the start event
            self.flush.zero_()
            self.a.record()
            fn()
            self.b.record()
            self.b.synchronize()
            ts.append(self.a.elapsed_time(self.b))
        return statistics.median(ts)


def peak_extra_gib(fn, prep=None):
    if prep:
        prep()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return peak / 2**30


def copy_gbps(timer, nbytes):
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = timer.median_ms(lambda: dst.copy_(src), 10)
    return 2 * nbytes / ms / 1e6  # read + write


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--N", type=int, default=16384)
    p.add_argument("--V", type=int, default=151936)
    p.add_argument("--ks", default="16,64")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--baseline-repeats", type=int, default=3)
    p.add_argument("--no-baselines", action="store_true")
    p.add_argument("--no-sparse", action="store_true")
    p.add_argument("--out", default="targets.csv")
    a = p.parse_args(argv)
    N, V, dtype = a.N, a.V, torch.bfloat16
    timer = Timer()
    z, zr, tok, old = make_inputs(N, V, dtype)
    unit = N * V * z.element_size()  # one pass over an N×V bf16 array
    bw = copy_gbps(timer, 4 * 2**30)
    gout = torch.ones(N, device="cuda")
    rows = []

    def record(name, k, ms, passes, peak):
        gbps = passes * unit / ms / 1e6
        rows.append(dict(case=name, k=k, ms=round(ms, 3), GBps=round(gbps, 1),
                         floor_ms=round(passes * unit / bw / 1e6, 3),
                         floor_frac=round(gbps / bw, 3), peak_extra_GiB=round(peak, 2),
                         copy_GBps=round(bw, 1)))
        print(f"  {name:34s} k={k:<4} {ms:8.3f} ms  {gbps:7.1f} GB/s  peak+{peak:6.2f} GiB",
              flush=True)

    leaf = z.detach().requires_grad_(True)
    for k in [int(x) for x in a.ks.split(",")]:
        fwd = lambda: OPS.topk_kl(z, zr, k, tok, old, None, 1.0, True, False)
        record("tike topk_kl fwd", k, timer.median_ms(fwd, a.repeats), 2, peak_extra_gib(fwd))

        def fb():
            out = tike_cuda.topk_kl(leaf, zr, k, sampled_tokens=tok, old_logprobs=old)
            return torch.autograd.grad(out, leaf, gout)[0]
        record("tike topk_kl fwd+bwd", k, timer.median_ms(fb, a.repeats), 4, peak_extra_gib(fb))

        buf = torch.empty_like(z)
        prep = lambda: buf.copy_(z)

        def fb_inplace():
            _, lse, idx, coef, shift, _ = OPS.topk_kl(buf, zr, k, tok, old, None, 1.0, True, False)
            OPS.topk_kl_backward_(gout, buf, lse, idx, coef, shift, None, 1.0)
        record("tike topk_kl fwd+bwd in place", k, timer.median_ms(fb_inplace, a.repeats, prep=prep),
               4, peak_extra_gib(fb_inplace, prep))
        del buf

    def full_fb():
        out = tike_cuda.full_kl(leaf, zr)
        return torch.autograd.grad(out, leaf, gout)[0]
    record("tike full_kl fwd+bwd", 0, timer.median_ms(full_fb, a.repeats), 5, peak_extra_gib(full_fb))

    def tok_fb():
        out = tike_cuda.token_logprobs(leaf, tok)
        return torch.autograd.grad(out, leaf, gout)[0]
    record("tike token_logprobs fwd+bwd", 0, timer.median_ms(tok_fb, a.repeats), 3,
           peak_extra_gib(tok_fb))

    if not a.no_sparse:
        # The sparse reference (docs/sparse_reference.md): the old policy's top-k at rollout
        # (against torch.topk), the reference on S~ (one pass over ref_logits), then TIKE on
        # the stored S~ at update time (one pass over logits forward, one backward).
        k = 16
        record("tike topk_indices", k, timer.median_ms(lambda: OPS.topk_indices(z, k, None),
                                                         a.repeats), 1, 0.0)
        record("torch.topk (indices)", k, timer.median_ms(lambda: torch.topk(z, k, -1),
                                                           a.repeats), 1, 0.0)
        support = OPS.topk_indices(z, k, None)
        record("tike sparse_reference", k,
               timer.median_ms(lambda: OPS.sparse_reference(zr, support, tok, None, 1.0),
                               a.repeats), 1, 0.0)
        sref = tike_cuda.sparse_reference(zr, support, sampled_tokens=tok)

        def sparse_fb():
            out = tike_cuda.topk_kl(leaf, sref, sampled_tokens=tok, old_logprobs=old)
            return torch.autograd.grad(out, leaf, gout)[0]
        record("tike topk_kl(sparse ref) fwd+bwd", k, timer.median_ms(sparse_fb, a.repeats), 3,
               peak_extra_gib(sparse_fb))
        del support, sref

    if not a.no_baselines:
        k = 16
        compiled = torch.compile(eager.topk_kl)
        for name, f in (("eager topk_kl fwd+bwd", eager.topk_kl),
                        ("compile topk_kl fwd+bwd", compiled)):
            def base_fb(f=f):
                out = f(leaf, zr, k, sampled_tokens=tok, old_logprobs=old)
                return torch.autograd.grad(out, leaf, gout)[0]
            try:
                t0 = time.time()
                base_fb()  # compiles (not timed)
                torch.cuda.synchronize()
                print(f"  ({name}: first call {time.time() - t0:.1f} s)", flush=True)
                record(name, k, timer.median_ms(base_fb, a.baseline_repeats, warmup=1), 4,
                       peak_extra_gib(base_fb))
            except Exception as e:  # e.g. out of memory: report, keep the rest
                print(f"  {name}: skipped ({type(e).__name__}: {e})", flush=True)
            torch.cuda.empty_cache()

    with open(a.out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"\nN={N} V={V} bf16 on {torch.cuda.get_device_name(0)}; copy {bw:.0f} GB/s; "
          "targets: fwd <= 3 ms, fwd+bwd <= 6 ms, k=64 within 15% of k=16")
    print(f"{'case':34s} {'k':>4s} {'ms':>9s} {'GB/s':>8s} {'floor ms':>9s} {'of floor':>9s} "
          f"{'peak GiB':>9s}")
    for r in rows:
        print(f"{r['case']:34s} {r['k']:4d} {r['ms']:9.3f} {r['GBps']:8.1f} {r['floor_ms']:9.3f} "
              f"{r['floor_frac']:9.3f} {r['peak_extra_GiB']:9.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
