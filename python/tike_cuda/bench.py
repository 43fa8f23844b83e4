"""Benchmark harness: tike_cuda's fused ops against eager PyTorch, torch.compile and Liger.

    python -m tike_cuda bench --preset cpu --out bench_out
    python -m tike_cuda bench --preset gpu --ops topk_kl --providers tike_cuda,compile
    python -m tike_cuda bench --preset sparse-gpu     # the fixed-support (sparse) mode

Each case (op, mode, N, V, k, dtype) is timed per provider: ``--warmup`` untimed calls,
then ``--repeats`` timed ones, reported as median (p50), p20 and p80. Inputs are made
once per shape, outside any timed region. On CUDA each call is timed with CUDA events
after flushing L2 (a memset of twice its size); on CPU with time.perf_counter (CPU ops
are synchronous). Modes: ``fwd`` is a forward without autograd (inputs do not require
grad); ``fwdbwd`` is forward plus ``torch.autograd.grad`` of the logits.

Byte floor (design.md §5): the fewest bytes an op must move, in passes over one
[N, V] array of the input dtype — topk_kl fwd 2 (z, zr), fwd+bwd 4 (z, zr, z again,
grad); full_kl 2 and 5 (its backward re-reads zr); token_logprobs 1 and 3. GBps is
those bytes over p50; floor_frac is (bytes / copy bandwidth) / p50, where the copy
bandwidth (read + write bytes per second of a large ``copy_``, median) is measured in
the same run: 1.0 would be copy speed.

Sparse mode (ops topk_kl_sparse, sparse_reference, topk_indices; presets sparse-cpu and
sparse-gpu, which also run the dense topk_kl beside them): the update-time pass
topk_kl_sparse is topk_kl with a SparseReference (built once, outside the timing) — 1
pass over the policy logits forward, 3 forward+backward, plus the store's N·(k+1)·8 + N·4
bytes; sparse_reference and topk_indices are the rollout-time calls (1 pass each, plus
what they write). A summary table sets the update pass against dense topk_kl.

peak_extra_MiB is measured on one extra, untimed call. CUDA: torch.cuda.max_memory_allocated
minus the allocation before the call (outputs and gradients included). CPU: growth of
the process's peak resident set (VmHWM, reset through /proc/self/clear_refs) over the
resident set before the call — memory the allocator newly touched; NaN where the reset
is not allowed.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import platform
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch

from . import eager, report
from .measure import Timer, peak_extra_mib, percentile, proc_status_kib
from .report import progress

OPS = ("topk_kl", "full_kl", "token_logprobs")
SPARSE_OPS = ("topk_kl_sparse", "sparse_reference", "topk_indices")
ALL_OPS = OPS + SPARSE_OPS
K_OPS = ("topk_kl",) + SPARSE_OPS  # ops with a k
FWD_ONLY = ("sparse_reference", "topk_indices")  # no gradient to time
MODES = ("fwd", "fwdbwd")
PROVIDERS = ("tike_cuda", "eager", "compile", "liger")
PASSES = {("topk_kl", "fwd"): 2, ("topk_kl", "fwdbwd"): 4,
          ("full_kl", "fwd"): 2, ("full_kl", "fwdbwd"): 5,
          ("token_logprobs", "fwd"): 1, ("token_logprobs", "fwdbwd"): 3,
          ("topk_kl_sparse", "fwd"): 1, ("topk_kl_sparse", "fwdbwd"): 3,
          ("sparse_reference", "fwd"): 1, ("topk_indices", "fwd"): 1}
COLUMNS = ["op", "provider", "mode", "N", "V", "k", "dtype", "device", "p50_ms", "p20_ms",
           "p80_ms", "GBps", "floor_frac", "peak_extra_MiB", "date", "torch", "cuda", "gpu",
           "copy_GBps", "host", "cpu_isa"]
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
# Rough [N, V]-sized temporaries of a fwd+bwd beyond the two inputs, to skip cases that
# cannot fit (eager: log_p, log_q, exp, grads of log_softmax ...).
EXTRA_TENSORS = {"tike_cuda": 1, "eager": 6, "compile": 3, "liger": 4}

K_SWEEP = [1, 2, 4, 8, 16, 32, 64, 128, 256]


@dataclass(frozen=True)
class Case:
    op: str
    mode: str
    N: int
    V: int
    k: int  # 0 where the op has no k
    dtype: str

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def nbytes(self) -> int:
        elt = torch.empty((), dtype=self.torch_dtype).element_size()
        return PASSES[(self.op, self.mode)] * self.N * self.V * elt + self.store_bytes()

    def store_bytes(self) -> int:
        """Bytes of the sparse store read or written (k + 1 slots: with the sampled token)."""
        if self.op in ("topk_kl_sparse", "sparse_reference"):
            return self.N * (self.k + 1) * 8 + self.N * 4
        return self.N * self.k * 4 if self.op == "topk_indices" else 0


# A grid is (ops, Ns, Vs, ks, dtypes); a preset is grids plus run settings.
PRESETS = {
    "smoke": dict(device="cpu", providers=["tike_cuda", "eager"], repeats=3, warmup=1,
                  grids=[(OPS, [8], [512], [1, 4], ["fp32"])]),
    "cpu": dict(device="cpu", providers=["tike_cuda", "eager", "compile"], repeats=5, warmup=1,
                grids=[(OPS, [256], [151936], [1, 4, 16, 64, 256], ["fp32"])]),
    "gpu": dict(device="cuda", providers=list(PROVIDERS), repeats=20, warmup=3,
                grids=[(["topk_kl"], [16384], [151936], K_SWEEP, ["bf16"]),
                       (OPS, [1024, 4096, 16384, 65536], [32000, 128256, 151936], [16], ["bf16"])]),
    "sparse-cpu": dict(device="cpu", providers=["tike_cuda", "eager"], repeats=5, warmup=1,
                       grids=[(("topk_kl",) + SPARSE_OPS, [256], [151936], [16, 64], ["fp32"])]),
    "sparse-gpu": dict(device="cuda", providers=["tike_cuda", "eager", "compile"], repeats=20,
                       warmup=3, grids=[(("topk_kl",) + SPARSE_OPS, [16384], [151936], [16, 64],
                                         ["bf16"])]),
}


def make_cases(grids, modes) -> List[Case]:
    seen, cases = set(), []
    for ops, Ns, Vs, ks, dtypes in grids:
        for dtype in dtypes:
            for N in Ns:
                for V in Vs:
                    for op in ops:
                        for mode in modes:
                            if mode != "fwd" and op in FWD_ONLY:
                                continue
                            for k in (ks if op in K_OPS else [0]):
                                c = Case(op, mode, N, V, k, dtype)
                                if k <= V and c not in seen:
                                    seen.add(c)
                                    cases.append(c)
    # Grouped by shape so that each input pair is made once.
    return sorted(cases, key=lambda c: (c.dtype, c.N, c.V))


# ----------------------------------------------------------------------------- inputs

@dataclass
class Inputs:
    z: torch.Tensor
    zr: torch.Tensor
    tokens: torch.Tensor
    old_lp: torch.Tensor
    grad_out: torch.Tensor


def make_inputs(N: int, V: int, dtype: torch.dtype, device: torch.device) -> Inputs:
    """z ~ N(0, 2²), zr = z + N(0, 0.5²): a policy close to its reference, as in RL."""
    g = torch.Generator(device=device).manual_seed(0)
    z = torch.empty(N, V, dtype=dtype, device=device)
    zr = torch.empty_like(z)
    step = max(1, (1 << 26) // V)  # float32 temporaries of at most 256 MiB
    for i in range(0, N, step):
        a = torch.randn(min(step, N - i), V, generator=g, device=device) * 2
        z[i:i + step] = a
        zr[i:i + step] = a + 0.5 * torch.randn(a.shape, generator=g, device=device)
    tokens = torch.randint(0, V, (N,), generator=g, device=device)
    old_lp = -2 - torch.rand(N, generator=g, device=device)
    return Inputs(z, zr, tokens, old_lp, torch.ones(N, device=device))


# ----------------------------------------------------------------------------- providers

class Skip(Exception):
    """A provider that cannot run a case; the message says why."""


def _tike_fns():
    try:
        import tike_cuda
        return {"topk_kl": tike_cuda.topk_kl, "full_kl": tike_cuda.full_kl,
                "token_logprobs": tike_cuda.token_logprobs}
    except (ImportError, AttributeError) as e:
        raise Skip(f"tike_cuda ops unavailable ({e})") from e


_COMPILED: Dict[str, Callable] = {}
COMPILE_DYNAMIC = True  # --compile-static sets False


def _compiled_fns():
    # dynamic=True: one graph per (op, mode) for every N, V and k, so a sweep costs a
    # handful of compilations; --compile-static specialises (and recompiles) per shape and k.
    if not _COMPILED:
        cfg = torch._dynamo.config
        # One graph per (shape, k): allow the whole sweep without falling back to eager.
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(cfg, name):
                setattr(cfg, name, max(getattr(cfg, name), 256))
        for op in OPS:
            _COMPILED[op] = torch.compile(getattr(eager, op), dynamic=COMPILE_DYNAMIC)
    return _COMPILED


def _liger_fn(case: Case, device: torch.device):
    if device.type != "cuda":
        raise Skip("liger: Triton kernels, CUDA only")
    try:
        from liger_kernel.transformers import LigerCrossEntropyLoss, LigerKLDIVLoss
    except ImportError as e:
        raise Skip(f"liger: liger_kernel not importable ({e})") from e
    if case.op == "token_logprobs":
        ce = LigerCrossEntropyLoss(reduction="none")
        return lambda z, zr, inp: -ce(z, inp.tokens)
    if case.op == "full_kl":
        # Closest Liger kernel: KLDivLoss on log-probs from an eager log_softmax. It
        # differentiates its first argument only, so this is KL(q || p) — same traffic
        # class as full_kl, not the same gradient.
        kl = LigerKLDIVLoss(reduction="none", log_target=True)
        return lambda z, zr, inp: kl(torch.log_softmax(z, -1),
                                     torch.log_softmax(zr, -1)).sum(-1)
    raise Skip("liger: no Liger kernel computes a top-k KL")


def _compiled(name: str) -> Callable:
    if name not in _COMPILED:
        _compiled_fns()
        _COMPILED[name] = torch.compile(getattr(eager, name), dynamic=COMPILE_DYNAMIC)
    return _COMPILED[name]


def _sparse_fwd(provider: str, case: Case, inp: Inputs) -> Callable:
    """fwd(z, zr, inp) of a sparse-mode op. The rollout's support and the stored reference
    are made here, once, outside the timed calls."""
    import tike_cuda
    k = case.k
    if provider not in ("tike_cuda", "eager", "compile"):
        raise Skip(f"{provider}: no {case.op}")
    fns = {"tike_cuda": lambda name: getattr(tike_cuda, name), "eager": lambda name: getattr(eager, name),
           "compile": _compiled}[provider]
    if case.op == "topk_indices":
        f = fns("topk_indices")
        return lambda z, zr, i: f(z, k)
    support = tike_cuda.topk_indices(inp.z, k)
    if case.op == "sparse_reference":
        f = fns("sparse_reference")
        return lambda z, zr, i: f(zr, support, sampled_tokens=i.tokens)
    sref = tike_cuda.sparse_reference(inp.zr, support, sampled_tokens=inp.tokens)
    if provider == "tike_cuda":
        return lambda z, zr, i: tike_cuda.topk_kl(z, sref, sampled_tokens=i.tokens,
                                                  old_logprobs=i.old_lp)
    f = fns("topk_kl_sparse")
    return lambda z, zr, i: f(z, sref.idx, sref.logprobs, sampled_tokens=i.tokens,
                              old_logprobs=i.old_lp)


def build_call(provider: str, case: Case, inp: Inputs, device: torch.device) -> Callable:
    """A no-argument callable running one forward (and backward) of `case`."""
    k = case.k
    if case.op in SPARSE_OPS:
        fwd = _sparse_fwd(provider, case, inp)
    elif provider in ("tike_cuda", "eager", "compile"):
        fns = {"tike_cuda": _tike_fns, "eager": lambda: {o: getattr(eager, o) for o in OPS},
               "compile": _compiled_fns}[provider]()
        f = fns[case.op]
        if case.op == "topk_kl":
            fwd = lambda z, zr, i: f(z, zr, k, sampled_tokens=i.tokens, old_logprobs=i.old_lp)
        elif case.op == "full_kl":
            fwd = lambda z, zr, i: f(z, zr)
        else:
            fwd = lambda z, zr, i: f(z, i.tokens)
    elif provider == "liger":
        fwd = _liger_fn(case, device)
    else:
        raise Skip(f"unknown provider {provider!r}")

    z = inp.z
    if provider == "liger" and case.mode == "fwdbwd":
        z = z.clone()  # Liger writes the gradient into the logits buffer
    if case.mode == "fwd":
        def call():
            with torch.no_grad():
                return fwd(z, inp.zr, inp)
        return call
    leaf = z.detach().requires_grad_(True)

    def call():
        out = fwd(leaf, inp.zr, inp)
        return torch.autograd.grad(out, leaf, inp.grad_out)[0]
    return call


# ----------------------------------------------------------------------------- measuring

def copy_bandwidth(timer: Timer, nbytes: int) -> float:
    """Read + write bytes per second of dst.copy_(src), median of 10."""
    src = torch.ones(nbytes, dtype=torch.uint8, device=timer.device)
    dst = torch.zeros_like(src)
    ts = timer.times_ms(lambda: dst.copy_(src), warmup=2, repeats=10)
    return 2 * nbytes / (percentile(ts, 0.5) * 1e-3)


def available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        return proc_status_kib("MemAvailable", "/proc/meminfo") * 1024
    except OSError:
        return 1 << 62


def environment(device: torch.device) -> Dict[str, str]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"date": datetime.date.today().isoformat(), "torch": torch.__version__,
            "cuda": torch.version.cuda or "",
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "",
            "host": f"{cpu} ({torch.get_num_threads()} threads)", "cpu_isa": _cpu_isa()}


def _cpu_isa() -> str:
    """The CPU kernels' instruction-set path (set TIKE_CPU_ISA before the run to force one)."""
    try:
        import tike_cuda
        return tike_cuda.cpu_isa()
    except (ImportError, AttributeError):
        return ""


