"""Benchmark of the fused LM-head GRPO loss: time and peak memory of one forward + backward
(gradients of the hidden states and the LM-head weight) against the unfused path.

    python -m tike_cuda.bench_fused --preset cpu --out bench_out/fused
    python -m tike_cuda.bench_fused --preset gpu --out bench_out/fused     # on a GPU machine

Providers:

- ``unfused``: ``fused_linear.unfused_linear_grpo_loss`` — full ``[B, T, V]`` logits of both
  models, then ``token_logprobs`` + ``per_token_kl`` (TIKE: ``topk_kl``) + ``grpo.grpo_loss``.
- ``fused``: ``fused_linear_grpo_loss`` (gradient formed in the forward, chunk by chunk).
- ``fused_recompute``: the same with ``gradient="recompute"`` (logits recomputed in the
  backward).
- ``liger``: Liger-Kernel's ``LigerFusedLinearGRPOLoss`` (k3 on the sampled token,
  ``loss_type="bnpo"`` = token-mean; its chunk is whole sequences). CUDA only.
- ``calibrate``: allocates and fills one ``[N, V]`` tensor and nothing else: the memory
  reading must be its size; this checks the measuring method in the same run.

Every (case, provider) runs in a fresh subprocess, so one measurement cannot inherit
another's cached or fragmented memory. Peak memory is measured, never computed:

- CUDA: ``torch.cuda.max_memory_allocated`` minus ``memory_allocated`` before the call
  (after a warm-up call): every byte the caching allocator handed out at the peak.
- CPU: torch has no allocator statistics here, and tracemalloc does not see its buffers.
  The subprocess runs with ``MALLOC_MMAP_THRESHOLD_=65536`` (a fixed threshold: glibc then
  serves every buffer above 64 KiB with its own mmap and unmaps it on free, so the
  resident set follows the live bytes instead of keeping freed heap), resets the kernel's
  resident-set high-water mark (``/proc/self/clear_refs`` ← 5), reads ``VmRSS``, makes the
  first (cold) call, then reads ``VmHWM``. The kernel raises VmHWM before it unmaps
  anything, so a buffer freed within the call still counts. Cold, because a warm process
  would reuse pages the first call left resident; the first call's one-time costs
  (thread pools, lazy init) are then included, which ``calibrate`` shows to be small.

Peak extra memory includes the gradients the call returns (``grads_MiB``: hidden's and the
weight's — any method must hold those). Times are p50 over ``--repeats`` calls after one
untimed call (CPU: time.perf_counter, and the process's CPU time of all threads, which a
loaded machine disturbs less than wall time; CUDA: events around the call).
"""
from __future__ import annotations

import argparse
import csv
import datetime
import gc
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import List, Optional

PROVIDERS = ("unfused", "fused", "fused_recompute", "liger", "calibrate")
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
COLUMNS = ["provider", "estimator", "k", "B", "T", "N", "H", "V", "dtype", "device", "chunk",
           "p50_ms", "min_ms", "max_ms", "cpu_p50_ms", "peak_extra_MiB", "logits_MiB", "grads_MiB", "note",
           "date", "torch", "host", "loadavg"]


@dataclass(frozen=True)
class Case:
    provider: str
    B: int
    T: int
    H: int
    V: int
    dtype: str = "fp32"
    estimator: str = "tike"
    k: int = 16
    chunk: Optional[int] = None  # rows; None: the memory budget's default
    device: str = "cpu"


def _grid(providers, base: Case, chunks=(None,)):
    out = []
    for p in providers:
        for c in (chunks if p in ("fused", "fused_recompute") else (None,)):
            out.append(replace(base, provider=p, chunk=c))
    return out


_CPU1 = Case("unfused", B=8, T=256, H=1024, V=32768, dtype="fp32")
_CPU2 = Case("unfused", B=8, T=256, H=1024, V=151936, dtype="bf16")
_GPU = Case("unfused", B=16, T=1024, H=4096, V=151936, dtype="bf16", device="cuda")
PRESETS = {
    "smoke": _grid(("calibrate", "unfused", "fused"), Case("unfused", B=2, T=64, H=64, V=4096))
    + [Case("calibrate", B=4, T=1024, H=64, V=4096)],  # a 64 MiB buffer: the method's check
    "cpu": _grid(("calibrate", "unfused", "fused", "fused_recompute"), _CPU1, (None, 256))
    + _grid(("unfused", "fused", "fused_recompute"), _CPU2, (None, 256))
    + _grid(("unfused", "fused"), replace(_CPU1, estimator="k3"), (None,)),
    "gpu": _grid(("calibrate", "unfused", "fused", "fused_recompute"), _GPU, (None, 1024))
    + _grid(("liger", "fused", "unfused"), replace(_GPU, estimator="k3"), (None, 1024)),
}


