"""tike-cuda command line: demo, audit, variance, synth and bench.

    tike-cuda demo                          # estimators vs exact KL at V = 151,936, speed, memory
    tike-cuda audit run.pt --out audit/     # paper Table 2 and Table 7 on your logits
    tike-cuda variance p1.pt p2.pt --out var/   # paper Figure 4 (bootstrap over sequences)
    tike-cuda synth seqs.pt --seqs 64 --seq-len 32 --vocab 32000   # a synthetic input file
    tike-cuda bench ...                     # the benchmark harness (tike_cuda.bench)

File keys are described in :mod:`tike_cuda.io`.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["main"]


def _device(name: str) -> str:
    import torch
    if name != "auto":
        return name
    import tike_cuda
    with_cuda = getattr(tike_cuda, "built_with_cuda", lambda: False)()
    return "cuda" if with_cuda and torch.cuda.is_available() else "cpu"


def _dtype(name: str):
    import torch
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _add_common(p):
    p.add_argument("--k", type=int, default=16, help="top-k size (default 16)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    p.add_argument("--chunk-rows", type=int, default=None,
                   help="positions per chunk (default: ~256 MiB of logits per chunk)")
    p.add_argument("--out", default=None, help="output folder (default: tike_<command>)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _parser():
    ap = argparse.ArgumentParser(prog="tike-cuda", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = sub.add_parser("demo", help="estimators vs exact KL, coverage, time and memory on "
                                    "synthetic LM-like logits")
    d.add_argument("--rows", type=int, default=256, help="token positions (default 256)")
    d.add_argument("--vocab", type=int, default=151_936, help="vocabulary size (default 151936)")
    d.add_argument("--k", type=int, default=16)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    d.add_argument("--device", default="auto")
    d.add_argument("--repeats", type=int, default=None, help="timed repeats (default 3 CPU, 20 GPU)")
    d.add_argument("--no-perf", action="store_true", help="skip the time/memory section")
    d.add_argument("--no-memory", action="store_true",
                   help="skip the CPU peak-memory subprocesses (each costs a torch import)")

    a = sub.add_parser("audit", help="top-k coverage and truncation residual (paper Tables 2, 7)")
    a.add_argument("files", nargs="+", help=".pt / .safetensors / .npz logits files")
    _add_common(a)
    a.add_argument("--ks", default="16,64,256", help="k values of the sweep (Table 7)")
    a.add_argument("--hi", type=float, default=0.99, help="high-coverage threshold")
    a.add_argument("--lo", type=float, default=0.90, help="low-coverage threshold")

    v = sub.add_parser("variance", help="bootstrap bias/variance of sequence-level estimators "
                                        "(paper Figure 4)")
    v.add_argument("files", nargs="+", help="one file per prompt: a panel each")
    _add_common(v)
    v.add_argument("--boot", type=int, default=1000, help="bootstrap resamples B (default 1000)")
    v.add_argument("--num-m", type=int, default=12, help="number of log-spaced sample sizes M")
    v.add_argument("--seed", type=int, default=0)

    s = sub.add_parser("synth", help="write a synthetic logits file for audit/variance")
    s.add_argument("path", help="output .pt / .safetensors / .npz")
    s.add_argument("--rows", type=int, default=None, help="independent positions")
    s.add_argument("--seqs", type=int, default=64, help="sequences (when --rows is not given)")
    s.add_argument("--seq-len", type=int, default=32)
    s.add_argument("--vocab", type=int, default=32_000)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])

    sub.add_parser("bench", help="benchmarks (all further arguments go to tike_cuda.bench)",
                   add_help=False)
    m = sub.add_parser("_memprobe")  # internal: one measurement in a fresh process
    m.add_argument("--data", required=True)
    m.add_argument("--method", required=True)
    m.add_argument("--k", type=int, default=16)
    return ap


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":
        # forwarded untouched so the harness owns its flags (and --help)
        from . import bench
        return bench.main(argv[1:]) or 0
    args = _parser().parse_args(argv)
    try:
        return {"demo": _demo, "_memprobe": _memprobe, "audit": _audit, "variance": _variance,
                "synth": _synth}[args.command](args)
    except ValueError as err:
        print(f"tike-cuda {args.command}: error: {err}", file=sys.stderr)
        return 2


def _out_dir(args, default):
    out = Path(args.out or default)
    out.mkdir(parents=True, exist_ok=True)
    return out


def _audit(args) -> int:
    from .diagnostics import (audit_from_diagnostics, k_sweep_table, markdown_table,
                              token_diagnostics, write_csv)
    from .io import load_logits
    ks = [int(x) for x in args.ks.split(",") if x.strip()]
    out = _out_dir(args, "tike_audit")
    device = _device(args.device)
    report, stems = [], set()
    for i, f in enumerate(args.files):
        d = load_logits(f)
        common = dict(mask=d.get("mask"), temperature=args.temperature,
                      chunk_rows=args.chunk_rows, device=device, progress=not args.quiet)
        diag = token_diagnostics(d["logits"], d["ref_logits"], args.k, **common)
        table = audit_from_diagnostics(diag, args.hi, args.lo)
        sweep = k_sweep_table(d["logits"], d["ref_logits"], ks, **common)
        stem = Path(f).stem if Path(f).stem not in stems else f"{Path(f).stem}_{i}"
        stems.add(stem)
        write_csv(table, out / f"{stem}_audit.csv")
        write_csv(sweep, out / f"{stem}_ksweep.csv")
        _audit_figure(diag, out / f"{stem}_audit.png", stem)
        text = (f"## {f}\n\n{len(diag.topk_mass)} positions, V = {d['logits'].shape[-1]}\n\n"
                f"Truncation residual by top-{args.k} coverage (paper Table 2):\n\n"
                f"{markdown_table(table)}\n\nResidual vs k (paper Table 7):\n\n"
                f"{markdown_table(sweep)}\n")
        print(text)
        report.append(text)
    (out / "audit.md").write_text("# Top-k coverage audit\n\n" + "\n".join(report))
    print(f"wrote {out}/audit.md, *_audit.csv, *_ksweep.csv, *_audit.png")
    return 0


def _audit_figure(diag, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    fig, (a0, a1) = plt.subplots(1, 2, figsize=(9, 3.6))
    a0.hist(diag.topk_mass, bins=50, color="tab:red", alpha=0.8)
    a0.set_xlabel(f"top-{diag.k} mass m_{diag.k}")
    a0.set_ylabel("positions")
    pts = a1.scatter(diag.topk_mass, np.abs(diag.xi_tail) + 1e-12, s=4, alpha=0.4,
                     c=diag.entropy, cmap="viridis")
    fig.colorbar(pts, ax=a1, label="policy entropy (nats)")
    a1.set_yscale("log")
    a1.set_xlabel(f"m_{diag.k}")
    a1.set_ylabel("|xi_tail| = |KL - KL_k|")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _variance(args) -> int:
    from .diagnostics import markdown_table, write_csv
    from .io import load_logits
    from .variance import bootstrap, log_spaced, plot_bootstrap, sequence_estimates, \
        write_bootstrap_csv
    out = _out_dir(args, "tike_variance")
    device = _device(args.device)
    panels = {}
    for i, f in enumerate(args.files):
        d = load_logits(f, required=("logits", "ref_logits", "tokens"))
        label = Path(f).stem if Path(f).stem not in panels else f"{Path(f).stem}_{i}"
        est = sequence_estimates(d["logits"], d["ref_logits"], d["tokens"], seq_id=d.get("seq_id"),
                                 old_logprobs=d.get("old_logprobs"), mask=d.get("mask"), k=args.k,
                                 temperature=args.temperature, chunk_rows=args.chunk_rows,
                                 device=device, progress=not args.quiet)
        n = len(next(iter(est.values())))
        write_csv([{"seq": i, **{k: float(v[i]) for k, v in est.items()}} for i in range(n)],
                  out / f"{label}_sequences.csv")
        rows = bootstrap(est, log_spaced(n, args.num_m), args.boot, args.seed)
        panels[label] = rows
        last = [r for r in rows if r["M"] == rows[-1]["M"]]
        print(f"## {f}: {n} sequences; bootstrap B = {args.boot}, M = {rows[-1]['M']}\n")
        print(markdown_table(last) + "\n")
    write_bootstrap_csv(panels, out / "bootstrap.csv")
    plot_bootstrap(panels, out / "variance.png")
    print(f"wrote {out}/bootstrap.csv, {out}/variance.png and per-file *_sequences.csv")
    return 0


def _synth(args) -> int:
    from .io import save_logits
    from .synthetic import synthetic_batch, synthetic_sequences
    if args.rows:
        d = synthetic_batch(args.rows, args.vocab, seed=args.seed, dtype=_dtype(args.dtype))
    else:
        d = synthetic_sequences(args.seqs, args.seq_len, args.vocab, seed=args.seed,
                                dtype=_dtype(args.dtype))
    path = save_logits(args.path, **d)
    print(f"wrote {path}: " + ", ".join(f"{k} {tuple(t.shape)}" for k, t in d.items()))
    return 0


# ------------------------------------------------------------------------------ demo

def _table(headers, rows):
    cells = [list(headers)] + [[str(c) for c in r] for r in rows]
    w = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for j, r in enumerate(cells):
        print("  " + "  ".join(c.ljust(w[i]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(r)))
        if j == 0:
            print("  " + "  ".join("-" * x for x in w))


def _expected_sampled(z, zr, kinds, chunk=32):
    """Per-row E_{o ~ p}[kl_penalty(log p_o, log q_o, kind)], summed exactly over the
    vocabulary in float64: the sampled estimators' expectation without Monte-Carlo noise."""
    import torch
    from .estimators import kl_penalty
    out = {kind: [] for kind in kinds}
    for s in range(0, z.shape[0], chunk):
        lp = torch.log_softmax(z[s:s + chunk].double(), -1)
        lq = torch.log_softmax(zr[s:s + chunk].double(), -1)
        p = lp.exp()
        for kind in kinds:
            out[kind].append((p * kl_penalty(lp, lq, kind)).sum(-1).cpu())
    return {kind: torch.cat(v) for kind, v in out.items()}


