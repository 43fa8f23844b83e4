"""tike-cuda command line: demo, audit, variance, synth and bench.

    tike-cuda demo                          # estimators vs exact KL at V = 151,936, speed, memory
    tike-cuda audit run.pt --out audit/     # paper Table 2 and Table 7 on your logits
    tike-cuda variance p1.pt p2.pt --out var/   # paper Figure 4 (bootstrap over sequences)
    tike-cuda synth seqs.pt --seqs 64 --seq-len 32 --vocab 32000   # a synthetic input file
    tike-cuda bench ...                     # the benchmark harness (tike_cuda.bench)

This module only parses arguments and dispatches; the work is done by tike_cuda.demo,
.diagnostics, .variance, .io and .synthetic. A failure is one ``error:`` line on stderr
(naming the file and what to do) and exit status 2, never a traceback. File keys are
described in :mod:`tike_cuda.io`.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

__all__ = ["main"]

DEFAULT_K = 16
DEFAULT_KS = (16, 64, 256)


class CliError(Exception):
    """A failure to report as one line."""


def _device(name: str) -> str:
    import torch
    if name != "auto":
        return name
    import tike_cuda
    return "cuda" if tike_cuda.built_with_cuda() and torch.cuda.is_available() else "cpu"


def _add_common(p):
    p.add_argument("--k", type=int, default=None, help=f"top-k size (default {DEFAULT_K})")
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
    d.add_argument("--k", type=int, default=DEFAULT_K)
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
    a.add_argument("--ks", default=None,
                   help="k values of the sweep (Table 7; default 16,64,256, those above the "
                        "vocabulary size skipped)")
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
    m = sub.add_parser("_memprobe")  # internal: one measurement in a fresh process (demo)
    m.add_argument("--data", required=True)
    m.add_argument("--method", required=True)
    m.add_argument("--k", type=int, default=DEFAULT_K)
    return ap


def _one_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":
        # forwarded untouched so the harness owns its flags (and --help)
        from . import bench
        return bench.main(argv[1:]) or 0
    args = _parser().parse_args(argv)
    prog = f"tike-cuda {args.command}"

    def show(message, category, filename, lineno, file=None, line=None):
        print(f"{prog}: warning: {message}", file=sys.stderr)

    try:
        with warnings.catch_warnings():
            warnings.showwarning = show
            return {"demo": _demo, "_memprobe": _memprobe, "audit": _audit,
                    "variance": _variance, "synth": _synth}[args.command](args)
    except (CliError, ValueError, TypeError, RuntimeError, OSError) as err:
        print(f"{prog}: error: {_one_line(err)}", file=sys.stderr)
        return 2


def _note(args, text: str) -> None:
    print(f"tike-cuda {args.command}: note: {text}", file=sys.stderr)


def _on_file(path, fn, *a, **kw):
    """fn(*a, **kw), with any failure reported as one line naming the file."""
    try:
        return fn(*a, **kw)
    except (ValueError, TypeError, RuntimeError) as err:
        text = _one_line(err)
        raise CliError(text if text.startswith(str(path)) else f"{path}: {text}") from err


def _k_for(args, path, V: int) -> int:
    """--k for a file of vocabulary V: the default is clipped to V with a note; a k the
    user gave that exceeds V is an error."""
    if args.k is None:
        if DEFAULT_K > V:
            _note(args, f"{path}: V = {V} is below the default k = {DEFAULT_K}: using k = {V}")
        return min(DEFAULT_K, V)
    if not 1 <= args.k <= V:
        raise CliError(f"{path}: --k {args.k} is outside [1, V = {V}]: pass --k between 1 and {V}")
    return args.k


def _ks_for(args, path, V: int) -> list:
    """--ks for a file of vocabulary V: default k's above V are skipped with a note; k's
    the user gave must lie in [1, V]."""
    if args.ks is None:
        ks = [k for k in DEFAULT_KS if k <= V] or [V]
        if len(ks) < len(DEFAULT_KS):
            skipped = ", ".join(str(k) for k in DEFAULT_KS if k > V)
            _note(args, f"{path}: V = {V}, so the default --ks sweep skips k = {skipped}")
        return ks
    try:
        ks = [int(x) for x in args.ks.split(",") if x.strip()]
    except ValueError:
        raise CliError(f"--ks must be comma-separated integers, got {args.ks!r}") from None
    bad = [k for k in ks if not 1 <= k <= V]
    if bad or not ks:
        raise CliError(f"{path}: --ks {args.ks} has k's outside [1, V = {V}]: pass k's between "
                       f"1 and {V}")
    return ks


def _out_dir(args, default):
    out = Path(args.out or default)
    out.mkdir(parents=True, exist_ok=True)
    return out


def _audit(args) -> int:
    from .diagnostics import (audit_from_diagnostics, k_sweep_table, markdown_table,
                              plot_audit, token_diagnostics, write_csv)
    from .io import load_logits
    out = _out_dir(args, "tike_audit")
    device = _device(args.device)
    report, stems, figures = [], set(), False
    for i, f in enumerate(args.files):
        d = load_logits(f)
        V = d["logits"].shape[-1]
        k, ks = _k_for(args, f, V), _ks_for(args, f, V)
        common = dict(mask=d.get("mask"), temperature=args.temperature,
                      chunk_rows=args.chunk_rows, device=device, progress=not args.quiet)
        diag = _on_file(f, token_diagnostics, d["logits"], d["ref_logits"], k, **common)
        table = audit_from_diagnostics(diag, args.hi, args.lo)
        sweep = _on_file(f, k_sweep_table, d["logits"], d["ref_logits"], ks, **common)
        stem = Path(f).stem if Path(f).stem not in stems else f"{Path(f).stem}_{i}"
        stems.add(stem)
        write_csv(table, out / f"{stem}_audit.csv")
        write_csv(sweep, out / f"{stem}_ksweep.csv")
        figures = plot_audit(diag, out / f"{stem}_audit.png", stem) is not None
        text = (f"## {f}\n\n{len(diag.topk_mass)} positions, V = {V}\n\n"
                f"Truncation residual by top-{k} coverage (paper Table 2):\n\n"
                f"{markdown_table(table)}\n\nResidual vs k (paper Table 7):\n\n"
                f"{markdown_table(sweep)}\n")
        print(text)
        report.append(text)
    (out / "audit.md").write_text("# Top-k coverage audit\n\n" + "\n".join(report))
    print(f"wrote {out}/audit.md, *_audit.csv, *_ksweep.csv{', *_audit.png' if figures else ''}")
    return 0


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
        k = _k_for(args, f, d["logits"].shape[-1])
        label = Path(f).stem if Path(f).stem not in panels else f"{Path(f).stem}_{i}"
        est = _on_file(f, sequence_estimates, d["logits"], d["ref_logits"], d["tokens"],
                       seq_id=d.get("seq_id"), old_logprobs=d.get("old_logprobs"),
                       mask=d.get("mask"), k=k, temperature=args.temperature,
                       chunk_rows=args.chunk_rows, device=device, progress=not args.quiet)
        n = len(next(iter(est.values())))
        write_csv([{"seq": i, **{k: float(v[i]) for k, v in est.items()}} for i in range(n)],
                  out / f"{label}_sequences.csv")
        rows = _on_file(f, bootstrap, est, log_spaced(n, args.num_m), args.boot, args.seed)
        panels[label] = rows
        last = [r for r in rows if r["M"] == rows[-1]["M"]]
        print(f"## {f}: {n} sequences; bootstrap B = {args.boot}, M = {rows[-1]['M']}\n")
        print(markdown_table(last) + "\n")
    write_bootstrap_csv(panels, out / "bootstrap.csv")
    figure = plot_bootstrap(panels, out / "variance.png")
    print(f"wrote {out}/bootstrap.csv{f', {figure}' if figure else ''} and per-file "
          "*_sequences.csv")
    return 0


def _synth(args) -> int:
    from .demo import DTYPES
    from .io import save_logits
    from .synthetic import synthetic_batch, synthetic_sequences
    if args.rows:
        d = synthetic_batch(args.rows, args.vocab, seed=args.seed, dtype=DTYPES[args.dtype])
    else:
        d = synthetic_sequences(args.seqs, args.seq_len, args.vocab, seed=args.seed,
                                dtype=DTYPES[args.dtype])
    path = save_logits(args.path, **d)
    print(f"wrote {path}: " + ", ".join(f"{k} {tuple(t.shape)}" for k, t in d.items()))
    return 0


def _demo(args) -> int:
    from . import demo
    demo.run(rows=args.rows, vocab=args.vocab, k=args.k, seed=args.seed, dtype=args.dtype,
             device=_device(args.device), repeats=args.repeats, perf=not args.no_perf,
             memory=not args.no_memory)
    return 0


def _memprobe(args) -> int:
    import json
    from . import demo
    print(json.dumps({"extra_mib": demo.memprobe(args.data, args.method, args.k)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