# ----------------------------------------------------------------------------- driver

def run(cases: List[Case], providers: List[str], device: torch.device, warmup: int,
        repeats: int, progress: bool = True) -> Tuple[List[dict], List[str]]:
    """Measures every (case, provider); returns CSV rows and notes on what was skipped."""
    timer = Timer(device)
    env = environment(device)
    copy_bytes = (2 << 30) if device.type == "cuda" else (512 << 20)
    copy_bytes = min(copy_bytes, available_bytes(device) // 8)
    copy_bw = copy_bandwidth(timer, copy_bytes)
    budget = available_bytes(device)
    rows, notes = [], []
    inp, inp_key = None, None
    bar = _progress(len(cases) * len(providers), progress)
    for case in cases:
        key = (case.N, case.V, case.dtype)
        elt = torch.empty((), dtype=case.torch_dtype).element_size()
        nv = case.N * case.V * elt
        for provider in providers:
            bar.set_description(f"{case.op} {case.mode} N={case.N} V={case.V} k={case.k} {provider}")
            bar.update(1)
            if (2 + EXTRA_TENSORS[provider]) * nv > 0.85 * budget:
                notes.append(f"skip {provider} {case}: would not fit in memory")
                continue
            if inp_key != key:
                inp = None  # free the previous shape first
                gc.collect()
                inp, inp_key = make_inputs(case.N, case.V, case.torch_dtype, device), key
            try:
                fn = build_call(provider, case, inp, device)
                ts = timer.times_ms(fn, warmup, repeats)
                mem = peak_extra_mib(fn, device)
            except Skip as e:
                notes.append(f"skip {provider} {case.op}: {e}")
                continue
            except (RuntimeError, ValueError, TypeError) as e:  # e.g. out of memory
                notes.append(f"error {provider} {case}: {type(e).__name__}: {str(e)[:200]}")
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            p50 = percentile(ts, 0.5)
            floor_ms = case.nbytes() / copy_bw * 1e3
            rows.append({"op": case.op, "provider": provider, "mode": case.mode, "N": case.N,
                         "V": case.V, "k": case.k, "dtype": case.dtype, "device": device.type,
                         "p50_ms": p50, "p20_ms": percentile(ts, 0.2),
                         "p80_ms": percentile(ts, 0.8), "GBps": case.nbytes() / p50 / 1e6,
                         "floor_frac": floor_ms / p50, "peak_extra_MiB": mem,
                         **env, "copy_GBps": copy_bw / 1e9})
    bar.close()
    return rows, sorted(set(notes), key=notes.index)


def _progress(total: int, enabled: bool):
    return progress(total=total, enabled=enabled)


def write_csv(rows: List[dict], path: Path) -> None:
    report.write_csv(rows, path, columns=COLUMNS, float_format=".6g")


def markdown_table(rows: List[dict]) -> str:
    """The results as a Markdown table, with each time's ratio to the tike_cuda time."""
    ref = {(r["op"], r["mode"], r["N"], r["V"], r["k"], r["dtype"]): r["p50_ms"]
           for r in rows if r["provider"] == "tike_cuda"}
    out = ["| op | mode | N | V | k | dtype | provider | p50 ms (p20–p80) | × tike_cuda "
           "| GB/s | floor frac | peak extra MiB |", "|" + "---|" * 12]
    for r in rows:
        base = ref.get((r["op"], r["mode"], r["N"], r["V"], r["k"], r["dtype"]))
        ratio = f"{r['p50_ms'] / base:.2f}" if base else "—"
        out.append(f"| {r['op']} | {r['mode']} | {r['N']} | {r['V']} | {r['k'] or '—'} "
                   f"| {r['dtype']} | {r['provider']} | {r['p50_ms']:.2f} ({r['p20_ms']:.2f}–"
                   f"{r['p80_ms']:.2f}) | {ratio} | {r['GBps']:.1f} | {r['floor_frac']:.3f} "
                   f"| {r['peak_extra_MiB']:.0f} |")
    return "\n".join(out)


def sparse_summary(rows: List[dict]) -> str:
    """The update-time pass on the stored reference against dense topk_kl (tike_cuda both):
    time, bytes moved, and the store's size per token."""
    dense = {(r["mode"], r["N"], r["V"], r["k"], r["dtype"]): r for r in rows
             if r["op"] == "topk_kl" and r["provider"] == "tike_cuda"}
    out = ["| mode | N | V | k | dtype | dense ms | sparse ms | time ratio | dense MB "
           "| sparse MB | store B/token |", "|" + "---|" * 11]
    for r in rows:
        key = (r["mode"], r["N"], r["V"], r["k"], r["dtype"])
        if r["op"] != "topk_kl_sparse" or r["provider"] != "tike_cuda" or key not in dense:
            continue
        d = dense[key]
        sparse_case = Case("topk_kl_sparse", *key)
        dense_case = Case("topk_kl", *key)
        out.append(f"| {r['mode']} | {r['N']} | {r['V']} | {r['k']} | {r['dtype']} "
                   f"| {d['p50_ms']:.2f} | {r['p50_ms']:.2f} | {r['p50_ms'] / d['p50_ms']:.2f} "
                   f"| {dense_case.nbytes() / 1e6:.0f} | {sparse_case.nbytes() / 1e6:.0f} "
                   f"| {sparse_case.store_bytes() // r['N']} |")
    return "\n".join(out) if len(out) > 2 else ""


def _csv_list(s: Optional[str], cast=str) -> Optional[list]:
    return None if s is None else [cast(x) for x in s.split(",") if x.strip()]


def parse_args(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tike_cuda bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="shape set and settings (default: gpu when CUDA is available, else cpu)")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: the preset's")
    p.add_argument("--ops", help=f"comma list of {','.join(ALL_OPS)}")
    p.add_argument("--providers", help=f"comma list of {','.join(PROVIDERS)}")
    p.add_argument("--modes", default="fwd,fwdbwd", help="comma list of fwd,fwdbwd")
    p.add_argument("--N", help="rows, comma list (replaces the preset's shapes)")
    p.add_argument("--V", help="vocabulary sizes, comma list")
    p.add_argument("--k", help="top-k values, comma list")
    p.add_argument("--dtype", help="fp32,bf16,fp16")
    p.add_argument("--repeats", type=int)
    p.add_argument("--warmup", type=int)
    p.add_argument("--threads", type=int, help="torch.set_num_threads on CPU")
    p.add_argument("--compile-static", action="store_true",
                   help="torch.compile with dynamic=False (a compilation per shape and k) "
                        "instead of one dynamic-shape graph per op and mode")
    p.add_argument("--out", default="bench_out", help="directory for results.csv and plots")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    preset = PRESETS[a.preset or ("gpu" if torch.cuda.is_available() else "cpu")]
    device = torch.device(a.device or preset["device"])
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench: --device cuda but no CUDA device is visible", file=sys.stderr)
        return 2
    if a.threads:
        torch.set_num_threads(a.threads)
    global COMPILE_DYNAMIC
    COMPILE_DYNAMIC = not a.compile_static
    _COMPILED.clear()
    ops = _csv_list(a.ops) or list(OPS)
    if a.ops is None and a.preset is not None and a.preset.startswith("sparse"):
        ops = ["topk_kl", *SPARSE_OPS]  # the dense op beside the sparse ones
    modes = _csv_list(a.modes)
    providers = _csv_list(a.providers) or preset["providers"]
    for name, given, allowed in (("op", ops, ALL_OPS), ("mode", modes, MODES),
                                 ("provider", providers, PROVIDERS)):
        bad = [x for x in given if x not in allowed]
        if bad:
            print(f"bench: unknown {name} {bad}; choose from {list(allowed)}", file=sys.stderr)
            return 2
    bad = [d for d in (_csv_list(a.dtype) or []) if d not in DTYPES]
    if bad:
        print(f"bench: unknown dtype {bad}; choose from {sorted(DTYPES)}", file=sys.stderr)
        return 2
    if any(x is not None for x in (a.N, a.V, a.k, a.dtype)):
        g0 = preset["grids"][-1]
        grids = [(ops, _csv_list(a.N, int) or g0[1], _csv_list(a.V, int) or g0[2],
                  _csv_list(a.k, int) or g0[3], _csv_list(a.dtype) or g0[4])]
    else:
        grids = [([o for o in g[0] if o in ops],) + tuple(g[1:]) for g in preset["grids"]]
    cases = make_cases(grids, modes)
    rows, notes = run(cases, providers, device, a.warmup if a.warmup is not None else preset["warmup"],
                      a.repeats or preset["repeats"], progress=not a.no_progress)

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out / "results.csv")
    (out / "notes.txt").write_text("\n".join(notes) + ("\n" if notes else ""))
    print(markdown_table(rows))
    summary = sparse_summary(rows)
    if summary:
        print("\nUpdate-time pass on the stored reference vs dense topk_kl (tike_cuda):")
        print(summary)
    if rows:
        print(f"\ncopy bandwidth {rows[0]['copy_GBps']:.1f} GB/s; {rows[0]['host']}; "
              f"tike_cuda CPU path {rows[0]['cpu_isa'] or '?'}; "
              f"torch {rows[0]['torch']}")
    for n in notes:
        print("note:", n)
    if not a.no_plot and rows:
        from .bench_plot import plot_csv
        for path in plot_csv(out / "results.csv", out):
            print("wrote", path)
    print("wrote", out / "results.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
