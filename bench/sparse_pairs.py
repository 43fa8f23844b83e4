"""The sparse reference's calls against what they replace, timed in interleaved pairs.

    PYTHONPATH=python python bench/sparse_pairs.py --N 128 --V 151936 --k 16 --threads 1

Each pair (call, baseline) runs alternately `--repeats` times after a warm-up, and the
medians of wall time and of the process's CPU time (time.process_time) are reported with
their ratio. On a shared machine the CPU time is the steadier of the two: other processes
stretch the wall time of both calls of a pair, not the CPU time either spends. Inputs are
made once, outside any timing (the harness's make_inputs: zr = z + noise).

Pairs:
  update, forward        topk_kl on the store     vs  dense topk_kl (tike_cuda)
  update, fwd + bwd      the same, with the gradient
  rollout                topk_indices             vs  torch.topk
  reference              sparse_reference         vs  dense topk_kl forward (for scale)
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

import tike_cuda
from tike_cuda.bench import DTYPES, make_inputs


def _timed(fn):
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    return (time.perf_counter() - w0) * 1e3, (time.process_time() - c0) * 1e3


def pair(a, b, repeats: int):
    """Medians (wall a, wall b, cpu a, cpu b) in ms of alternating calls."""
    a(), b()
    ta, tb = [], []
    for _ in range(repeats):
        ta.append(_timed(a))
        tb.append(_timed(b))
    med = lambda ts, i: statistics.median(t[i] for t in ts)  # noqa: E731
    return med(ta, 0), med(tb, 0), med(ta, 1), med(tb, 1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--N", type=int, default=128)
    p.add_argument("--V", type=int, default=151936)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=9)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    inp = make_inputs(a.N, a.V, DTYPES[a.dtype], device)
    z, zr, tok, old, k = inp.z, inp.zr, inp.tokens, inp.old_lp, a.k
    support = tike_cuda.topk_indices(z, k)
    sref = tike_cuda.sparse_reference(zr, support, sampled_tokens=tok)
    leaf = z.detach().clone().requires_grad_()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def run(f):
        def call():
            f()
            sync()
        return call

    def fwd(ref):
        def f():
            with torch.no_grad():
                tike_cuda.topk_kl(z, ref, k, sampled_tokens=tok, old_logprobs=old)
        return run(f)

    def fwdbwd(ref):
        return run(lambda: torch.autograd.grad(
            tike_cuda.topk_kl(leaf, ref, k, sampled_tokens=tok, old_logprobs=old).sum(), leaf))

    pairs = [
        ("update, forward", "topk_kl(logits, sref)", "topk_kl(logits, ref_logits)", fwd(sref), fwd(zr)),
        ("update, fwd + bwd", "topk_kl(logits, sref)", "topk_kl(logits, ref_logits)",
         fwdbwd(sref), fwdbwd(zr)),
        ("rollout", "topk_indices", "torch.topk", run(lambda: tike_cuda.topk_indices(z, k)),
         run(lambda: torch.topk(z, k))),
        ("reference", "sparse_reference", "dense topk_kl forward",
         run(lambda: tike_cuda.sparse_reference(zr, support, sampled_tokens=tok)), fwd(zr)),
    ]
    print(f"N={a.N} V={a.V} k={k} {a.dtype} {device.type}, {a.threads} thread(s), "
          f"medians of {a.repeats} interleaved pairs; store {sref.nbytes / a.N:.0f} B/token")
    print("| stage | call | ms wall (CPU) | baseline | ms wall (CPU) | ratio wall (CPU) |")
    print("|---|---|---|---|---|---|")
    for stage, name, base, f, g in pairs:
        wf, wg, cf, cg = pair(f, g, a.repeats)
        print(f"| {stage} | {name} | {wf:.1f} ({cf:.1f}) | {base} | {wg:.1f} ({cg:.1f}) "
              f"| {wf / wg:.2f} ({cf / cg:.2f}) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