def _demo_accuracy(z, zr, tok, old, k):
    import torch
    import tike_cuda
    from .estimators import ESTIMATORS, SAMPLED_ESTIMATORS, per_token_kl
    with torch.no_grad():
        exact = tike_cuda.full_kl(z, zr).double().cpu()
        _, st = tike_cuda.topk_kl(z, zr, k, return_stats=True)
        _, ent = tike_cuda.token_logprobs(z, tok, return_entropy=True)
        in_topk = (torch.topk(z, k, dim=-1).indices == tok[:, None]).any(-1).double().cpu()
        m = st.topk_mass.double().cpu()
        print(f"\nTop-{k} coverage m_{k} = sum of the policy's top-{k} probabilities:")
        q = torch.quantile(m, torch.tensor([0.05, 0.5], dtype=torch.float64))
        print(f"  mean {m.mean():.4f}  median {q[1]:.4f}  p5 {q[0]:.4f}  "
              f"m >= 0.99: {(m >= 0.99).double().mean():.1%}  m < 0.90: {(m < 0.9).double().mean():.1%}")
        print(f"  sampled token in top-{k}: {in_topk.mean():.1%}  mean policy entropy "
              f"{ent.double().mean():.2f} nats")
        expect = _expected_sampled(z, zr, SAMPLED_ESTIMATORS)
        r_dev = (tike_cuda.token_logprobs(z, tok).double() - old.double()).exp().sub(1).abs()
        r_dev = r_dev.mean().item()
        kl_mean = exact.mean().item()
        rows = []
        for name in ESTIMATORS:
            est = per_token_kl(z, zr, name, sampled_tokens=tok, k=k,
                               old_logprobs=old if name.startswith("tike") else None).double().cpu()
            err = est - exact
            bias = (expect[name] - exact).mean().item() if name in SAMPLED_ESTIMATORS \
                else err.mean().item()
            label = f"{name} (k={k})" if name.startswith("tike") else name
            rows.append([label, f"{est.mean():.3e}", f"{bias:+.2e}", f"{bias / kl_mean:+.1%}",
                         f"{err.std():.2e}", f"{err.abs().max():.2e}"])
    print(f"\nPer-token estimates vs the exact KL (mean exact KL {kl_mean:.3e} per token):")
    _table(["estimator", "mean", "bias", "bias/KL", "spread", "max |err|"], rows)
    print("  bias: mean over positions of E[estimate] - KL; for the sampled-token estimators\n"
          "        E is over o ~ p, summed exactly over the vocabulary (no sampling noise).\n"
          "  spread: std over positions of (estimate - KL) on the drawn tokens; max |err| likewise.\n"
          f"  tike uses the rollout log-probs: importance weight r = exp(log p(o) - old_logprob),\n"
          f"  mean |r - 1| = {r_dev:.1%} here.")


