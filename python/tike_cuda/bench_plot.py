"""Plots of a benchmark CSV (python/tike_cuda/bench.py): time and peak extra memory
against k on log-log axes, one line per provider, like the paper's Figure 5; and time
against N for the other sweeps. The dashed line is the byte floor (p50 · floor_frac).

    python -m tike_cuda.bench_plot bench_out/results.csv [out_dir]
"""
from __future__ import annotations

import csv
import math
import sys
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Tuple

STYLE = {"tike_cuda": ("C0", "o"), "eager": ("C1", "s"), "compile": ("C2", "^"),
         "liger": ("C3", "D")}


def read_rows(path) -> List[dict]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for c in ("N", "V", "k"):
            r[c] = int(r[c])
        for c in ("p50_ms", "p20_ms", "p80_ms", "floor_frac", "peak_extra_MiB"):
            r[c] = float(r[c]) if r[c] not in ("", None) else math.nan
    return rows


def _series(rows: List[dict], x: str) -> Dict[str, List[Tuple]]:
    by: Dict[str, List[Tuple]] = defaultdict(list)
    for r in rows:
        by[r["provider"]].append((r[x], r["p50_ms"], r["p20_ms"], r["p80_ms"], r["peak_extra_MiB"],
                                  r["p50_ms"] * r["floor_frac"]))
    return {p: sorted(v) for p, v in by.items()}


def _figure(rows: List[dict], x: str, title: str, path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    floor = {}
    for prov, pts in _series(rows, x).items():
        color, marker = STYLE.get(prov, ("C7", "x"))
        xs = [p[0] for p in pts]
        p50 = [p[1] for p in pts]
        err = [[p[1] - p[2] for p in pts], [p[3] - p[1] for p in pts]]
        ax_t.errorbar(xs, p50, yerr=err, color=color, marker=marker, capsize=2, label=prov)
        mem = [(p[0], p[4]) for p in pts if p[4] > 0]  # a log axis cannot show 0 or NaN
        if mem:
            ax_m.plot(*zip(*mem), color=color, marker=marker, label=prov)
        floor.update({p[0]: p[5] for p in pts})
    if floor:
        fx = sorted(floor)
        ax_t.plot(fx, [floor[v] for v in fx], "k--", lw=1, label="byte floor")
    # At least a decade per axis, so near-constant series do not get hair-splitting ticks.
    for ax in (ax_t, ax_m):
        ys = [y for line in ax.lines for y in line.get_ydata() if y > 0]
        if ys:
            ax.set_ylim(min(ys) / 2, max(ys) * 2)
    for ax, ylab in ((ax_t, "time, ms (p50; bars p20–p80)"),
                     (ax_m, "peak extra memory, MiB (0 not drawn)")):
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.set_yscale("log")
        ax.set_xlabel(x)
        ax.set_ylabel(ylab)
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    if not ax_m.lines:
        ax_m.text(0.5, 0.5, "no extra memory measured", ha="center", transform=ax_m.transAxes)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_csv(csv_path, out_dir) -> List[Path]:
    """Writes one PNG per sweep with more than one point; returns their paths."""
    rows = read_rows(csv_path)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    groups: Dict[Tuple, List[dict]] = defaultdict(list)
    for r in rows:
        if r["op"] == "topk_kl":  # k sweep at a fixed shape
            groups[("k", r["op"], r["mode"], r["N"], r["V"], r["dtype"], r["device"])].append(r)
        # N sweep at a fixed V and k
        groups[("N", r["op"], r["mode"], r["V"], r["k"], r["dtype"], r["device"])].append(r)
    for key, rs in groups.items():
        x = key[0]
        if len({r[x] for r in rs}) < 2:
            continue
        if x == "k":
            _, op, mode, N, V, dtype, dev = key
            name = f"{op}_{mode}_N{N}_V{V}_{dtype}_{dev}_vs_k.png"
            title = f"{op} {mode}, N={N}, V={V}, {dtype}, {dev}"
        else:
            _, op, mode, V, k, dtype, dev = key
            name = f"{op}_{mode}_V{V}" + (f"_k{k}" if k else "") + f"_{dtype}_{dev}_vs_N.png"
            title = f"{op} {mode}, V={V}" + (f", k={k}" if k else "") + f", {dtype}, {dev}"
        written.append(_figure(rs, x, title, out_dir / name))
    return written


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    for p in plot_csv(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else Path(sys.argv[1]).parent):
        print("wrote", p)