# ----------------------------------------------------------------------------- worker

def _inputs(case: Case, torch):
    """Policy and reference heads near each other, random tokens, all positions valid."""
    dt, dev = getattr(torch, DTYPES[case.dtype]), torch.device(case.device)
    g = torch.Generator(device=dev).manual_seed(0)
    B, T, H, V = case.B, case.T, case.H, case.V
    rnd = lambda *s: torch.randn(*s, generator=g, device=dev, dtype=dt)
    h, w = rnd(B, T, H), rnd(V, H) * (2.0 / H) ** 0.5
    rh, rw = h + 0.1 * rnd(B, T, H), w + 0.1 * (2.0 / H) ** 0.5 * rnd(V, H)
    tokens = torch.randint(0, V, (B, T), generator=g, device=dev)
    old = -1 - 2 * torch.rand(B, T, generator=g, device=dev)
    adv = torch.randn(B, generator=g, device=dev)
    mask = torch.ones(B, T, dtype=torch.bool, device=dev)
    return h.requires_grad_(), w.requires_grad_(), tokens, old, adv, mask, rh, rw


def _call(case: Case, torch):
    """A no-argument callable running one forward + backward of the case."""
    from tike_cuda import fused_linear as fl
    if case.provider == "calibrate":
        dt = getattr(torch, DTYPES[case.dtype])
        return lambda: torch.ones(case.B * case.T, case.V, dtype=dt, device=case.device), None
    h, w, tokens, old, adv, mask, rh, rw = _inputs(case, torch)
    kw = dict(kl_estimator=case.estimator, k=case.k, beta=0.04)
    if case.provider == "liger":
        if case.device != "cuda":
            raise RuntimeError("liger: Triton kernels, CUDA only")
        if case.estimator != "k3":
            raise RuntimeError("liger: its GRPO loss has k3 only")
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
        loss_fn = LigerFusedLinearGRPOLoss(beta=0.04, use_ref_model=True, loss_type="bnpo",
                                           chunk_size=1)
        fwd = lambda: loss_fn(h, w, tokens, mask.long(), adv, old_per_token_logps=old,
                              ref_input=rh, ref_weight=rw)[0]
        chunk = f"{case.T} (1 sequence)"
    elif case.provider == "unfused":
        fwd = lambda: fl.unfused_linear_grpo_loss(h, w, tokens, old, adv, mask, rh, rw, **kw)[0]
        chunk = "-"
    else:
        gradient = "recompute" if case.provider == "fused_recompute" else "in_forward"
        fwd = lambda: fl.fused_linear_grpo_loss(h, w, tokens, old, adv, mask, rh, rw,
                                                chunk_size=case.chunk, gradient=gradient, **kw)[0]
        chunk = case.chunk or fl.chunk_rows(case.V, h.dtype, case.estimator)

    def call():
        loss = fwd()
        return (loss, *torch.autograd.grad(loss, [h, w]))
    return call, chunk