def _timed(fn, x, repeats, cuda):
    import statistics
    import time
    import torch

    def once():
        x.grad = None
        fn(x).sum().backward()
        if cuda:
            torch.cuda.synchronize()

    once()  # warm-up (lazy init, allocator)
    peak = None
    if cuda:
        x.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        once()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        once()
        times.append(time.perf_counter() - t)
    x.grad = None
    return statistics.median(times) * 1e3, peak


def _providers(zr, tok, old, k):
    import tike_cuda
    from . import eager
    from .estimators import kl_penalty, per_token_kl
    return [
        (f"TIKE k={k}", "tike_cuda",
         lambda x: tike_cuda.topk_kl(x, zr, k, sampled_tokens=tok, old_logprobs=old)),
        (f"TIKE k={k}", "eager",
         lambda x: eager.topk_kl(x, zr, k, sampled_tokens=tok, old_logprobs=old)),
        ("exact KL", "tike_cuda", lambda x: tike_cuda.full_kl(x, zr)),
        ("exact KL", "eager", lambda x: eager.full_kl(x, zr)),
        ("k3 (sampled)", "tike_cuda", lambda x: per_token_kl(x, zr, "k3", sampled_tokens=tok)),
        ("k3 (sampled)", "eager", lambda x: kl_penalty(eager.token_logprobs(x, tok),
                                                       eager.token_logprobs(zr, tok), "k3")),
    ]


def _demo_perf(args, z, zr, tok, old, device):
    import torch
    cuda = device.startswith("cuda")
    repeats = args.repeats or (20 if cuda else 3)
    x = z.detach().clone().requires_grad_()
    rows, mem = [], {}
    for op, provider, fn in _providers(zr, tok, old, args.k):
        ms, peak = _timed(fn, x, repeats, cuda)
        rows.append([op, provider, f"{ms:.1f}", "" if peak is None else f"{peak:.0f}"])
        mem[(op, provider)] = peak
    del x
    grad_mib = z.numel() * z.element_size() / 2**20
    if not cuda and not args.no_memory and sys.platform.startswith("linux"):
        rss = _cpu_memprobes(z, zr, tok, old, args.k)
        for r in rows:
            if r[0].startswith("TIKE"):
                r[3] = f"{rss[r[1]]:.0f}"
    print(f"\nForward + backward, {z.shape[0]} x {z.shape[1]:,} {str(z.dtype).replace('torch.', '')}"
          f" on {device} (median of {repeats}; gradient buffer alone {grad_mib:.0f} MiB):")
    _table(["op", "provider", "ms", "peak extra MiB"], rows)
    if cuda:
        print("  peak extra MiB: torch.cuda.max_memory_allocated during one forward+backward\n"
              "  minus the memory allocated before it (inputs excluded, gradient included).")
    elif not args.no_memory and sys.platform.startswith("linux"):
        print("  peak extra MiB (TIKE rows): growth of the resident set over one forward+backward\n"
              "  (peak RSS, VmHWM reset just before, minus the RSS before) in a fresh process\n"
              "  holding only the inputs; includes the gradient buffer.")