def worker(case: Case, repeats: int) -> dict:
    import torch

    from .bench import environment
    from .measure import peak_extra_mib
    gc.collect()
    call, chunk = _call(case, torch)
    cuda = case.device == "cuda"
    if cuda:  # a warm-up call (autotuning, allocator pools), its outputs dropped at once;
        call()  # on the CPU the measured call is the first (module docstring)
    peak_mib = peak_extra_mib(call, torch.device(case.device))
    times, cpu_times = [], []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = call()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0, c0 = time.perf_counter(), time.process_time()
            out = call()
            times.append((time.perf_counter() - t0) * 1e3)
            cpu_times.append((time.process_time() - c0) * 1e3)
        del out
    times.sort()
    cpu_times.sort()
    elt = torch.empty((), dtype=getattr(torch, DTYPES[case.dtype])).element_size()
    env = environment(torch.device(case.device))
    N = case.B * case.T
    return dict(asdict(case), N=N, chunk=chunk, p50_ms=times[len(times) // 2] if times else float("nan"),
                min_ms=times[0] if times else float("nan"), max_ms=times[-1] if times else float("nan"),
                cpu_p50_ms=cpu_times[len(cpu_times) // 2] if cpu_times else float("nan"),
                peak_extra_MiB=peak_mib, logits_MiB=N * case.V * elt / 2**20,
                grads_MiB=(N + case.V) * case.H * elt / 2**20 if case.provider != "calibrate" else 0.0,
                note="", torch=torch.__version__,
                host=env["gpu"] or env["host"])


# ----------------------------------------------------------------------------- driver

def measure(case: Case, repeats: int, timeout: float) -> dict:
    """Runs one case in a fresh interpreter; a failure becomes a row with a note."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    pkg_root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([pkg_root] + [p for p in [env.get("PYTHONPATH")] if p])
    cmd = [sys.executable, "-m", "tike_cuda.bench_fused", "--worker", json.dumps(asdict(case)),
           "--repeats", str(repeats)]
    try:
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        for line in p.stdout.splitlines():
            if line.startswith("RESULT "):
                return json.loads(line[7:])
        note = (p.stderr.strip().splitlines() or ["no output"])[-1][:200]
    except subprocess.TimeoutExpired:
        note = f"timed out after {timeout:.0f} s"
    N = case.B * case.T
    return dict(asdict(case), N=N, p50_ms=float("nan"), min_ms=float("nan"),
                max_ms=float("nan"), cpu_p50_ms=float("nan"), peak_extra_MiB=float("nan"), logits_MiB=float("nan"),
                grads_MiB=float("nan"), note=note, torch="", host="")


def markdown(rows: List[dict]) -> str:
    """One table per shape; times as ratios to the unfused path's, measured in the same run."""
    out = []
    shapes = sorted({(r["estimator"], r["B"], r["T"], r["H"], r["V"], r["dtype"], r["device"])
                     for r in rows}, key=str)
    for est, B, T, H, V, dt, dev in shapes:
        sel = [r for r in rows if (r["estimator"], r["B"], r["T"], r["H"], r["V"], r["dtype"],
                                   r["device"]) == (est, B, T, H, V, dt, dev)]
        ref = next((r for r in sel if r["provider"] == "unfused"), None)
        out.append(f"\n{est}, N = {B * T} ({B}×{T}), H = {H}, V = {V}, {dt}, {dev}; one "
                   f"[N, V] logits tensor = {sel[0]['logits_MiB']:.0f} MiB, gradients of "
                   f"hidden + weight = {max(r['grads_MiB'] for r in sel):.0f} MiB\n")
        out.append("| provider | chunk rows | p50 ms (min–max) | × unfused | CPU-time ms | × unfused | "
                   "peak extra MiB | × unfused | note |")
        out.append("|---|---|---|---|---|---|---|---|---|")
        for r in sel:
            ratio = lambda key: (f"{r[key] / ref[key]:.2f}" if ref and r["provider"] != "calibrate"
                                 else "")
            out.append(f"| {r['provider']} | {r['chunk']} | {r['p50_ms']:.0f} ({r['min_ms']:.0f}–"
                       f"{r['max_ms']:.0f}) | {ratio('p50_ms')} | {r['cpu_p50_ms']:.0f} | "
                       f"{ratio('cpu_p50_ms')} | {r['peak_extra_MiB']:.0f} | "
                       f"{ratio('peak_extra_MiB')} | {r['note']} |")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tike_cuda.bench_fused",
                                 description="Fused LM-head GRPO loss: time and peak memory "
                                             "against the unfused path (and Liger on CUDA)")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="smoke")
    ap.add_argument("--providers", default=None, help="comma list, a subset of " + ",".join(PROVIDERS))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per subprocess")
    ap.add_argument("--out", default="bench_out/fused")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(worker(Case(**json.loads(args.worker)), args.repeats)))
        return 0
    cases = PRESETS[args.preset]
    if args.providers:
        wanted = args.providers.split(",")
        bad = [p for p in wanted if p not in PROVIDERS]
        if bad:
            print(f"unknown provider(s) {bad}; choose from {PROVIDERS}", file=sys.stderr)
            return 2
        cases = [c for c in cases if c.provider in wanted]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    rows = []
    for case in cases:
        print(f"{case.provider} {case.estimator} N={case.B * case.T} H={case.H} V={case.V} "
              f"{case.dtype} chunk={case.chunk} ...", file=sys.stderr, flush=True)
        r = measure(case, args.repeats, args.timeout)
        r.update(date=datetime.date.today().isoformat(), loadavg=load)
        rows.append(r)
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    table = markdown(rows)
    (out / "results.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