def _cpu_memprobes(z, zr, tok, old, k):
    import json
    import os
    import subprocess
    import tempfile
    import torch
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "inputs.pt")
        torch.save({"logits": z.cpu(), "ref_logits": zr.cpu(), "tokens": tok.cpu(),
                    "old_logprobs": old.cpu()}, data)
        procs = {name: subprocess.Popen([sys.executable, "-m", "tike_cuda", "_memprobe",
                                         "--data", data, "--method", name, "--k", str(k)],
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for name in ("tike_cuda", "eager")}
        out = {}
        for name, p in procs.items():
            stdout, stderr = p.communicate()
            if p.returncode:
                raise RuntimeError(f"memory probe {name} failed:\n{stderr}")
            out[name] = json.loads(stdout.strip().splitlines()[-1])["extra_mib"]
    return out


def _vm_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"no {field} in /proc/self/status")


def _memprobe(args) -> int:
    """Peak resident-set growth of one forward+backward, in a process holding only inputs.

    Uses the process's own VmHWM (peak RSS), reset through /proc/self/clear_refs just
    before the run: ru_maxrss cannot be used, it carries the parent's peak across exec.
    """
    import gc
    import json
    import torch
    d = torch.load(args.data, weights_only=True)
    x = d["logits"].requires_grad_()
    zr, tok, old = d["ref_logits"], d["tokens"], d["old_logprobs"]

    def provider(rows):
        sl = slice(None, rows)
        return {p: f for op, p, f in _providers(zr[sl], tok[sl], old[sl], args.k)
                if op.startswith("TIKE")}[args.method]

    small = x.detach()[:2].clone().requires_grad_()
    provider(2)(small).sum().backward()  # page in code and thread pools first
    del small
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    before = _vm_kib("VmRSS")
    provider(None)(x).sum().backward()
    peak = _vm_kib("VmHWM")
    print(json.dumps({"extra_mib": (peak - before) / 1024}))
    return 0


def _demo(args) -> int:
    import time
    import torch
    from .synthetic import synthetic_batch
    t0 = time.perf_counter()
    device, dtype = _device(args.device), _dtype(args.dtype)
    if not 1 <= args.k <= args.vocab:
        raise ValueError(f"--k must be in [1, --vocab], got {args.k}")
    d = synthetic_batch(args.rows, args.vocab, seed=args.seed, dtype=dtype, device=device)
    z, zr, tok, old = d["logits"], d["ref_logits"], d["tokens"], d["old_logprobs"]
    threads = "" if device.startswith("cuda") else f", {torch.get_num_threads()} threads"
    if not device.startswith("cuda"):
        import tike_cuda
        threads += f", CPU path {tike_cuda.cpu_isa()} (TIKE_CPU_ISA; runs {'/'.join(tike_cuda.cpu_isas())})"
    print(f"tike_cuda demo: {args.rows} token positions x V = {args.vocab:,} "
          f"({args.dtype}), k = {args.k}, on {device}{threads}")
    print(f"  synthetic LM-like logits (tike_cuda.synthetic, seed {args.seed}): Zipfian rows of "
          f"varying entropy,\n  reference = perturbed policy, tokens drawn from the policy")
    _demo_accuracy(z, zr, tok, old, args.k)
    if not args.no_perf:
        _demo_perf(args, z, zr, tok, old, device)
    print(f"\ndone in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
